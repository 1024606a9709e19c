"""Component of the train stage: TopK SAEs on the cached activations, through DeepSpeed."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from mmsae.components import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def train(
    config_yaml: str,
    parent_run_id: str,
    shards: Input[Dataset],
    sae: Output[Model],
    metrics: Output[Metrics],
):
    """Train the SAE(s) (see ``mmsae.stages.train``); ``sae`` points to the checkpoint folder."""
    from mmsae.components.metrics import log_figures
    from mmsae.components.pointers import read_pointer, write_pointer
    from mmsae.config import config_from_yaml
    from mmsae.stages import train as stage

    out = stage.run(config_from_yaml(config_yaml), shards=read_pointer(shards), parent_run_id=parent_run_id or None)
    write_pointer(sae, out.uri)
    log_figures(metrics, out.figures)
