"""The detection scorer: can the explainer tell a subject's activating images from its non-activating ones by
the explanation alone?

Per pair, up to ``images`` held-out activating images (the mine stage's quantile samples, else its top images)
and as many non-activating ones (its negatives) are shown together, as plain images in a seeded order that
depends on the subject only, to the explainer's ``detect`` (`mmsae.explainers.base.Explainer.detect`: one
yes/no per image), through the response cache. The score is the balanced accuracy of its answers, the mean
of the share of activating images it calls a match and the share of the others it does not (chance: 0.5,
whatever the numbers of each). A pair without images of both kinds, or whose answer failed, is skipped; an
explainer that cannot answer at all (``EndpointError``) stops the scorer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mmsae.explainers import OK, Explainer
from mmsae.scorers.base import Pair, PairResult, PairScore, Scorer, Skipped

log = logging.getLogger(__name__)

__all__ = ["DetectionScorer", "balanced_accuracy"]


def balanced_accuracy(matches: Sequence[bool], activating: Sequence[bool]) -> tuple[float, float, float]:
    """``(balanced accuracy, true-positive rate, true-negative rate)`` of ``matches`` against the truth; both
    kinds of image must be present."""
    positives = sum(bool(a) for a in activating)
    negatives = len(activating) - positives
    if positives == 0 or negatives == 0:
        raise ValueError("balanced accuracy needs activating and non-activating images")
    tpr = sum(bool(m) and bool(a) for m, a in zip(matches, activating, strict=True)) / positives
    tnr = sum(not m and not a for m, a in zip(matches, activating, strict=True)) / negatives
    return (tpr + tnr) / 2, tpr, tnr


class DetectionScorer(Scorer):
    """Balanced accuracy of the explainer's detection (see the module docstring).

    ``open_explainer()`` builds the explainer inside the event loop the scorer runs (the explain stage's
    backend, wrapped in its response cache); ``png_of(image_idx)`` gives an image's PNG bytes.
    """

    name = "detection"

    def __init__(self, open_explainer: Callable[[], Explainer], png_of: Callable[[int], bytes], images: int,
                 seed: int, concurrency: int = 16, describe: dict[str, Any] | None = None) -> None:
        self.open_explainer, self.png_of = open_explainer, png_of
        self.images, self.seed, self.concurrency = images, seed, concurrency
        self._description = dict(describe or {})
        self.cache_hits = 0

    def describe(self) -> dict[str, Any]:
        return {**self._description, "images_per_kind": self.images, "chance": 0.5}

    def score(self, pairs: Sequence[Pair]) -> list[PairResult]:
        return asyncio.run(self._score_all(pairs))

    def shown(self, pair: Pair) -> tuple[list[int], list[bool]]:
        """The images shown for a pair, in the order shown, and which of them activate the subject."""
        activating = list(dict.fromkeys(pair.subject.activating))[: self.images]
        negatives = [i for i in dict.fromkeys(pair.subject.negatives) if i not in activating][: self.images]
        images = activating + negatives
        truth = [True] * len(activating) + [False] * len(negatives)
        order = np.random.default_rng([self.seed, pair.subject.feature]).permutation(len(images)).tolist()
        return [images[k] for k in order], [truth[k] for k in order]

    async def _score_all(self, pairs: Sequence[Pair]) -> list[PairResult]:
        explainer = self.open_explainer()
        slots = asyncio.Semaphore(self.concurrency)  # also bounds the images held in memory

        async def one(pair: Pair) -> PairResult:
            async with slots:
                return await self._one(explainer, pair)

        tasks = [asyncio.create_task(one(p)) for p in pairs]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.cache_hits += int(getattr(explainer, "hits", 0))
            await explainer.aclose()

    async def _one(self, explainer: Explainer, pair: Pair) -> PairResult:
        images, truth = self.shown(pair)
        if not any(truth):
            return Skipped("no activating images")
        if all(truth):
            return Skipped("no non-activating images")
        pngs = await asyncio.to_thread(lambda: [self.png_of(i) for i in images])
        answer = await explainer.detect(pair.explanation, pngs)
        if answer.status != OK or answer.matches is None or len(answer.matches) != len(images):
            return Skipped(f"detection failed: {answer.error or 'no usable answer'}")
        accuracy, tpr, tnr = balanced_accuracy(answer.matches, truth)
        return PairScore(accuracy, {"images": images, "activating": truth, "matches": list(answer.matches),
                                    "tpr": tpr, "tnr": tnr, "cached": answer.cached})
