"""Feature selection: which of the mined features later stages (explain, score, steer) take.

The syntax is that of ``mine.select``: ``all``, ``ids:3,17``, ``frequency:LO..HI``, ``most_active:N`` or
``random:N``. The mine stage records its selection in the top examples' manifest; :func:`select_features`
applies a selection to mined records.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mmsae.examples import FeatureRecord

log = logging.getLogger(__name__)

SYNTAX = "all, ids:3,17,42, frequency:LO..HI, most_active:N or random:N"


class SelectionError(ValueError):
    """A feature selection that does not follow the syntax of ``mine.select``."""


@dataclass(frozen=True)
class Selection:
    """A parsed ``mine.select``: how later stages pick features from the mined ones."""

    how: str
    ids: tuple[int, ...] = ()
    low: float = 0.0
    high: float = 1.0
    count: int = 0
    """N of ``most_active:N`` and ``random:N``."""


def parse_selection(how: str) -> Selection:
    """Parse ``all``, ``ids:3,17``, ``frequency:LO..HI``, ``most_active:N`` or ``random:N``."""
    text = how.strip()
    kind, _, arg = text.partition(":")
    try:
        if text == "all":
            return Selection("all")
        if kind == "ids" and arg:
            return Selection("ids", ids=tuple(int(x) for x in arg.split(",")))
        if kind == "frequency" and ".." in arg:
            low, high = (float(x) for x in arg.split("..", 1))
            if not 0 <= low <= high:
                raise ValueError(f"need 0 <= LO <= HI, got {low}..{high}")
            return Selection("frequency", low=low, high=high)
        if kind in ("most_active", "random") and arg:
            count = int(arg)
            if count < 0:
                raise ValueError("N must be >= 0")
            return Selection(kind, count=count)
    except ValueError as e:
        raise SelectionError(f"feature selection {how!r}: {e}") from None
    raise SelectionError(f"feature selection {how!r}: expected {SYNTAX}")


def select_features(records: Iterable[FeatureRecord], how: str | Selection, seed: int = 0) -> list[int]:
    """Feature ids picked from mined records, in ascending order.

    ``ids``: those of the ids that were mined; ``frequency:LO..HI``: token frequency within [LO, HI];
    ``most_active:N``: the N highest token frequencies (ties: lower id); ``random:N``: N drawn with ``seed``
    among the features with at least one activating image.
    """
    selection = parse_selection(how) if isinstance(how, str) else how
    ordered = sorted(records, key=lambda r: r.feature)
    if selection.how == "all":
        return [r.feature for r in ordered]
    if selection.how == "ids":
        mined = {r.feature for r in ordered}
        missing = sorted(set(selection.ids) - mined)
        if missing:
            log.warning("selection asks for features %s that were not mined", missing[:20])
        return sorted(set(selection.ids) & mined)
    if selection.how == "frequency":
        return [r.feature for r in ordered if selection.low <= r.frequency <= selection.high]
    if selection.how == "most_active":
        by_frequency = sorted(ordered, key=lambda r: (-r.frequency, r.feature))
        return sorted(r.feature for r in by_frequency[: selection.count])
    alive = [r.feature for r in ordered if r.image_frequency > 0]
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randperm(len(alive), generator=generator)[: selection.count].tolist()
    return sorted(alive[i] for i in drawn)
