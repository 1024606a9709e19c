"""Streaming per-feature histograms of positive activations: fixed linear bins over a range that doubles.

Each row (an SAE feature) counts its values in ``bins`` equal bins over ``[0, 2**e)``, where ``2**e`` is the
smallest power of two above the largest value seen so far. When a value reaches past the range, the range
doubles (as often as needed) and neighbouring bins are merged pairwise: the bin edges of a doubled range are
edges of the old one, so the counts stay exact. The result depends only on the values, not on their order
or on how they are batched. Memory: ``rows x bins`` int64 counts and one exponent per row.
"""

from __future__ import annotations

import torch

EMPTY_EXPONENT = -(1 << 20)
"""The exponent of a row that has seen no value (its range is empty)."""


class DoublingHistogram:
    """``counts`` ``[rows, bins]``: per row, its values in ``bins`` equal bins over ``[0, upper())``."""

    def __init__(self, rows: int, bins: int, device: torch.device | str = "cpu"):
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"histogram bins {bins}: expected a power of two >= 2")
        self.bins = int(bins)
        self.log2_bins = self.bins.bit_length() - 1
        self.counts = torch.zeros((rows, self.bins), dtype=torch.int64, device=device)
        self.exponent = torch.full((rows,), EMPTY_EXPONENT, dtype=torch.int64, device=device)

    def add(self, row: torch.Tensor, values: torch.Tensor) -> None:
        """Count ``values`` (positive and finite) into the rows ``row`` (int64, same length)."""
        if values.numel() == 0:
            return
        _, needed = torch.frexp(values)  # values < 2**needed
        top = torch.full_like(self.exponent, EMPTY_EXPONENT).scatter_reduce_(0, row, needed.long(), reduce="amax")
        grow = (top > self.exponent).nonzero().squeeze(1)
        if grow.numel():
            self._widen(grow, top[grow])
        # exact: scaling by a power of two, in float64 so that no exponent over- or underflows
        scale = torch.pow(2.0, (self.log2_bins - self.exponent[row]).double())
        index = (values.double() * scale).floor().long().clamp_(0, self.bins - 1)
        self.counts.view(-1).index_add_(0, row * self.bins + index, torch.ones_like(index))

    def _widen(self, rows: torch.Tensor, exponent: torch.Tensor) -> None:
        """Double the ranges of ``rows`` up to ``2**exponent``, merging their bins pairwise each time."""
        shift = (exponent - self.exponent[rows]).clamp(max=self.log2_bins)
        target = torch.arange(self.bins, device=rows.device)[None, :] >> shift[:, None]
        merged = torch.zeros((len(rows), self.bins), dtype=torch.int64, device=rows.device)
        merged.scatter_add_(1, target, self.counts[rows])
        self.counts[rows] = merged
        self.exponent[rows] = exponent

    def upper(self) -> torch.Tensor:
        """Per row, the top of its range (0.0 for a row that has seen no value)."""
        empty = self.exponent == EMPTY_EXPONENT
        return torch.where(empty, 0.0, torch.pow(2.0, self.exponent.clamp(min=-1000).double()))

    def nbytes(self) -> int:
        return self.counts.numel() * self.counts.element_size() + self.exponent.numel() * self.exponent.element_size()
