"""The KFP pipeline: it compiles, its components are thin, and the whole DAG runs under kfp.local."""

from __future__ import annotations

import json

import yaml
from kfp import compiler

from mmsae.config import load_config
from mmsae.pipelines.sae_interp import PIPELINE_NAME, sae_interp

# a world and models small enough that the whole DAG runs in a minute or two on two cores
QUICK = [
    "toyworld.n_train=48", "toyworld.n_heldout=12",
    "toylmm.steps=20", "toylmm.batch_size=8",
    "cache.batch_size=8", "cache.shard_rows=400", "cache.num_workers=0",
    "train.num_latents=128", "train.k=8", "train.batch_size=64", "train.lr_warmup_steps=2",
    "train.dead_tokens=5000", "train.log_every=5",
    "steer.max_features=2", "steer.images=2", "steer.strengths=[4.0]", "steer.max_new_tokens=8",
    "attribute.images=4", "attribute.heatmaps=1",
]


def test_pipeline_compiles_with_every_step_in_order(tmp_path):
    path = tmp_path / "p.yaml"
    compiler.Compiler().compile(sae_interp, str(path))
    spec = next(yaml.safe_load_all(path.read_text()))  # then the Kubernetes platform section
    assert spec["pipelineInfo"]["name"] == PIPELINE_NAME
    tasks = spec["root"]["dag"]["tasks"]
    outer = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    inner = spec["components"]["comp-for-loop-2"]["dag"]["tasks"]  # one layer's steps
    assert "close-tracking" in tasks and tasks["close-tracking"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert {"open-tracking", "inputs", "plan-layers", "for-loop-2"} <= set(outer)
    assert {"cache", "train", "mine", "report"} <= set(inner)
    assert set(inner["cache"]["dependentTasks"]) == {"layer-config"}
    assert set(outer["for-loop-2"]["dependentTasks"]) == {"plan-layers", "inputs"}
    assert set(outer["plan-layers"]["dependentTasks"]) == {"open-tracking"}
    assert "cache" in inner["train"]["dependentTasks"]
    assert {"cache", "train"} <= set(inner["mine"]["dependentTasks"])
    assert "mine" in inner["report"]["dependentTasks"]
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert len(images) == 2  # the CPU image and the GPU training image
    # components install nothing at start: the images carry mmsae and kfp
    for e in spec["deploymentSpec"]["executors"].values():
        assert "pip install" not in " ".join(e["container"].get("command", []))


def test_whole_dag_runs_locally_and_records_every_step(tmp_path, monkeypatch):
    monkeypatch.setenv("MMSAE_CACHE_DIR", str(tmp_path / "cache"))
    from mmsae.demo import run_demo
    from mmsae.tracking import stage_runs

    cfg = load_config(None, [*QUICK, "cache.layers=[0,1]"])
    summary = run_demo(cfg, tmp_path / "demo")
    assert set(summary["steps"]) == {"toyworld"}  # the one run-wide step
    assert summary["steps"]["toyworld"]["n_train_images"] == 48
    assert set(summary["layers"]) == {"0", "1"}  # one SAE per layer, each with every step
    for layer, steps in summary["layers"].items():
        assert set(steps) == {"cache", "train", "mine", "explain", "score", "attribute", "steer", "report"}, layer
        assert steps["cache"]["images"] == 48  # the cache reads the training split
        assert steps["train"]["steps"] > 0
        assert steps["report"]["index"] == str(tmp_path / f"demo/work/layers/{layer}/report/index.html")
    written = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert written["layers"] == summary["layers"]
    # MLflow: one finished parent run with a child per stage and layer
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    exp = client.get_experiment_by_name("mmsae")
    parents = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert "toyworld" in stage_runs(parents[0].info.run_id, uri=summary["tracking_uri"])
    job_id = parents[0].data.tags["kfp.job_id"]
    for stage in ("cache", "train", "mine", "explain", "score", "attribute", "steer", "report"):
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mmsae.stage` = '{stage}'")
        assert sorted(r.data.tags["mmsae.layer"] for r in runs) == ["0", "1"], stage
        assert {r.data.tags["kfp.job_id"] for r in runs} == {job_id}, stage
        assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[0].info.run_id}, stage
    # each layer's outputs under its own folder
    trains = client.search_runs([exp.experiment_id], filter_string="tags.`mmsae.stage` = 'train'")
    assert {r.data.params["train.out"] for r in trains} == {str(tmp_path / f"demo/work/layers/{n}/train") for n in (0, 1)}

    # a recurring retrain run finds every configured layer current and ends at once
    from kfp import local

    from mmsae.components.planning import finished_sae_in_mlflow
    from mmsae.pipelines.retrain_layer import retrain_layer

    text = (tmp_path / "demo" / "config.yaml").read_text()
    cfg = load_config(tmp_path / "demo" / "config.yaml")
    assert finished_sae_in_mlflow(cfg, 1) == str(tmp_path / "demo/work/layers/1/train")
    assert finished_sae_in_mlflow(cfg, -1) is None
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "retrain"))
    retrain_layer(config_yaml=text, run_name="retrain")
    trains = client.search_runs([exp.experiment_id], filter_string="tags.`mmsae.stage` = 'train'")
    assert len(trains) == 2  # nothing retrained
    retrains = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mmsae.pipeline") == "retrain"]
    assert len(retrains) == 1 and retrains[0].info.status == "FINISHED"



def test_cluster_env_comes_from_the_named_configmap_and_secrets_on_every_task(tmp_path, monkeypatch):
    import importlib

    from mmsae.pipelines import sae_interp as module

    monkeypatch.setenv("MMSAE_PIPELINE_ENV_CONFIGMAP", "mmsae-env")
    monkeypatch.setenv("MMSAE_S3_SECRET", "mmsae-s3")
    monkeypatch.setenv("MMSAE_EXPLAINER_SECRET", "mmsae-explainer")
    try:
        reloaded = importlib.reload(module)
        out = tmp_path / "p.yaml"
        compiler.Compiler().compile(reloaded.sae_interp, str(out))
    finally:
        monkeypatch.undo()
        importlib.reload(module)
    docs = list(yaml.safe_load_all(out.read_text()))
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    tasks = docs[0]["deploymentSpec"]["executors"]
    assert set(executors) == set(tasks)  # every step, the exit handler's too
    for name, spec in executors.items():
        assert [c["configMapName"] for c in spec["configMapAsEnv"]] == ["mmsae-env"], name
        secrets = {s["secretName"] for s in spec["secretAsEnv"]}
        expected = {"mmsae-s3", "mmsae-explainer"} if ("explain" in name or "score" in name) else {"mmsae-s3"}
        assert secrets == expected, name


def test_a_layer_config_narrows_the_layers_and_gives_each_layer_its_own_outputs():
    from mmsae.components.planning import config_for_layer, parse_layer

    cfg = load_config(None, ["run.workdir=s3://bucket/run", "cache.layers=[3, 7]", "mine.out=s3://other/mine"])
    layer = config_for_layer(cfg, parse_layer("7"))
    assert layer.cache.layers == [7]
    assert layer.cache.out == "s3://bucket/run/layers/7/cache"
    assert layer.train.out == "s3://bucket/run/layers/7/train"
    assert layer.report.out == "s3://bucket/run/layers/7/report"
    assert layer.mine.out == "s3://other/mine/layer-7"  # a configured output gets the layer appended
    assert cfg.cache.layers == [3, 7] and cfg.train.out == ""  # the run config is left as it is
    assert parse_layer("-2") == -2 and parse_layer("model.layers.3") == "model.layers.3"


def test_the_next_layer_is_the_first_without_an_sae_then_the_first_stale_one():
    from mmsae.components.planning import choose_layer

    saes = {3: "s3://run/layers/3/train", 7: "s3://run/layers/7/train"}
    stale = {"s3://run/layers/7/train": "image_set changed since"}
    layer, reason = choose_layer([3, 7, 9], saes.get, stale.get)
    assert layer == 9 and "no finished SAE" in reason
    layer, reason = choose_layer([3, 7], saes.get, stale.get)
    assert layer == 7 and "image_set changed since" in reason
    layer, reason = choose_layer([3], saes.get, stale.get)
    assert layer is None and "nothing to do" in reason


def test_an_sae_is_stale_when_its_shards_came_from_another_image_set(tmp_path):
    from mmsae import storage
    from mmsae.components.planning import sae_staleness
    from mmsae.stages._base import KEY_FIELD

    shards, sae = tmp_path / "cache", tmp_path / "train"
    prints = {"image_set": "aaa", "model": "bbb"}
    storage.write_manifest(shards, "activations", files=[], extra={KEY_FIELD: {"config": {}, "fingerprints": prints}})
    storage.write_manifest(sae, "sae", files=[], inputs={"shards": str(shards)})
    assert sae_staleness(str(sae), prints) is None
    assert sae_staleness(str(sae), {**prints, "image_set": "ccc"}) == "image_set changed since"
    assert "cannot be read" in sae_staleness(str(tmp_path / "missing"), prints)
