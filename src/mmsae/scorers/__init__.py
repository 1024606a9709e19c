"""Scorers: how well an explanation describes its SAE feature, each beside a random baseline.

- `base`: what a scorer judges (:class:`Pair`: an explanation and a :class:`Subject`, a feature's images), what
  it returns (:class:`PairScore` or :class:`Skipped`), and the baseline's pairing (:func:`derangement`).
- `iou`: the feature's binarised activation maps against a segmentation of what the explanation names.
- `planted`: the toy world's planted concepts: the concepts an explanation names, their masks as the IoU
  segmentation, and the ground-truth scorer.
- `grounded`: GroundingDINO + SAM as the IoU segmentation of any image set.
- `clip`: CLIP score of the explanation against the top images.
- `detection`: balanced accuracy of the explainer telling activating from non-activating images.
- `images`, `models`: the image set's images by index; loading the scorers' checkpoints (local or s3://).

The score stage (`mmsae.stages.score`) builds the scorers the config asks for and writes their rows.
"""

from __future__ import annotations

from mmsae.scorers.base import Pair, PairResult, PairScore, ScoreError, Scorer, Skipped, Subject, derangement

__all__ = ["Pair", "PairResult", "PairScore", "ScoreError", "Scorer", "Skipped", "Subject", "derangement"]
