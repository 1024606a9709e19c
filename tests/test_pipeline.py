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
]


def test_pipeline_compiles_with_every_step_in_order(tmp_path):
    path = tmp_path / "p.yaml"
    compiler.Compiler().compile(sae_interp, str(path))
    spec = yaml.safe_load(path.read_text())
    assert spec["pipelineInfo"]["name"] == PIPELINE_NAME
    tasks = spec["root"]["dag"]["tasks"]
    inner = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert "close-tracking" in tasks and tasks["close-tracking"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert {"open-tracking", "inputs", "cache", "train", "mine", "report"} <= set(inner)
    assert set(inner["cache"]["dependentTasks"]) == {"open-tracking", "inputs"}
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

    cfg = load_config(None, QUICK)
    summary = run_demo(cfg, tmp_path / "demo")
    steps = summary["steps"]
    assert {"toyworld", "cache", "train", "mine", "report"} <= set(steps)
    assert steps["toyworld"]["n_train_images"] == 48
    assert steps["cache"]["images"] == 48  # the cache reads the training split
    assert steps["train"]["steps"] > 0
    written = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert written["steps"] == steps
    # MLflow: one finished parent run with a child per stage
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    exp = client.get_experiment_by_name("mmsae")
    parents = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = stage_runs(parents[0].info.run_id, uri=summary["tracking_uri"])
    assert {"toyworld", "cache", "train", "mine", "report"} <= set(children)



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
