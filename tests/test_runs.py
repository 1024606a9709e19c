"""`mmsae runs compare` against a real MLflow server holding the runs of two demo-sized pipeline runs (logged
here as the pipeline's tracking component and stages log them), plus runs it must leave out."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from mmsae import runs, tracking
from mmsae.cli import app
from mmsae.services.mlflow_server import MlflowServer

runner = CliRunner()


def _pipeline_run(uri: str, name: str, job: str, experiment: str, stages: dict[str, tuple[dict, dict]],
                  tags: dict[str, str] | None = None) -> str:
    """A pipeline run as the DAG leaves it: the parent (tagged with the KFP run id) and one child per stage
    with its config section as params and its figures as metrics."""
    parent = tracking.start_pipeline_run(name, tags=tags, params={"workdir": f"s3://mmsae/runs/{name}"}, uri=uri,
                                         experiment=experiment, kfp_job_id=job, kfp_job_name=name)
    for stage, (config, figures) in stages.items():
        with tracking.stage_run(stage, parent_run_id=parent, config=config, uri=uri, experiment=experiment) as run:
            run.log_metrics(tracking.metric_values(figures))
    tracking.end_pipeline_run(parent, uri=uri)
    return parent


def _demo(layer: int, k: int, num_latents: int | None, fvu: float, dead: float,
          scores: dict[str, float] | None) -> dict[str, tuple[dict, dict]]:
    stages: dict[str, tuple[dict, dict]] = {
        "inputs": ({}, {"images": 6500}),
        "cache": ({"cache": {"layers": [layer], "model": "s3://mmsae/toyworld/lmm", "image_set": "s3://mmsae/toy",
                             "tokens": "image"}}, {"rows": 110000}),
        "train": ({"train": {"k": k, "num_latents": num_latents, "expansion_factor": 8, "batch_size": 1024}},
                  {"steps": 420, "dead_pct": dead, "heldout_fvu_image": fvu, "heldout_tokens_image": 5500}),
        "mine": ({"mine": {"top_k": 10}}, {"dead_pct": 26.8, "features_mined": 1024}),
    }
    if scores is not None:
        stages["score"] = ({"score": {"top_images": 5}}, scores)
    return stages


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Two demo-sized pipeline runs in experiment mmsae (the second without a score stage), one in another
    experiment and one without the team tag; yields the server's URI."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow-runs"), startup_timeout=120) as server:
        uri = server.uri
        _pipeline_run(uri, "demo-layer1", "kfp-run-1", "mmsae", tags={"team": "vision"},
                      stages=_demo(1, 16, 1024, 0.029, 14.3, {"detection": 0.82, "iou": 0.67, "clip": 0.24}))
        _pipeline_run(uri, "demo-layer0", "kfp-run-2", "mmsae", tags={"team": "vision"},
                      stages=_demo(0, 32, None, 0.041, 3.5, None))
        _pipeline_run(uri, "elsewhere", "kfp-run-3", "other", stages=_demo(1, 64, 4096, 0.5, 50.0, None))
        _pipeline_run(uri, "untagged", "kfp-run-4", "mmsae", stages=_demo(1, 8, 512, 0.2, 1.0, None))
        yield uri


def _compare(uri: str, *args: str, tmp_path: Path) -> tuple[list[dict[str, Any]], str]:
    table = tmp_path / "table.csv"
    result = runner.invoke(app, ["runs", "compare", "--tracking-uri", uri, "--plot", str(tmp_path / "plot.png"),
                                 "--csv", str(table), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with table.open() as handle:
        return list(csv.DictReader(handle)), result.stdout


def test_two_demo_runs_side_by_side_with_missing_figures_blank(demo_runs, tmp_path) -> None:
    rows, printed = _compare(demo_runs, "--experiment", "mmsae", "--tag", "team=vision", tmp_path=tmp_path)
    assert [row["run"] for row in rows] == ["demo-layer1", "demo-layer0"]
    first, second = rows
    assert first["kfp_run"] == "kfp-run-1" and first["layer"] == "1" and first["k"] == "16"
    assert first["width"] == "1024" and first["model"] == "s3://mmsae/toyworld/lmm"
    assert first["image_set"] == "s3://mmsae/toy"
    assert float(first["fvu"]) == pytest.approx(0.029) and float(first["dead_pct"]) == pytest.approx(14.3)
    assert float(first["detection"]) == pytest.approx(0.82) and float(first["iou"]) == pytest.approx(0.67)
    assert first["steering"] == "" and first["ground_truth"] == ""
    assert second["layer"] == "0" and second["k"] == "32" and second["width"] == "8x"  # num_latents unset
    assert float(second["fvu"]) == pytest.approx(0.041)
    assert second["detection"] == second["iou"] == second["clip"] == ""
    header, rule, *lines = printed.splitlines()[:4]
    assert header.split()[:6] == ["run", "kfp_run", "layer", "model", "image_set", "width"]
    assert set(rule) <= {"-", " "} and lines[0].startswith("demo-layer1")
    with Image.open(tmp_path / "plot.png") as plot:
        assert plot.format == "PNG" and plot.width >= 1000 and plot.height >= 1000


def test_runs_are_chosen_by_kfp_run_id_across_experiments_and_by_experiment(demo_runs, tmp_path) -> None:
    rows, _ = _compare(demo_runs, "--kfp-run", "kfp-run-3", "--kfp-run", "kfp-run-2", tmp_path=tmp_path)
    assert sorted(row["run"] for row in rows) == ["demo-layer0", "elsewhere"]
    rows, _ = _compare(demo_runs, tmp_path=tmp_path)  # default: experiment mmsae, any tag
    assert [row["run"] for row in rows] == ["demo-layer1", "demo-layer0", "untagged"]
    rows, _ = _compare(demo_runs, "-e", "other", "--column", "mean_mined_dead=mine:dead_pct", tmp_path=tmp_path)
    assert [row["run"] for row in rows] == ["elsewhere"] and float(rows[0]["+mean_mined_dead"]) == 26.8


def test_stage_runs_tagged_with_a_layer_make_one_row_each(demo_runs, tmp_path) -> None:
    parent = tracking.start_pipeline_run("two-layers", uri=demo_runs, kfp_job_id="kfp-run-5")
    for layer, fvu in ((0, 0.05), (1, 0.03)):
        for stage, config, figures in (("cache", {"cache": {"layers": [0, 1]}}, {}),
                                       ("train", {"train": {"k": 16, "num_latents": 1024}},
                                        {"heldout_fvu_image": fvu})):
            with tracking.stage_run(stage, parent_run_id=parent, config=config, uri=demo_runs) as run:
                run.set_tags({runs.TAG_LAYER: layer})
                run.log_metrics(figures)
    with tracking.stage_run("report", parent_run_id=parent, config={}, uri=demo_runs) as run:
        run.log_metrics({"features": 1024})
    comparison = runs.compare(demo_runs, kfp_runs=["kfp-run-5"], extra=[runs.parse_column("shown=report:features")])
    assert [(row["layer"], row["fvu"], row["+shown"]) for row in comparison.rows] == [(0, 0.05, 1024.0),
                                                                                      (1, 0.03, 1024.0)]


def test_an_unknown_experiment_or_nothing_matching_is_one_line(demo_runs, tmp_path) -> None:
    result = runner.invoke(app, ["runs", "compare", "--tracking-uri", demo_runs, "-e", "nope"])
    assert result.exit_code == 1 and "no MLflow experiment 'nope'" in result.output and "other" in result.output
    result = runner.invoke(app, ["runs", "compare", "--tracking-uri", demo_runs, "--tag", "team=audio",
                                 "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 1 and "no pipeline run" in result.output and not (tmp_path / "p.png").exists()
    result = runner.invoke(app, ["runs", "compare", "--tracking-uri", demo_runs, "--tag", "team"])
    assert result.exit_code == 1 and "expected KEY=VALUE" in result.output
