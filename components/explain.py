"""Component of the explain stage: a short description of each selected feature, from its masked top images.

The API key of an OpenAI-compatible explainer reaches the pod through its environment ($OPENAI_API_KEY, from
a Kubernetes Secret the pipeline mounts), never through the config or an artifact.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from mmsae.components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def explain(
    config_yaml: str,
    parent_run_id: str,
    top_examples: Input[Dataset],
    explanations: Output[Dataset],
    metrics: Output[Metrics],
):
    """Explain the selected features (see ``mmsae.stages.explain``); ``explanations`` points to the
    artifact."""
    from mmsae.components.metrics import log_figures
    from mmsae.components.pointers import read_pointer, write_pointer
    from mmsae.config import config_from_yaml
    from mmsae.stages import explain as stage

    out = stage.run(
        config_from_yaml(config_yaml),
        top_examples=read_pointer(top_examples),
        parent_run_id=parent_run_id or None,
    )
    write_pointer(explanations, out.uri)
    log_figures(metrics, out.figures)
