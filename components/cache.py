"""Component of the cache stage: activation shards of one or more LMM layers over an image set."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from mmsae.components import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def cache(
    config_yaml: str,
    parent_run_id: str,
    image_set: Input[Dataset],
    lmm: Input[Model],
    shards: Output[Dataset],
    metrics: Output[Metrics],
):
    """Cache activations (see ``mmsae.stages.cache``); ``shards`` points to the shard artifact's URI."""
    from mmsae.components.metrics import log_figures
    from mmsae.components.pointers import read_pointer, write_pointer
    from mmsae.config import config_from_yaml
    from mmsae.stages import cache as stage

    out = stage.run(
        config_from_yaml(config_yaml),
        image_set=read_pointer(image_set),
        model=read_pointer(lmm),
        parent_run_id=parent_run_id or None,
    )
    write_pointer(shards, out.uri)
    log_figures(metrics, out.figures)
