"""The IoU scorer: where a feature fires against where the explanation's subject is.

For each of a subject's top images, the feature's activation map (``mmsae.heatmaps.activation_map``: every
view, resampled bilinearly to the image's own resolution) is cut at ``threshold`` times its own maximum (as
the mine stage's ground truth cuts it) and compared with a segmentation of what the explanation names, made
by a :class:`Segmenter`: the planted concepts' masks on the toy world (``mmsae.scorers.planted``), else
GroundingDINO boxes turned into masks by SAM (``mmsae.scorers.grounded``). The pair's score is the mean IoU
over the first ``images`` of them; an image where the segmentation finds nothing, or the feature shows nowhere, counts 0.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mmsae.heatmaps import activation_map
from mmsae.models.geometry import PatchInfo
from mmsae.scorers.base import Pair, PairResult, PairScore, Scorer, Skipped

log = logging.getLogger(__name__)

__all__ = ["ActivationMasks", "IouScorer", "Segmenter", "activation_mask", "mask_iou"]


def mask_iou(first: np.ndarray, second: np.ndarray) -> float:
    """|A and B| / |A or B| of two bool masks of one shape; 0 when both are empty."""
    if first.shape != second.shape:
        raise ValueError(f"masks of shapes {first.shape} and {second.shape} cannot be compared")
    union = int(np.logical_or(first, second).sum())
    return int(np.logical_and(first, second).sum()) / union if union else 0.0


def activation_mask(heat: np.ndarray, threshold: float) -> np.ndarray:
    """Where an activation map reaches ``threshold`` times its own maximum (nowhere when it is not positive)."""
    top = float(heat.max()) if heat.size else 0.0
    if top <= 0:
        return np.zeros(heat.shape, dtype=bool)
    return heat >= threshold * top


class ActivationMasks:
    """A feature's binarised activation map on an image, at the image's full resolution.

    ``tokens_of(feature, image_idx)``: the feature's per-token activations on the image (the top-examples
    artifact's maps); ``size_of(image_idx)``: its ``(width, height)``.
    """

    def __init__(self, tokens_of: Callable[[int, int], Mapping[str, Any]], size_of: Callable[[int], tuple[int, int]],
                 info: PatchInfo, threshold: float) -> None:
        self.tokens_of, self.size_of, self.info, self.threshold = tokens_of, size_of, info, threshold

    def mask(self, feature: int, image_idx: int) -> np.ndarray:
        width, height = self.size_of(image_idx)
        heat = activation_map(self.tokens_of(feature, image_idx), (height, width), self.info)
        return activation_mask(heat, self.threshold)


class Segmenter(abc.ABC):
    """Where an image shows what an explanation names."""

    backend: str

    @abc.abstractmethod
    def segment(self, explanation: str, images: Sequence[int]) -> list[np.ndarray]:
        """One bool mask per image (``[height, width]`` at its full resolution), in order."""

    def label(self, explanation: str) -> dict[str, Any]:
        """What the segmentation looked for (recorded with each score)."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend}

    def close(self) -> None:  # noqa: B027 - a no-op by default, overridden by segmenters that hold models
        """Release models."""


class IouScorer(Scorer):
    """Mean IoU of the subject's activation masks with the explanation's segmentation, over its top images."""

    name = "iou"

    def __init__(self, segmenter: Segmenter, masks: ActivationMasks, images: int = 5) -> None:
        self.segmenter, self.masks, self.images = segmenter, masks, images

    def describe(self) -> dict[str, Any]:
        return {**self.segmenter.describe(), "threshold": self.masks.threshold, "images": self.images}

    def score(self, pairs: Sequence[Pair]) -> list[PairResult]:
        return [self._one(pair) for pair in pairs]

    def _one(self, pair: Pair) -> PairResult:
        images = list(pair.subject.top[: self.images])
        if not images:
            return Skipped("no top images")
        targets = self.segmenter.segment(pair.explanation, images)
        active = [self.masks.mask(pair.subject.feature, i) for i in images]
        ious = [mask_iou(a, t) for a, t in zip(active, targets, strict=True)]
        return PairScore(float(np.mean(ious)), {
            **self.segmenter.label(pair.explanation), "images": images, "ious": ious,
            "activated_pct": float(np.mean([100.0 * a.mean() for a in active])),
            "target_pct": float(np.mean([100.0 * t.mean() for t in targets]))})

    def close(self) -> None:
        self.segmenter.close()
