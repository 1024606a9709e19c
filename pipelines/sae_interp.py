"""The full mmsae run as one KFP DAG: inputs, then per configured layer cache -> train -> mine -> explain ->
score, attribute -> steer -> report (`layer.layer_steps`).

The MLflow parent run is opened first and closed by an exit handler, so a failed run is recorded as FAILED.
``plan_layers`` reads ``cache.layers`` and a ``ParallelFor`` runs one SAE per layer (`layer.layer_steps`;
each item carries its layer and the parent run id, so the loop takes no other task output parameter),
each with its own report (a report per layer: each layer's features, explanations and scores on one page;
`mmsae runs compare` sets the layers side by side). ``$MMSAE_LAYER_PARALLELISM`` (compile time, default 0:
all at once) bounds how many layers run at a time.

What each task asks of the cluster (GPUs, CPU, memory, the GPU taint, /dev/shm, the ConfigMap and Secrets
named at compile time) is in `cluster`. Run settings come from the ``config_yaml`` pipeline parameter.

Caching: the stages reuse a sealed output only when its key (the settings that shape it and the
fingerprint of every input) matches, so reuse never goes stale. KFP's own cache keys on parameters and
input artifacts, not on the bytes behind a URI, so the tasks that read the world (``inputs``,
``plan_layers``, ``layer_config``) never take a cached result; ``layer_config`` heads each layer's config
with the fingerprint of the image set and the LMM, so every later task's cache key changes when the
image set's snapshot or the model changes. The explain, score and steer steps retry with backoff.
"""

import os

from kfp import dsl

from mmsae.components.layers import plan_layers
from mmsae.components.tracking import close_tracking
from mmsae.pipelines.cluster import with_cluster_env
from mmsae.pipelines.layer import layer_steps, run_inputs

PIPELINE_NAME = "mmsae-sae-interp"


@dsl.pipeline(name=PIPELINE_NAME,
              description="Cache, train, mine, explain, score, attribute and steer SAE features of an LMM, one SAE "
                          "per layer.")
def sae_interp(config_yaml: str = "", run_name: str = ""):
    """``config_yaml``: the whole run config (mmsae's schema) as YAML text; empty means the defaults."""
    closer = close_tracking(config_yaml=config_yaml, kfp_job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    closer.set_caching_options(False)
    with dsl.ExitHandler(closer, name="run"):
        opened, world = run_inputs(config_yaml, run_name, "inputs (image set + LMM; the toy world unless given)")
        layers = plan_layers(config_yaml=config_yaml, parent_run_id=opened.output)
        layers.set_display_name("layers")
        layers.set_caching_options(False)
        with dsl.ParallelFor(layers.output, parallelism=int(os.environ.get("MMSAE_LAYER_PARALLELISM", "0")),
                             name="layer") as item:
            layer_steps(config_yaml, item.parent_run_id, item.layer, world.outputs["image_set"],
                        world.outputs["lmm"])
        with_cluster_env(opened, world, layers)
    with_cluster_env(closer)
