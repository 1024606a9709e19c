"""Scoring against planted concepts (the toy world): which concept an explanation names, the concepts' own masks
as the IoU scorer's segmentation, and the ground-truth scorer.

A concept ``kind:name`` (``color:red``, ``texture:checkered``) is named by an explanation when its name appears
in it as a whole word (or phrase), case aside: "red" is in "Red striped squares" but not in "checkered"
(`mmsae.explainers.local.concept_words`, the rule the local explainer reads captions by).

Ground truth. A feature has planted concepts when every one of its top images holds a concept (at least
``min_images`` of them; "shared"), or when the mine stage's ``ground_truth.json`` names it as a concept's
best-matching feature or best detector ("detects"); only the concept kinds that file counts (colours and
textures by default). A pair scores 1 when the explanation names one of the subject's planted concepts, else
0; subjects without one are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mmsae.explainers.local import concept_words
from mmsae.scorers.base import Pair, PairResult, PairScore, Scorer, Skipped
from mmsae.scorers.iou import Segmenter

__all__ = ["ConceptSegmenter", "GroundTruthScorer", "concept_word", "detected_concepts", "named_concepts",
           "shared_concepts"]


def concept_word(concept: str) -> str:
    """The word (or phrase) of a ``kind:name`` concept: its name."""
    return concept.split(":", 1)[-1].replace("_", " ")


def named_concepts(explanation: str, concepts: Sequence[str]) -> list[str]:
    """The concepts whose word ``explanation`` names as a whole word, in the order given."""
    words = concept_words(explanation or "", [concept_word(c) for c in concepts])
    return [c for c in concepts if concept_word(c) in words]


def shared_concepts(images: Sequence[int], concepts_of: Callable[[int], Sequence[str]], kinds: Sequence[str],
                    min_images: int) -> list[str]:
    """The concepts of ``kinds`` that every one of ``images`` holds (none with fewer than ``min_images``)."""
    if len(images) < max(1, min_images):
        return []
    common = set(concepts_of(images[0]))
    for i in images[1:]:
        common &= set(concepts_of(i))
    return sorted(c for c in common if c.split(":", 1)[0] in kinds)


def detected_concepts(ground_truth: Mapping[str, Any]) -> dict[int, list[str]]:
    """Per feature, the concepts (of the kinds counted) that ``ground_truth.json`` names it for: as the
    best-matching feature or as the best detector."""
    kinds = set(ground_truth.get("kinds") or ())
    out: dict[int, set[str]] = {}
    for entry in ground_truth.get("concepts", []):
        if entry.get("kind") not in kinds:
            continue
        for key in ("feature", "f1_feature"):
            if entry.get(key) is not None:
                out.setdefault(int(entry[key]), set()).add(str(entry["concept"]))
    return {f: sorted(c) for f, c in out.items()}


class ConceptSegmenter(Segmenter):
    """The explanation's segmentation from the planted masks: the concepts it names, their masks joined within
    a kind ("red or blue") and intersected across kinds ("red" and "striped": the red striped objects)."""

    backend = "planted_masks"

    def __init__(self, concepts: Sequence[str], concepts_of: Callable[[int], Sequence[str]],
                 mask_of: Callable[[int, str], np.ndarray], size_of: Callable[[int], tuple[int, int]]) -> None:
        self.concepts = sorted(concepts)
        self.concepts_of, self.mask_of, self.size_of = concepts_of, mask_of, size_of

    def label(self, explanation: str) -> dict[str, Any]:
        return {"concepts": named_concepts(explanation, self.concepts)}

    def segment(self, explanation: str, images: Sequence[int]) -> list[np.ndarray]:
        named = named_concepts(explanation, self.concepts)
        return [self._mask(named, i) for i in images]

    def _mask(self, named: Sequence[str], image_idx: int) -> np.ndarray:
        width, height = self.size_of(image_idx)
        if not named:
            return np.zeros((height, width), dtype=bool)
        held = set(self.concepts_of(image_idx))
        by_kind: dict[str, np.ndarray] = {}
        for concept in named:
            kind = concept.split(":", 1)[0]
            mask = by_kind.setdefault(kind, np.zeros((height, width), dtype=bool))
            if concept in held:
                mask |= np.asarray(self.mask_of(image_idx, concept), dtype=bool)
        return np.logical_and.reduce(list(by_kind.values()))


class GroundTruthScorer(Scorer):
    """1 when the explanation names one of the subject's planted concepts, else 0 (see the module docstring)."""

    name = "ground_truth"

    def __init__(self, concepts_of: Callable[[int], Sequence[str]], kinds: Sequence[str],
                 detects: Mapping[int, Sequence[str]], min_images: int) -> None:
        self.concepts_of, self.kinds, self.detects, self.min_images = concepts_of, list(kinds), detects, min_images

    def describe(self) -> dict[str, Any]:
        return {"kinds": self.kinds, "min_images": self.min_images}

    def score(self, pairs: Sequence[Pair]) -> list[PairResult]:
        return [self._one(pair) for pair in pairs]

    def _one(self, pair: Pair) -> PairResult:
        feature = pair.subject.feature
        shared = shared_concepts(list(pair.subject.top), self.concepts_of, self.kinds, self.min_images)
        detects = list(self.detects.get(feature, ()))
        planted = sorted(set(shared) | set(detects))
        if not planted:
            return Skipped("no planted concept")
        hit = named_concepts(pair.explanation, planted)
        groups = tuple(name for name, members in (("shared", shared), ("detectors", detects)) if members)
        return PairScore(1.0 if hit else 0.0, {"planted": planted, "shared": shared, "detects": detects,
                                               "named": hit}, groups)
