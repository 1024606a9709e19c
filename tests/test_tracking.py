"""Tests of mmsae.tracking (sqlite backends and a real `mlflow server` on loopback) and MlflowServer."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from mmsae import tracking
from mmsae.services.mlflow_server import MlflowServer, MlflowServerError

ENV_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


class StageBroke(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised empty sqlite store; copying it saves each test the schema migration."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def workdir(tmp_path: Path, template_db: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory that already holds an initialised ``mlflow.db``."""
    shutil.copy(template_db, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _sqlite(path: Path) -> str:
    return f"sqlite:///{path}"


def _all_runs(client: MlflowClient) -> list:
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exp_ids, max_results=1000)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server"), startup_timeout=120) as server:
        yield server


# ------------------------------------------------------------------------------------------------ sqlite


def test_default_sqlite_store_holds_parent_and_stage_children(workdir: Path, monkeypatch) -> None:
    config_a = {"model": {"lr": 0.001, "layers": [1, 2]}, "name": "cache"}
    parent = tracking.start_pipeline_run(
        "toy", tags={"owner": "ci"}, params={"run": {"seed": 3}}, kfp_job_id="job-7", kfp_job_name="toy-run"
    )
    with tracking.stage_run("cache", parent_run_id=parent, config=config_a) as tr:
        tr.log_metrics({"loss": 2.0}, step=0)
        tr.log_metrics({"loss": 1.0, "inner": {"acc": 0.5}}, step=1)
        tr.log_params({"extra": {"k": "v"}})
    with tracking.stage_run("train", parent_run_id=parent, config={"steps": 5}) as tr:
        tr.set_tags({"device": "cpu"})
        tr.log_dict({"a": 1}, "notes/summary.json")
    tracking.end_pipeline_run(parent)

    uri = _sqlite(workdir / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.info.run_name == "toy"
    assert parent_run.data.params["run.seed"] == "3"
    assert parent_run.data.tags["kfp.job_id"] == "job-7"
    assert parent_run.data.tags["kfp.job_name"] == "toy-run"
    assert parent_run.data.tags["owner"] == "ci"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # for the fluent search below
    children = mlflow.search_runs(
        experiment_ids=[parent_run.info.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'",
        output_format="list",
    )
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {"cache", "train"}
    cache = by_name["cache"]
    assert cache.info.status == "FINISHED"
    assert cache.data.metrics == {"loss": 1.0, "inner.acc": 0.5}
    assert [m.value for m in client.get_metric_history(cache.info.run_id, "loss")] == [2.0, 1.0]
    assert cache.data.params["model.lr"] == "0.001"
    assert cache.data.params["name"] == "cache"
    assert cache.data.params["extra.k"] == "v"
    assert yaml.safe_load(cache.data.params["model.layers"]) == [1, 2]
    config_file = client.download_artifacts(cache.info.run_id, tracking.CONFIG_ARTIFACT, str(workdir / "dl"))
    assert yaml.safe_load(Path(config_file).read_text()) == config_a
    assert by_name["train"].data.tags["device"] == "cpu"
    assert by_name["train"].data.tags[tracking.TAG_STAGE] == "train"
    assert "notes/summary.json" in [
        f.path for f in client.list_artifacts(by_name["train"].info.run_id, "notes")
    ]
    # Artifacts sit beside the database, not wherever the process happened to run.
    assert cache.info.artifact_uri.startswith((workdir / "mlartifacts").as_uri())
    assert tracking.stage_runs(parent) == {
        "cache": cache.info.run_id,
        "train": by_name["train"].info.run_id,
    }


def test_injected_run_id_is_logged_into_without_new_runs(workdir: Path, monkeypatch) -> None:
    uri = _sqlite(workdir / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("kfp")
    kfp_parent = client.create_run(exp, run_name="kfp-run").info.run_id
    task_run = client.create_run(exp, run_name="train-task", tags={MLFLOW_PARENT_RUN_ID: kfp_parent})
    task_id = task_run.info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_RUN_ID", task_id)
    before = {r.info.run_id for r in _all_runs(client)}

    pipeline_id = tracking.start_pipeline_run("toy", params={"seed": 1})
    with tracking.stage_run("train", parent_run_id=pipeline_id, config={"steps": 4}) as tr:
        assert tr.run_id == task_id
        tr.log_metrics({"fvu": 0.25}, step=3)
    tracking.end_pipeline_run(pipeline_id)

    assert pipeline_id == kfp_parent
    assert {r.info.run_id for r in _all_runs(client)} == before
    run = client.get_run(task_id)
    assert run.data.metrics["fvu"] == 0.25
    assert run.data.params["steps"] == "4"
    assert run.data.tags[tracking.TAG_STAGE] == "train"
    assert run.data.tags[tracking.TAG_STATUS] == "FINISHED"
    # Kubeflow owns the lifecycle of both runs: neither is ended here.
    assert run.info.status == "RUNNING"
    assert client.get_run(kfp_parent).info.status == "RUNNING"


def test_failing_stage_ends_failed_and_reraises(workdir: Path) -> None:
    parent = tracking.start_pipeline_run("toy")
    with pytest.raises(StageBroke, match="disk full"):
        with tracking.stage_run("mine", parent_run_id=parent) as tr:
            tr.log_metrics({"done": 1})
            raise StageBroke("disk full")
    with tracking.stage_run("score", parent_run_id=parent):
        pass
    runs = tracking.stage_runs(parent)
    client = MlflowClient(tracking_uri=_sqlite(workdir / "mlflow.db"))
    assert client.get_run(runs["mine"]).info.status == "FAILED"
    assert client.get_run(runs["mine"]).data.metrics == {"done": 1.0}
    assert client.get_run(runs["score"]).info.status == "FINISHED"
    tracking.end_pipeline_run(parent, status="failed")
    assert client.get_run(parent).info.status == "FAILED"


def test_tracking_uri_env_is_honoured_over_cwd(workdir: Path, template_db: Path, monkeypatch) -> None:
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(template_db, elsewhere / "other.db")
    uri = _sqlite(elsewhere / "other.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with tracking.stage_run("cache", config={"a": 1}) as tr:
        tr.log_metrics({"n": 5})
    other = MlflowClient(tracking_uri=uri)
    assert [r.data.metrics for r in _all_runs(other)] == [{"n": 5.0}]
    cwd_store = MlflowClient(tracking_uri=_sqlite(workdir / "mlflow.db"))
    assert _all_runs(cwd_store) == []


def test_experiment_id_env_overrides_experiment_name(workdir: Path, monkeypatch) -> None:
    client = MlflowClient(tracking_uri=_sqlite(workdir / "mlflow.db"))
    exp = client.create_experiment("given-by-kubeflow")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp)
    parent = tracking.start_pipeline_run("toy", experiment="ignored")
    assert client.get_run(parent).info.experiment_id == exp
    assert client.get_experiment_by_name("ignored") is None


def test_disabled_tracking_touches_no_store(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with tracking.stage_run("cache", config={"a": 1}, enabled=False) as tr:
        assert tr.run_id is None
        tr.log_params({"a": 1})
        tr.log_metrics({"m": 1.0}, step=2)
        tr.log_dict({"a": 1}, "x.json")
        tr.log_artifact(tmp_path / "missing.txt")
        tr.set_tags({"t": "v"})
    assert list(tmp_path.iterdir()) == []


def test_long_params_are_truncated_and_odd_keys_cleaned(workdir: Path) -> None:
    with tracking.stage_run("explain") as tr:
        tr.log_params({"prompt": "x" * (MAX_PARAM_VAL_LENGTH + 500), "bad key!": 1, "a": {"b/c": 2}})
        tr.set_tags({"long": "y" * 9000})
        run_id = tr.run_id
    run = MlflowClient(tracking_uri=_sqlite(workdir / "mlflow.db")).get_run(run_id)
    assert len(run.data.params["prompt"]) == MAX_PARAM_VAL_LENGTH
    assert run.data.params["prompt"].endswith("[truncated]")
    assert run.data.params["bad key_"] == "1"
    assert run.data.params["a.b/c"] == "2"
    assert len(run.data.tags["long"]) <= 8000


def test_non_numeric_metric_is_rejected_naming_the_key(workdir: Path) -> None:
    with tracking.stage_run("score") as tr:
        with pytest.raises(TypeError, match="'label'"):
            tr.log_metrics({"label": "red"})
        with pytest.raises(FileNotFoundError, match="nope.txt"):
            tr.log_artifact(workdir / "nope.txt")


def test_file_store_uri_is_refused_with_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(tracking.TrackingError, match="plain file store"):
        tracking.start_pipeline_run("toy", uri=str(tmp_path / "mlruns"))
    with pytest.raises(tracking.TrackingError, match="plain file store"):
        tracking.resolve_tracking_uri((tmp_path / "mlruns").as_uri())


def test_default_uri_is_absolute_sqlite_in_cwd(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.resolve_tracking_uri() == "http://127.0.0.1:1"
    assert tracking.resolve_tracking_uri("sqlite:////x/y.db") == "sqlite:////x/y.db"


def test_unknown_parent_run_is_a_clear_error(workdir: Path) -> None:
    with pytest.raises(tracking.TrackingError, match="parent run of stage 'train'"):
        with tracking.stage_run("train", parent_run_id="0123456789abcdef0123456789abcdef"):
            pass
    with pytest.raises(ValueError, match="FINISHED, FAILED"):
        tracking.end_pipeline_run("whatever", status="DONE")


# ------------------------------------------------------------------------------------------- real server


@pytest.mark.services
def test_server_parent_child_runs_and_artifact_round_trip(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    uri = mlflow_server.uri
    parent = tracking.start_pipeline_run("server-toy", uri=uri, experiment="server-exp")
    payload = tmp_path / "features" / "top.txt"
    payload.parent.mkdir()
    payload.write_text("feature 7: red stripes\n")
    with tracking.stage_run("mine", parent_run_id=parent, config={"k": 8}, uri=uri) as tr:
        tr.log_metrics({"coverage": 0.75})
        tr.log_artifact(payload.parent, "mined")
        child = tr.run_id
    tracking.end_pipeline_run(parent, uri=uri)

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(child)
    assert run.data.tags[MLFLOW_PARENT_RUN_ID] == parent
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert MlflowClient(tracking_uri=uri).get_run(child).data.metrics == {"coverage": 0.75}
    assert tracking.stage_runs(parent, uri=uri) == {"mine": child}
    got = mlflow.artifacts.download_artifacts(
        run_id=child, artifact_path="mined/top.txt", dst_path=str(tmp_path / "dl"), tracking_uri=uri
    )
    assert Path(got).read_text() == "feature 7: red stripes\n"
    config_file = mlflow.artifacts.download_artifacts(
        run_id=child, artifact_path=tracking.CONFIG_ARTIFACT, dst_path=str(tmp_path / "dl2"), tracking_uri=uri
    )
    assert yaml.safe_load(Path(config_file).read_text()) == {"k": 8}
    # The server stored the artifact in its own artifact root (proxied upload).
    stored = list((mlflow_server.root / "mlartifacts").rglob("top.txt"))
    assert [p.read_text() for p in stored] == ["feature 7: red stripes\n"]


class _DyingServer(MlflowServer):
    def command(self) -> list[str]:
        return [sys.executable, "-c", "import sys; print('cannot bind the port'); sys.exit(3)"]


def test_server_that_dies_reports_its_log_tail(tmp_path: Path) -> None:
    server = _DyingServer(tmp_path / "srv", startup_timeout=20)
    with pytest.raises(MlflowServerError, match=r"exited with code 3(.|\n)*cannot bind the port"):
        server.start()
    assert not server.running


def test_find_pipeline_run_by_kfp_job_id(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    uri = f"sqlite:///{tmp_path / 'find.db'}"
    first = tracking.start_pipeline_run("p", uri=uri, kfp_job_id="job-1")
    second = tracking.start_pipeline_run("p", uri=uri, kfp_job_id="job-2")
    assert tracking.find_pipeline_run("job-1", uri=uri) == first
    assert tracking.find_pipeline_run("job-2", uri=uri) == second
    assert tracking.find_pipeline_run("job-3", uri=uri) is None
    assert tracking.find_pipeline_run("", uri=uri) is None


def _left_running(client: MlflowClient, experiment: str, stage: str, output: str, parent: str | None) -> str:
    """What a stage process killed with -9 leaves: its run, never ended."""
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    tags = {tracking.TAG_STAGE: stage, tracking.TAG_OUTPUT: output}
    if parent:
        tags[MLFLOW_PARENT_RUN_ID] = parent
    run_id = client.create_run(exp_id, run_name=stage, tags=tags).info.run_id
    client.log_param(run_id, "cache.batch_size", "8")
    client.log_metric(run_id, "images_per_s", 3.0, step=2)
    return run_id


def test_stage_resumed_after_a_kill_goes_on_in_the_run_left_running(workdir: Path) -> None:
    uri = _sqlite(workdir / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    parent = tracking.start_pipeline_run("pipe", uri=uri, experiment="exp")
    killed = _left_running(client, "exp", "cache", "/w/cache", parent)
    other_output = _left_running(client, "exp", "cache", "/elsewhere", parent)
    with tracking.stage_run("cache", parent_run_id=parent, config={"cache": {"batch_size": 16, "layers": [1]}},
                            uri=uri, experiment="exp", output="/w/cache") as tracker:
        assert tracker.run_id == killed
        tracker.log_metrics({"images_per_s": 4.0}, step=3)
    run = client.get_run(killed)
    assert run.info.status == "FINISHED"
    assert run.data.params["cache.batch_size"] == "8"  # MLflow keeps a param's first value
    assert run.data.params["cache.layers"] == "[1]"  # new ones are added
    assert client.get_run(other_output).info.status == "RUNNING"  # another output's run is not ours
    assert len(tracking.stage_runs(parent, uri=uri)) == 1  # no second run of the stage


def test_run_left_running_under_another_parent_is_marked_killed(workdir: Path) -> None:
    uri = _sqlite(workdir / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    first = tracking.start_pipeline_run("pipe", uri=uri, experiment="exp")
    killed = _left_running(client, "exp", "train", "/w/train", first)
    second = tracking.start_pipeline_run("pipe again", uri=uri, experiment="exp")
    with tracking.stage_run("train", parent_run_id=second, uri=uri, experiment="exp", output="/w/train") as tracker:
        assert tracker.run_id != killed
    assert client.get_run(killed).info.status == "KILLED"
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_headline_figures_are_the_latest_values_after_progress(workdir: Path) -> None:
    """A figure logged as progress at a high step must not shadow its final value."""
    from mmsae.config import RunConfig
    from mmsae.stages._base import stage_context

    cfg = RunConfig()
    cfg.run.workdir = str(workdir / "work")
    cfg.tracking.uri = _sqlite(workdir / "mlflow.db")
    with stage_context(cfg, "cache", {}, output="/w/cache") as ctx:
        for step, written in ((1, 100), (7, 700)):
            ctx.log_progress({"bytes_written": written}, step=step)
        ctx.finish({"bytes_written": 900, "note": "text is not a metric", "ratio": float("nan")})
        run_id = ctx.tracker.run_id
    run = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(run_id)
    assert run.data.metrics == {"bytes_written": 900.0}
