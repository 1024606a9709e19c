"""Each KFP component's function, called as KFP would, with the stage it wraps replaced by a stand-in.

What a component must do: hand the stage the run config and the URIs its input pointers name, make its
output pointer name the stage's output, and log to its `Metrics` artifact exactly the stage's finite
numeric figures under `mmsae.tracking.metric_values`'s names.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient

from mmsae.config import RunConfig, dump_config, load_config
from mmsae.stages._base import StageOutputs
from mmsae.tracking import TAG_KFP_JOB_ID, metric_values

FIGURES: dict[str, Any] = {
    "images": 12,
    "fvu": 0.25,
    "converged": True,
    "note": "a text figure",
    "nan_figure": float("nan"),
    "a/b": 3,
    "nested": {"x": 1.5, "inf_figure": float("inf")},
    "numpy_count": np.int64(7),
}
METRICS = {"images": 12.0, "fvu": 0.25, "a.b": 3.0, "nested.x": 1.5, "numpy_count": 7.0}
"""What the components must log of FIGURES: finite real numbers only, `/` and nesting turned into dots."""


class FakeArtifact:
    """What a component touches of a KFP artifact: its name, its local file and its metadata."""

    def __init__(self, folder: Path, name: str, metadata: dict[str, Any] | None = None) -> None:
        self.name = name
        self.path = str(folder / name)
        self.uri = f"local://{self.path}"
        self.metadata = dict(metadata or {})


class FakeMetrics(FakeArtifact):
    def __init__(self, folder: Path, name: str = "metrics") -> None:
        super().__init__(folder, name)
        self.logged: dict[str, float] = {}

    def log_metric(self, metric: str, value: float) -> None:
        assert metric not in self.logged, f"{metric} logged twice"
        self.logged[metric] = value


def pointer_in_metadata(folder: Path, name: str, uri: str) -> FakeArtifact:
    return FakeArtifact(folder, name, {"uri": uri})


def pointer_in_file(folder: Path, name: str, uri: str) -> FakeArtifact:
    artifact = FakeArtifact(folder, name)
    Path(artifact.path).write_text(json.dumps({"uri": uri}))
    return artifact


def assert_points_to(artifact: FakeArtifact, uri: str) -> None:
    assert artifact.metadata["uri"] == uri
    assert json.loads(Path(artifact.path).read_text()) == {"uri": uri}


@pytest.fixture
def config(tmp_path: Path) -> RunConfig:
    return load_config(None, [f"run.workdir={tmp_path / 'work'}", "run.seed=5", "mine.top_k=3",
                              "tracking.enabled=false"])


def stand_in(monkeypatch: pytest.MonkeyPatch, stage: str, outputs: StageOutputs) -> list[tuple[tuple, dict]]:
    """Replace ``mmsae.stages.<stage>.run``; returns the list its calls are recorded in."""
    calls: list[tuple[tuple, dict]] = []

    def run(*args: Any, **kwargs: Any) -> StageOutputs:
        calls.append((args, kwargs))
        return outputs

    monkeypatch.setattr(importlib.import_module(f"mmsae.stages.{stage}"), "run", run)
    return calls


def test_the_figures_are_a_real_test_of_the_metrics_rule():
    assert metric_values(FIGURES) == METRICS
    assert any(isinstance(v, bool) for v in FIGURES.values()) and any(isinstance(v, str) for v in FIGURES.values())
    assert any(isinstance(v, float) and math.isnan(v) for v in FIGURES.values())


# component, its stage's keyword for each input pointer, its output pointer, and its optional inputs
POINTER_STAGES = [
    ("cache", {"image_set": "image_set", "lmm": "model"}, "shards", ()),
    ("train", {"shards": "shards"}, "sae", ()),
    ("mine", {"shards": "shards", "sae": "sae"}, "top_examples", ()),
    ("explain", {"top_examples": "top_examples"}, "explanations", ()),
    ("score", {"explanations": "explanations", "top_examples": "top_examples"}, "scores", ()),
    ("attribute", {"top_examples": "top_examples"}, "attributions", ()),
    ("steer", {"top_examples": "top_examples", "explanations": "explanations", "attributions": "attributions"},
     "steering", ("explanations", "attributions")),
]


@pytest.mark.parametrize("parent", ["", "parent-run-1"])
@pytest.mark.parametrize(("name", "inputs", "output", "optional"), POINTER_STAGES, ids=[s[0] for s in POINTER_STAGES])
def test_stage_component_passes_pointers_and_logs_finite_figures(name, inputs, output, optional, parent, config,
                                                                 tmp_path, monkeypatch):
    component = getattr(importlib.import_module(f"mmsae.components.{name}"), name)
    out_uri = f"s3://bucket/run/{name}"
    calls = stand_in(monkeypatch, name, StageOutputs(out_uri, FIGURES))
    left_out = set(optional) if not parent else set()  # optional inputs go to the stage as None when not given
    given = {}
    # one pointer in its metadata, the next in its file only
    for i, param in enumerate(each for each in inputs if each not in left_out):
        make = pointer_in_metadata if i % 2 == 0 else pointer_in_file
        given[param] = make(tmp_path, param, f"/data/{param}-uri")
    pointer, metrics = FakeArtifact(tmp_path, output), FakeMetrics(tmp_path)
    component.python_func(config_yaml=dump_config(config), parent_run_id=parent, **given,
                          **{output: pointer, "metrics": metrics})
    assert len(calls) == 1
    (cfg,), kwargs = calls[0]
    assert cfg == config
    assert kwargs == {**{stage_kw: None if param in left_out else f"/data/{param}-uri"
                         for param, stage_kw in inputs.items()}, "parent_run_id": parent or None}
    assert_points_to(pointer, out_uri)
    assert metrics.logged == METRICS


@pytest.mark.parametrize("with_optional", [False, True])
def test_report_component_holds_the_page_and_logs_finite_figures(with_optional, config, tmp_path, monkeypatch):
    from mmsae.components.report import report as component

    page = tmp_path / "report" / "index.html"
    page.parent.mkdir()
    page.write_bytes(b"<!doctype html><title>r</title>")
    calls = stand_in(monkeypatch, "report", StageOutputs(str(page.parent), FIGURES, {"index": str(page)}))
    optional = {}
    if with_optional:
        optional = {"explanations": pointer_in_metadata(tmp_path, "explanations", "/data/expl.jsonl"),
                    "scores": pointer_in_file(tmp_path, "scores", "/data/scores.jsonl")}
    html, metrics = FakeArtifact(tmp_path, "report.html"), FakeMetrics(tmp_path)
    component.python_func(config_yaml=dump_config(config), parent_run_id="p",
                          top_examples=pointer_in_file(tmp_path, "top_examples", "/data/mined"),
                          report=html, metrics=metrics, **optional)
    (cfg,), kwargs = calls[0]
    assert cfg == config
    assert kwargs == {"top_examples": "/data/mined", "parent_run_id": "p", "steering": None, "attributions": None,
                      "explanations": "/data/expl.jsonl" if with_optional else None,
                      "scores": "/data/scores.jsonl" if with_optional else None}
    assert Path(html.path).read_bytes() == page.read_bytes()
    assert html.metadata["uri"] == str(page)
    assert metrics.logged == METRICS


def test_inputs_component_builds_the_toy_world_when_no_inputs_are_configured(config, tmp_path, monkeypatch):
    from mmsae.components.inputs import inputs as component

    calls = stand_in(monkeypatch, "toyworld", StageOutputs("/w/toyworld/images", FIGURES, {"lmm": "/w/toyworld/lmm"}))
    image_set, lmm, metrics = FakeArtifact(tmp_path, "image_set"), FakeArtifact(tmp_path, "lmm"), FakeMetrics(tmp_path)
    component.python_func(config_yaml=dump_config(config), parent_run_id="", image_set=image_set, lmm=lmm,
                          metrics=metrics)
    (cfg,), kwargs = calls[0]
    assert cfg == config and kwargs == {"parent_run_id": None}
    assert_points_to(image_set, "/w/toyworld/images")
    assert_points_to(lmm, "/w/toyworld/lmm")
    assert metrics.logged == METRICS


def test_inputs_component_passes_configured_inputs_on_and_refuses_missing_ones(config, tmp_path, monkeypatch):
    from mmsae.components.inputs import inputs as component

    calls = stand_in(monkeypatch, "toyworld", StageOutputs("/unused", FIGURES, {"lmm": "/unused"}))
    (tmp_path / "images").mkdir()
    (tmp_path / "model").mkdir()
    config.cache.image_set, config.cache.model = str(tmp_path / "images"), str(tmp_path / "model")
    image_set, lmm, metrics = FakeArtifact(tmp_path, "image_set"), FakeArtifact(tmp_path, "lmm"), FakeMetrics(tmp_path)
    component.python_func(config_yaml=dump_config(config), parent_run_id="", image_set=image_set, lmm=lmm,
                          metrics=metrics)
    assert calls == []
    assert_points_to(image_set, str(tmp_path / "images"))
    assert_points_to(lmm, str(tmp_path / "model"))
    assert metrics.logged == {}
    config.cache.model = str(tmp_path / "no-model")
    with pytest.raises(FileNotFoundError, match=r"cache\.model = .*no-model does not exist"):
        component.python_func(config_yaml=dump_config(config), parent_run_id="", image_set=image_set, lmm=lmm,
                              metrics=metrics)
    config.cache.model = ""
    with pytest.raises(ValueError, match=r"cache\.image_set is set but cache\.model is empty"):
        component.python_func(config_yaml=dump_config(config), parent_run_id="", image_set=image_set, lmm=lmm,
                              metrics=metrics)
    assert calls == []  # never a toy world in place of a half-configured input


class FinalStatus:
    """What close_tracking reads of KFP's PipelineTaskFinalStatus."""

    def __init__(self, state: str) -> None:
        self.state = state


@pytest.mark.parametrize(("state", "status"),
                         [("SUCCEEDED", "FINISHED"), ("FAILED", "FAILED"), ("CANCELLED", "KILLED")])
def test_tracking_components_open_and_close_the_parent_run(state, status, tmp_path, monkeypatch):
    from mmsae.components.tracking import close_tracking, open_tracking

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config_yaml = dump_config(load_config(None, [f"tracking.uri={uri}", "tracking.experiment=components",
                                                 f"run.workdir={tmp_path / 'work'}", "run.name=cfg-name"]))
    run_id = open_tracking.python_func(config_yaml=config_yaml, run_name="", kfp_job_id="job-42",
                                       kfp_job_name="the job")
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "cfg-name" and run.info.status == "RUNNING"
    assert run.data.tags[TAG_KFP_JOB_ID] == "job-42"
    assert run.data.params["workdir"] == str(tmp_path / "work")
    close_tracking.python_func(config_yaml=config_yaml, kfp_job_id="job-42", status=FinalStatus(state))
    assert client.get_run(run_id).info.status == status
    close_tracking.python_func(config_yaml=config_yaml, kfp_job_id="another-job", status=FinalStatus("FAILED"))
    assert client.get_run(run_id).info.status == status  # another job's exit leaves this run alone


def test_tracking_components_do_nothing_with_tracking_off(tmp_path, monkeypatch):
    from mmsae.components.tracking import close_tracking, open_tracking

    monkeypatch.chdir(tmp_path)
    config_yaml = dump_config(load_config(None, ["tracking.enabled=false"]))
    assert open_tracking.python_func(config_yaml=config_yaml, run_name="r", kfp_job_id="j", kfp_job_name="n") == ""
    close_tracking.python_func(config_yaml=config_yaml, kfp_job_id="j", status=FinalStatus("FAILED"))
    assert list(tmp_path.iterdir()) == []  # no database made
