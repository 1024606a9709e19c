"""The SAE training step never builds a dense ``[tokens, latents]`` tensor outside the encoder product.

Runs one forward and backward of the train stage's SAE step (:class:`mmsae.training.engine.SaeBundle`'s
forward, the call the DeepSpeed engine makes: decoder rows normalised in the forward pass, AuxK over dead
latents) under a :class:`~torch.utils._python_dispatch.TorchDispatchMode` that records the size of every
tensor an aten op produces, in four phases: inside :func:`~mmsae.sae.kernels.topk_encode` (``encode``),
inside :func:`~mmsae.sae.kernels.sparse_decode` or :func:`~mmsae.sae.kernels.sparse_decode_with_aux`
(``decode``), the rest of the forward (``forward``) and ``backward``. The shape makes ``tokens x latents`` (512 x 4096 = 2 M) sixteen times the largest legitimate
tensor, a ``[latents, d]`` weight or its gradient (131 k), so a dense decode (top-k scattered into
``[n, m]`` and multiplied by ``W_dec``) or a dense gradient of the latents shows up as an op output of
``n·m`` elements where the kernels produce at most ``max(m·d, n·d, ...)``.

What the kernels legitimately produce (read from :mod:`mmsae.sae.kernels`): the encoder computes its
pre-activations chunk by chunk into one ``[min(chunk_rows, n), m]`` buffer (at this shape one chunk, so
exactly ``n·m`` elements: the dense encoder product, allowed in ``encode`` and nowhere else) and keeps
``[n, k]`` selections. AuxK, with at most a quarter of the latents dead (5 % here), takes the dead latents'
columns out of each chunk (``[chunk, dead]``) and is dense products over their rows (``[n, dead]``); with
more dead (half, the third case), the encoder masks the non-dead latents in its buffer in place and keeps an
``[n, k_aux]`` selection, decoded sparsely. The
decoder is an ``embedding_bag`` into ``[n, d]``. The backward products are over a CSR pattern of
``n·k`` entries (:class:`~mmsae.sae.kernels.SparsePattern`): a sparse tensor is counted by the elements it
stores (its ``values``), not by its dense shape ``[m, n]``, which is what it avoids building. Their results
are ``[m, d]``, ``[m]``, ``[n, k]`` and ``[d]``.

The second test shows the check is not vacuous: with the sparse decode replaced by a dense one, or the
sparse transposed product of the backward by a dense one, the same check fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import mmsae.sae.model as sae_model
from mmsae.sae import kernels

pytestmark = pytest.mark.usefixtures("single_thread")

N, D, M, K = 512, 32, 4096, 8
DEAD_FRACTION = 0.05
HOOKPOINT = "h"


def _stored(t: Tensor) -> int:
    """Elements ``t`` holds: its numel when strided, the number of stored values when sparse."""
    if t.layout == torch.strided:
        return t.numel()
    if t.layout == torch.sparse_coo:
        return t._values().numel()
    return t.values().numel()  # CSR / CSC / BSR / BSC


class OpSizes(TorchDispatchMode):
    """Records, per phase, the largest tensor any aten op returned (elements, op, shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "forward"
        self.largest: dict[str, tuple[int, str, tuple[int, ...]]] = {}
        self.ops: dict[str, int] = {}

    @contextmanager
    def within(self, phase: str) -> Iterator[None]:
        before, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = before

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.ops[self.phase] = self.ops.get(self.phase, 0) + 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                size = _stored(t)
                if size > self.largest.get(self.phase, (-1,))[0]:
                    self.largest[self.phase] = (size, str(func), tuple(t.shape))
        return out


def _tagged(rec: OpSizes, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        with rec.within(phase):
            return fn(*args, **kwargs)

    return call


def _train_step_op_sizes(monkeypatch: pytest.MonkeyPatch, multi_topk: bool = False,
                         dead_fraction: float = DEAD_FRACTION) -> OpSizes:
    """One forward + backward of the stage's SAE step under :class:`OpSizes`; the record."""
    from mmsae.config import TrainConfig
    from mmsae.training import engine as stage

    torch.manual_seed(0)
    t = TrainConfig(num_latents=M, k=K, batch_size=N, device="cpu", multi_topk=multi_topk)
    variant = stage.Variant("", HOOKPOINT, M, K, 1e-3)
    bundle = stage.SaeBundle([variant], D, t)
    x = torch.randn(N, D) * 2.0 + 1.0
    dead = torch.zeros(M, dtype=torch.bool)
    dead[torch.randperm(M, generator=torch.Generator().manual_seed(0))[: int(dead_fraction * M)]] = True
    variance = (x - x.mean(0)).pow(2).sum()

    rec = OpSizes()
    monkeypatch.setattr(sae_model, "topk_encode", _tagged(rec, "encode", sae_model.topk_encode))
    monkeypatch.setattr(sae_model, "sparse_decode", _tagged(rec, "decode", sae_model.sparse_decode))
    monkeypatch.setattr(sae_model, "sparse_decode_with_aux",
                        _tagged(rec, "decode", sae_model.sparse_decode_with_aux))
    with rec:
        loss, outs = bundle({HOOKPOINT: x}, {variant.key: dead}, {HOOKPOINT: variance}, t, 1)
        with rec.within("backward"):
            loss.backward()
    assert t.auxk_alpha > 0 and float(outs[variant.key][1]["auxk"].detach()) > 0, "the step ran no AuxK"
    assert all(p.grad is not None for p in bundle.parameters())
    return rec


def _assert_no_dense(rec: OpSizes) -> None:
    dense = N * M
    # the recorder saw each phase: the encoder's dense product, the backward's [m, d] weight gradients
    assert rec.largest["encode"][0] == dense, rec.largest
    assert rec.largest["backward"][0] >= M * D, rec.largest
    assert rec.ops["decode"] > 0, rec.ops
    for phase in ("decode", "forward", "backward"):
        size, op, shape = rec.largest[phase]
        assert size < dense, (
            f"{phase}: {op} returned {shape} ({size} elements), a dense [tokens x latents] tensor "
            f"({N} x {M}) outside the encoder product"
        )


@pytest.mark.parametrize("multi_topk,dead_fraction", [(False, DEAD_FRACTION), (True, DEAD_FRACTION), (False, 0.5)])
def test_the_training_step_builds_no_dense_tokens_by_latents_tensor(
    monkeypatch: pytest.MonkeyPatch, multi_topk: bool, dead_fraction: float
) -> None:
    _assert_no_dense(_train_step_op_sizes(monkeypatch, multi_topk, dead_fraction))


def _dense_decode(acts: Tensor, indices: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                  pattern: Any = None, normalize_rows: bool = False) -> Tensor:
    """``sparse_decode`` done densely: ``acts`` scattered into ``[n, m]`` times the (normalised) weight."""
    if normalize_rows:
        weight = weight / (torch.linalg.vector_norm(weight, dim=1, keepdim=True) + torch.finfo(weight.dtype).eps)
    return kernels.dense_decode_reference(acts, indices, weight, bias)


def _dense_decode_with_aux(acts: Tensor, indices: Tensor, weight: Tensor, bias: Tensor | None,
                           aux_acts: Tensor, aux_indices: Tensor, *, aux_subset: Any = None, pattern: Any = None,
                           normalize_rows: bool = False) -> tuple[Tensor, Tensor]:
    """``sparse_decode_with_aux`` done densely, both terms."""
    return (_dense_decode(acts, indices, weight, bias, normalize_rows=normalize_rows),
            _dense_decode(aux_acts, aux_indices, weight, None, normalize_rows=normalize_rows))


def _dense_transpose_matmul(self: kernels.SparsePattern, values: Tensor, dense: Tensor,
                            out: Tensor | None = None) -> Tensor:
    """``S.T @ dense`` with ``S`` built as a dense ``[n, m]`` matrix (the gradient the kernels avoid)."""
    s = values.new_zeros(values.shape[0], self.num_latents).scatter(1, self.indices, values)
    return s.t() @ dense.to(s.dtype)


@pytest.mark.parametrize("broken", ["dense decode", "dense backward"])
def test_the_check_fails_for_a_dense_decode_or_a_dense_backward(
    monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    if broken == "dense decode":
        monkeypatch.setattr(sae_model, "sparse_decode", _dense_decode)
        monkeypatch.setattr(sae_model, "sparse_decode_with_aux", _dense_decode_with_aux)
        phase = "decode"
    else:
        monkeypatch.setattr(kernels.SparsePattern, "transpose_matmul", _dense_transpose_matmul)
        phase = "backward"
    with pytest.raises(AssertionError, match=f"^{phase}: .*dense \\[tokens x latents\\]"):
        _assert_no_dense(_train_step_op_sizes(monkeypatch))
