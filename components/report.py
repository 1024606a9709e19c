"""Component of the report stage: the run's HTML dashboard, shown by the KFP UI as an HTML artifact."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Output

from mmsae.components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def report(
    config_yaml: str,
    parent_run_id: str,
    top_examples: Input[Dataset],
    report: Output[HTML],
    metrics: Output[Metrics],
    explanations: Input[Dataset] | None = None,
    scores: Input[Dataset] | None = None,
    steering: Input[Dataset] | None = None,
    attributions: Input[Dataset] | None = None,
):
    """Render the dashboard (see ``mmsae.stages.report``); ``report`` holds the page itself.

    ``explanations``, ``scores``, ``steering`` and ``attributions`` are optional pointer artifacts of the later
    stages.
    """
    from mmsae import storage
    from mmsae.components.metrics import log_figures
    from mmsae.components.pointers import read_pointer
    from mmsae.config import config_from_yaml
    from mmsae.stages import report as stage

    out = stage.run(
        config_from_yaml(config_yaml),
        top_examples=read_pointer(top_examples),
        explanations=read_pointer(explanations) if explanations is not None else None,
        scores=read_pointer(scores) if scores is not None else None,
        steering=read_pointer(steering) if steering is not None else None,
        attributions=read_pointer(attributions) if attributions is not None else None,
        parent_run_id=parent_run_id or None,
    )
    with open(report.path, "wb") as f:
        f.write(storage.read_bytes(out.uris["index"]))
    report.metadata["uri"] = out.uris["index"]
    log_figures(metrics, out.figures)
