"""Sparse kernels of the TopK SAE: a top-k encoder and a sparse decoder as ``torch.autograd.Function``\\ s.

Reads and writes no files. With ``n`` tokens, ``d`` input width, ``m`` latents and ``k`` active latents per
token, the only dense work of a training step is the encoder product (``2·n·d·m`` FLOPs). Everything else
touches the ``n·k`` selected entries only:

* :func:`topk_encode` computes ``TopK(ReLU((x - b_dec) @ W_enc.T + b_enc))`` chunk by chunk over the tokens,
  so the ``[n, m]`` pre-activations never exist at once and are never kept for backward. The optional
  auxiliary selection (top ``k_aux`` latents among a masked subset, for the AuxK loss) is taken from the same
  chunks. Its backward builds the encoder weight gradient ``G.T @ (x - b_dec)`` as one sparse-times-dense
  product (``G`` has ``k`` non-zeros per row), the encoder bias gradient as per-latent sums, the decoder bias
  gradient with the pre-bias trick (``-(Σ_i G_i) @ W_enc``, no ``[n, d]`` temporary) and the input
  gradient, if asked for, with ``embedding_bag``.
  Under autocast the encoder product runs in the autocast dtype (bf16 on a GPU), the selected values are
  returned in the input's dtype.
* :func:`sparse_decode` computes ``Σ_j acts[:, j] · W_dec[idx[:, j]] + b_dec`` with ``embedding_bag``; its
  backward gets the activation gradient as dot products at the selected indices only (a sampled
  matrix product, taken latent by latent so each decoder row is read once) and the decoder weight gradient
  as one sparse-times-dense product. With ``normalize_rows`` it decodes with every row divided by its norm,
  gradient included, by scaling the ``k`` coefficients of each token instead of building a normalised
  ``[m, d]`` copy (the autograd of that copy cost about a second per step at 32 768 × 1024 on the CPU).

Both transposed products use one :class:`SparsePattern`: the ``[m, n]`` CSR layout of the top-k indices,
built once per step (a sort of ``n·k`` integer keys) and shared by encoder and decoder when they use the
same indices. CSR products were measured faster on the CPU than ``index_add_`` of outer products (which
must materialise ``n·k·d`` values) and than COO products.

:func:`dense_topk_encode_reference` and :func:`dense_decode_reference` are plain-autograd versions used by
the tests as the ground truth; they build the dense ``[n, m]`` matrices the kernels avoid.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "SparsePattern",
    "TopKEncoding",
    "default_chunk_rows",
    "dense_decode_reference",
    "dense_topk_encode_reference",
    "dot_at_indices",
    "sparse_decode",
    "topk_encode",
]

#: Size of the pre-activation buffer of one encoder chunk (at m = 32 768: 1024 tokens). Measured on the
#: CPU: chunks of 512-2048 tokens run the encoder product plus top-k as fast as the bare full-batch product
#: (which writes its whole [n, m] result to memory); 128 tokens are ~10 % slower.
DEFAULT_CHUNK_BYTES = 128 * 2**20

# dtypes the CPU/GPU sparse CSR kernels accept; others are computed in float32 and cast back.
_SPARSE_DTYPES = (torch.float32, torch.float64)


def default_chunk_rows(
    num_latents: int, element_size: int = 4, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> int:
    """Number of tokens per encoder chunk so that one ``[rows, num_latents]`` buffer is ``chunk_bytes``."""
    return max(1, chunk_bytes // max(1, num_latents * element_size))


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        # torch warns once per process that CSR support is "beta"; the operations used here are tested.
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


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
        n, k = self.shape
        flat = self.indices.reshape(-1).to(torch.int64)
        # A stable sort by latent keeps the tokens of each latent in order. On the CPU numpy's integer
        # argsort is ~7x faster than torch.sort here (0.03 s vs 0.18 s for 262 144 entries).
        if flat.device.type == "cpu":
            order = torch.from_numpy(np.argsort(flat.numpy(), kind="stable"))
        else:
            order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_latents)
        crow = torch.zeros(self.num_latents + 1, dtype=torch.int64, device=flat.device)
        torch.cumsum(counts, 0, out=crow[1:])
        itype = self._index_dtype()
        self._order = order
        self._crow = crow.to(itype)
        self._col = torch.div(order, k, rounding_mode="floor").to(itype)

    def transpose_matmul(self, values: Tensor, dense: Tensor) -> Tensor:
        """``S.T @ dense`` ``[m, d]`` where ``S[i, indices[i, j]] = values[i, j]``; ``dense`` is ``[n, d]``."""
        n, k = self.shape
        if values.shape != (n, k) or dense.dim() != 2 or dense.shape[0] != n:
            raise ValueError(
                f"expected values [{n}, {k}] and dense [{n}, d], got {tuple(values.shape)} and "
                f"{tuple(dense.shape)}"
            )
        if self._order is None:
            self._build()
        assert self._order is not None and self._crow is not None and self._col is not None
        out_dtype = torch.promote_types(values.dtype, dense.dtype)
        work = out_dtype if out_dtype in _SPARSE_DTYPES else torch.float32
        v = values.reshape(-1)[self._order].to(work)
        s = _csr(self._crow, self._col, v, (self.num_latents, n))
        dense = dense.to(work).contiguous()
        # addmm into a fresh tensor with beta=0 (its content is ignored): torch.sparse.mm would zero-fill a
        # result, compute into a column-major temporary and copy it back, three passes over [m, d].
        out = torch.empty(self.num_latents, dense.shape[1], dtype=work, device=dense.device)
        torch.addmm(out, s, dense, beta=0.0, out=out)
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
        if self._order is None:
            self._build()
        assert self._order is not None and self._crow is not None and self._col is not None
        zeros = torch.zeros(n * k, dtype=weight.dtype, device=weight.device)
        mask = _csr(self._crow, self._col, zeros, (self.num_latents, n))
        res = torch.sparse.sampled_addmm(mask, weight, dense.t(), beta=0.0, alpha=1.0)
        out = torch.empty(n * k, dtype=weight.dtype, device=weight.device)
        out[self._order] = res.values()
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
    work = out_dtype if out_dtype in _SPARSE_DTYPES else torch.float32
    out = pattern.gather_latent_major(dense.to(work), weight.to(work))
    return out if out.dtype == out_dtype else out.to(out_dtype)


# ----------------------------------------------------------------------------------------------- encoder


class TopKEncoding(NamedTuple):
    """Output of :func:`topk_encode`: the selected activations (after ReLU) and latent indices.

    ``aux_acts``/``aux_indices`` are ``[n, 0]`` unless an auxiliary selection was asked for.
    """

    acts: Tensor
    indices: Tensor
    aux_acts: Tensor
    aux_indices: Tensor


def _autocast_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype autocast would compute a matrix product of ``dtype`` inputs in (``dtype`` when it is off)."""
    if dtype.is_floating_point and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        b_dec: Tensor,
        weight: Tensor,
        bias: Tensor,
        k: int,
        aux_mask: Tensor | None,
        k_aux: int,
        chunk_rows: int,
        pattern_box: list[SparsePattern | None] | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n = x.shape[0]
        m = weight.shape[0]
        x_in = x - b_dec
        # The product into a preallocated buffer is not cast by autocast (out= variants never are), so its
        # dtype is chosen here: the autocast dtype when autocast is on, as F.linear would compute in.
        work = _autocast_dtype(x.device.type, x_in.dtype)
        x_work, w_t, bias_work = x_in.to(work), weight.to(work).t(), bias.to(work)
        acts = x_in.new_empty(n, k, dtype=work)
        idx = torch.empty(n, k, dtype=torch.int64, device=x.device)
        aux_acts = x_in.new_empty(n, k_aux, dtype=work)
        aux_idx = torch.empty(n, k_aux, dtype=torch.int64, device=x.device)
        dead = None if aux_mask is None or k_aux == 0 else aux_mask.logical_not()
        buf = x_in.new_empty(min(chunk_rows, n), m, dtype=work) if n else x_in.new_empty(0, m, dtype=work)
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            pre = buf[: stop - start]
            torch.addmm(bias_work, x_work[start:stop], w_t, out=pre)
            # ReLU commutes with top-k (it is monotone), so it is applied to the k selected values only.
            torch.topk(pre, k, dim=1, sorted=False, out=(acts[start:stop], idx[start:stop]))
            if dead is not None:
                pre.masked_fill_(dead, float("-inf"))
                torch.topk(pre, k_aux, dim=1, sorted=False, out=(aux_acts[start:stop], aux_idx[start:stop]))
        acts = acts.relu_().to(x_in.dtype)
        aux_acts = aux_acts.relu_().to(x_in.dtype)
        ctx.save_for_backward(x_in, weight, acts, idx, aux_acts, aux_idx)
        ctx.num_latents = m
        ctx.pattern_box = pattern_box
        ctx.mark_non_differentiable(idx, aux_idx)
        ctx.set_materialize_grads(False)  # an unused output (e.g. the aux selection) gets None, not zeros
        if pattern_box is not None:
            pattern_box[0] = SparsePattern(idx, m)
        return acts, idx, aux_acts, aux_idx

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_acts: Tensor | None, _g_idx: Any, g_aux: Tensor | None, _g_aux_idx: Any
    ) -> tuple[Tensor | None, ...]:
        x_in, weight, acts, idx, aux_acts, aux_idx = ctx.saved_tensors
        m = ctx.num_latents
        need_x, need_b_dec, need_w, need_b = ctx.needs_input_grad[:4]
        terms: list[tuple[Tensor, SparsePattern]] = []
        if g_acts is not None:
            box = ctx.pattern_box
            pattern = box[0] if box is not None and box[0] is not None else SparsePattern(idx, m)
            terms.append((g_acts * (acts > 0), pattern))
        if g_aux is not None and aux_idx.shape[1] > 0:
            terms.append((g_aux * (aux_acts > 0), SparsePattern(aux_idx, m)))

        grad_w = grad_b = grad_x = grad_b_dec = None
        if not terms:
            return None, None, None, None, None, None, None, None, None
        if need_w:
            for g, p in terms:
                part = p.transpose_matmul(g, x_in)
                grad_w = part if grad_w is None else grad_w.add_(part)
        if need_b or (need_b_dec and not need_x):
            for g, p in terms:
                part = p.latent_sums(g)
                grad_b = part if grad_b is None else grad_b.add_(part)
        if need_x:
            for g, p in terms:
                part = F.embedding_bag(p.indices, weight, per_sample_weights=g.to(weight.dtype), mode="sum")
                grad_x = part if grad_x is None else grad_x.add_(part)
            assert grad_x is not None
            if need_b_dec:
                grad_b_dec = -grad_x.sum(0)
        elif need_b_dec:
            # Pre-bias trick: Σ_i (G @ W)_i = (Σ_i G_i) @ W, without the [n, d] input gradient.
            assert grad_b is not None
            grad_b_dec = -(grad_b.to(weight.dtype) @ weight)
        if grad_b is not None and not need_b:
            grad_b = None
        return grad_x, grad_b_dec, grad_w, grad_b, None, None, None, None, None


def topk_encode(
    x: Tensor,
    b_dec: Tensor,
    weight: Tensor,
    bias: Tensor,
    k: int,
    *,
    aux_mask: Tensor | None = None,
    k_aux: int = 0,
    chunk_rows: int | None = None,
    pattern_box: list[SparsePattern | None] | None = None,
) -> TopKEncoding:
    """``TopK(ReLU((x - b_dec) @ weight.T + bias))`` as (values, indices), with a sparse backward.

    Args:
        x: ``[n, d]`` inputs.
        b_dec: ``[d]`` decoder bias, subtracted from the input before encoding.
        weight: ``[m, d]`` encoder weight (``nn.Linear`` layout); ``bias``: ``[m]``.
        k: latents kept per token. Values are ``>= 0``; where fewer than ``k`` pre-activations are positive
            the remaining selected values are 0 (with an arbitrary index).
        aux_mask: optional ``[m]`` bool mask (True = eligible); with ``k_aux > 0`` the top ``k_aux``
            eligible latents per token are returned as ``aux_acts``/``aux_indices`` (after ReLU).
        chunk_rows: tokens per chunk of the encoder product (default :func:`default_chunk_rows`).
        pattern_box: optional one-element list; the :class:`SparsePattern` of the returned ``indices`` is
            stored in it so :func:`sparse_decode` can reuse it for its backward.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected x [n, d] and weight [m, d] with the same d, got {tuple(x.shape)} and "
            f"{tuple(weight.shape)}"
        )
    m = weight.shape[0]
    if not 0 < k <= m:
        raise ValueError(f"k must be in 1..{m} (the number of latents), got {k}")
    if aux_mask is not None:
        if aux_mask.shape != (m,) or aux_mask.dtype != torch.bool:
            raise ValueError(
                f"aux_mask must be a bool tensor of shape [{m}], got {aux_mask.dtype} {tuple(aux_mask.shape)}"
            )
        if not 0 <= k_aux <= m:
            raise ValueError(f"k_aux must be in 0..{m}, got {k_aux}")
    else:
        k_aux = 0
    rows = chunk_rows or default_chunk_rows(m, weight.element_size())
    acts, idx, aux_acts, aux_idx = _TopKEncode.apply(
        x, b_dec, weight, bias, int(k), aux_mask, int(k_aux), int(rows), pattern_box
    )
    return TopKEncoding(acts, idx, aux_acts, aux_idx)


# ----------------------------------------------------------------------------------------------- decoder


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``[m]`` dot products of the rows of ``a`` and ``b`` (both ``[m, d]``) without an ``[m, d]`` temporary."""
    m, d = a.shape
    return torch.bmm(a.reshape(m, 1, d), b.reshape(m, d, 1)).reshape(m)


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        acts: Tensor,
        indices: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        pattern: SparsePattern | None,
        normalize_rows: bool,
    ) -> Tensor:
        norms = scale = None
        coeffs = acts.to(weight.dtype)
        if normalize_rows:
            # Rows divided by (norm + eps) through the per-token coefficients: no normalised [m, d] copy.
            norms = torch.linalg.vector_norm(weight, dim=1)
            scale = (norms + torch.finfo(weight.dtype).eps).reciprocal_()[indices]
            coeffs = coeffs * scale
        out = F.embedding_bag(indices, weight, per_sample_weights=coeffs, mode="sum")
        if bias is not None:
            out.add_(bias)
        ctx.save_for_backward(acts, indices, weight, norms, scale)
        ctx.pattern = pattern if pattern is not None and pattern.indices is indices else None
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        acts, indices, weight, norms, scale = ctx.saved_tensors
        need_acts, _, need_w, need_b = ctx.needs_input_grad[:4]
        pattern = ctx.pattern or SparsePattern(indices, weight.shape[0])
        grad_out = grad_out.contiguous()
        grad_acts = grad_w = None
        if need_acts:
            grad_acts = dot_at_indices(grad_out, weight, indices, pattern)
            if scale is not None:
                grad_acts = grad_acts * scale
            grad_acts = grad_acts.to(acts.dtype)
        if need_w:
            coeffs = acts if scale is None else acts.to(scale.dtype) * scale
            grad_w = pattern.transpose_matmul(coeffs, grad_out).to(weight.dtype)
            if norms is not None:
                # d(w / (|w| + eps)) / dw applied to the row gradient g' (already divided by |w| + eps):
                # g' - (g' . w) w / ((|w| + eps) |w|), in place on the fresh gradient.
                eps = torch.finfo(weight.dtype).eps
                inv = (norms + eps).reciprocal_()
                along = _row_dot(grad_w, weight).mul_(inv).div_(norms.clamp_min(eps))
                grad_w.addcmul_(weight, along.unsqueeze(1), value=-1.0)
        grad_b = grad_out.sum(0) if (need_b and ctx.has_bias) else None
        return grad_acts, None, grad_w, grad_b, None, None


def sparse_decode(
    acts: Tensor,
    indices: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    pattern: SparsePattern | None = None,
    normalize_rows: bool = False,
) -> Tensor:
    """``out[i] = Σ_j acts[i, j] · weight[indices[i, j]] (+ bias)`` ``[n, d]``, with a sparse backward.

    ``acts``/``indices`` are ``[n, k]`` (indices distinct within a row), ``weight`` ``[m, d]``, ``bias``
    ``[d]`` or None. ``pattern`` may be the :class:`SparsePattern` of ``indices`` (e.g. from
    :func:`topk_encode`) to share its sort with the encoder backward.

    With ``normalize_rows`` the rows of ``weight`` are used divided by ``(‖row‖ + eps)`` (``eps`` of the
    weight's dtype), gradients included (the weight gradient then has no component along each row), as if
    ``weight / (vector_norm(weight, dim=1, keepdim=True) + eps)`` were passed, but without building that
    ``[m, d]`` copy or differentiating through it: the scales go into the ``k`` coefficients of each token.
    """
    if acts.shape != indices.shape or acts.dim() != 2:
        raise ValueError(
            f"acts and indices must both be [n, k], got {tuple(acts.shape)} and {tuple(indices.shape)}"
        )
    if weight.dim() != 2:
        raise ValueError(f"weight must be [m, d], got {tuple(weight.shape)}")
    return _SparseDecode.apply(acts, indices, weight, bias, pattern, bool(normalize_rows))


# -------------------------------------------------------------------------------------- dense references


def dense_topk_encode_reference(
    x: Tensor, b_dec: Tensor, weight: Tensor, bias: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Plain-autograd ``TopK(ReLU((x - b_dec) @ weight.T + bias))``: (values, indices), sorted by value."""
    pre = F.relu(F.linear(x - b_dec, weight, bias))
    values, indices = pre.topk(k, dim=1)
    return values, indices


def dense_decode_reference(
    acts: Tensor, indices: Tensor, weight: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Plain-autograd decode: scatter ``acts`` into a dense ``[n, m]`` matrix and multiply by ``weight``."""
    dense = acts.new_zeros(acts.shape[0], weight.shape[0]).scatter(1, indices, acts)
    out = dense @ weight
    return out if bias is None else out + bias
