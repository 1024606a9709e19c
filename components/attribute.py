"""Component of the attribute stage: the SAE features behind an answer token, from one forward and one backward
pass per batch of examples."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from mmsae.components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def attribute(
    config_yaml: str,
    parent_run_id: str,
    top_examples: Input[Dataset],
    attributions: Output[Dataset],
    metrics: Output[Metrics],
):
    """Attribute the examples' answers (see ``mmsae.stages.attribute``); ``attributions`` points to the artifact."""
    from mmsae.components.metrics import log_figures
    from mmsae.components.pointers import read_pointer, write_pointer
    from mmsae.config import config_from_yaml
    from mmsae.stages import attribute as stage

    out = stage.run(
        config_from_yaml(config_yaml),
        top_examples=read_pointer(top_examples),
        parent_run_id=parent_run_id or None,
    )
    write_pointer(attributions, out.uri)
    log_figures(metrics, out.figures)
