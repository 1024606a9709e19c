"""Stage report: one self-contained HTML dashboard of a run's features.

Reads: the top-examples artifact (``report.top_examples``, default ``<workdir>/mine``: per-feature statistics,
top images and their heat-map PNGs), the headline figures every step recorded under ``<workdir>/summary/``,
and, when given, the JSONL results of the later stages: explanations (``feature, explanation, status,
explainer model, ...``), scores (``feature, scorer, score, details``; a line without a feature is a
scorer's random baseline) and steering results (``feature, strength, prompt, baseline output, steered
output, metrics``). Each of these may be named as a ``.jsonl`` file or as an artifact folder holding one.

Writes to ``report.out`` (default ``<workdir>/report``): ``index.html`` and a manifest of kind ``report``
(written last); logs the page to the stage's MLflow run and records its URI in ``<workdir>/summary/report.json``.

The page needs no network: every image is a base64 data URI, the CSS and the few lines of sorting script are
inline, and a Content-Security-Policy allows only that script (by hash) and data: images. Every text that comes
from an artifact (explanations, model replies, prompts, steering outputs, details) is escaped by Jinja2's
autoescape. The index lists every mined feature; only ``report.max_detail_features`` of them get a detail
section (chosen by ``report.detail_order``), so the page stays small on large runs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup
from tqdm import tqdm

from mmsae import storage, tracking
from mmsae.config import ReportConfig, RunConfig
from mmsae.examples import TopExamples, TopExamplesError
from mmsae.stages.common import read_summaries, record_summary, stage_uri

log = logging.getLogger(__name__)

STEP = "report"
KIND = "report"
FORMAT_VERSION = 1
INDEX_NAME = "index.html"
MINE_STEP = "mine"
MLFLOW_ARTIFACT_DIR = "report"

_TEMPLATES = "templates"
_TEMPLATE = "report.html.j2"
_JS = "report.js"
_CSS = "report.css"


class ReportError(ValueError):
    """An input of the report that cannot be read or does not have the expected form; names the input."""


@dataclass(frozen=True)
class ReportOutputs:
    uri: str
    """The report folder."""
    index_uri: str
    """The dashboard page, ``<uri>/index.html``."""
    figures: dict[str, Any]


def run(
    cfg: RunConfig,
    top_examples: str | None = None,
    explanations: str | None = None,
    scores: str | None = None,
    steering: str | None = None,
    parent_run_id: str | None = None,
) -> ReportOutputs:
    """Render the run's dashboard; the URI arguments override the ``report`` section (the pipeline's inputs)."""
    r = cfg.report.model_copy(update={
        "top_examples": top_examples or cfg.report.top_examples or stage_uri(cfg.run.workdir, MINE_STEP),
        "explanations": explanations or cfg.report.explanations,
        "scores": scores or cfg.report.scores,
        "steering": steering or cfg.report.steering,
        "out": cfg.report.out or stage_uri(cfg.run.workdir, STEP),
        "title": cfg.report.title or f"mmsae report: {cfg.run.name}",
    })
    with tracking.stage_run(
        STEP, parent_run_id=parent_run_id, config={"report": r.model_dump(mode="json")},
        uri=cfg.tracking.uri, experiment=cfg.tracking.experiment, enabled=cfg.tracking.enabled,
    ) as tr:
        examples = open_top_examples(r.top_examples)
        summaries = {k: v for k, v in read_summaries(cfg.run.workdir).items() if k != STEP}
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
        inputs = {name: uri for name, uri in (("top_examples", r.top_examples), ("explanations", r.explanations),
                                              ("scores", r.scores), ("steering", r.steering)) if uri}
        storage.write_manifest(r.out, KIND, files=[INDEX_NAME], config={"report": r.model_dump(mode="json")},
                               inputs=inputs, extra={"figures": figures}, format_version=FORMAT_VERSION)
        with tempfile.TemporaryDirectory(prefix="mmsae-report-") as tmp:
            local = Path(tmp) / INDEX_NAME
            local.write_bytes(data)
            tr.log_artifact(local, MLFLOW_ARTIFACT_DIR)
        figures = {**figures, "report_bytes": len(data), "index": index_uri}
        tr.log_metrics({k: v for k, v in figures.items() if _is_number(v)})
        tr.set_tags({"mmsae.report": index_uri})
        record_summary(cfg.run.workdir, STEP, figures)
    log.info("report: %s (%d features, %d in detail, %.1f MiB)", index_uri, figures["features"],
             figures["features_detailed"], len(data) / 2**20)
    return ReportOutputs(r.out, index_uri, figures)


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


# ---------------------------------------------------------------------------------------------------
# rendering


@dataclass
class _Feature:
    feature: int
    frequency: float | None
    image_frequency: float | None
    max_activation: float | None
    mean_activation: float | None
    top: list[tuple[int, float]]
    quantiles: list[tuple[int, float, int]]
    negatives: list[int]
    explanations: list[dict[str, Any]] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)
    steering: list[dict[str, Any]] = field(default_factory=list)

    def score_of(self, scorer: str) -> float | None:
        vals = [_number(s.get("score")) for s in self.scores if str(s.get("scorer")) == scorer]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    def mean_score(self) -> float | None:
        vals = [v for v in (_number(s.get("score")) for s in self.scores) if v is not None]
        return sum(vals) / len(vals) if vals else None


def render_report(
    examples,
    r: ReportConfig,
    explanations: Sequence[Mapping[str, Any]] | None = None,
    scores: Sequence[Mapping[str, Any]] | None = None,
    steering: Sequence[Mapping[str, Any]] | None = None,
    summaries: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The dashboard page for a top-examples reader and the optional later-stage records; also its figures."""
    feats = [_feature(rec) for rec in examples.features()]
    by_id = {f.feature: f for f in feats}
    unknown: dict[str, set[int]] = {}
    for what, records in (("explanations", explanations), ("scores", scores), ("steering", steering)):
        for rec in records or ():
            fid = _feature_id(rec.get("feature"))
            if fid is None:
                continue
            if fid not in by_id:
                unknown.setdefault(what, set()).add(fid)
                continue
            getattr(by_id[fid], what).append(dict(rec))
    for what, ids in unknown.items():
        log.warning("%s names %d features that were not mined (e.g. %s); they are left out",
                    what, len(ids), sorted(ids)[:5])
    baselines = [dict(rec) for rec in scores or () if _feature_id(rec.get("feature")) is None]
    scorers = _scorers(scores or ())

    extra = dict(examples.manifest.extra or {})
    selected = {int(i) for i in extra.get("selected", extra.get("features", [])) if _feature_id(i) is not None}
    detailed = _choose_detailed(feats, r, selected)
    detailed_ids = {f.feature for f in detailed}

    meta = [(label, value) for label, value in (
        ("hook point", extra.get("hookpoint")), ("model family", extra.get("family")),
        ("latents", extra.get("num_latents")), ("k", extra.get("k")), ("image score", extra.get("score")),
        ("top examples", getattr(examples, "uri", None) or r.top_examples),
        ("generated", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")),
    ) if value not in (None, "")]

    headline = []
    for step, figs in sorted((summaries or {}).items()):
        headline.append((step, [(k, _fmt(v)) for k, v in _flat(figs)] if isinstance(figs, Mapping)
                         else [("value", _fmt(figs))]))
    if not (summaries or {}).get(MINE_STEP) and extra.get("figures"):
        headline.append((MINE_STEP, [(k, _fmt(v)) for k, v in _flat(extra["figures"])]))

    columns = [
        {"key": "feature", "label": "feature", "type": "number"},
        {"key": "explanation", "label": "explanation", "type": "text"},
        {"key": "frequency", "label": "frequency", "type": "number"},
        {"key": "image-frequency", "label": "image freq.", "type": "number"},
        {"key": "max-activation", "label": "max act.", "type": "number"},
        {"key": "mean-activation", "label": "mean act.", "type": "number"},
    ]
    if not explanations:
        columns = [c for c in columns if c["key"] != "explanation"]
    # one scorer: its column is "score"; several: a column each and "score", their mean
    score_keys = {s: "score" for s in scorers} if len(scorers) == 1 else {s: f"score-{_slug(s)}" for s in scorers}
    if len(scorers) > 1:
        columns += [{"key": score_keys[s], "label": s, "type": "number"} for s in scorers]
    if scorers:
        columns.append({"key": "score", "label": scorers[0] if len(scorers) == 1 else "mean score", "type": "number"})

    rows = []
    for f in feats:
        expl = _primary_explanation(f)
        values: dict[str, Any] = {
            "feature": f.feature, "explanation": expl, "frequency": f.frequency,
            "image-frequency": f.image_frequency, "max-activation": f.max_activation,
            "mean-activation": f.mean_activation, "score": f.mean_score(),
        }
        values.update({score_keys[s]: f.score_of(s) for s in scorers})
        cells = []
        for c in columns:
            v = values[c["key"]]
            if c["key"] == "feature":
                cells.append({"text": str(f.feature), "numeric": True,
                              "link": _anchor(f.feature) if f.feature in detailed_ids else None})
            elif c["type"] == "number":
                cells.append({"text": _fmt_stat(c["key"], v), "numeric": True, "link": None})
            else:
                cells.append({"text": v or "", "numeric": False, "link": None})
        attrs = [(k, "" if v is None else (_raw(v) if not isinstance(v, str) else v)) for k, v in values.items()]
        rows.append({"feature": f.feature, "attrs": attrs, "cells": cells})

    kinds = ["overlay", "masked"] if r.heatmap == "both" else [r.heatmap]
    details = []
    n_images = 0
    for f in tqdm(detailed, desc="report", unit="feature", disable=len(detailed) < 50):
        view = _feature_view(examples, f, r, kinds)
        n_images += sum(1 for im in view["images"] for p in im["pictures"] if p["src"])
        details.append(view)

    ground_truth = _ground_truth_view(examples, detailed_ids)
    js = _resource(_JS)
    css = _resource(_CSS)
    script_hash = base64.b64encode(hashlib.sha256(js.encode("utf-8")).digest()).decode("ascii")
    csp = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
           f"script-src 'sha256-{script_hash}'; base-uri 'none'; form-action 'none'")
    page = _template().render(
        title=r.title or "mmsae report", meta=meta, headline=headline, baselines=[_score_view(b) for b in baselines],
        columns=columns, rows=rows, n_detailed=len(details), features=details,
        has_explanations=bool(explanations), image_width=r.image_width, ground_truth=ground_truth,
        css=Markup(css), js=Markup(js), csp=csp, version=_version(),
    )
    figures = {
        "features": len(feats),
        "features_detailed": len(details),
        "images": n_images,
        "explained_features": sum(1 for f in feats if any(e.get("status", "ok") == "ok" for e in f.explanations)),
        "scored_features": sum(1 for f in feats if f.scores),
        "steered_features": sum(1 for f in feats if f.steering),
    }
    return page, figures


@lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(_resource(_TEMPLATE))


def _resource(name: str) -> str:
    return resources.files("mmsae").joinpath(_TEMPLATES, name).read_text(encoding="utf-8")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mmsae")
    except Exception:  # not installed as a distribution
        return "unknown"


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """A field of a reader record, whether the reader gives dataclasses or plain dicts."""
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _feature(rec: Any) -> _Feature:
    fid = _feature_id(_get(rec, "feature"))
    if fid is None:
        raise ReportError(f"a features record of the top-examples artifact has no integer feature id: {rec!r}")
    top = [(int(_get(t, "image_idx")), float(_get(t, "score"))) for t in _get(rec, "top", []) or []]
    quantiles = [(int(_get(q, "image_idx")), float(_get(q, "score")), int(_get(q, "quantile", 0)))
                 for q in _get(rec, "quantiles", []) or []]
    return _Feature(
        feature=fid, frequency=_number(_get(rec, "frequency")), image_frequency=_number(_get(rec, "image_frequency")),
        max_activation=_number(_get(rec, "max_activation")), mean_activation=_number(_get(rec, "mean_activation")),
        top=top, quantiles=quantiles, negatives=[int(n) for n in _get(rec, "negatives", []) or []],
    )


def _choose_detailed(feats: list[_Feature], r: ReportConfig, selected: set[int]) -> list[_Feature]:
    """The features that get a detail section, in feature-id order."""
    if len(feats) <= r.max_detail_features:
        return list(feats)

    def key(f: _Feature) -> tuple:
        if r.detail_order == "feature":
            return (f.feature,)
        if r.detail_order == "selected":  # the mine stage's selection, then by max activation
            return (f.feature not in selected, -(f.max_activation or 0.0), f.feature)
        v = {"frequency": f.frequency, "max_activation": f.max_activation, "score": f.mean_score()}[r.detail_order]
        return (v is None, -(v or 0.0), f.feature)

    chosen = sorted(feats, key=key)[: r.max_detail_features]
    return sorted(chosen, key=lambda f: f.feature)


def _feature_view(examples, f: _Feature, r: ReportConfig, kinds: list[str]) -> dict[str, Any]:
    images = []
    for rank, (image_idx, score) in enumerate(f.top[: r.images_per_feature]):
        pictures = []
        for kind in kinds:
            pictures.append({"kind": kind, "src": _data_uri(examples.heatmap_bytes(f.feature, image_idx, kind),
                                                             f"heat map {kind} of feature {f.feature}, image {image_idx}")})
        images.append({"rank": rank + 1, "image_idx": image_idx, "score": _fmt(score), "pictures": pictures})
    stats = [
        ("frequency", _fmt_stat("frequency", f.frequency)),
        ("image frequency", _fmt_stat("image-frequency", f.image_frequency)),
        ("max activation", _fmt_stat("max-activation", f.max_activation)),
        ("mean activation", _fmt_stat("mean-activation", f.mean_activation)),
    ]
    return {
        "feature": f.feature, "anchor": _anchor(f.feature), "stats": stats, "images": images,
        "quantiles": [{"image_idx": i, "score": _fmt(s), "quantile": q} for i, s, q in f.quantiles],
        "negatives": f.negatives,
        "explanations": [_explanation_view(e) for e in f.explanations],
        "scores": [_score_view(s) for s in f.scores],
        "steering": [_steering_view(s) for s in f.steering],
    }


def _data_uri(data: bytes | None, what: str) -> str | None:
    if data is None:
        return None
    mime = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg" if data[:2] == b"\xff\xd8" else None
    if mime is None:
        log.warning("%s is neither PNG nor JPEG; left out", what)
        return None
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _ground_truth_view(examples, detailed_ids: set[int]) -> list[dict[str, Any]]:
    """The artifact's ground-truth file (image sets with planted concepts) as tables: lists of records become
    a table each (feature ids linked to their sections), mappings of numbers a table of figures."""
    try:
        gt = examples.ground_truth()
    except (TopExamplesError, storage.ManifestError, ValueError) as e:
        log.warning("ground truth of %s not shown: %s", getattr(examples, "uri", "the top examples"), e)
        return []
    if not isinstance(gt, Mapping):
        return []
    tables = []
    for name, value in gt.items():
        if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            cols = list(dict.fromkeys(k for v in value for k in v))
            rows = []
            for v in value:
                cells = []
                for c in cols:
                    fid = _feature_id(v.get(c)) if c == "feature" or c.endswith("_feature") else None
                    cells.append({"text": _fmt(v.get(c)), "link": _anchor(fid) if fid in detailed_ids else None})
                rows.append(cells)
            tables.append({"name": str(name), "columns": [str(c) for c in cols], "rows": rows})
        elif isinstance(value, Mapping) and value:
            rows = [[{"text": k, "link": None}, {"text": _fmt(v), "link": None}] for k, v in _flat(value)]
            tables.append({"name": str(name), "columns": ["figure", "value"], "rows": rows})
    return tables


def _explanation_view(e: Mapping[str, Any]) -> dict[str, Any]:
    model = _first(e, "explainer_model", "explainer", "model")
    latency = _number(_first(e, "latency_s", "latency"))
    return {
        "explanation": _text(e.get("explanation")) or "(no explanation)",
        "status": _slug(str(e.get("status") or "ok")),
        "model": _text(model),
        "latency": f"{latency:.2f} s" if latency is not None else "",
        "raw": _text(_first(e, "raw_reply", "raw", "reply")),
    }


def _score_view(s: Mapping[str, Any]) -> dict[str, Any]:
    details = s.get("details")
    return {"scorer": _text(s.get("scorer")), "score": _fmt(s.get("score")),
            "details": "" if details in (None, {}, []) else _pretty(details)}


def _steering_view(s: Mapping[str, Any]) -> dict[str, Any]:
    metrics = s.get("metrics")
    return {
        "strength": _fmt(s.get("strength")),
        "prompt": _text(s.get("prompt")),
        "baseline": _text(_first(s, "baseline_output", "baseline")),
        "steered": _text(_first(s, "steered_output", "steered")),
        "metrics": "" if metrics in (None, {}, []) else _pretty(metrics),
    }


def _primary_explanation(f: _Feature) -> str:
    ok = [e for e in f.explanations if (e.get("status") or "ok") == "ok" and e.get("explanation")]
    chosen = ok[0] if ok else (f.explanations[0] if f.explanations else None)
    if chosen is None:
        return ""
    text = _text(chosen.get("explanation"))
    return text if (chosen.get("status") or "ok") == "ok" else f"({chosen.get('status')}) {text}".strip()


def _scorers(scores: Iterable[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for s in scores:
        if s.get("scorer") is not None and _feature_id(s.get("feature")) is not None:
            seen.setdefault(str(s["scorer"]), None)
    return list(seen)


def _first(rec: Mapping[str, Any], *names: str) -> Any:
    for n in names:
        if rec.get(n) not in (None, ""):
            return rec[n]
    return None


def _feature_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\d+", value):
        return int(value)
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _pretty(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-") or "x"


def _anchor(feature: int) -> str:
    return f"f-{feature:06d}"


def _raw(value: Any) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3g}"
        return f"{value:.4g}"
    return _text(value)


def _fmt_stat(key: str, value: float | None) -> str:
    if value is None:
        return ""
    if key in ("frequency", "image-frequency"):
        return f"{100 * value:.3g}%"
    return _fmt(value)


def _flat(figures: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return list(tracking.flatten(figures).items())
