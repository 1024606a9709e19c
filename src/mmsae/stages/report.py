"""Stage report: one self-contained HTML dashboard of a run's features.

Reads: the top-examples artifact (``report.top_examples``, default ``<workdir>/mine``: per-feature statistics,
top images and their heat-map PNGs), the headline figures every step recorded under ``<workdir>/summary/``,
and, when given, the JSONL results of the later stages: explanations (``feature, explanation, status,
explainer model, ...``), scores (``feature, scorer, score, details``; a line without a feature is a
scorer's random baseline) and steering results (``feature, strength, prompt, baseline output, steered
output, metrics``). Each of these may be named as a ``.jsonl`` file or as an artifact folder holding one. Of a
steering artifact (the folder, or its ``steering.jsonl``) the report also reads ``dose_response.json`` and
``random_baseline.jsonl`` for each feature's dose-response (computed from the rows when the file is absent). An
attributions artifact (``report.attributions``, the attribute stage's folder) gives the Attributions section:
``attributions.jsonl`` and the heat maps of its first ``report.attribution_examples`` examples.

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
from mmsae.dashboard_attributions import AttributionRecords, heatmap_name
from mmsae.dashboard_steering import SteeringExtras
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
STEERING_KIND, STEERING_RECORDS = "steering", "steering.jsonl"
STEERING_RANDOM, STEERING_DOSE = "random_baseline.jsonl", "dose_response.json"
"""The steering artifact's kind and files (`mmsae.stages.steer`, not imported: it loads torch)."""
ATTRIBUTIONS_KIND, ATTRIBUTIONS_RECORDS = "attributions", "attributions.jsonl"
"""The attributions artifact's kind and records (`mmsae.stages.attribute`)."""
INPUTS = ("top_examples", "explanations", "scores", "steering", "attributions")
"""The report settings that name its input artifacts."""

__all__ = ["ReportError", "open_attributions", "open_top_examples", "read_jsonl", "read_steering_extras",
           "render_report", "run"]


def run(
    cfg: RunConfig,
    top_examples: str | None = None,
    explanations: str | None = None,
    scores: str | None = None,
    steering: str | None = None,
    attributions: str | None = None,
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
        "attributions": attributions or cfg.report.attributions,
        "out": resolve_uri(None, cfg.report.out, workdir, STEP),
        "title": cfg.report.title or f"mmsae report: {cfg.run.name}",
    })
    index_uri = storage.join(r.out, INDEX_NAME)
    with stage_context(cfg, STEP, {"report": r.model_dump(mode="json")}, parent_run_id, output=r.out) as ctx:
        summaries = {k: v for k, v in read_summaries(workdir, ctx.layer).items() if k != STEP}
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
    config = r.model_dump(mode="json", exclude={*INPUTS, "out"})
    config["summaries_sha256"] = hashlib.sha256(json.dumps(summaries, sort_keys=True).encode()).hexdigest()
    try:
        return OutputKey.of(config, _inputs(r))
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
        steering_extras=read_steering_extras(r.steering) if r.steering else None,
        attributions=open_attributions(r.attributions) if r.attributions else None,
    )
    index_uri = storage.join(r.out, INDEX_NAME)
    data = page.encode("utf-8")
    storage.write_bytes(index_uri, data)
    figures = {**figures, "report_bytes": len(data), "index": index_uri,
               "bytes_per_detailed_feature": len(data) / max(1, figures["features_detailed"])}
    storage.write_manifest(r.out, KIND, files=[INDEX_NAME], config={"report": r.model_dump(mode="json")},
                           inputs=_inputs(r), extra={"figures": figures, KEY_FIELD: key.to_json()},
                           format_version=FORMAT_VERSION)
    with tempfile.TemporaryDirectory(prefix="mmsae-report-") as tmp:
        local = Path(tmp) / INDEX_NAME
        local.write_bytes(data)
        ctx.tracker.log_artifact(local, MLFLOW_ARTIFACT_DIR)
    ctx.tracker.set_tags({"mmsae.report": index_uri})
    return figures


# ---------------------------------------------------------------------------------------------------
# inputs


def _inputs(r: ReportConfig) -> dict[str, str]:
    """The input artifacts the report shows, by setting name (those given)."""
    return {name: getattr(r, name) for name in INPUTS if getattr(r, name)}


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


def read_steering_extras(uri: str) -> SteeringExtras | None:
    """The dose-response and the random baseline of a steering artifact, named by its folder or its
    ``steering.jsonl``; None for another JSONL file. Files the manifest lists are checked against it."""
    folder = uri
    if uri.endswith(".jsonl"):
        head, _, name = uri.rpartition("/")
        if name != STEERING_RECORDS or not head:
            return None
        folder = head
    try:
        manifest = storage.read_manifest(folder)
    except storage.ManifestError:
        manifest = None
    if manifest is not None and manifest.kind != STEERING_KIND:
        log.warning("report.steering: %s holds a %r artifact, not a steering one; its rows only are shown",
                    folder, manifest.kind)
        return None

    def read(name: str) -> bytes | None:
        if manifest is not None:
            return storage.read_verified_bytes(folder, name, manifest) if name in manifest.files else None
        try:
            return storage.read_bytes(storage.join(folder, name))
        except FileNotFoundError:
            return None

    dose, random_rows = read(STEERING_DOSE), read(STEERING_RANDOM)
    try:
        summary = json.loads(dose) if dose is not None else None
    except json.JSONDecodeError as e:
        raise ReportError(f"report.steering: {storage.join(folder, STEERING_DOSE)} is not JSON: {e}") from e
    if summary is not None and not isinstance(summary, dict):
        raise ReportError(f"report.steering: {storage.join(folder, STEERING_DOSE)} holds a "
                          f"{type(summary).__name__}, expected a JSON object")
    extra = manifest.extra if manifest is not None else {}
    strengths = [float(x) for x in extra.get("strengths") or () if isinstance(x, int | float)]
    return SteeringExtras(
        dose_response=summary, strengths=strengths, unit=str(extra.get("strength_unit") or ""), source=folder,
        random_rows=_parse_jsonl(random_rows.decode("utf-8"), storage.join(folder, STEERING_RANDOM), "steering")
        if random_rows is not None else [])


def open_attributions(uri: str) -> AttributionRecords:
    """The attributions artifact at ``uri``: its records (checked against the manifest) and its heat maps, read
    when asked for; a missing or wrong artifact is a :class:`ReportError` naming it."""
    try:
        manifest = storage.read_manifest(uri, ATTRIBUTIONS_KIND)
    except storage.ManifestError as e:
        raise ReportError(f"report.attributions: no attributions artifact at {uri}: {e}") from e
    if ATTRIBUTIONS_RECORDS not in manifest.files:
        raise ReportError(f"report.attributions: the manifest of {uri} lists no {ATTRIBUTIONS_RECORDS}; expected "
                          "the attribute stage's artifact")
    text = storage.read_verified_bytes(uri, ATTRIBUTIONS_RECORDS, manifest).decode("utf-8")
    rows = _parse_jsonl(text, storage.join(uri, ATTRIBUTIONS_RECORDS), "attributions")

    def heatmap(example: int, feature: int | None) -> bytes | None:
        name = heatmap_name(example, feature)
        return storage.read_verified_bytes(uri, name, manifest) if name in manifest.files else None

    return AttributionRecords(uri, rows, heatmap)
