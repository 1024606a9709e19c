"""The steps of one layer's SAE, shared by the pipelines: cache -> train -> mine, then explain -> score and
attribute, then steer (the explained features, or the attributed ones: ``steer.source``) -> report.

Every step takes the layer's own run config (``layer_config``: ``cache.layers`` set to the layer, outputs
under ``<run.workdir>/layers/<layer>/``), so each stage run is tagged with its layer (``mmsae.layer``).
"""

from kfp import dsl

from mmsae.components.attribute import attribute
from mmsae.components.cache import cache
from mmsae.components.explain import explain
from mmsae.components.inputs import inputs
from mmsae.components.layers import layer_config
from mmsae.components.mine import mine
from mmsae.components.report import report
from mmsae.components.score import score
from mmsae.components.steer import steer
from mmsae.components.tracking import open_tracking
from mmsae.components.train import train
from mmsae.pipelines.cluster import asks_the_explainer, on_gpu, with_cluster_env


def run_inputs(config_yaml, run_name, inputs_name: str) -> tuple[dsl.PipelineTask, dsl.PipelineTask]:
    """The first steps of a run, never cached (they read the world): the MLflow parent run opened, then the
    inputs (image set and LMM, the toy world unless given); returns both tasks."""
    opened = open_tracking(config_yaml=config_yaml, run_name=run_name, kfp_job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                           kfp_job_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
    opened.set_caching_options(False)
    world = inputs(config_yaml=config_yaml, parent_run_id=opened.output)
    world.set_display_name(inputs_name)
    world.set_caching_options(False)
    return opened, world


def layer_steps(config_yaml, parent_run_id, layer, image_set, lmm) -> dict[str, dsl.PipelineTask]:
    """Add one layer's steps to the pipeline being defined; returns them by stage name."""
    planned = layer_config(config_yaml=config_yaml, layer=layer, image_set=image_set, lmm=lmm)
    planned.set_display_name("layer config")
    planned.set_caching_options(False)  # it fingerprints the inputs: always look again
    config = planned.output
    cached = cache(config_yaml=config, parent_run_id=parent_run_id, image_set=image_set, lmm=lmm)
    cached.set_display_name("cache activations")
    trained = train(config_yaml=config, parent_run_id=parent_run_id, shards=cached.outputs["shards"])
    trained.set_display_name("train SAE")
    mined = mine(config_yaml=config, parent_run_id=parent_run_id, shards=cached.outputs["shards"],
                 sae=trained.outputs["sae"])
    mined.set_display_name("mine top images")
    explained = explain(config_yaml=config, parent_run_id=parent_run_id, top_examples=mined.outputs["top_examples"])
    explained.set_display_name("explain features")
    scored = score(config_yaml=config, parent_run_id=parent_run_id, explanations=explained.outputs["explanations"],
                   top_examples=mined.outputs["top_examples"])
    scored.set_display_name("score explanations")
    attributed = attribute(config_yaml=config, parent_run_id=parent_run_id, top_examples=mined.outputs["top_examples"])
    attributed.set_display_name("attribute answers")
    steered = steer(config_yaml=config, parent_run_id=parent_run_id, top_examples=mined.outputs["top_examples"],
                    explanations=explained.outputs["explanations"],
                    attributions=attributed.outputs["attributions"]).after(scored)
    steered.set_display_name("steer features")
    dashboard = report(config_yaml=config, parent_run_id=parent_run_id, top_examples=mined.outputs["top_examples"],
                       explanations=explained.outputs["explanations"], scores=scored.outputs["scores"],
                       steering=steered.outputs["steering"], attributions=attributed.outputs["attributions"])
    dashboard.set_display_name("report")
    steps = {"layer_config": planned, "cache": cached, "train": trained, "mine": mined, "explain": explained,
             "score": scored, "attribute": attributed, "steer": steered, "report": dashboard}
    on_gpu(cached, trained, mined, attributed, steered)
    asks_the_explainer(explained, scored)
    with_cluster_env(*steps.values())
    return steps
