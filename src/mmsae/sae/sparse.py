"""Sparse building blocks of the SAE kernels: a wide top-k, the top-k pattern's transpose, sampled products.

Reads and writes no files. :mod:`mmsae.sae.kernels` builds the encoder and decoder from these:

* :func:`topk_rows` is ``torch.topk(values, k, dim=1, sorted=False)``. On the CPU, rows much wider than ``k``
  go through an exact block pre-selection first (the ``k`` blocks with the largest maxima hold the top ``k``
  values): ATen's CPU top-k copies every element of a row into a (value, index) pair before selecting, about
  2 ns an element at 32 768 latents, while a block maximum is one vectorised pass.
* :class:`SparsePattern` is the ``[m, n]`` (latent-major) layout of ``[n, k]`` top-k indices, built once per
  step and shared by every product over the same indices: ``S.T @ dense`` (the weight gradients) and the
  per-latent sums. The transposed product is a CSR product, written into a given buffer (last step's
  gradient, see :mod:`mmsae.sae.buffers`) when there is one.
* :func:`dot_at_indices` is a sampled product ``dense[i] · weight[indices[i, j]]`` taken latent by latent.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor
from torch.profiler import record_function

__all__ = ["SparsePattern", "dot_at_indices", "topk_rows"]

# dtypes the CPU/GPU sparse CSR kernels accept; others are computed in float32 and cast back.
SPARSE_DTYPES = (torch.float32, torch.float64)

PRESELECT_BLOCKS_PER_K = 16
"""Block pre-selection splits a row into at least this many blocks per selected value."""
PRESELECT_MIN_BLOCK = 16
"""Smallest block (elements) worth a pre-selection pass; narrower rows go straight to ``torch.topk``. Measured
at 1024 x 32 768, k = 64 on 2 threads: one pass with blocks of 32 takes 21 ms against ``torch.topk``'s 40-70 ms;
a second level (blocks of 8 within the candidates) saves ~2 ms more but doubles the operations, each of which
waits for both threads (slow when another process holds a core)."""


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        # torch warns once per process that CSR support is "beta"; the operations used here are tested.
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


# ------------------------------------------------------------------------------------------------ top-k


def _preselect_block(values: Tensor, k: int) -> int:
    """Block width for :func:`topk_rows`' pre-selection of ``values`` ``[rows, width]``; 0: none."""
    if values.device.type != "cpu" or not values.is_contiguous():
        return 0
    width = values.shape[1]
    block = 1
    while width % (2 * block) == 0 and width // (2 * block) >= PRESELECT_BLOCKS_PER_K * k:
        block *= 2
    return block if block >= PRESELECT_MIN_BLOCK else 0


def topk_rows(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest values of each row of ``values`` ``[rows, width]`` and their columns, unsorted.

    The same selection as ``torch.topk(values, k, dim=1, sorted=False)`` (NaN counts as largest; among equal
    values which column is returned may differ). On the CPU a row of ``width >= 16·k·16`` (cut into
    power-of-two blocks of 16 or more) goes through a block pre-selection: the ``k`` blocks with the largest
    maxima hold the row's top ``k`` values (every block holding a value above the ``k``-th largest has a
    larger maximum than all but fewer than ``k`` blocks), so the top ``k`` of those ``k`` blocks, found the
    same way, is the answer.
    """
    rows, width = values.shape
    block = _preselect_block(values, k)
    if block == 0 or rows == 0:
        return torch.topk(values, k, dim=1, sorted=False)
    blocks = width // block
    maxima = values.view(rows, blocks, block).amax(dim=2)
    _, chosen = torch.topk(maxima, k, dim=1, sorted=False)  # [rows, k] block numbers
    base = torch.arange(rows, device=values.device).mul_(blocks).unsqueeze(1)
    candidates = values.view(rows * blocks, block).index_select(0, (chosen + base).view(-1)).view(rows, k * block)
    top, position = topk_rows(candidates, k)
    columns = chosen.gather(1, torch.div(position, block, rounding_mode="floor")).mul_(block)
    return top, columns.add_(position.remainder(block))


# ------------------------------------------------------------------------------------------- the pattern


class SparsePattern:
    """The transpose of a top-k index pattern, laid out for fast per-latent sums over tokens.

    For ``indices`` ``[n, k]`` (row ``i`` selects latents ``indices[i]``), a sparse matrix ``S`` ``[n, m]``
    has ``S[i, indices[i, j]] = values[i, j]``. :meth:`transpose_matmul` returns ``S.T @ dense`` ``[m, d]``
    and :meth:`latent_sums` returns ``S.T @ 1``. The sort that orders the ``n·k`` entries by latent is done
    once, on first use, and reused by every product with the same indices (encoder and decoder backward).
    Indices must be distinct within a row (true of top-k selections).
    """

    def __init__(self, indices: Tensor, num_latents: int) -> None:
        if indices.dim() != 2:
            raise ValueError(f"indices must be 2-D [tokens, k], got shape {tuple(indices.shape)}")
        self.indices = indices
        self.num_latents = int(num_latents)
        self._order: Tensor | None = None
        self._crow: Tensor | None = None
        self._col: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(tokens, k)``."""
        n, k = self.indices.shape
        return int(n), int(k)

    def _index_dtype(self) -> torch.dtype:
        n, k = self.shape
        return torch.int32 if max(n * k, self.num_latents, n) < 2**31 - 1 else torch.int64

    def _build(self) -> None:
        with record_function("sae.pattern"):
            n, k = self.shape
            flat = self.indices.reshape(-1).to(torch.int64)
            # A stable sort by latent keeps the tokens of each latent in order. On the CPU numpy's integer
            # argsort is ~7x faster than torch.sort here, and its radix sort of 16-bit keys another ~6x.
            if flat.device.type == "cpu":
                keys = flat.numpy()
                if self.num_latents <= 2**16:
                    keys = keys.astype(np.uint16)
                order = torch.from_numpy(np.argsort(keys, kind="stable"))
            else:
                order = torch.argsort(flat, stable=True)
            counts = torch.bincount(flat, minlength=self.num_latents)
            crow = torch.zeros(self.num_latents + 1, dtype=torch.int64, device=flat.device)
            torch.cumsum(counts, 0, out=crow[1:])
            itype = self._index_dtype()
            self._order = order
            self._crow = crow.to(itype)
            self._col = torch.div(order, k, rounding_mode="floor").to(itype)

    def _built(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._order is None:
            self._build()
        assert self._order is not None and self._crow is not None and self._col is not None
        return self._order, self._crow, self._col

    def transpose_matmul(self, values: Tensor, dense: Tensor, out: Tensor | None = None) -> Tensor:
        """``S.T @ dense`` ``[m, d]`` where ``S[i, indices[i, j]] = values[i, j]``; ``dense`` is ``[n, d]``.

        ``out``: an ``[m, d]`` tensor to write the result into (its content is ignored), used when it has the
        result's dtype and device (see :func:`mmsae.sae.buffers.gradient_buffer`).
        """
        n, k = self.shape
        if values.shape != (n, k) or dense.dim() != 2 or dense.shape[0] != n:
            raise ValueError(
                f"expected values [{n}, {k}] and dense [{n}, d], got {tuple(values.shape)} and "
                f"{tuple(dense.shape)}"
            )
        order, crow, col = self._built()
        out_dtype = torch.promote_types(values.dtype, dense.dtype)
        work = out_dtype if out_dtype in SPARSE_DTYPES else torch.float32
        sorted_values = values.reshape(-1)[order].to(work)
        dense = dense.to(work).contiguous()
        shape = (self.num_latents, dense.shape[1])
        if out is None or out.shape != shape or out.dtype != work or out.device != dense.device \
                or not out.is_contiguous():
            out = torch.empty(shape, dtype=work, device=dense.device)
        # One kernel whether or not a buffer was given, so a step's gradient does not depend on it (a resumed
        # run repeats an uninterrupted one bit for bit). addmm into the result with beta=0 (its content is
        # ignored): torch.sparse.mm would zero-fill a result, compute into a column-major temporary and copy
        # it back, three passes over [m, d].
        torch.addmm(out, _csr(crow, col, sorted_values, (shape[0], n)), dense, beta=0.0, out=out)
        return out if out.dtype == out_dtype else out.to(out_dtype)

    def latent_sums(self, values: Tensor) -> Tensor:
        """``Σ_i S[i, :]`` ``[m]``: the sum of ``values`` per latent."""
        flat = self.indices.reshape(-1)
        out = torch.zeros(self.num_latents, dtype=values.dtype, device=values.device)
        return out.index_add_(0, flat, values.reshape(-1))

    def gather_latent_major(self, dense: Tensor, weight: Tensor) -> Tensor:
        """``out[i, j] = dense[i] · weight[indices[i, j]]`` ``[n, k]``, computed latent by latent.

        A sampled product over the ``[m, n]`` pattern: every row of ``weight`` ``[m, d]`` is read once and in
        order, and the token rows of ``dense`` ``[n, d]`` (small enough to stay in cache) are gathered, where a
        token-major product would gather ``n·k`` rows of ``weight`` from memory (measured 2x slower on the CPU).
        """
        n, k = self.shape
        order, crow, col = self._built()
        zeros = torch.zeros(n * k, dtype=weight.dtype, device=weight.device)
        mask = _csr(crow, col, zeros, (self.num_latents, n))
        res = torch.sparse.sampled_addmm(mask, weight, dense.t(), beta=0.0, alpha=1.0)
        out = torch.empty(n * k, dtype=weight.dtype, device=weight.device)
        out[order] = res.values()
        return out.view(n, k)


def dot_at_indices(
    dense: Tensor, weight: Tensor, indices: Tensor, pattern: SparsePattern | None = None
) -> Tensor:
    """``out[i, j] = dense[i] · weight[indices[i, j]]`` ``[n, k]`` without forming ``dense @ weight.T``.

    ``dense`` is ``[n, d]``, ``weight`` ``[m, d]``, ``indices`` ``[n, k]``.
    """
    if pattern is None or pattern.indices is not indices:
        pattern = SparsePattern(indices, weight.shape[0])
    out_dtype = torch.promote_types(dense.dtype, weight.dtype)
    work = out_dtype if out_dtype in SPARSE_DTYPES else torch.float32
    out = pattern.gather_latent_major(dense.to(work), weight.to(work))
    return out if out.dtype == out_dtype else out.to(out_dtype)
