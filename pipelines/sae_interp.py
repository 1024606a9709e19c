"""The full mmsae run as one KFP DAG: inputs -> cache -> train -> mine -> explain -> score -> steer -> report.

It holds the steps that exist so far; every later stage adds its component and its step here, so the
demo always runs the DAG end to end. The MLflow parent run is opened first and closed by an exit
handler, so a failed run is recorded as FAILED.

The explain and score steps (score's detection asks the same explainer) retry with backoff (a busy or
restarting explainer server; its answers are cached, so a retry asks only what is still unanswered). With
$MMSAE_EXPLAINER_SECRET set at compile time, both read $OPENAI_API_KEY and $OPENAI_BASE_URL from that
Kubernetes Secret (optional keys: a vLLM server in the cluster needs no key); the key never enters the config,
the compiled pipeline or an artifact.
"""

import os

from kfp import dsl, kubernetes

from mmsae.components.cache import cache
from mmsae.components.explain import explain
from mmsae.components.inputs import inputs
from mmsae.components.mine import mine
from mmsae.components.report import report
from mmsae.components.score import score
from mmsae.components.tracking import close_tracking, open_tracking
from mmsae.components.train import train

PIPELINE_NAME = "mmsae-sae-interp"
EXPLAINER_SECRET = os.environ.get("MMSAE_EXPLAINER_SECRET", "")
"""Kubernetes Secret whose keys OPENAI_API_KEY and OPENAI_BASE_URL become the explain and score steps'
environment; empty: none is mounted (the compiled pipeline then has no Kubernetes platform section)."""
ENV_CONFIGMAP = os.environ.get("MMSAE_PIPELINE_ENV_CONFIGMAP", "")
"""ConfigMap (the chart's) whose keys become every step's environment: the S3 endpoint and region and the
MLflow tracking URI; empty: none is mounted."""
S3_SECRET = os.environ.get("MMSAE_S3_SECRET", "")
"""Secret whose AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY become every step's environment; empty: none."""
ENV_CONFIGMAP_KEYS = ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
                      "MLFLOW_TRACKING_URI")
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
EXPLAIN_RETRIES = 3
EXPLAIN_BACKOFF = "60s"


def with_cluster_env(*tasks: dsl.PipelineTask) -> None:
    """Give each task the cluster's S3 and MLflow settings (ConfigMap) and S3 credentials (Secret), named at
    compile time; values stay in Kubernetes, never in the compiled YAML."""
    for task in tasks:
        if ENV_CONFIGMAP:
            kubernetes.use_config_map_as_env(task, config_map_name=ENV_CONFIGMAP, optional=True,
                                             config_map_key_to_env={key: key for key in ENV_CONFIGMAP_KEYS})
        if S3_SECRET:
            kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, optional=True,
                                         secret_key_to_env={key: key for key in S3_SECRET_KEYS})


@dsl.pipeline(name=PIPELINE_NAME, description="Cache, train, mine, explain and score SAE features of an LMM.")
def sae_interp(config_yaml: str = "", run_name: str = ""):
    """``config_yaml``: the whole run config (mmsae's schema) as YAML text; empty means the defaults."""
    closer = close_tracking(config_yaml=config_yaml, kfp_job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    closer.set_caching_options(False)
    with dsl.ExitHandler(closer, name="run"):
        opened = open_tracking(
            config_yaml=config_yaml,
            run_name=run_name,
            kfp_job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            kfp_job_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        )
        opened.set_caching_options(False)
        world = inputs(config_yaml=config_yaml, parent_run_id=opened.output)
        world.set_display_name("inputs (image set + LMM; the toy world unless given)")
        cached = cache(
            config_yaml=config_yaml,
            parent_run_id=opened.output,
            image_set=world.outputs["image_set"],
            lmm=world.outputs["lmm"],
        )
        cached.set_display_name("cache activations")
        trained = train(config_yaml=config_yaml, parent_run_id=opened.output, shards=cached.outputs["shards"])
        trained.set_display_name("train SAE")
        mined = mine(
            config_yaml=config_yaml,
            parent_run_id=opened.output,
            shards=cached.outputs["shards"],
            sae=trained.outputs["sae"],
        )
        mined.set_display_name("mine top images")
        explained = explain(config_yaml=config_yaml, parent_run_id=opened.output,
                            top_examples=mined.outputs["top_examples"])
        explained.set_display_name("explain features")
        scored = score(config_yaml=config_yaml, parent_run_id=opened.output,
                       explanations=explained.outputs["explanations"], top_examples=mined.outputs["top_examples"])
        scored.set_display_name("score explanations")
        for asks_the_explainer in (explained, scored):
            asks_the_explainer.set_retry(num_retries=EXPLAIN_RETRIES, backoff_duration=EXPLAIN_BACKOFF,
                                         backoff_factor=2.0, backoff_max_duration="900s")
            if EXPLAINER_SECRET:
                kubernetes.use_secret_as_env(asks_the_explainer, secret_name=EXPLAINER_SECRET, optional=True,
                                             secret_key_to_env={"OPENAI_API_KEY": "OPENAI_API_KEY",
                                                                "OPENAI_BASE_URL": "OPENAI_BASE_URL"})
        dashboard = report(
            config_yaml=config_yaml,
            parent_run_id=opened.output,
            top_examples=mined.outputs["top_examples"],
            explanations=explained.outputs["explanations"],
            scores=scored.outputs["scores"],
        )
        dashboard.set_display_name("report")
        with_cluster_env(opened, world, cached, trained, mined, explained, scored, dashboard)
    with_cluster_env(closer)
