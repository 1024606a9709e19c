"""The steering view of a feature's card: its dose-response, drawn as an inline SVG and listed as a table.

A steered feature's dose-response is, per strength, the success rate (the share of prompts whose unsteered output
does not name the feature's concept and whose steered output does) beside its random baseline's (a random feature
clamped at the same strengths, measured with the same concept words), the KL divergence of the first generated
token's distribution from the unsteered one, and the perplexity of the steered output under the unsteered model.
They come from the steering artifact's ``dose_response.json`` (`mmsae.steering.dose_response`) or, when it is
absent, are computed from the rows of ``steering.jsonl`` and ``random_baseline.jsonl`` by the same definitions
(see `mmsae.stages.steer`).

The plot is drawn like the activation histogram (``mmsae.dashboard``): coordinates here, the SVG in the page's
template, so the page stays self-contained and every text stays escaped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmsae.dashboard_figures import finite_number, number, whole_number

log = logging.getLogger(__name__)

STRENGTH_UNITS = {"max_activation": "× max activation", "activation": "activation units"}
"""Axis wording of the steer stage's ``strength_unit`` values."""
PLOT_WIDTH, PLOT_HEIGHT = 340, 200
"""Size of the dose-response plot, in CSS pixels."""
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 58, 12, 10, 40
LABEL_GAP = 30
"""Least distance in CSS pixels between two labelled ticks of the strength axis."""
STAT_NAMES = ("success_rate", "kl_mean", "perplexity")


@dataclass
class SteeringExtras:
    """What a steering artifact holds besides its rows; every part may be missing."""

    dose_response: Mapping[str, Any] | None = None
    """The parsed ``dose_response.json``."""
    random_rows: list[dict[str, Any]] = field(default_factory=list)
    """The rows of ``random_baseline.jsonl``."""
    strengths: list[float] = field(default_factory=list)
    """The strengths steered at (the manifest's); empty: those the rows hold."""
    unit: str = ""
    """The manifest's ``strength_unit``; empty: unknown."""
    source: str = ""
    """Where the artifact was read, for warnings."""


def dose_curves(rows: Sequence[Mapping[str, Any]], extras: SteeringExtras | None) -> dict[int, dict[str, Any]]:
    """Per steered feature: its points (one per strength, ascending: ``strength, n`` and each of
    :data:`STAT_NAMES` with its ``random_`` counterpart), the unsteered perplexity of its prompts and where the
    points come from."""
    extras = extras or SteeringExtras()
    from_rows = _curves_from_rows(rows, extras)
    from_file = _curves_from_file(extras.dose_response, extras.source) if extras.dose_response else {}
    out = {}
    for feature, curve in from_rows.items():
        if feature in from_file:
            out[feature] = {**curve, "points": from_file[feature], "source": "dose_response.json"}
        else:
            out[feature] = curve
    return out


def _curves_from_file(summary: Mapping[str, Any], source: str) -> dict[int, list[dict[str, Any]]]:
    """The points of ``dose_response.json``; an entry of another shape is warned about and left out."""
    features = summary.get("features")
    if not isinstance(features, Mapping):
        log.warning("%s: dose_response.json has no 'features' mapping; the curves are computed from the rows", source)
        return {}
    out = {}
    for key, entry in features.items():
        strengths = entry.get("strengths") if isinstance(entry, Mapping) else None
        feature = whole_number(key)
        if feature is None or not isinstance(strengths, Mapping):
            log.warning("%s: dose_response.json entry %r is not a feature with strengths; left out", source, key)
            continue
        points = []
        for strength, stats in strengths.items():
            x = finite_number(strength, booleans=True)
            if x is None or not isinstance(stats, Mapping):
                continue
            points.append({"strength": x, "n": stats.get("n"),
                           **{name: finite_number(stats.get(name), booleans=True) for name in STAT_NAMES},
                           **{f"random_{name}": finite_number(stats.get(f"random_{name}"), booleans=True) for name in STAT_NAMES}})
        out[feature] = sorted(points, key=lambda p: p["strength"])
    return out


def _curves_from_rows(rows: Sequence[Mapping[str, Any]], extras: SteeringExtras) -> dict[int, dict[str, Any]]:
    """The points computed from the rows (and the random baseline's rows, by ``for_feature``)."""
    own: dict[tuple[int, float], list[Mapping[str, Any]]] = {}
    other: dict[tuple[int, float], list[Mapping[str, Any]]] = {}
    for items, into, by in ((rows, own, "feature"), (extras.random_rows, other, "for_feature")):
        for row in items:
            feature, strength = whole_number(row.get(by)), finite_number(row.get("strength"), booleans=True)
            if feature is not None and strength is not None:
                into.setdefault((feature, strength), []).append(row)
    strengths = sorted({float(s) for s in extras.strengths} or {s for _, s in own})
    out = {}
    for feature in dict.fromkeys(f for f, _ in own):
        points = []
        for strength in strengths:
            stats, rnd = _stats(own.get((feature, strength), [])), _stats(other.get((feature, strength), []))
            points.append({"strength": strength, "n": stats.pop("n"), **stats,
                           **{f"random_{k}": v for k, v in rnd.items() if k != "n"}})
        mine = [r for (f, _), group in own.items() if f == feature for r in group]
        out[feature] = {"points": points, "source": "steering rows",
                        "unsteered_perplexity": _geometric_mean(_metric(r, "baseline_perplexity") for r in mine)}
    return out


def _stats(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``mmsae.steering``'s statistics of a group of rows: success over the prompts it is defined for, mean KL,
    perplexity as exp of the mean per-token NLL."""
    def mean(name: str) -> float | None:
        values = [v for v in (_metric(r, name) for r in rows) if v is not None]
        return sum(values) / len(values) if values else None

    nll = [_metric(r, "steered_nll") for r in rows]
    if not any(v is not None for v in nll):  # rows with a perplexity only: the same mean, through its log
        nll = [math.log(p) if p is not None and p > 0 else None for p in (_metric(r, "steered_perplexity")
                                                                           for r in rows)]
    kept = [v for v in nll if v is not None]
    return {"n": len(rows), "success_rate": mean("success"), "kl_mean": mean("kl_first_token"),
            "perplexity": math.exp(sum(kept) / len(kept)) if kept else None}


def dose_view(feature: int, curve: Mapping[str, Any] | None, unit: str) -> dict[str, Any] | None:
    """The card's dose-response: the plot (None when no success rate was measured) and the table; None when
    the rows measure none of :data:`STAT_NAMES` (results of another format)."""
    points = curve.get("points") if curve else None
    if not points or not any(p.get(k) is not None for p in points
                             for name in STAT_NAMES for k in (name, f"random_{name}")):
        return None
    has_random = any(p.get(f"random_{name}") is not None for p in points for name in STAT_NAMES)
    table = [{"strength": number(p["strength"]), "n": "" if p.get("n") is None else str(p["n"]),
              "success": _percent(p.get("success_rate")), "random_success": _percent(p.get("random_success_rate")),
              "kl": _fmt(p.get("kl_mean")), "random_kl": _fmt(p.get("random_kl_mean")),
              "perplexity": _fmt(p.get("perplexity")), "random_perplexity": _fmt(p.get("random_perplexity"))}
             for p in points]
    return {"plot": _plot(feature, points, unit), "table": table, "has_random": has_random,
            "strength_label": strength_label(unit), "source": curve.get("source", ""),
            "unsteered_perplexity": _fmt(curve.get("unsteered_perplexity"))}


def strength_label(unit: str) -> str:
    """The strength axis's title with its unit."""
    return f"strength ({STRENGTH_UNITS.get(unit, unit or 'as configured in steer.strengths')})"


def _plot(feature: int, points: Sequence[Mapping[str, Any]], unit: str) -> dict[str, Any] | None:
    """Coordinates of the success-rate curves (the feature's, the random baseline's) against strength."""
    if not any(p.get(k) is not None for p in points for k in ("success_rate", "random_success_rate")):
        return None
    xs = [p["strength"] for p in points]
    low, high = min(xs), max(xs)
    inner_w = PLOT_WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    inner_h = PLOT_HEIGHT - MARGIN_TOP - MARGIN_BOTTOM

    def x_of(strength: float) -> float:
        share = 0.5 if high == low else (strength - low) / (high - low)
        return round(MARGIN_LEFT + share * inner_w, 2)

    def y_of(rate: float) -> float:
        return round(MARGIN_TOP + (1 - min(max(rate, 0.0), 1.0)) * inner_h, 2)

    series = []
    for name, key, label in (("feature", "success_rate", f"feature {feature}"),
                             ("random", "random_success_rate", "random feature (baseline)")):
        marks = [{"x": x_of(p["strength"]), "y": y_of(p[key]), "strength": repr(float(p["strength"])),
                  "value": repr(float(p[key])),
                  "title": f"{label} at strength {number(p['strength'])}: {_percent(p[key])} success"}
                 for p in points if p.get(key) is not None]
        if marks:
            series.append({"name": name, "label": label, "points": marks, "path": _path(points, key, x_of, y_of)})
    ticks, last = [], -math.inf
    for x in xs:
        at = x_of(x)
        ticks.append({"x": at, "label": number(x) if at - last >= LABEL_GAP else ""})
        last = at if ticks[-1]["label"] else last
    bottom = MARGIN_TOP + inner_h
    return {"width": PLOT_WIDTH, "height": PLOT_HEIGHT, "left": MARGIN_LEFT, "right": PLOT_WIDTH - MARGIN_RIGHT,
            "top": MARGIN_TOP, "bottom": bottom, "x_ticks": ticks,
            "y_ticks": [{"y": y_of(v), "label": f"{round(100 * v)} %"} for v in (0.0, 0.5, 1.0)],
            "series": series, "x_label": strength_label(unit), "x_label_x": MARGIN_LEFT + inner_w / 2,
            "x_label_y": PLOT_HEIGHT - 6, "y_label": "success (% of prompts)",
            "y_label_x": 13, "y_label_y": MARGIN_TOP + inner_h / 2}


def _path(points: Sequence[Mapping[str, Any]], key: str, x_of, y_of) -> str:
    """An SVG path through the measured points, broken where a strength has none."""
    parts, pen_down = [], False
    for p in points:
        if p.get(key) is None:
            pen_down = False
            continue
        parts.append(f"{'L' if pen_down else 'M'}{x_of(p['strength'])} {y_of(p[key])}")
        pen_down = True
    return " ".join(parts)


def _metric(row: Mapping[str, Any], name: str) -> float | None:
    metrics = row.get("metrics")
    return finite_number(metrics.get(name), booleans=True) if isinstance(metrics, Mapping) else None


def _geometric_mean(values) -> float | None:
    logs = [math.log(v) for v in values if v is not None and v > 0]
    return math.exp(sum(logs) / len(logs)) if logs else None


def _percent(value: float | None) -> str:
    return "" if value is None else f"{number(100 * value)} %"


def _fmt(value: float | None) -> str:
    return "" if value is None else number(value)
