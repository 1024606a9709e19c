"""What the pipelines' tasks ask of the cluster, from compile-time environment variables.

Read when a pipeline module is imported (the pipeline is defined then; `mmsae pipeline compile` imports it
afresh), never at run time, so the compiled YAML names resources, Kubernetes objects and node settings,
never a secret value:

- ``$MMSAE_PIPELINE_ENV_CONFIGMAP`` (every task's S3 endpoint/region and MLflow URI), ``$MMSAE_S3_SECRET``
  (S3 keys), ``$MMSAE_EXPLAINER_SECRET`` (the explainer's ``OPENAI_API_KEY``/``OPENAI_BASE_URL``, explain and
  score only): the names of the chart's ConfigMap and Secrets; empty: none is mounted.
- GPU tasks (cache, train, mine, steer) run in the GPU image (``$MMSAE_TRAIN_IMAGE``, see
  `mmsae.components`) and ask for ``$MMSAE_GPU_TYPE`` (accelerator resource, default
  ``nvidia.com/gpu``), ``$MMSAE_GPUS`` (per task, default 1), ``$MMSAE_GPU_CPU`` / ``$MMSAE_GPU_MEMORY``
  (requests and limits, default 8 CPUs and 64G), ``$MMSAE_SHM_SIZE`` (a memory-backed ``/dev/shm`` for the
  data loaders and NCCL, default 16Gi), ``$MMSAE_GPU_TOLERATION`` (taint key tolerated, default
  ``nvidia.com/gpu``; empty: none) and ``$MMSAE_GPU_NODE_SELECTOR`` (``label=value``; empty: none).
"""

import os

from kfp import dsl, kubernetes

from mmsae import components

ENV_CONFIGMAP_KEYS = ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
                      "MLFLOW_TRACKING_URI")
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
EXPLAINER_SECRET_KEYS = ("OPENAI_API_KEY", "OPENAI_BASE_URL")
EXPLAIN_RETRIES = 3
EXPLAIN_BACKOFF = "60s"
SHM_VOLUME = "dshm"
TRAIN_IMAGE_ENV = "MMSAE_TRAIN_IMAGE"

GPU_DEFAULTS = {
    "MMSAE_GPU_TYPE": "nvidia.com/gpu",
    "MMSAE_GPUS": "1",
    "MMSAE_GPU_CPU": "8",
    "MMSAE_GPU_MEMORY": "64G",
    "MMSAE_SHM_SIZE": "16Gi",
    "MMSAE_GPU_TOLERATION": "nvidia.com/gpu",
    "MMSAE_GPU_NODE_SELECTOR": "",
}


def setting(name: str) -> str:
    """A compile-time setting: the environment variable, else its default."""
    return os.environ.get(name, GPU_DEFAULTS.get(name, ""))


def with_cluster_env(*tasks: dsl.PipelineTask) -> None:
    """Give each task the cluster's S3 and MLflow settings (ConfigMap) and S3 credentials (Secret), named at
    compile time; values stay in Kubernetes, never in the compiled YAML."""
    config_map, s3_secret = setting("MMSAE_PIPELINE_ENV_CONFIGMAP"), setting("MMSAE_S3_SECRET")
    for task in tasks:
        if config_map:
            kubernetes.use_config_map_as_env(task, config_map_name=config_map, optional=True,
                                             config_map_key_to_env={key: key for key in ENV_CONFIGMAP_KEYS})
        if s3_secret:
            kubernetes.use_secret_as_env(task, secret_name=s3_secret, optional=True,
                                         secret_key_to_env={key: key for key in S3_SECRET_KEYS})


def asks_the_explainer(*tasks: dsl.PipelineTask) -> None:
    """Retries with backoff (a busy or restarting explainer server) and the explainer's Secret as env."""
    secret = setting("MMSAE_EXPLAINER_SECRET")
    for task in tasks:
        task.set_retry(num_retries=EXPLAIN_RETRIES, backoff_duration=EXPLAIN_BACKOFF, backoff_factor=2.0,
                       backoff_max_duration="900s")
        if secret:
            kubernetes.use_secret_as_env(task, secret_name=secret, optional=True,
                                         secret_key_to_env={key: key for key in EXPLAINER_SECRET_KEYS})


def on_gpu(*tasks: dsl.PipelineTask) -> None:
    """The GPU image (CUDA, DeepSpeed), GPUs, CPU and memory, the GPU taint tolerated, the node selector and
    a memory-backed /dev/shm. The image's name is also the task's ``$MMSAE_TRAIN_IMAGE``, so a step that
    starts pods of its own (train with ``train.nodes > 1``) starts them in the image it runs in."""
    toleration, selector = setting("MMSAE_GPU_TOLERATION"), setting("MMSAE_GPU_NODE_SELECTOR")
    for task in tasks:
        task.set_container_image(components.TRAIN_IMAGE)
        task.set_env_variable(TRAIN_IMAGE_ENV, components.TRAIN_IMAGE)
        task.set_accelerator_type(setting("MMSAE_GPU_TYPE"))
        task.set_accelerator_limit(int(setting("MMSAE_GPUS")))
        task.set_cpu_request(setting("MMSAE_GPU_CPU")).set_cpu_limit(setting("MMSAE_GPU_CPU"))
        task.set_memory_request(setting("MMSAE_GPU_MEMORY")).set_memory_limit(setting("MMSAE_GPU_MEMORY"))
        kubernetes.empty_dir_mount(task, volume_name=SHM_VOLUME, mount_path="/dev/shm", medium="Memory",
                                   size_limit=setting("MMSAE_SHM_SIZE"))
        if toleration:
            kubernetes.add_toleration(task, key=toleration, operator="Exists", effect="NoSchedule")
        if selector:
            label, _, value = selector.partition("=")
            kubernetes.add_node_selector(task, label_key=label, label_value=value)
