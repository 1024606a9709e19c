"""One layer's SAE of an existing image set and LMM, for recurring runs: cache, train, mine, explain, score,
attribute, steer and report the next layer that needs it.

``next_layer`` asks MLflow for the newest finished train run of each configured layer (tag
``mmsae.layer``) and takes the first layer with none; else the first whose SAE is stale: the image set or
the LMM its shards were cached from (fingerprints in the shards' manifest) has changed since. So a
schedule walks the model's layers and then keeps them fresh. A run with nothing to do ends at once: the
``next_layer`` step logs why and the layer's steps are skipped (``dsl.If`` on an empty choice).

Cluster settings and caching are as in `sae_interp`: ``inputs``, ``next_layer`` and ``layer_config`` never
take a cached result; every later task's cache key holds the inputs' fingerprint.
"""

from kfp import dsl

from mmsae.components.layers import next_layer
from mmsae.components.tracking import close_tracking
from mmsae.pipelines.cluster import with_cluster_env
from mmsae.pipelines.layer import layer_steps, run_inputs

PIPELINE_NAME = "mmsae-retrain-layer"
NOTHING_TO_DO = ""
"""What ``next_layer`` returns when every configured layer has a current SAE."""


@dsl.pipeline(name=PIPELINE_NAME,
              description="Train and explain the SAE of the next configured layer that has none or a stale one.")
def retrain_layer(config_yaml: str = "", run_name: str = ""):
    """``config_yaml``: the whole run config (mmsae's schema) as YAML text, naming the image set and the LMM
    (``cache.image_set``, ``cache.model``; both empty: the toy world) and the layers (``cache.layers``)."""
    closer = close_tracking(config_yaml=config_yaml, kfp_job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    closer.set_caching_options(False)
    with dsl.ExitHandler(closer, name="run"):
        opened, world = run_inputs(config_yaml, run_name, "inputs (image set + LMM)")
        chosen = next_layer(config_yaml=config_yaml, image_set=world.outputs["image_set"], lmm=world.outputs["lmm"])
        chosen.set_display_name("next layer (from MLflow)")
        chosen.set_caching_options(False)
        with dsl.If(chosen.output != NOTHING_TO_DO, name="a-layer-to-train"):
            layer_steps(config_yaml, opened.output, chosen.output, world.outputs["image_set"], world.outputs["lmm"])
        with_cluster_env(opened, world, chosen)
    with_cluster_env(closer)
