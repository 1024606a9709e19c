"""Stage report: one self-contained HTML dashboard of a run's features.

Reads: the top-examples artifact (``report.top_examples``, default ``<workdir>/mine``: per-feature statistics,
top images and their heat-map PNGs), the headline figures every step recorded under ``<workdir>/summary/``,
and, when given, the JSONL results of the later stages: explanations (``feature, explanation, status,
explainer model, ...``), scores (``feature, scorer, score, details``; a line without a feature is a
scorer's random baseline) and steering results (``feature, strength, prompt, baseline output, steered
output, metrics``). Each of these may be named as a ``.jsonl`` file or as an artifact folder holding one.

Writes to ``report.out`` (default ``<workdir>/report``): ``index.html`` and a manifest of kind ``report``
(written last); logs the page to the stage's MLflow run and records its URI in ``<workdir>/summary/report.json``.

The page itself is built by ``mmsae.dashboard``: it needs no network (every image is a base64 data URI, the
CSS and the one script inline, and a Content-Security-Policy allows only that script, by hash, and data:
images), and every text that comes from an artifact is escaped by Jinja2's autoescape. The index lists
every mined feature; only ``report.max_detail_features`` of them get a detail section (chosen by
``report.detail_order``), and their heat maps are embedded as thumbnails sized to the page
(``mmsae.dashboard_images``), so the page stays small on large runs.

The larger view of a heat map is the thumbnail itself, shown at twice its size on click: a thumbnail holds
twice the pixels it is shown with (up to the PNG the mine stage stored), so the enlarged view costs no
bytes. The full PNGs stay in the mine stage's artifact; the page does not link to them, as it is shown
apart from that artifact (the KFP UI, MLflow).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from mmsae import storage
from mmsae.config import ReportConfig, RunConfig
from mmsae.dashboard import ReportError, render_report
from mmsae.examples import TopExamples
from mmsae.stages._base import (
    KEY_FIELD,
    OutputKey,
    StageContext,
    StageOutputs,
    read_summaries,
    resolve_uri,
    reusable_output,
    stage_context,
)

log = logging.getLogger(__name__)

STEP = "report"
KIND = "report"
FORMAT_VERSION = 1
INDEX_NAME = "index.html"
MINE_STEP = "mine"
MLFLOW_ARTIFACT_DIR = "report"

__all__ = ["ReportError", "open_top_examples", "read_jsonl", "render_report", "run"]


def run(
    cfg: RunConfig,
    top_examples: str | None = None,
    explanations: str | None = None,
    scores: str | None = None,
    steering: str | None = None,
    parent_run_id: str | None = None,
) -> StageOutputs:
    """Render the run's dashboard; the URI arguments override the ``report`` section (the pipeline's inputs).

    Returns the report folder as ``uri`` and the page as ``uris["index"]``.
    """
    workdir = cfg.run.workdir
    r = cfg.report.model_copy(update={
        "top_examples": resolve_uri(top_examples, cfg.report.top_examples, workdir, MINE_STEP),
        "explanations": explanations or cfg.report.explanations,
        "scores": scores or cfg.report.scores,
        "steering": steering or cfg.report.steering,
        "out": resolve_uri(None, cfg.report.out, workdir, STEP),
        "title": cfg.report.title or f"mmsae report: {cfg.run.name}",
    })
    index_uri = storage.join(r.out, INDEX_NAME)
    with stage_context(cfg, STEP, {"report": r.model_dump(mode="json")}, parent_run_id, output=r.out) as ctx:
        summaries = {k: v for k, v in read_summaries(workdir).items() if k != STEP}
        key = _output_key(r, summaries)
        sealed = reusable_output(r.out, KIND, key, overwrite=ctx.overwrite, setting="report.out")
        if sealed is not None:
            figures = dict(sealed.extra["figures"])
        else:
            figures = _render_and_write(r, summaries, key, ctx)
        ctx.finish(figures)
    log.info("report: %s (%d features, %d in detail, %.1f MiB)", index_uri, figures["features"],
             figures["features_detailed"], figures["report_bytes"] / 2**20)
    return StageOutputs(r.out, figures, {"index": index_uri})


def _output_key(r: ReportConfig, summaries: dict[str, Any]) -> OutputKey:
    """The report's inputs: the artifacts it shows, and the other steps' headline figures (by their hash)."""
    inputs = {name: uri for name, uri in (("top_examples", r.top_examples), ("explanations", r.explanations),
                                          ("scores", r.scores), ("steering", r.steering)) if uri}
    config = r.model_dump(mode="json", exclude={"top_examples", "explanations", "scores", "steering", "out"})
    config["summaries_sha256"] = hashlib.sha256(json.dumps(summaries, sort_keys=True).encode()).hexdigest()
    try:
        return OutputKey.of(config, inputs)
    except FileNotFoundError as e:
        raise ReportError(str(e)) from e


def _render_and_write(r: ReportConfig, summaries: dict[str, Any], key: OutputKey, ctx: StageContext) -> dict[str, Any]:
    """Render the page, write it and its manifest (last), and log it to the stage's MLflow run."""
    examples = open_top_examples(r.top_examples)
    page, figures = render_report(
        examples, r,
        explanations=read_jsonl(r.explanations, "explanations") if r.explanations else None,
        scores=read_jsonl(r.scores, "scores") if r.scores else None,
        steering=read_jsonl(r.steering, "steering") if r.steering else None,
        summaries=summaries,
    )
    index_uri = storage.join(r.out, INDEX_NAME)
    data = page.encode("utf-8")
    storage.write_bytes(index_uri, data)
    figures = {**figures, "report_bytes": len(data), "index": index_uri,
               "bytes_per_detailed_feature": len(data) / max(1, figures["features_detailed"])}
    inputs = {name: uri for name, uri in (("top_examples", r.top_examples), ("explanations", r.explanations),
                                          ("scores", r.scores), ("steering", r.steering)) if uri}
    storage.write_manifest(r.out, KIND, files=[INDEX_NAME], config={"report": r.model_dump(mode="json")},
                           inputs=inputs, extra={"figures": figures, KEY_FIELD: key.to_json()},
                           format_version=FORMAT_VERSION)
    with tempfile.TemporaryDirectory(prefix="mmsae-report-") as tmp:
        local = Path(tmp) / INDEX_NAME
        local.write_bytes(data)
        ctx.tracker.log_artifact(local, MLFLOW_ARTIFACT_DIR)
    ctx.tracker.set_tags({"mmsae.report": index_uri})
    return figures


# ---------------------------------------------------------------------------------------------------
# inputs


def open_top_examples(uri: str) -> TopExamples:
    """The top-examples artifact at ``uri``; a missing or wrong artifact is a :class:`ReportError` naming it."""
    try:
        return TopExamples(uri)
    except (FileNotFoundError, storage.ManifestError) as e:
        raise ReportError(f"report.top_examples: no top-examples artifact at {uri}: {e}") from e


def read_jsonl(uri: str, what: str) -> list[dict[str, Any]]:
    """The records of a JSONL file, or of the one JSONL file of an artifact folder (``<what>.jsonl`` if several).

    A folder with a manifest has its file checked against the manifest's sha256.
    """
    if uri.endswith(".jsonl"):
        try:
            text = storage.read_text(uri)
        except FileNotFoundError as e:
            raise ReportError(f"report.{what}: {uri} does not exist") from e
        return _parse_jsonl(text, uri, what)
    try:
        names = [n for n in storage.list_files(uri) if n.endswith(".jsonl")]
    except FileNotFoundError as e:
        raise ReportError(f"report.{what}: {uri} does not exist") from e
    if not names:
        raise ReportError(f"report.{what}: {uri} holds no .jsonl file; expected a JSONL file or a folder with one")
    if len(names) > 1:
        preferred = [n for n in names if Path(n).name == f"{what}.jsonl"]
        if len(preferred) != 1:
            raise ReportError(f"report.{what}: {uri} holds several .jsonl files {sorted(names)}; name one of them")
        names = preferred
    name = names[0]
    try:
        manifest = storage.read_manifest(uri)
    except storage.ManifestError:
        manifest = None
    if manifest is not None and name in manifest.files:
        text = storage.read_verified_bytes(uri, name, manifest).decode("utf-8")
    else:
        text = storage.read_text(storage.join(uri, name))
    return _parse_jsonl(text, storage.join(uri, name), what)


def _parse_jsonl(text: str, uri: str, what: str) -> list[dict[str, Any]]:
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"report.{what}: {uri} line {i} is not JSON: {e}") from e
        if not isinstance(rec, dict):
            raise ReportError(f"report.{what}: {uri} line {i} is a {type(rec).__name__}, expected a JSON object")
        out.append(rec)
    return out
