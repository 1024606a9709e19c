"""The training fast path: fused decoder normalisation, autocast, the one-rank engine, the benchmark."""

from __future__ import annotations

import pytest
import torch

from mmsae.sae import SaeConfig, TopKSAE
from mmsae.sae.kernels import sparse_decode, topk_encode


# --- tests/test_sae_kernels.py ------------------------------------------------------------------------
def test_sparse_decode_with_normalize_rows_equals_decoding_with_normalised_weight() -> None:
    torch.manual_seed(0)
    n, m, d, k = 7, 12, 5, 3
    acts = torch.rand(n, k, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(m)[:k] for _ in range(n)])
    w = (torch.randn(m, d, dtype=torch.float64) * 3).requires_grad_()
    b = torch.randn(d, dtype=torch.float64, requires_grad=True)
    g = torch.randn(n, d, dtype=torch.float64)
    fused = sparse_decode(acts, idx, w, b, normalize_rows=True)
    w_hat = w / (torch.linalg.vector_norm(w, dim=1, keepdim=True) + torch.finfo(w.dtype).eps)
    ref = sparse_decode(acts, idx, w_hat, b)
    torch.testing.assert_close(fused, ref)
    for a, r in zip(torch.autograd.grad(fused, (acts, w, b), g), torch.autograd.grad(ref, (acts, w, b), g), strict=True):
        torch.testing.assert_close(a, r)
    assert torch.autograd.gradcheck(lambda a_, w_, b_: sparse_decode(a_, idx, w_, b_, normalize_rows=True), (acts, w, b))


def test_topk_encode_under_autocast_computes_the_product_in_the_autocast_dtype() -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(40, 16), torch.randn(64, 16), torch.randn(64) * 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        enc = topk_encode(x, torch.zeros(16), w, b, 4)
    assert enc.acts.dtype == torch.float32
    ref = torch.relu(torch.nn.functional.linear(x.bfloat16(), w.bfloat16(), b.bfloat16())).float()
    torch.testing.assert_close(enc.acts, ref.gather(1, enc.indices))  # the values are the bf16 product's
    assert torch.equal(enc.acts.sort(1).values, ref.topk(4, dim=1).values.sort(1).values)


# --- tests/test_sae_model.py ---------------------------------------------------------------------------
def test_normalize_in_forward_gives_the_outputs_and_gradients_of_decoder_weight() -> None:
    torch.manual_seed(0)
    sae = TopKSAE(SaeConfig(d_in=16, num_latents=64, k=4, multi_topk=True)).double()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1, dtype=torch.float64) + 0.5)  # rows off unit norm
    sae.normalize_in_forward = True
    x = torch.randn(30, 16, dtype=torch.float64)
    dead = torch.rand(64) < 0.5
    out = sae(x, dead_mask=dead, k_aux=6)
    loss = sae.training_step_losses(out, auxk_alpha=0.5)[0]
    grads = torch.autograd.grad(loss, list(sae.parameters()))
    # reference: a plain SAE whose decoder is decoder_weight(), the normalisation differentiated by autograd
    ref = TopKSAE(SaeConfig(d_in=16, num_latents=64, k=4, multi_topk=True)).double()
    ref.load_state_dict(sae.state_dict())
    w_hat = sae.decoder_weight()
    del ref.W_dec
    ref.W_dec = w_hat
    out_ref = ref(x, dead_mask=dead, k_aux=6)
    loss_ref = ref.training_step_losses(out_ref, auxk_alpha=0.5)[0]
    ref_grads = dict(zip(["encoder.weight", "encoder.bias", "W_dec", "b_dec"],
                         torch.autograd.grad(loss_ref, [ref.encoder.weight, ref.encoder.bias, sae.W_dec, ref.b_dec]),
                         strict=True))
    torch.testing.assert_close(loss, loss_ref)
    named = dict(zip([n for n, _ in sae.named_parameters()], grads, strict=True))
    for name in ref_grads:
        torch.testing.assert_close(named[name], ref_grads[name])
    assert float((named["W_dec"] * sae.W_dec.detach()).sum(1).abs().max()) < 1e-10  # no component along the rows
    torch.testing.assert_close(sae.decode(out.latent_acts, out.latent_indices), out.sae_out)


# --- tests/test_train.py -------------------------------------------------------------------------------
def test_one_rank_engine_uses_no_zero_partitioning_and_no_allreduce() -> None:
    from mmsae.config import TrainConfig
    from mmsae.training import engine as engine_module

    t = TrainConfig(num_latents=64, k=4, batch_size=8, device="cpu", zero_stage=2)
    with engine_module.process_group(t):
        bundle = engine_module.SaeBundle([engine_module.Variant("", "h", 64, 4, 1e-3)], 16, t)
        engine = engine_module.build_engine(bundle, t, world=1, total_steps=10)
        _one_engine_step(engine, bundle, t)


def test_an_explicit_zero_stage_is_used_on_one_rank() -> None:
    from mmsae.config import TrainConfig
    from mmsae.training import engine as engine_module

    t = TrainConfig(num_latents=64, k=4, batch_size=8, device="cpu", zero_stage=0)
    with engine_module.process_group(t):
        bundle = engine_module.SaeBundle([engine_module.Variant("", "h", 64, 4, 1e-3)], 16, t)
        engine = engine_module.build_engine(bundle, t, world=1, total_steps=10, zero_stage=2)
        _one_engine_step(engine, bundle, t, stage=2)
    with pytest.raises(ValueError, match="zero_stage must be 0, 1 or 2"):
        engine_module.build_engine(bundle, t, world=1, total_steps=10, zero_stage=3)


def _one_engine_step(engine, bundle, t, stage: int = 0) -> None:
    assert engine.zero_optimization_stage() == stage
    assert engine.enable_backward_allreduce == (stage > 0)
    x = torch.randn(8, 16)
    before = bundle.saes["__h"].encoder.weight.detach().clone()
    loss, _ = engine({"h": x}, {"__h": torch.zeros(64, dtype=torch.bool)}, {"h": (x - x.mean(0)).pow(2).sum()}, t, 1)
    engine.backward(loss)
    engine.step()
    assert not torch.equal(before, bundle.saes["__h"].encoder.weight)


# --- tests/test_bench_train.py -------------------------------------------------------------------------
def test_train_benchmark_times_the_stage_step_and_its_parts_at_a_tiny_shape() -> None:
    from bench import train as bench_train

    tiny = bench_train.Setup(d_in=32, num_latents=256, k=4, batch_tokens=128, naive_batch_tokens=64,
                             warmup_steps=1, pairs=2, naive_pairs=1, naive_warmup_steps=0, matmul_reps=1)
    r = bench_train.measure(tiny, torch.device("cpu"))
    assert r["engine"]["zero_stage_used"] == 0 and r["matmul_dtype"] == "float32"
    for row in r["pairs"]["train"] + r["pairs"]["train_bare"]:
        parts = sum(row[f"part_{p}_wall_s"] for p in ("forward", "backward", "step"))
        assert 0 < parts <= row["step_wall_s"]
    assert r["train"]["tokens_per_s"] > 0 and r["train_bare"]["tokens_per_s"] > 0 and r["naive"]["tokens_per_s"] > 0
    assert r["auxk"]["in_timed_step"] and r["auxk"]["last_auxk_loss"] > 0
    # the profiled pieces: AuxK's only in the step with dead latents; in units of the baseline product
    with_auxk, bare = r["breakdown"]["auxk"], r["breakdown"]["bare"]
    pieces = {"encode_product", "encode_topk", "decode", "backward_decode", "backward_encode", "optimizer",
              "forward_other", "backward_other"}
    assert pieces <= set(bare) and pieces | {"encode_aux_topk", "decode_aux", "backward_decode_aux",
                                             "backward_encode_aux"} <= set(with_auxk)
    assert not {"encode_aux_topk", "decode_aux"} & set(bare)
    assert sum(piece["share_of_step"] for piece in with_auxk.values()) == pytest.approx(1.0, abs=0.05)
    assert all(piece["wall_s"] >= 0 and piece["of_limit"] >= 0 for piece in with_auxk.values())
    assert r["dense_encoder_limit_tokens_per_s"] == r["matmul_flop_per_s"] / (2 * 32 * 256)
    g = bench_train.gpu_figures("NVIDIA H100 80GB HBM3", 3e5, 2 * 4096 * 131072, 7e14)
    assert g["fraction_of_nominal_bf16_peak"] < g["fraction_of_measured_bf16_peak"]
    assert "nominal_bf16_flop_per_s" not in bench_train.gpu_figures("NVIDIA H100 PCIe", 3e5, 1e9, 7e14)
