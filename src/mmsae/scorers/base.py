"""What every scorer shares: the question it answers, what it returns, and the random baseline's pairing.

A scorer judges **pairs**: an explanation (the text another stage wrote for one feature) and a **subject** (a
feature's images: its top images, its held-out activating images, its non-activating images). A feature's own
score is the pair of its explanation and its own images; the random baseline pairs each explanation with
another feature's images (:func:`derangement`: a seeded permutation of the scored features with no fixed
point), so that every subject meets exactly one explanation that is not its own. A scorer returns, per pair,
a :class:`PairScore` or a :class:`Skipped` naming why the pair could not be scored.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

__all__ = ["Pair", "PairResult", "PairScore", "ScoreError", "Scorer", "Skipped", "Subject", "derangement"]


class ScoreError(RuntimeError):
    """A score setting or input that cannot be used; the message says which and what to do."""


@dataclass(frozen=True)
class Subject:
    """One feature's images, as the mine stage recorded them (image_idx values of the image set)."""

    feature: int
    top: tuple[int, ...]
    """Its top images, best first (IoU and CLIP take the first ``score.top_images``)."""
    activating: tuple[int, ...] = ()
    """Held-out activating images: its quantile samples, else its top images."""
    negatives: tuple[int, ...] = ()
    """Images on which it never fires."""


@dataclass(frozen=True)
class Pair:
    """An explanation (of feature ``explained``) judged against a subject's images."""

    explained: int
    explanation: str
    subject: Subject

    @property
    def own(self) -> bool:
        """The explanation of the subject itself (not a baseline pair)."""
        return self.explained == self.subject.feature


@dataclass(frozen=True)
class PairScore:
    score: float
    details: dict[str, Any] = field(default_factory=dict)
    groups: tuple[str, ...] = ()
    """Named sub-populations the pair belongs to, each with a headline figure of its own (``<scorer>_<group>``)."""


@dataclass(frozen=True)
class Skipped:
    reason: str


PairResult = PairScore | Skipped


class Scorer(abc.ABC):
    """Scores pairs; ``name`` is the ``scorer`` field of its rows."""

    name: ClassVar[str]

    @abc.abstractmethod
    def score(self, pairs: Sequence[Pair]) -> list[PairResult]:
        """One result per pair, in order."""

    def describe(self) -> dict[str, Any]:
        """What the scorer is (backend, model, thresholds): recorded with the artifact."""
        return {}

    def close(self) -> None:  # noqa: B027 - a no-op by default, overridden by scorers that hold models
        """Release models."""


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation of ``range(n)`` with no fixed point (``out[i] != i``); empty below two items.

    Drawn uniformly among derangements by rejection (about e draws on average).
    """
    if n < 2:
        return []
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        if not (order == np.arange(n)).any():
            return order.tolist()
