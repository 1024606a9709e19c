"""Component of the train stage: TopK SAEs on the cached activations, through DeepSpeed, on every GPU given.

Where the ranks run is `mmsae.launch`'s choice: in-process on one GPU or the CPU, one rank per GPU of the
step's pod under torchrun, or a Kubeflow Trainer TrainJob when ``train.nodes > 1``. The TrainJob gets the
step's own settings through KFP's task-config passthroughs: resources (per node), env (ConfigMap and Secret
references by name), tolerations, node selector, affinity and volumes. Each is also applied to the step's
own pod (``apply_to_task``), which runs the ranks itself whenever ``train.nodes = 1``; with several nodes
that pod holds its share while it waits, so a multi-node pipeline may be compiled with fewer GPUs per step
(``$MMSAE_GPUS``) and ``train.gpus_per_node`` set to the nodes' count.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from mmsae.components import TRAIN_IMAGE

PASSED_THROUGH = [
    dsl.TaskConfigField.RESOURCES,
    dsl.TaskConfigField.ENV,
    dsl.TaskConfigField.KUBERNETES_TOLERATIONS,
    dsl.TaskConfigField.KUBERNETES_NODE_SELECTOR,
    dsl.TaskConfigField.KUBERNETES_AFFINITY,
    dsl.TaskConfigField.KUBERNETES_VOLUMES,
]
"""The step's settings a TrainJob inherits (each applied to the step's pod too)."""


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False,
               task_config_passthroughs=[dsl.TaskConfigPassthrough(field=field, apply_to_task=True)
                                         for field in PASSED_THROUGH])
def train(
    config_yaml: str,
    parent_run_id: str,
    shards: Input[Dataset],
    sae: Output[Model],
    metrics: Output[Metrics],
    task_config: dsl.TaskConfig = None,
):
    """Train the SAE(s) (see ``mmsae.stages.train``, ``mmsae.launch``); ``sae`` points to the checkpoint folder."""
    from mmsae import components, launch
    from mmsae.components.metrics import log_figures
    from mmsae.components.pointers import read_pointer, write_pointer
    from mmsae.config import config_from_yaml

    out = launch.train(config_from_yaml(config_yaml), shards=read_pointer(shards), parent_run_id=parent_run_id or None,
                       pod=launch.PodSettings.of(task_config), image=components.TRAIN_IMAGE)
    write_pointer(sae, out.uri)
    log_figures(metrics, out.figures)
