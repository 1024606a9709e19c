"""Pipeline runs side by side, from MLflow: what tells them apart (layer, width, k, model, image set) and
their headline figures (FVU, dead share, detection accuracy, explanation scores, steering success), as a
table and as a plot of each figure against layer, width and k.

Reads, at the tracking URI, the pipeline runs (tagged ``mmsae.pipeline``) chosen by experiment, tag or KFP
run id (tag ``kfp.job_id``), and their stage runs (tagged ``mmsae.stage``; children of the pipeline run, or
grandchildren under Kubeflow's own MLflow runs). A stage run logs its config section as flattened params
(``train.k``, ``cache.layers``, ...) and its figures as metrics. Each SAE is one row: one per pipeline run,
or one per layer where stage runs carry the layer in the tag ``mmsae.layer`` (stage runs without it, such as
the report, count for every layer of their pipeline run). A figure that was not logged is left blank.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from mmsae import tracking
from mmsae.dashboard_figures import finite_number

log = logging.getLogger(__name__)

TAG_LAYER = "mmsae.layer"
"""Tag of a stage run that works on one layer of a pipeline run over several."""
MAX_DEPTH = 4
"""Levels of MLflow runs between a stage run and its pipeline run (Kubeflow nests loop iterations)."""


class RunsError(RuntimeError):
    """No such experiment, a malformed selection, or no pipeline run matched; the message says which."""


@dataclass(frozen=True)
class Column:
    """One column: a param or a metric of one stage, the first of ``names`` that the stage run logged."""

    label: str
    stage: str
    names: tuple[str, ...]
    metric: bool = True


SETTINGS = (
    Column("model", "cache", ("cache.model",), metric=False),
    Column("image_set", "cache", ("cache.image_set",), metric=False),
    Column("width", "train", ("train.num_latents",), metric=False),
    Column("k", "train", ("train.k",), metric=False),
)
"""What tells runs apart, besides the layer (first column, see :func:`_layer`)."""
FIGURES = (
    Column("fvu", "train", ("heldout_fvu_image", "heldout_fvu_all", "heldout_fvu_text", "fvu")),
    Column("dead_pct", "train", ("dead_pct",)),
    Column("detection", "score", ("detection", "detection.mean", "detection_accuracy")),
    Column("iou", "score", ("iou", "iou.mean")),
    Column("clip", "score", ("clip", "clip.mean")),
    Column("ground_truth", "score", ("ground_truth", "ground_truth.mean")),
    Column("steering", "steer", ("success_rate", "success", "steering_success")),
)
"""The headline figures: held-out FVU and dead-latent share (train), detection accuracy and explanation
scores (score), steering success rate (steer)."""
AXES = ("layer", "width", "k")
"""What the plot puts each figure against."""


@dataclass
class Comparison:
    """The rows (one per SAE) under ``columns``; a missing value is None."""

    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def figures(self) -> list[str]:
        return [c for c in self.columns if c in {f.label for f in FIGURES} or c.startswith("+")]


def parse_column(text: str) -> Column:
    """An extra figure column from ``LABEL=STAGE:METRIC`` (e.g. ``auxk=train:auxk``)."""
    label, _, rest = text.partition("=")
    stage, _, metric = rest.partition(":")
    if not (label and stage and metric):
        raise RunsError(f"column {text!r}: expected LABEL=STAGE:METRIC, e.g. mean_l0=mine:mean_l0")
    return Column(f"+{label}", stage, (metric,))


def compare(tracking_uri: str | None = None, experiments: Sequence[str] = (), tags: Mapping[str, str] | None = None,
            kfp_runs: Sequence[str] = (), extra: Sequence[Column] = ()) -> Comparison:
    """The rows of the chosen pipeline runs: those of ``experiments`` (default: every experiment when
    ``kfp_runs`` are named, else mmsae's default experiment) holding every tag of ``tags``, and, when
    ``kfp_runs`` are given, run for one of those KFP run ids."""
    client = MlflowClient(tracking_uri=tracking.resolve_tracking_uri(tracking_uri))
    runs = _all_runs(client, _experiment_ids(client, experiments, bool(kfp_runs)))
    pipelines = [run for run in runs if tracking.TAG_PIPELINE in run.data.tags
                 and all(run.data.tags.get(k) == v for k, v in (tags or {}).items())
                 and (not kfp_runs or run.data.tags.get(tracking.TAG_KFP_JOB_ID) in kfp_runs)]
    if not pipelines:
        raise RunsError(f"no pipeline run at {client.tracking_uri} matches: experiments "
                        f"{list(experiments) or 'default'}, tags {dict(tags or {})}, KFP runs {list(kfp_runs)}")
    stages = _stage_runs_by_pipeline(runs, {run.info.run_id for run in pipelines})
    columns = ["run", "kfp_run", "layer", *(c.label for c in SETTINGS), *(c.label for c in (*FIGURES, *extra))]
    comparison = Comparison(columns)
    for pipeline in sorted(pipelines, key=lambda run: run.info.start_time or 0):
        for group in _layer_groups(stages.get(pipeline.info.run_id, [])):
            comparison.rows.append(_row(pipeline, group, extra))
    return comparison


def _experiment_ids(client: MlflowClient, names: Sequence[str], every: bool) -> list[str]:
    if not names:
        if every:
            return [e.experiment_id for e in client.search_experiments()]
        names = [tracking.DEFAULT_EXPERIMENT]
    ids = []
    for name in names:
        found = client.get_experiment_by_name(name)
        if found is None:
            known = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise RunsError(f"no MLflow experiment {name!r} at {client.tracking_uri} (experiments: {known})")
        ids.append(found.experiment_id)
    return ids


def _all_runs(client: MlflowClient, experiment_ids: list[str]) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _stage_runs_by_pipeline(runs: Iterable[Run], pipeline_ids: set[str]) -> dict[str, list[Run]]:
    """Stage runs under each pipeline run, found by climbing their parent runs."""
    by_id = {run.info.run_id: run for run in runs}
    found: dict[str, list[Run]] = {}
    for run in by_id.values():
        if tracking.TAG_STAGE not in run.data.tags:
            continue
        parent = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
        for _ in range(MAX_DEPTH):
            if parent is None or parent in pipeline_ids:
                break
            parent = by_id[parent].data.tags.get(MLFLOW_PARENT_RUN_ID) if parent in by_id else None
        if parent in pipeline_ids:
            found.setdefault(parent, []).append(run)
    return found


def _layer_groups(stage_runs: list[Run]) -> list[list[Run]]:
    """Stage runs per layer (tag mmsae.layer), each with the runs that name no layer; newest first."""
    ordered = sorted(stage_runs, key=lambda run: run.info.start_time or 0, reverse=True)
    shared = [run for run in ordered if TAG_LAYER not in run.data.tags]
    layers = sorted({run.data.tags[TAG_LAYER] for run in ordered if TAG_LAYER in run.data.tags}, key=_sort_key)
    if not layers:
        return [shared]
    return [[run for run in ordered if run.data.tags.get(TAG_LAYER) == layer] + shared for layer in layers]


def _row(pipeline: Run, group: list[Run], extra: Sequence[Column]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "run": pipeline.info.run_name or pipeline.info.run_id,
        "kfp_run": pipeline.data.tags.get(tracking.TAG_KFP_JOB_ID),
        "layer": _layer(group),
    }
    for column in (*SETTINGS, *FIGURES, *extra):
        row[column.label] = _value(group, column)
    if row["width"] is None:
        factor = _value(group, Column("expansion", "train", ("train.expansion_factor",), metric=False))
        row["width"] = f"{factor}x" if factor is not None else None
    return row


def _stage_of(run: Run) -> str:
    return run.data.tags.get(tracking.TAG_STAGE, "")


def _value(group: list[Run], column: Column) -> Any:
    for run in group:  # newest first: a rerun of a stage wins
        if _stage_of(run) != column.stage:
            continue
        logged = run.data.metrics if column.metric else run.data.params
        for name in column.names:
            if name in logged and logged[name] not in ("None", ""):
                return logged[name] if column.metric else _param(logged[name])
    return None


def _param(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _layer(group: list[Run]) -> Any:
    tagged = {run.data.tags[TAG_LAYER] for run in group if TAG_LAYER in run.data.tags}
    if tagged:
        return _param(tagged.pop())
    layers = _value(group, Column("layer", "cache", ("cache.layers",), metric=False))
    if isinstance(layers, list):
        return layers[0] if len(layers) == 1 else ",".join(map(str, layers))
    return layers


def _sort_key(value: Any) -> tuple[int, float, str]:
    number = finite_number(value)
    return (0, number, "") if number is not None else (1, 0.0, str(value))


# ----------------------------------------------------------------------------------------------------------
# output


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(comparison: Comparison) -> str:
    """The comparison as an aligned text table (blank cells: not logged)."""
    cells = [comparison.columns] + [[_cell(row[c]) for c in comparison.columns] for row in comparison.rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(comparison.columns))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
             for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def write_csv(comparison: Comparison, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(comparison.columns)
        writer.writerows([_cell(row[c]) for c in comparison.columns] for row in comparison.rows)


def plot(comparison: Comparison, path: Path) -> Path:
    """A grid of scatter plots, one figure per row against layer, width and k (one colour per run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = comparison.figures
    grid, axes = plt.subplots(len(figures), len(AXES), figsize=(4 * len(AXES), 2.6 * len(figures)),
                              squeeze=False)
    runs = list(dict.fromkeys(row["run"] for row in comparison.rows))
    colours = {run: plt.get_cmap("tab10")(i % 10) for i, run in enumerate(runs)}
    for i, figure in enumerate(figures):
        for j, axis in enumerate(AXES):
            _scatter(axes[i][j], comparison.rows, axis, figure, colours)
            if i == len(figures) - 1:
                axes[i][j].set_xlabel(axis)
            if j == 0:
                axes[i][j].set_ylabel(figure.lstrip("+"))
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colours[run], label=run) for run in runs[:10]]
    grid.legend(handles=handles, loc="upper center", ncol=min(len(handles), 5), frameon=False)
    grid.tight_layout(rect=(0, 0, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.savefig(path, dpi=100)
    plt.close(grid)
    return path


def _scatter(ax, rows: list[dict[str, Any]], axis: str, figure: str, colours: dict[str, Any]) -> None:
    """One figure against one axis; an axis with a value that is not a number (a width of ``8x``) is shown
    as categories, in the order of :func:`_sort_key`."""
    from matplotlib.ticker import MaxNLocator

    values = [row[axis] for row in rows if row[axis] is not None]
    categories = (sorted({str(v) for v in values}, key=_sort_key)
                  if any(finite_number(v) is None for v in values) else None)
    points = [(row[axis], float(row[figure]), row["run"]) for row in rows
              if row[axis] is not None and finite_number(row[figure]) is not None]
    if not points:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    for x, y, run in points:
        position = float(categories.index(str(x))) if categories else float(x)
        ax.scatter([position], [y], color=colours[run], s=28)
    if categories:  # the same x range in every row of the grid
        ax.set_xticks(range(len(categories)), categories)
        ax.set_xlim(-0.5, len(categories) - 0.5)
    else:
        low, high = min(map(float, values)), max(map(float, values))
        pad = (high - low) * 0.1 or 0.5
        ax.set_xlim(low - pad, high + pad)
        if all(float(v).is_integer() for v in values):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
