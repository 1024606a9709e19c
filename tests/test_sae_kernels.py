"""The sparse SAE kernels agree with their dense plain-autograd references (values and gradients)."""

from __future__ import annotations

import pytest
import torch

from mmsae.sae import sparse as sparse_module
from mmsae.sae.kernels import (
    DEFAULT_CHUNK_BYTES,
    SparsePattern,
    default_chunk_rows,
    dense_decode_reference,
    dense_topk_encode_reference,
    dot_at_indices,
    sparse_decode,
    sparse_decode_with_aux,
    topk_encode,
)
from mmsae.sae.sparse import topk_rows

pytestmark = pytest.mark.usefixtures("single_thread")


# (tokens, latents, width, k): k does not divide the other sizes in most cases.
SHAPES = [(7, 50, 12, 3), (33, 128, 16, 5), (64, 257, 24, 13), (1, 9, 4, 9)]


def _distinct_indices(n: int, m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(m, generator=gen)[:k] for _ in range(n)])


def _dense(values: torch.Tensor, indices: torch.Tensor, m: int) -> torch.Tensor:
    return values.new_zeros(values.shape[0], m).scatter(1, indices, values)


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize(("n", "m", "d", "k"), SHAPES)
def test_sparse_decode_matches_dense_reference(n: int, m: int, d: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n * 1000 + m)
    idx = _distinct_indices(n, m, k, gen)
    acts0, w0, b0 = (
        torch.rand(n, k, generator=gen),
        torch.randn(m, d, generator=gen),
        torch.randn(d, generator=gen),
    )
    probe = torch.randn(n, d, generator=gen)

    acts, w, b = _leaves(acts0, w0, b0)
    out = sparse_decode(acts, idx, w, b)
    (out * probe).sum().backward()

    r_acts, r_w, r_b = _leaves(acts0, w0, b0)
    ref = dense_decode_reference(r_acts, idx, r_w, r_b)
    (ref * probe).sum().backward()

    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acts.grad, r_acts.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, r_w.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, r_b.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("n", "m", "d", "k"), SHAPES)
@pytest.mark.parametrize("input_grad", [False, True])
def test_topk_encode_matches_dense_reference(n: int, m: int, d: int, k: int, input_grad: bool) -> None:
    gen = torch.Generator().manual_seed(n * 7 + m)
    x0 = torch.randn(n, d, generator=gen)
    b_dec0, w0 = torch.randn(d, generator=gen) * 0.1, torch.randn(m, d, generator=gen)
    b0 = torch.randn(m, generator=gen) * 0.1
    probe = torch.randn(n, m, generator=gen)

    x, b_dec, w, b = _leaves(x0, b_dec0, w0, b0)
    x.requires_grad_(input_grad)
    enc = topk_encode(x, b_dec, w, b, k, chunk_rows=3)  # chunks that do not divide n
    dense = _dense(enc.acts, enc.indices, m)
    (dense * probe).sum().backward()

    rx, rb_dec, rw, rb = _leaves(x0, b_dec0, w0, b0)
    rx.requires_grad_(input_grad)
    r_vals, r_idx = dense_topk_encode_reference(rx, rb_dec, rw, rb, k)
    r_dense = _dense(r_vals, r_idx, m)
    (r_dense * probe).sum().backward()

    torch.testing.assert_close(dense, r_dense, rtol=1e-5, atol=1e-5)
    assert (enc.acts >= 0).all()
    assert enc.aux_acts.shape == (n, 0)
    for got, want in [(b_dec.grad, rb_dec.grad), (w.grad, rw.grad), (b.grad, rb.grad)]:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if input_grad:
        torch.testing.assert_close(x.grad, rx.grad, rtol=1e-4, atol=1e-5)
    else:
        assert x.grad is None


def test_topk_encode_result_does_not_depend_on_chunking() -> None:
    gen = torch.Generator().manual_seed(3)
    x, w, b = (
        torch.randn(20, 8, generator=gen),
        torch.randn(40, 8, generator=gen),
        torch.randn(40, generator=gen),
    )
    b_dec = torch.zeros(8)
    whole = _dense(*topk_encode(x, b_dec, w, b, 6, chunk_rows=20)[:2], 40)
    for rows in (1, 3, 7, 64):
        torch.testing.assert_close(_dense(*topk_encode(x, b_dec, w, b, 6, chunk_rows=rows)[:2], 40), whole)


def test_topk_encode_with_fewer_positive_preactivations_than_k_gives_zeros_and_no_gradient() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 6, generator=gen)
    w = torch.randn(10, 6, generator=gen).requires_grad_(True)
    b = torch.full((10,), -100.0, requires_grad=True)  # every pre-activation is negative
    enc = topk_encode(x, torch.zeros(6), w, b, 4)
    assert torch.equal(enc.acts, torch.zeros(5, 4))
    enc.acts.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(b.grad, torch.zeros_like(b))


def test_aux_selection_takes_top_latents_among_masked_ones_with_gradients() -> None:
    gen = torch.Generator().manual_seed(5)
    n, m, d, k, k_aux = 9, 30, 6, 3, 4
    x0, w0, b0 = (
        torch.randn(n, d, generator=gen),
        torch.randn(m, d, generator=gen),
        torch.randn(m, generator=gen),
    )
    mask = torch.zeros(m, dtype=torch.bool)
    mask[torch.randperm(m, generator=gen)[:12]] = True
    probe = torch.randn(n, m, generator=gen)

    w, b = _leaves(w0, b0)
    enc = topk_encode(x0, torch.zeros(d), w, b, k, aux_mask=mask, k_aux=k_aux, chunk_rows=4)
    assert enc.aux_indices.shape == (n, k_aux)
    assert mask[enc.aux_indices].all()
    (_dense(enc.aux_acts, enc.aux_indices, m) * probe).sum().backward()

    rw, rb = _leaves(w0, b0)
    pre = torch.nn.functional.linear(x0, rw, rb).masked_fill(~mask, float("-inf"))
    vals, idx = pre.topk(k_aux, dim=1)
    ref = _dense(vals.relu(), idx, m)
    (ref * probe).sum().backward()
    torch.testing.assert_close(_dense(enc.aux_acts, enc.aux_indices, m), ref.detach())
    torch.testing.assert_close(w.grad, rw.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, rb.grad, rtol=1e-5, atol=1e-6)


def test_sparse_decode_passes_gradcheck_in_float64() -> None:
    gen = torch.Generator().manual_seed(6)
    idx = _distinct_indices(4, 11, 3, gen)
    acts = torch.rand(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w_, b_: sparse_decode(a, idx, w_, b_), (acts, w, b))


@pytest.mark.parametrize(("seed", "tokens", "width", "every", "aux_dense", "chunk_rows"), [
    (7, 4, 5, 2, False, 3),  # the auxiliary selection from masked chunks
    (12, 5, 4, 3, True, 2),  # taken densely over the masked latents' columns
])
def test_topk_encode_passes_gradcheck_in_float64(seed, tokens, width, every, aux_dense, chunk_rows) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=gen, dtype=torch.float64, requires_grad=True)
    b_dec = torch.randn(width, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, width, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.arange(12) % every == 0

    def fn(x_, b_dec_, w_, b_):
        enc = topk_encode(x_, b_dec_, w_, b_, 3, aux_mask=mask, k_aux=2, aux_dense=aux_dense, chunk_rows=chunk_rows)
        return enc.acts, enc.aux_acts

    assert torch.autograd.gradcheck(fn, (x, b_dec, w, b))


def test_pattern_shared_between_encoder_and_decoder_gives_the_same_gradients() -> None:
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(10, 6, generator=gen)
    w_enc0, w_dec0 = torch.randn(20, 6, generator=gen), torch.randn(20, 6, generator=gen)
    grads = []
    for share in (False, True):
        w_enc, w_dec = _leaves(w_enc0, w_dec0)
        box: list[SparsePattern | None] = [None]
        enc = topk_encode(x, torch.zeros(6), w_enc, torch.zeros(20), 4, pattern_box=box if share else None)
        pattern = box[0] if share else None
        if share:
            assert pattern is not None and pattern.indices is enc.indices
        out = sparse_decode(enc.acts, enc.indices, w_dec, None, pattern=pattern)
        (out - x).pow(2).sum().backward()
        grads.append((w_enc.grad, w_dec.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transpose_matmul_and_dot_at_indices_match_dense_products(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(9)
    n, m, d, k = 13, 40, 7, 5
    idx = _distinct_indices(n, m, k, gen)
    values = torch.randn(n, k, generator=gen).to(dtype)
    dense_in = torch.randn(n, d, generator=gen).to(dtype)
    weight = torch.randn(m, d, generator=gen).to(dtype)
    pattern = SparsePattern(idx, m)

    got = pattern.transpose_matmul(values, dense_in)
    want = _dense(values.float(), idx, m).t() @ dense_in.float()
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)

    dots = dot_at_indices(dense_in, weight, idx, pattern)
    want_dots = (dense_in.float() @ weight.float().t()).gather(1, idx)
    torch.testing.assert_close(dots.float(), want_dots, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(pattern.latent_sums(values.float()), _dense(values.float(), idx, m).sum(0))


def test_kernels_reject_bad_shapes_and_k() -> None:
    x, w, b = torch.randn(3, 4), torch.randn(6, 4), torch.zeros(6)
    with pytest.raises(ValueError, match="k must be in 1..6"):
        topk_encode(x, torch.zeros(4), w, b, 7)
    with pytest.raises(ValueError, match="same d"):
        topk_encode(torch.randn(3, 5), torch.zeros(5), w, b, 2)
    with pytest.raises(ValueError, match="aux_mask"):
        topk_encode(x, torch.zeros(4), w, b, 2, aux_mask=torch.ones(5, dtype=torch.bool), k_aux=1)
    with pytest.raises(ValueError, match=r"acts and indices must both be \[n, k\]"):
        sparse_decode(torch.rand(3, 2), torch.zeros(3, 3, dtype=torch.long), w)


def test_default_chunk_rows_bounds_the_buffer() -> None:
    assert default_chunk_rows(32768) * 32768 * 4 == DEFAULT_CHUNK_BYTES
    assert default_chunk_rows(10**12) == 1


# ------------------------------------------------------------------------------------ wide top-k, AuxK


def _assert_same_topk(values: torch.Tensor, k: int) -> None:
    got_vals, got_idx = topk_rows(values, k)
    want_vals, _ = values.topk(k, dim=1, sorted=False)
    assert got_idx.shape == (values.shape[0], k)
    # the same values (NaN as the largest), taken from the returned columns, no column twice
    torch.testing.assert_close(got_vals.sort(1).values, want_vals.sort(1).values, equal_nan=True)
    torch.testing.assert_close(values.gather(1, got_idx), got_vals, equal_nan=True)
    assert (got_idx.sort(1).values.diff(dim=1) > 0).all()


@pytest.mark.parametrize("k", [1, 8, 16])
def test_topk_rows_preselection_gives_torch_topk_selection_on_wide_rows(k: int) -> None:
    gen = torch.Generator().manual_seed(10)
    rows, width = 37, 4096
    assert sparse_module._preselect_block(torch.empty(rows, width), k) >= sparse_module.PRESELECT_MIN_BLOCK
    values = torch.randn(rows, width, generator=gen)
    values[0] = 1.0  # every value tied
    values[1, 100:200] = 5.0  # more ties at the top than k
    values[2, ::7] = float("-inf")
    values[3, 5] = float("nan")
    values[4] = float("-inf")
    values[5, :3] = torch.tensor([50.0, 40.0, 30.0])  # the top values in one block
    _assert_same_topk(values, k)
    _assert_same_topk(values.bfloat16(), k)


def test_topk_rows_takes_torch_topk_where_preselection_does_not_pay() -> None:
    assert sparse_module._preselect_block(torch.empty(5, 4096), 200) == 0  # k too close to the width
    assert sparse_module._preselect_block(torch.empty(5, 3003), 2) == 0  # odd: no block of 4 or more divides it
    assert sparse_module._preselect_block(torch.empty(4096, 5).t(), 1) == 0  # not contiguous
    _assert_same_topk(torch.randn(5, 3003), 2)


@pytest.mark.parametrize("input_grad", [False, True])
def test_dense_aux_selection_matches_the_masked_one_with_gradients(input_grad: bool) -> None:
    gen = torch.Generator().manual_seed(11)
    n, m, d, k, k_aux = 23, 64, 6, 3, 5
    x0, b_dec0 = torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen) * 0.1
    w0, b0 = torch.randn(m, d, generator=gen, dtype=torch.float64), torch.randn(m, generator=gen) * 0.1
    mask = torch.zeros(m, dtype=torch.bool)
    mask[torch.randperm(m, generator=gen)[:9]] = True
    probe, aux_probe = torch.randn(n, m, generator=gen, dtype=torch.float64), torch.randn(n, m, generator=gen)
    results = []
    for dense in (False, True):
        x, b_dec, w, b = _leaves(x0, b_dec0.double(), w0, b0.double())
        x.requires_grad_(input_grad)
        enc = topk_encode(x, b_dec, w, b, k, aux_mask=mask, k_aux=k_aux, aux_dense=dense, chunk_rows=4)
        assert (enc.aux_subset is not None) == dense
        if dense:
            assert torch.equal(enc.aux_subset.rows, mask.nonzero().squeeze(1))
            assert torch.equal(enc.aux_subset.rows[enc.aux_subset.positions], enc.aux_indices)
        aux = _dense(enc.aux_acts, enc.aux_indices, m)
        ((_dense(enc.acts, enc.indices, m) * probe).sum() + (aux * aux_probe.double()).sum()).backward()
        results.append((aux.detach(), [t.grad for t in (x, b_dec, w, b)]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for masked_grad, dense_grad in zip(results[0][1], results[1][1], strict=True):
        if input_grad or masked_grad is not None:
            torch.testing.assert_close(dense_grad, masked_grad)


@pytest.mark.parametrize("subset", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_decode_with_aux_matches_two_reference_decodes(subset: bool, normalize: bool) -> None:
    gen = torch.Generator().manual_seed(13)
    n, m, d, k, k_aux = 11, 30, 5, 3, 4
    idx = _distinct_indices(n, m, k, gen)
    rows = torch.randperm(m, generator=gen)[:8].sort().values
    positions = _distinct_indices(n, rows.numel(), k_aux, gen)
    aux_idx = rows[positions]
    acts0, aux0 = torch.rand(n, k, generator=gen, dtype=torch.float64), torch.rand(n, k_aux, generator=gen)
    w0 = torch.randn(m, d, generator=gen, dtype=torch.float64) * 2
    b0 = torch.randn(d, generator=gen, dtype=torch.float64)
    probe, aux_probe = torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randn(n, d, generator=gen)
    from mmsae.sae.kernels import AuxSubset

    acts, aux_acts, w, b = _leaves(acts0, aux0.double(), w0, b0)
    out, aux_out = sparse_decode_with_aux(acts, idx, w, b, aux_acts, aux_idx, normalize_rows=normalize,
                                          aux_subset=AuxSubset(rows, positions) if subset else None)
    ((out * probe).sum() + (aux_out * aux_probe.double()).sum()).backward()

    r_acts, r_aux, r_w, r_b = _leaves(acts0, aux0.double(), w0, b0)
    w_used = r_w / (r_w.norm(dim=1, keepdim=True) + torch.finfo(r_w.dtype).eps) if normalize else r_w
    ref, ref_aux = dense_decode_reference(r_acts, idx, w_used, r_b), dense_decode_reference(r_aux, aux_idx, w_used)
    ((ref * probe).sum() + (ref_aux * aux_probe.double()).sum()).backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(aux_out, ref_aux)
    for got, want in [(acts.grad, r_acts.grad), (aux_acts.grad, r_aux.grad), (w.grad, r_w.grad), (b.grad, r_b.grad)]:
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(
        lambda a_, x_, w_: sparse_decode_with_aux(a_, idx, w_, None, x_, aux_idx, normalize_rows=normalize,
                                                  aux_subset=AuxSubset(rows, positions) if subset else None),
        (acts.detach().requires_grad_(), aux_acts.detach().requires_grad_(), w.detach().requires_grad_()))


def test_cleared_gradients_are_written_again_and_accumulating_ones_are_not() -> None:
    gen = torch.Generator().manual_seed(14)
    n, m, d, k = 16, 40, 6, 3
    x = torch.randn(n, d, generator=gen)
    w_enc = torch.nn.Parameter(torch.randn(m, d, generator=gen))
    w_dec = torch.nn.Parameter(torch.randn(m, d, generator=gen))

    def backward() -> None:
        box: list[SparsePattern | None] = [None]
        enc = topk_encode(x, torch.zeros(d), w_enc, torch.zeros(m), k, pattern_box=box)
        out = sparse_decode(enc.acts, enc.indices, w_dec, None, pattern=box[0], normalize_rows=True)
        (out - x).pow(2).sum().backward()

    reference = []
    for _ in range(3):  # cleared between steps, as zero_grad(set_to_none=True) does: the storage comes back
        backward()
        reference.append((w_enc.grad.clone(), w_dec.grad.clone(), w_enc.grad.data_ptr(), w_dec.grad.data_ptr()))
        w_enc.grad = w_dec.grad = None
    assert reference[1][2:] == reference[2][2:]
    for got, want in zip(reference[2][:2], reference[0][:2], strict=True):
        torch.testing.assert_close(got, want)
    backward()
    backward()  # accumulates into the gradient that is still set: never handed out as a buffer
    torch.testing.assert_close(w_enc.grad, 2 * reference[0][0])
    torch.testing.assert_close(w_dec.grad, 2 * reference[0][1])
