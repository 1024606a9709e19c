"""The dashboard: one self-contained HTML page of a run's features, from a top-examples reader, the step
summaries and the later stages' records (the report stage, ``mmsae.stages.report``, reads them and writes
the page).

What a researcher opens first: the headline figures of every step with labels, units, meanings and their
baselines (``mmsae.dashboard_figures``); the ground truth of planted concepts (toy world); an index of
every mined feature, sorted by image frequency (then max activation; features that never fire last), with
a search box over ids, explanations and promoted tokens; and, for ``report.max_detail_features`` of them, a
section with statistics, an activation histogram, the tokens the feature's decoder direction promotes and
suppresses, explanations, top-image heat maps (thumbnails, ``mmsae.dashboard_images``; click one to see
it at twice the size), quantile and random samples, scores beside their random baselines, steering results
with the feature's dose-response (``mmsae.dashboard_steering``) and the attributed examples it is a top
feature of; and an Attributions section of the attribute stage's examples (``mmsae.dashboard_attributions``).

The page needs no network: images are ``data:`` URIs, the CSS and the one script (sorting, search) inline,
and a Content-Security-Policy allows only that script, by hash. All text goes through Jinja2's autoescape.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from typing import Any

import jinja2
from markupsafe import Markup

from mmsae import dashboard_figures, storage
from mmsae.config import ReportConfig
from mmsae.dashboard_attributions import AttributionRecords, attributed_in, attributions_view
from mmsae.dashboard_figures import finite_number
from mmsae.dashboard_images import thumbnail
from mmsae.dashboard_steering import SteeringExtras, dose_curves, dose_view
from mmsae.examples import TopExamplesError

log = logging.getLogger(__name__)

MINE_STEP = "mine"
DEFAULT_SORT = "-image-frequency"
"""The index's order when the page opens (a leading minus: descending)."""
INDEX_TOKENS = 5
"""Promoted tokens listed per feature in the index."""
_TEMPLATES = "templates"
_TEMPLATE = "report.html.j2"
_JS = "report.js"
_CSS = "report.css"


class ReportError(ValueError):
    """An input of the report that cannot be read or does not have the expected form; names the input."""


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
    histogram: list[int] = field(default_factory=list)
    histogram_upper: float = 0.0
    promoted: list[dict[str, Any]] = field(default_factory=list)
    suppressed: list[dict[str, Any]] = field(default_factory=list)
    explanations: list[dict[str, Any]] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)
    steering: list[dict[str, Any]] = field(default_factory=list)

    def score_of(self, scorer: str) -> float | None:
        vals = [finite_number(s.get("score")) for s in self.scores if str(s.get("scorer")) == scorer]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    def mean_score(self) -> float | None:
        vals = [v for v in (finite_number(s.get("score")) for s in self.scores) if v is not None]
        return sum(vals) / len(vals) if vals else None


def render_report(
    examples,
    r: ReportConfig,
    explanations: Sequence[Mapping[str, Any]] | None = None,
    scores: Sequence[Mapping[str, Any]] | None = None,
    steering: Sequence[Mapping[str, Any]] | None = None,
    summaries: Mapping[str, Mapping[str, Any]] | None = None,
    steering_extras: SteeringExtras | None = None,
    attributions: AttributionRecords | None = None,
) -> tuple[str, dict[str, Any]]:
    """The dashboard page for a top-examples reader and the optional later-stage records (``steering_extras``:
    the steering artifact's dose-response and random baseline); also its figures."""
    feats = [_feature(rec) for rec in examples.features()]
    _attach_records(feats, {"explanations": explanations, "scores": scores, "steering": steering})
    baselines = [dict(rec) for rec in scores or () if _feature_id(rec.get("feature")) is None]
    baseline_of = {str(b.get("scorer")): _fmt(b.get("score")) for b in baselines if b.get("scorer") is not None}
    extra = dict(examples.manifest.extra or {})
    selected = {int(i) for i in extra.get("selected", extra.get("features", [])) if _feature_id(i) is not None}
    detailed = _choose_detailed(feats, r, selected)
    detailed_ids = {f.feature for f in detailed}
    columns, rows = _index(feats, detailed_ids, _scorers(scores or ()), bool(explanations), baseline_of)
    curves = dose_curves(steering or (), steering_extras)
    attribution = attributions_view(attributions, r.attribution_examples, r.image_width, detailed_ids,
                                     {f.feature: _primary_explanation(f) for f in feats})
    shown_examples = {e["example"] for e in attribution["examples"]} if attribution else set()
    cards = {"curves": curves, "unit": steering_extras.unit if steering_extras else "",
             "attributed": attributed_in(attributions, shown_examples)}
    details = _details(examples, detailed, r, baseline_of, cards)
    headline = dashboard_figures.headline(_headline_summaries(summaries, extra))
    shown = {key for card in headline for row in card["rows"]
             for key in (row["key"], row["baseline"] and row["baseline"]["key"]) if key}
    js = _resource(_JS)
    script_hash = base64.b64encode(hashlib.sha256(js.encode("utf-8")).digest()).decode("ascii")
    csp = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
           f"script-src 'sha256-{script_hash}'; base-uri 'none'; form-action 'none'")
    page = _template().render(
        title=r.title or "mmsae report", meta=_meta(examples, r, extra), headline=headline,
        baselines=[_score_view(b, {}) for b in baselines], columns=columns, rows=rows, n_detailed=len(details),
        features=details, has_explanations=bool(explanations), image_width=r.image_width, attribution=attribution,
        ground_truth=_ground_truth_view(examples, detailed_ids, shown), default_sort=DEFAULT_SORT,
        css=Markup(_resource(_CSS)), js=Markup(js), csp=csp, version=_version(),
    )
    figures = {
        "features": len(feats),
        "features_detailed": len(details),
        "images": sum(1 for d in details for im in d["images"] for p in im["pictures"] if p["thumb"]),
        "explained_features": sum(1 for f in feats if any(e.get("status", "ok") == "ok" for e in f.explanations)),
        "scored_features": sum(1 for f in feats if f.scores),
        "steered_features": sum(1 for f in feats if f.steering),
        "dose_response_features": sum(1 for d in details if d["dose"]),
        "attributed_examples": attribution["shown"] if attribution else 0,
    }
    return page, figures


def _headline_summaries(summaries: Mapping[str, Any] | None, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The steps' figures; the mine step's from the artifact when its summary is not there."""
    out = dict(summaries or {})
    if not out.get(MINE_STEP) and extra.get("figures"):
        out[MINE_STEP] = extra["figures"]
    return out


def _attach_records(feats: list[_Feature], sources: Mapping[str, Sequence[Mapping[str, Any]] | None]) -> None:
    """Give each mined feature its explanations, scores and steering records; warn of unknown features."""
    by_id = {f.feature: f for f in feats}
    unknown: dict[str, set[int]] = {}
    for what, records in sources.items():
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


def _meta(examples, r: ReportConfig, extra: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return [(label, value) for label, value in (
        ("hook point", extra.get("hookpoint")), ("model family", extra.get("family")),
        ("latents", extra.get("num_latents")), ("k", extra.get("k")), ("image score", extra.get("score")),
        ("top examples", getattr(examples, "uri", None) or r.top_examples),
        ("generated", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")),
    ) if value not in (None, "")]


# ---------------------------------------------------------------------------------------------------
# the index


def _index(feats: list[_Feature], detailed_ids: set[int], scorers: list[str], has_explanations: bool,
           baseline_of: Mapping[str, str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The feature index: its columns and one row per mined feature (cells, sortable and searchable
    attributes), in the default order (:data:`DEFAULT_SORT`)."""
    columns = [
        {"key": "feature", "label": "feature", "type": "number"},
        {"key": "explanation", "label": "explanation", "type": "text"},
        {"key": "promotes", "label": "promotes", "type": "text"},
        {"key": "frequency", "label": "frequency", "type": "number"},
        {"key": "image-frequency", "label": "image freq.", "type": "number"},
        {"key": "max-activation", "label": "max act.", "type": "number"},
        {"key": "mean-activation", "label": "mean act.", "type": "number"},
    ]
    has_tokens = any(f.promoted for f in feats)
    columns = [c for c in columns if (c["key"] != "explanation" or has_explanations)
               and (c["key"] != "promotes" or has_tokens)]
    # one scorer: its column is "score"; several: a column each and "score", their mean
    score_keys = {s: "score" for s in scorers} if len(scorers) == 1 else {s: f"score-{_slug(s)}" for s in scorers}
    if len(scorers) > 1:
        columns += [{"key": score_keys[s], "label": s, "type": "number", "baseline": baseline_of.get(s)}
                    for s in scorers]
    if scorers:
        columns.append({"key": "score", "label": scorers[0] if len(scorers) == 1 else "mean score", "type": "number",
                        "baseline": baseline_of.get(scorers[0]) if len(scorers) == 1 else None})
    for c in columns:
        c["sort"] = "descending" if "-" + c["key"] == DEFAULT_SORT else None
        c.setdefault("baseline", None)
    rows = [_index_row(f, columns, score_keys, detailed_ids) for f in sorted(feats, key=_default_order)]
    return columns, rows


def _default_order(f: _Feature) -> tuple:
    """Image frequency, then max activation, descending (features that never fire last); then the id."""
    return (-(f.image_frequency or 0.0), -(f.max_activation or 0.0), f.feature)


def _index_row(f: _Feature, columns: list[dict[str, Any]], score_keys: Mapping[str, str],
               detailed_ids: set[int]) -> dict[str, Any]:
    tokens = [t["token"] for t in f.promoted[:INDEX_TOKENS]]
    values: dict[str, Any] = {
        "feature": f.feature, "explanation": _primary_explanation(f), "promotes": " ".join(tokens),
        "frequency": f.frequency, "image-frequency": f.image_frequency, "max-activation": f.max_activation,
        "mean-activation": f.mean_activation, "score": f.mean_score(),
    }
    values.update({key: f.score_of(s) for s, key in score_keys.items()})
    cells = [_index_cell(c, values[c["key"]], f.feature, detailed_ids, tokens) for c in columns]
    attrs = [(k, "" if v is None else (_raw(v) if not isinstance(v, str) else v)) for k, v in values.items()]
    search = " ".join([values["explanation"], *(t["token"] for t in f.promoted)]).lower()
    return {"feature": f.feature, "attrs": attrs, "cells": cells, "search": search}


def _index_cell(column: Mapping[str, Any], value: Any, feature: int, detailed_ids: set[int],
                tokens: list[str]) -> dict[str, Any]:
    if column["key"] == "feature":
        return {"text": str(feature), "kind": "num", "link": _anchor(feature) if feature in detailed_ids else None}
    if column["key"] == "promotes":
        return {"text": "", "kind": "tokens", "tokens": tokens, "link": None}
    if column["type"] == "number":
        return {"text": _fmt_stat(column["key"], value), "kind": "num", "link": None}
    return {"text": value or "", "kind": "text", "link": None}


# ---------------------------------------------------------------------------------------------------
# the detail sections


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


def _details(examples, detailed: list[_Feature], r: ReportConfig, baseline_of: Mapping[str, str],
             cards: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The detail sections (``cards``: the dose-response curves, their strength unit, the attributed examples
    per feature); the heat maps are read and cut to thumbnails in parallel (Pillow and the checksums release
    the GIL)."""
    kinds = ["overlay", "masked"] if r.heatmap == "both" else [r.heatmap]
    jobs = [(f.feature, image_idx, kind) for f in detailed for image_idx, _ in f.top[: r.images_per_feature]
            for kind in kinds]

    def one(job: tuple[int, int, str]):
        feature, image_idx, kind = job
        return thumbnail(examples.heatmap_bytes(feature, image_idx, kind), r.image_width,
                         f"heat map {kind} of feature {feature}, image {image_idx}")

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        thumbs = dict(zip(jobs, pool.map(one, jobs), strict=True))
    return [_feature_view(f, r, kinds, thumbs, baseline_of, cards) for f in detailed]


def _feature_view(f: _Feature, r: ReportConfig, kinds: list[str], thumbs: Mapping[tuple[int, int, str], Any],
                  baseline_of: Mapping[str, str], cards: Mapping[str, Any]) -> dict[str, Any]:
    images = [{"rank": rank + 1, "image_idx": image_idx, "score": _fmt(score),
               "pictures": [{"kind": kind, "thumb": thumbs[(f.feature, image_idx, kind)]} for kind in kinds]}
              for rank, (image_idx, score) in enumerate(f.top[: r.images_per_feature])]
    stats = [
        ("frequency", _fmt_stat("frequency", f.frequency)),
        ("image frequency", _fmt_stat("image-frequency", f.image_frequency)),
        ("max activation", _fmt_stat("max-activation", f.max_activation)),
        ("mean activation", _fmt_stat("mean-activation", f.mean_activation)),
    ]
    return {
        "feature": f.feature, "anchor": _anchor(f.feature), "stats": stats, "images": images,
        "histogram": _histogram_view(f.histogram, f.histogram_upper),
        "promoted": [_token_view(t) for t in f.promoted], "suppressed": [_token_view(t) for t in f.suppressed],
        "quantiles": [{"image_idx": i, "score": _fmt(s), "quantile": q} for i, s, q in f.quantiles],
        "negatives": f.negatives,
        "explanations": [_explanation_view(e) for e in f.explanations],
        "scores": [_score_view(s, baseline_of) for s in f.scores],
        "has_baselines": any(str(s.get("scorer")) in baseline_of for s in f.scores),
        "steering": [_steering_view(s) for s in f.steering],
        "dose": dose_view(f.feature, cards["curves"].get(f.feature), cards["unit"]) if f.steering else None,
        "attributed": cards["attributed"].get(f.feature, []),
    }


HISTOGRAM_WIDTH, HISTOGRAM_HEIGHT = 240, 48
"""Size of the activation histogram's plot, in CSS pixels."""


def _histogram_view(counts: Sequence[int], upper: float) -> dict[str, Any] | None:
    """Bars of the activation histogram up to its last non-empty bin, heights on a log scale of the count."""
    last = max((i for i, c in enumerate(counts) if c), default=-1)
    if last < 0 or upper <= 0:
        return None
    step = upper / len(counts)
    top = math.log1p(max(counts))
    width = HISTOGRAM_WIDTH / (last + 1)
    bars = []
    for i, c in enumerate(counts[: last + 1]):
        height = HISTOGRAM_HEIGHT * math.log1p(c) / top
        bars.append({"x": round(i * width, 2), "y": round(HISTOGRAM_HEIGHT - height, 2), "width": round(width, 2),
                     "height": round(height, 2), "title": f"{_fmt(i * step)} to {_fmt((i + 1) * step)}: {c:,} tokens"})
    return {"bars": bars, "width": HISTOGRAM_WIDTH, "height": HISTOGRAM_HEIGHT, "high": _fmt((last + 1) * step),
            "tokens": f"{sum(counts):,}"}


def _token_view(t: Mapping[str, Any]) -> dict[str, str]:
    return {"token": str(t.get("token", "")), "logit": _fmt(finite_number(t.get("logit")))}


def _ground_truth_view(examples, detailed_ids: set[int], headline_keys: set[str]) -> list[dict[str, Any]]:
    """The artifact's ground-truth file (image sets with planted concepts) as tables: lists of records become
    a table each (feature ids linked to their sections, known columns labelled), mappings of numbers a table
    of figures unless the headline already shows every one of them."""
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
            rows = [[_ground_truth_cell(c, v.get(c), detailed_ids) for c in cols] for v in value]
            tables.append({"name": str(name), "columns": [dashboard_figures.GROUND_TRUTH_COLUMNS.get(c, c) for c in cols],
                           "rows": rows})
        elif isinstance(value, Mapping) and value:
            flat = _flat(value)
            if {k for k, _ in flat} <= headline_keys:
                continue  # the headline shows these figures already
            rows = [[{"text": k, "link": None}, {"text": _fmt(v), "link": None}] for k, v in flat]
            tables.append({"name": str(name), "columns": ["figure", "value"], "rows": rows})
    return tables


def _ground_truth_cell(column: str, value: Any, detailed_ids: set[int]) -> dict[str, Any]:
    fid = _feature_id(value) if column == "feature" or column.endswith("_feature") else None
    return {"text": _fmt(value), "link": _anchor(fid) if fid in detailed_ids else None}


def _explanation_view(e: Mapping[str, Any]) -> dict[str, Any]:
    model = _first(e, "explainer_model", "explainer", "model")
    latency = finite_number(_first(e, "latency_s", "latency"))
    return {
        "explanation": _text(e.get("explanation")) or "(no explanation)",
        "status": _slug(str(e.get("status") or "ok")),
        "model": _text(model),
        "latency": f"{latency:.2f} s" if latency is not None else "",
        "raw": _text(_first(e, "raw_reply", "raw", "reply")),
    }


def _score_view(s: Mapping[str, Any], baseline_of: Mapping[str, str]) -> dict[str, Any]:
    details = s.get("details")
    return {"scorer": _text(s.get("scorer")), "score": _fmt(s.get("score")),
            "baseline": baseline_of.get(str(s.get("scorer")), ""),
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


# ---------------------------------------------------------------------------------------------------
# records, template and formatting


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
        feature=fid, frequency=finite_number(_get(rec, "frequency")), image_frequency=finite_number(_get(rec, "image_frequency")),
        max_activation=finite_number(_get(rec, "max_activation")), mean_activation=finite_number(_get(rec, "mean_activation")),
        top=top, quantiles=quantiles, negatives=[int(n) for n in _get(rec, "negatives", []) or []],
        histogram=[int(c) for c in _get(rec, "histogram", []) or []],
        histogram_upper=finite_number(_get(rec, "histogram_upper")) or 0.0,
        promoted=list(_get(rec, "promoted", []) or []), suppressed=list(_get(rec, "suppressed", []) or []),
    )


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
    if isinstance(value, int | float):
        return dashboard_figures.number(value) if math.isfinite(value) else str(value)
    return _text(value)


def _fmt_stat(key: str, value: float | None) -> str:
    if value is None:
        return ""
    if key in ("frequency", "image-frequency"):
        return f"{100 * value:.3g}%"
    return _fmt(value)


def _flat(values: Mapping[str, Any]) -> list[tuple[str, Any]]:
    from mmsae import tracking

    return list(tracking.flatten(values).items())
