"""Ground truth on an image set with planted concepts (the toy world): does a feature stand for a concept?

Reads mined features (their top and quantile-sampled images and per-token activation maps), the image set's
``concepts`` (``kind:name`` strings per image) and ``masks`` (one binary mask per concept, aligned with
``concepts``), and the model's image geometry for the heat maps. Writes nothing.

The headline (:data:`HEADLINE`, first among the figures) is the **detection F1**: each concept is matched
over **all** mined images to the feature that detects it best, a feature "detecting" a concept on an image
when it fires on any of the image's tokens; the match is the feature with the best F1 of that detection
against the concept's presence (precision = share of the feature's images that hold the concept, recall =
share of the concept's images the feature fires on). A colour-and-texture conjunction feature has a texture
recall of about one over the number of colours, so F1 tells whether a pure concept feature exists. Its
baseline is the F1 of a detector that always fires, 2p / (1 + p) for a concept with base rate p. The
detector's **IoU** is measured on the images of its top-K and of its quantile samples that hold the concept
(0 when none does), and ``f1_on_patches`` is the share of its activation on those images that lies on
tokens with a place in the image: the rest lies on image-newline (or CLS) tokens, which no heat map shows, so
a detector that fires there has an IoU near 0 whatever it detects.

The top-K match is kept beside it: for each planted concept the best-matching feature is the one whose
top-K images most often hold the concept; among the features tied at that count, the one whose maps cover
the concept best (highest IoU, as Network Dissection ranks units; at most ``max_candidates`` tied features
are measured, lowest ids first; remaining ties: the lower feature id). Its **top-K precision** is the share
of its top-K slots filled by an image that holds the concept (slots a rare feature leaves empty count as
misses, so a feature with one top image cannot reach 1.0 by luck); its random baseline is the concept's base
rate, the share of images that hold it. It saturates: images hold several objects, so many features fill
their top-K with images that hold a concept (often while firing on another object of them), and 1.0 cannot
tell a good SAE from a better one. Its **IoU** is a hard IoU, averaged over those of its top images that hold
the concept: the heat map (:func:`mmsae.heatmaps.activation_map`, every view, resampled bilinearly to the
image's size) cut at ``threshold`` times its own maximum, against the concept's mask.

Only the concept kinds asked for count in the averages (colours and textures by default: shapes are not
learnt by the toy LMM, so no figure depends on them).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from mmsae.examples import FeatureRecord
from mmsae.heatmaps import activation_map
from mmsae.models.geometry import PatchInfo

log = logging.getLogger(__name__)

__all__ = ["HEADLINE", "ConceptMatch", "Detection", "best_detectors", "concept_labels", "concept_matches",
           "ground_truth_of", "has_ground_truth", "summarize"]

HEADLINE = "gt_f1"
"""The figure that ranks SAEs on the ground truth: top-K precision saturates at 1.0 on the toy world."""
IOU_METHOD = ("hard IoU: heat map >= threshold * its maximum, against the concept mask; best-matching feature: "
              "most top-K images holding the concept, then the highest IoU among those tied; detector IoU: over "
              "the detector's top and quantile-sampled images that hold the concept")


@dataclass(frozen=True)
class ConceptMatch:
    """A planted concept and the feature that matches it best."""

    concept: str
    kind: str
    feature: int | None
    """None when no mined feature has a top image holding the concept."""
    hits: int
    """Top images of the feature that hold the concept."""
    top_k: int
    precision: float
    iou: float | None
    """None when it could not be measured (no geometry, or no top image with the concept)."""
    iou_images: int
    base_rate: float
    """Share of the images that hold the concept: the precision of a random feature."""
    tied: int = 1
    """Features whose top-K held the concept as often as this one's (the IoU chose among them)."""
    f1_feature: int | None = None
    """The feature whose firing over all mined images detects the concept best (None: not counted)."""
    f1: float | None = None
    f1_precision: float | None = None
    f1_recall: float | None = None
    f1_iou: float | None = None
    """IoU of the detector feature's maps with the concept's mask, over its top and quantile-sampled images
    that hold it (0 when none of them does)."""
    f1_iou_images: int = 0
    """Images the detector's IoU was measured on."""
    f1_on_patches: float | None = None
    """Share of the detector's activation on those images that lies on tokens with a place in the image
    (patches); the rest is on image-newline or CLS tokens, which no heat map shows."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Detection:
    """The feature whose firing best detects a concept over all mined images."""

    feature: int
    f1: float
    precision: float
    recall: float


def concept_labels(concepts_of: Sequence[Sequence[str]]) -> tuple[list[str], torch.Tensor]:
    """The sorted concept names and a bool ``[images, concepts]`` matrix of which image holds which."""
    names = sorted({c for cs in concepts_of for c in cs})
    col = {c: j for j, c in enumerate(names)}
    labels = torch.zeros((len(concepts_of), len(names)), dtype=torch.bool)
    rows = [(i, col[c]) for i, cs in enumerate(concepts_of) for c in cs]
    if rows:
        labels[torch.tensor(rows).T.unbind()] = True
    return names, labels


def best_detectors(label_hits: torch.Tensor, image_count: torch.Tensor, label_images: torch.Tensor,
                   names: Sequence[str], feature_ids: Sequence[int]) -> dict[str, Detection]:
    """Per concept, the feature of the best F1 (ties: the first in ``feature_ids``).

    ``label_hits[f, c]``: images holding concept c on which feature position f fires; ``image_count[f]``: the
    images it fires on; ``label_images[c]``: the images holding c (all over the same mined images).
    """
    hits = label_hits.double()
    denom = image_count.double()[:, None] + label_images.double()[None, :]
    f1 = torch.where(denom > 0, 2 * hits / denom.clamp(min=1), 0.0)
    out = {}
    for j, c in enumerate(names):
        if int(label_images[j]) == 0:
            continue
        p = int(f1[:, j].argmax())
        h = float(hits[p, j])
        out[c] = Detection(int(feature_ids[p]), float(f1[p, j]),
                           h / float(image_count[p]) if int(image_count[p]) else 0.0, h / float(label_images[j]))
    return out


def has_ground_truth(ds) -> bool:
    """Whether an image set carries planted concepts with masks."""
    return {"concepts", "masks"} <= set(ds.column_names)


def concept_matches(
    records: Sequence[FeatureRecord],
    concepts_of: Sequence[Sequence[str]],
    *,
    top_k: int,
    tokens_of: Callable[[int, int], Mapping[str, Any]] | None = None,
    mask_of: Callable[[int, str], np.ndarray] | None = None,
    info: PatchInfo | None = None,
    image_ids: Sequence[int] | None = None,
    threshold: float = 0.5,
    max_candidates: int = 256,
    detectors: Mapping[str, Detection] | None = None,
) -> list[ConceptMatch]:
    """Match every concept of the image set to its best feature (see the module's docstring).

    ``concepts_of[i]``: the concepts of image row ``i``. ``image_ids``: the images the features were mined
    on (the base rate's population; default every row). ``tokens_of(feature, image)``, ``mask_of(image,
    concept)`` and ``info`` are needed for the IoU; without them it is None. ``detectors`` (from
    :func:`best_detectors`) fills the F1 fields.
    """
    ids = list(range(len(concepts_of))) if image_ids is None else [int(i) for i in image_ids]
    if not ids:
        return []
    counts: Counter[str] = Counter()
    for i in ids:
        counts.update(set(concepts_of[i]))
    best = _most_top_k_hits(records, concepts_of)
    by_id = {rec.feature: rec for rec in records}
    maps = None
    if tokens_of is not None and mask_of is not None and info is not None:
        maps = _MapOverlap(concepts_of, tokens_of, mask_of, info, threshold)
    out = []
    for c in sorted(counts):
        kind = c.split(":", 1)[0]
        base = counts[c] / len(ids)
        if c not in best:
            out.append(ConceptMatch(c, kind, None, 0, top_k, 0.0, None, 0, base, 0))
            continue
        h, tied = best[c]
        tied = sorted(tied)
        f, (iou, n_iou) = tied[0], (None, 0)
        if maps is not None:
            scored = [(maps.iou(c, g, by_id[g].top_images), g) for g in tied[:max_candidates]]
            (iou, n_iou), f = max(scored, key=lambda s: (-1.0 if s[0][0] is None else s[0][0], -s[1]))
        out.append(ConceptMatch(c, kind, f, h, top_k, h / top_k, iou, n_iou, base, len(tied)))
    if detectors:
        out = [_with_detector(m, d, by_id.get(d.feature), maps) if (d := detectors.get(m.concept)) else m
               for m in out]
    return out


def _most_top_k_hits(records: Sequence[FeatureRecord], concepts_of: Sequence[Sequence[str]]
                     ) -> dict[str, tuple[int, list[int]]]:
    """Per concept: the most top-K images holding it that any feature has, and the features with that many."""
    best: dict[str, tuple[int, list[int]]] = {}
    for rec in records:
        hits: Counter[str] = Counter()
        for img in rec.top_images:
            hits.update(set(concepts_of[img]))
        for c, h in hits.items():
            cur = best.get(c)
            if cur is None or h > cur[0]:
                best[c] = (h, [rec.feature])
            elif h == cur[0]:
                cur[1].append(rec.feature)
    return best


def _with_detector(match: ConceptMatch, det: Detection, rec: FeatureRecord | None,
                   maps: _MapOverlap | None) -> ConceptMatch:
    """``match`` with its detector's F1 fields and, when the maps can be read, its IoU on the concept."""
    match = replace(match, f1_feature=det.feature, f1=det.f1, f1_precision=det.precision, f1_recall=det.recall)
    if maps is None or rec is None:
        return match
    images = list(dict.fromkeys(rec.top_images + rec.quantile_images))
    iou, measured = maps.iou(match.concept, det.feature, images)
    return replace(match, f1_iou=_or_zero(iou), f1_iou_images=measured,
                   f1_on_patches=maps.on_patches(match.concept, det.feature, images))


class _MapOverlap:
    """A feature's heat maps against a concept's masks, on those of the given images that hold the concept."""

    def __init__(self, concepts_of: Sequence[Sequence[str]], tokens_of: Callable[[int, int], Mapping[str, Any]],
                 mask_of: Callable[[int, str], np.ndarray], info: PatchInfo, threshold: float):
        self.concepts_of, self.tokens_of, self.mask_of = concepts_of, tokens_of, mask_of
        self.info, self.threshold = info, threshold

    def holding(self, concept: str, images: Sequence[int]) -> list[int]:
        return [i for i in images if concept in self.concepts_of[i]]

    def iou(self, concept: str, feature: int, images: Sequence[int]) -> tuple[float | None, int]:
        """Mean IoU over the images holding ``concept`` and how many there were (None, 0: none)."""
        ious = []
        for img in self.holding(concept, images):
            mask = np.asarray(self.mask_of(img, concept), dtype=bool)
            heat = activation_map(self.tokens_of(feature, img), mask.shape, self.info)
            ious.append(_iou(heat, mask, self.threshold))
        return (float(np.mean(ious)), len(ious)) if ious else (None, 0)

    def on_patches(self, concept: str, feature: int, images: Sequence[int]) -> float | None:
        """Share of the feature's activation on the images holding ``concept`` that lies on patch tokens
        (views >= 0, the tokens a heat map shows); None when it is not active there."""
        placed = total = 0.0
        for img in self.holding(concept, images):
            tokens = self.tokens_of(feature, img)
            act = np.asarray(tokens["act"], dtype=np.float64)
            placed += float(act[np.asarray(tokens["view"]) >= 0].sum())
            total += float(act.sum())
        return placed / total if total > 0 else None


def _or_zero(x: float | None) -> float:
    return 0.0 if x is None else x


def _iou(heat: np.ndarray, mask: np.ndarray, threshold: float) -> float:
    top = float(heat.max())
    if top <= 0:
        return 0.0
    on = heat >= threshold * top
    union = int((on | mask).sum())
    return int((on & mask).sum()) / union if union else 0.0


def summarize(matches: Sequence[ConceptMatch], kinds: Sequence[str]) -> dict[str, float]:
    """Headline figures over the concepts of ``kinds``, :data:`HEADLINE` first (when detectors were counted):
    mean detection F1 and its always-fires baseline, then top-K precision, IoU and their breakdowns by kind."""
    kinds = list(kinds)
    counted = [m for m in matches if m.kind in kinds]
    if not counted:
        return {}
    figures: dict[str, float] = {}
    detected = [m for m in counted if m.f1 is not None]
    if detected:
        figures.update(_detector_figures(detected, ""))
    figures.update({
        "gt_concepts": len(counted),
        "gt_topk_precision": float(np.mean([m.precision for m in counted])),
        "gt_topk_precision_random": float(np.mean([m.base_rate for m in counted])),
        "gt_features_distinct": len({m.feature for m in counted if m.feature is not None}),
    })
    ious = [m.iou for m in counted if m.iou is not None]
    if ious:
        figures["gt_iou"] = float(np.mean(ious))
    for kind in kinds:
        sub = [m for m in counted if m.kind == kind]
        if not sub:
            continue
        figures[f"gt_topk_precision_{kind}"] = float(np.mean([m.precision for m in sub]))
        sub_iou = [m.iou for m in sub if m.iou is not None]
        if sub_iou:
            figures[f"gt_iou_{kind}"] = float(np.mean(sub_iou))
        sub_detected = [m for m in sub if m.f1 is not None]
        if sub_detected:
            figures.update(_detector_figures(sub_detected, f"_{kind}"))
    return figures


def _detector_figures(detected: Sequence[ConceptMatch], suffix: str) -> dict[str, float]:
    """The detectors' figures over ``detected`` (all kinds: ``suffix`` "", one kind: ``_<kind>``)."""
    out = {f"gt_f1{suffix}": float(np.mean([m.f1 for m in detected]))}
    if suffix:
        out[f"gt_f1_recall{suffix}"] = float(np.mean([m.f1_recall for m in detected]))
    else:
        out["gt_f1_always_fires"] = float(np.mean([2 * m.base_rate / (1 + m.base_rate) for m in detected]))
        out["gt_f1_features_distinct"] = len({m.f1_feature for m in detected})
    f1_ious = [m.f1_iou for m in detected if m.f1_iou is not None]
    if f1_ious:
        out[f"gt_f1_iou{suffix}"] = float(np.mean(f1_ious))
    on_patches = [m.f1_on_patches for m in detected if m.f1_on_patches is not None]
    if on_patches:
        out[f"gt_f1_on_patches{suffix}"] = float(np.mean(on_patches))
    return out


def mask_reader(ds) -> Callable[[int, str], np.ndarray]:
    """``mask_of(image, concept)`` over an image set's ``concepts`` and ``masks`` columns."""
    cols = ds.select_columns(["concepts", "masks"])

    def mask_of(i: int, concept: str) -> np.ndarray:
        row = cols[int(i)]
        return np.asarray(row["masks"][row["concepts"].index(concept)].convert("1"), dtype=bool)

    return mask_of


def ground_truth_of(top_examples, image_set: str, split: str | None = None, *, kinds: Sequence[str] = ("color", "texture"),
                    threshold: float = 0.5, info: PatchInfo | None = None) -> tuple[list[ConceptMatch], dict[str, float]]:
    """Ground truth of a sealed top-examples artifact (a :class:`~mmsae.examples.TopExamples`) on its image set."""
    from mmsae.data.images import load_image_set

    ds = load_image_set(image_set, split)
    if not has_ground_truth(ds):
        return [], {}
    records = top_examples.features()
    matches = concept_matches(
        records, ds["concepts"], top_k=int(top_examples.extra["top_k"]),
        tokens_of=top_examples.activation_tokens, mask_of=mask_reader(ds), info=info,
        threshold=threshold)
    return matches, summarize(matches, kinds)
