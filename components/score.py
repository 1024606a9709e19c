"""Component of the score stage: IoU, CLIP score, detection and ground truth of the explanations, each beside its
random baseline.

Detection asks the explain stage's explainer: an OpenAI-compatible one reads its API key from the pod's
environment ($OPENAI_API_KEY, from a Kubernetes Secret the pipeline mounts), never from the config.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from mmsae.components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def score(
    config_yaml: str,
    parent_run_id: str,
    explanations: Input[Dataset],
    top_examples: Input[Dataset],
    scores: Output[Dataset],
    metrics: Output[Metrics],
):
    """Score the explanations (see ``mmsae.stages.score``); ``scores`` points to the artifact's URI."""
    from mmsae.components.metrics import log_figures
    from mmsae.components.pointers import read_pointer, write_pointer
    from mmsae.config import config_from_yaml
    from mmsae.stages import score as stage

    out = stage.run(
        config_from_yaml(config_yaml),
        explanations=read_pointer(explanations),
        top_examples=read_pointer(top_examples),
        parent_run_id=parent_run_id or None,
    )
    write_pointer(scores, out.uri)
    log_figures(metrics, out.figures)
