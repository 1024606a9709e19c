"""Component of the steer stage: clamp features while the LMM generates, and measure how its output moves."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from mmsae.components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def steer(
    config_yaml: str,
    parent_run_id: str,
    top_examples: Input[Dataset],
    steering: Output[Dataset],
    metrics: Output[Metrics],
    explanations: Input[Dataset] | None = None,
    attributions: Input[Dataset] | None = None,
):
    """Steer the explained (or attributed) features (see ``mmsae.stages.steer``); ``steering`` points to the
    artifact. ``explanations`` and ``attributions`` are optional pointer artifacts of the explain and attribute
    stages."""
    from mmsae.components.metrics import log_figures
    from mmsae.components.pointers import read_pointer, write_pointer
    from mmsae.config import config_from_yaml
    from mmsae.stages import steer as stage

    out = stage.run(
        config_from_yaml(config_yaml),
        top_examples=read_pointer(top_examples),
        explanations=read_pointer(explanations) if explanations is not None else None,
        attributions=read_pointer(attributions) if attributions is not None else None,
        parent_run_id=parent_run_id or None,
    )
    write_pointer(steering, out.uri)
    log_figures(metrics, out.figures)
