"""The dashboard's Attributions section: the attribute stage's examples with their heat maps, and, on each
feature's card, the examples it is a top attributed feature of.

Each example (at most ``report.attribution_examples``, in the artifact's order) shows its prompt, the answer token
against the baseline token, the metric (logit(answer) - logit(baseline) at the last position), the heat map of all
features' positive attribution on the image and the heat maps of its first top features (as many as the attribute
stage drew), boxed as the top images are (`mmsae.dashboard_images`), and a table of every top feature with its
attribution and the share of its positive attribution on image tokens; a feature with a card links to it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from mmsae.dashboard_figures import finite_number, number, whole_number
from mmsae.dashboard_images import thumbnail

log = logging.getLogger(__name__)


def heatmap_name(example: int, feature: int | None) -> str:
    """File name of an attribution heat map in the artifact (``feature`` None: all features together); the
    attribute stage's naming (`mmsae.stages.attribute.heatmap_name`)."""
    return f"heatmaps/e{example:04d}-" + ("total" if feature is None else f"f{feature:06d}") + ".png"


@dataclass
class AttributionRecords:
    """An attributions artifact as the report reads it."""

    uri: str
    rows: list[dict[str, Any]]
    """The lines of ``attributions.jsonl``."""
    heatmap_bytes: Callable[[int, int | None], bytes | None]
    """The PNG of an example's heat map for a feature (None: all features), or None when none was drawn."""


def example_anchor(example: int) -> str:
    return f"attr-e{example:04d}"


def attributed_in(records: AttributionRecords | None, shown: set[int]) -> dict[int, list[dict[str, Any]]]:
    """Per feature, the examples it is a top attributed feature of: rank, attribution, and a link when the
    example is shown."""
    out: dict[int, list[dict[str, Any]]] = {}
    for row in records.rows if records else ():
        example = whole_number(row.get("example"))
        if example is None:
            continue
        for rank, top in enumerate(_top_features(row), 1):
            out.setdefault(top["feature"], []).append({
                "example": example, "rank": rank, "attribution": _fmt(top["attribution"]),
                "answer": _text(row.get("answer")), "baseline": _text(row.get("baseline")),
                "link": example_anchor(example) if example in shown else None})
    return out


def attributions_view(records: AttributionRecords | None, cap: int, image_width: int, feature_links: set[int],
                      explanation_of: Mapping[int, str]) -> dict[str, Any] | None:
    """The Attributions section: the first ``cap`` examples, their heat maps read and cut to thumbnails in
    parallel; None without an attributions artifact."""
    if records is None:
        return None
    rows = [r for r in records.rows if whole_number(r.get("example")) is not None]
    shown = rows[:cap]
    jobs = [(int(r["example"]), feature) for r in shown
            for feature in [None, *(t["feature"] for t in _top_features(r))]]

    def one(job: tuple[int, int | None]):
        example, feature = job
        what = f"attribution heat map of example {example}, " + ("all features" if feature is None
                                                                 else f"feature {feature}")
        return thumbnail(records.heatmap_bytes(example, feature), image_width, what)

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        thumbs = dict(zip(jobs, pool.map(one, jobs), strict=True))
    examples = [_example_view(r, thumbs, feature_links, explanation_of) for r in shown]
    return {"uri": records.uri, "examples": examples, "total": len(rows), "shown": len(shown)}


def _example_view(row: Mapping[str, Any], thumbs: Mapping[tuple[int, int | None], Any], feature_links: set[int],
                  explanation_of: Mapping[int, str]) -> dict[str, Any]:
    example = int(row["example"])
    tops = []
    for rank, top in enumerate(_top_features(row), 1):
        feature = top["feature"]
        tops.append({"rank": rank, "feature": feature, "attribution": _fmt(top["attribution"]),
                     "image_share": "" if top["image_share"] is None else f"{number(100 * top['image_share'])} %",
                     "link": f"f-{feature:06d}" if feature in feature_links else None,
                     "explanation": explanation_of.get(feature, ""), "thumb": thumbs.get((example, feature))})
    return {
        "example": example, "anchor": example_anchor(example), "image_idx": _text(row.get("image_idx")),
        "prompt": _text(row.get("prompt")), "answer": _text(row.get("answer")),
        "baseline": _text(row.get("baseline")), "metric": _fmt(finite_number(row.get("metric"))),
        "features_total": _fmt(finite_number(row.get("features_total"))),
        "error_total": _fmt(finite_number(row.get("error_total"))),
        "total": thumbs.get((example, None)), "features": tops,
        "drawn": [t for t in tops if t["thumb"] is not None],
    }


def _top_features(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The row's top features that name an integer feature, in the artifact's order."""
    out = []
    for top in row.get("top_features") or ():
        feature = whole_number(top.get("feature")) if isinstance(top, Mapping) else None
        if feature is not None:
            out.append({"feature": feature, "attribution": finite_number(top.get("attribution")),
                        "image_share": finite_number(top.get("image_share"))})
    return out


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _fmt(value: float | None) -> str:
    return "" if value is None else number(value)
