"""Component of the mine stage: top images, quantile samples, token maps and heat maps per SAE feature."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from mmsae.components import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def mine(
    config_yaml: str,
    parent_run_id: str,
    shards: Input[Dataset],
    sae: Input[Model],
    top_examples: Output[Dataset],
    metrics: Output[Metrics],
):
    """Mine top examples (see ``mmsae.stages.mine``); ``top_examples`` points to the artifact's URI."""
    from mmsae.components.metrics import log_figures
    from mmsae.components.pointers import read_pointer, write_pointer
    from mmsae.config import config_from_yaml
    from mmsae.stages import mine as stage

    out = stage.run(
        config_from_yaml(config_yaml),
        shards=read_pointer(shards),
        sae=read_pointer(sae),
        parent_run_id=parent_run_id or None,
    )
    write_pointer(top_examples, out.uri)
    log_figures(metrics, out.figures)
