"""TopK SAE module: config validation, initialisation, encode/decode, losses (FVU, AuxK, Multi-TopK)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from mmsae.sae import ForwardOutput, SaeConfig, SaeConfigError, TopKSAE, geometric_median

pytestmark = pytest.mark.usefixtures("single_thread")


def _randomised(cfg: SaeConfig, seed: int = 0) -> TopKSAE:
    """An SAE whose biases are non-zero, so every term of the forward pass is exercised."""
    torch.manual_seed(seed)
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.3)
    return sae


def _dense_forward(sae: TopKSAE, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: dense pre-activations and dense top-k reconstruction (plain autograd)."""
    pre = F.relu(F.linear(x - sae.b_dec, sae.encoder.weight, sae.encoder.bias))
    vals, idx = pre.topk(k, dim=1)
    dense = torch.zeros_like(pre).scatter(1, idx, vals)
    return pre, dense @ sae.W_dec + sae.b_dec


# ------------------------------------------------------------------------------------------- config


def test_config_derives_num_latents_from_expansion_factor() -> None:
    assert SaeConfig(d_in=16, expansion_factor=4, k=8).effective_num_latents == 64
    assert SaeConfig(d_in=16, expansion_factor=4, num_latents=40, k=8).effective_num_latents == 40


def test_config_drops_legacy_keys_as_sparsify_does_and_takes_current_keys_silently(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Older sparsify wrote ``signed`` and ``jumprelu``, which current sparsify drops; current sparsify writes
    ``activation``, ``skip_connection`` and ``transcode``, which are not legacy and draw no warning."""
    raw = {"d_in": 8, "num_latents": 32, "k": 4, "signed": False, "jumprelu": False,
           "activation": "topk", "skip_connection": False, "transcode": False}
    with caplog.at_level(logging.INFO, logger="mmsae.sae.model"):
        cfg = SaeConfig.model_validate(raw)
    assert cfg.effective_num_latents == 32
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
    messages = " ".join(rec.getMessage() for rec in caplog.records)
    assert "signed" in messages and "jumprelu" in messages
    assert not any(key in messages for key in ("activation", "skip_connection", "transcode"))
    assert not set(raw) - {"d_in", "num_latents", "k"} & set(cfg.to_cfg_json())


@pytest.mark.parametrize(
    ("key", "value"),
    [("signed", True), ("jumprelu", True), ("skip_connection", True), ("transcode", True),
     ("activation", "groupmax")],
)
def test_config_rejects_unsupported_legacy_values(key: str, value: object) -> None:
    with pytest.raises(SaeConfigError, match=key):
        SaeConfig.from_cfg_json({"d_in": 8, "k": 4, key: value})
    with pytest.raises(ValueError, match=key):
        SaeConfig.model_validate({"d_in": 8, "k": 4, key: value})


def test_config_rejects_unknown_keys_and_impossible_k() -> None:
    with pytest.raises(SaeConfigError, match="unknown SAE config key.*mult_topk"):
        SaeConfig.from_cfg_json({"d_in": 8, "k": 4, "mult_topk": True})
    with pytest.raises(SaeConfigError, match="exceeds the number of latents"):
        SaeConfig.from_cfg_json({"d_in": 4, "num_latents": 10, "k": 11})
    with pytest.raises(SaeConfigError, match="multi_topk"):
        SaeConfig.from_cfg_json({"d_in": 4, "num_latents": 10, "k": 3, "multi_topk": True})
    with pytest.raises(SaeConfigError, match="'k'"):
        SaeConfig.from_cfg_json({"d_in": 4, "k": 0})
    with pytest.raises(ValueError, match="exceeds the number of latents"):
        SaeConfig(d_in=4, num_latents=10, k=11)


def test_config_round_trips_through_cfg_json_keys() -> None:
    cfg = SaeConfig(d_in=8, expansion_factor=2, num_latents=24, k=5, multi_topk=True, normalize_decoder=False)
    assert set(cfg.to_cfg_json()) == {
        "expansion_factor",
        "normalize_decoder",
        "num_latents",
        "k",
        "multi_topk",
        "d_in",
    }
    assert SaeConfig.model_validate(cfg.to_cfg_json()) == cfg


# ------------------------------------------------------------------------------------------- init


def test_init_ties_decoder_to_normalised_encoder_and_zeroes_biases() -> None:
    torch.manual_seed(0)
    sae = TopKSAE(SaeConfig(d_in=12, num_latents=40, k=4))
    norms = torch.linalg.vector_norm(sae.W_dec, dim=1)
    torch.testing.assert_close(norms, torch.ones(40))
    expected = sae.encoder.weight / torch.linalg.vector_norm(sae.encoder.weight, dim=1, keepdim=True)
    torch.testing.assert_close(sae.W_dec.detach(), expected.detach())
    assert sae.W_dec.data_ptr() != sae.encoder.weight.data_ptr()
    assert torch.equal(sae.encoder.bias, torch.zeros(40))
    assert torch.equal(sae.b_dec, torch.zeros(12))


def test_geometric_median_is_robust_to_outliers_and_matches_the_1d_median() -> None:
    line = torch.tensor([[0.0], [1.0], [2.0], [10.0], [100.0]])
    torch.testing.assert_close(geometric_median(line), torch.tensor([2.0]), atol=1e-3, rtol=0)
    gen = torch.Generator().manual_seed(1)
    cloud = torch.randn(200, 3, generator=gen) * 0.1 + torch.tensor([1.0, -2.0, 3.0])
    points = torch.cat([cloud, torch.full((20, 3), 50.0)])
    med = geometric_median(points)
    assert torch.linalg.vector_norm(med - torch.tensor([1.0, -2.0, 3.0])) < 0.2
    assert torch.linalg.vector_norm(points.mean(0) - torch.tensor([1.0, -2.0, 3.0])) > 4.0


def test_init_b_dec_sets_the_decoder_bias_from_a_sample() -> None:
    sae = TopKSAE(SaeConfig(d_in=3, num_latents=12, k=2))
    sample = torch.tensor(
        [[0.0, 0.0, 0.0], [2.0, 2.0, 2.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [30.0, 0.0, 0.0]]
    )
    sae.init_b_dec(sample, method="mean")
    torch.testing.assert_close(sae.b_dec.detach(), sample.mean(0))
    sae.init_b_dec(sample)
    torch.testing.assert_close(sae.b_dec.detach(), torch.tensor([1.0, 1.0, 1.0]), atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="unknown b_dec init method"):
        sae.init_b_dec(sample, method="median")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- forward


def test_encode_decode_and_fvu_match_the_dense_formula() -> None:
    sae = _randomised(SaeConfig(d_in=10, num_latents=48, k=5))
    x = torch.randn(3, 7, 10)
    acts, idx = sae.encode(x)
    assert acts.shape == idx.shape == (3, 7, 5)
    pre, ref_out = _dense_forward(sae, x.reshape(-1, 10), 5)
    dense = torch.zeros(21, 48).scatter(1, idx.reshape(-1, 5), acts.reshape(-1, 5))
    torch.testing.assert_close(
        dense, torch.zeros_like(pre).scatter(1, pre.topk(5).indices, pre.topk(5).values)
    )

    out = sae(x)
    assert out.sae_out.shape == x.shape
    torch.testing.assert_close(out.sae_out.reshape(-1, 10), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(acts, idx), out.sae_out, rtol=1e-6, atol=1e-6)
    y = x.reshape(-1, 10)
    fvu = (y - ref_out).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.fvu, fvu, rtol=1e-5, atol=1e-6)
    assert float(out.auxk_loss) == 0.0 and float(out.multi_topk_fvu) == 0.0


def test_forward_gradients_match_dense_autograd() -> None:
    cfg = SaeConfig(d_in=8, num_latents=30, k=4)
    sae, ref = _randomised(cfg, seed=2), _randomised(cfg, seed=2)
    x = torch.randn(25, 8)
    sae(x).fvu.backward()
    _, ref_out = _dense_forward(ref, x, 4)
    ((x - ref_out).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).backward()
    for (name, p), (_, q) in zip(sae.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("every,normalize", [(5, False), (5, True), (1, False), (1, True), (2, True)])
def test_auxk_loss_matches_the_openai_recipe(every: int, normalize: bool) -> None:
    # every 5th latent dead: the dense path over the dead subset; every one or every 2nd: the sparse kernels
    cfg = SaeConfig(d_in=8, num_latents=40, k=3)
    sae, ref = _randomised(cfg, seed=3), _randomised(cfg, seed=3)
    sae.normalize_in_forward = normalize
    if normalize:  # the reference uses the normalised rows as its parameters
        with torch.no_grad():
            ref.W_dec.div_(ref.W_dec.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps)
    x = torch.randn(30, 8)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::every] = True
    num_dead = int(dead.sum())
    k_aux = 16
    out = sae(x, dead_mask=dead, k_aux=k_aux)
    out.auxk_loss.backward()

    pre, ref_out = _dense_forward(ref, x, 3)
    masked = pre.masked_fill(~dead, float("-inf"))
    vals, idx = masked.topk(min(k_aux, num_dead), dim=1)
    e_hat = torch.zeros_like(pre).scatter(1, idx, vals) @ ref.W_dec
    residual = (x - ref_out).detach()
    # OpenAI's normalized_mse(auxk_recons, residual): the residual's own variance, no dead-count scale
    want = (e_hat - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
    want.backward()
    torch.testing.assert_close(out.auxk_loss, want, rtol=1e-5, atol=1e-7)
    for (name, p), (_, q) in zip(sae.named_parameters(), ref.named_parameters(), strict=True):
        want_grad = q.grad
        if normalize and name == "W_dec":  # through w / |w|: the part along each row removed, over |w|
            w = ref.W_dec.detach()
            want_grad = (q.grad - (q.grad * w).sum(1, keepdim=True) * w) / p.detach().norm(dim=1, keepdim=True)
        torch.testing.assert_close(p.grad, want_grad, rtol=1e-4, atol=1e-6, msg=name)


def test_auxk_is_zero_without_dead_latents_and_uses_default_k_aux() -> None:
    sae = _randomised(SaeConfig(d_in=8, num_latents=40, k=3))
    x = torch.randn(12, 8)
    assert float(sae(x, dead_mask=torch.zeros(40, dtype=torch.bool)).auxk_loss) == 0.0
    all_dead = sae(x, dead_mask=torch.ones(40, dtype=torch.bool)).auxk_loss.item()
    assert all_dead > 0.0
    # the default k_aux is d_in // 2 = 4
    assert sae(x, dead_mask=torch.ones(40, dtype=torch.bool), k_aux=4).auxk_loss.item() == pytest.approx(
        all_dead
    )
    assert sae(x, dead_mask=torch.ones(40, dtype=torch.bool), k_aux=9).auxk_loss.item() != pytest.approx(
        all_dead
    )
    with pytest.raises(ValueError, match="dead_mask"):
        sae(x, dead_mask=torch.ones(39, dtype=torch.bool))


def test_auxk_rejects_a_non_positive_width_only_when_latents_are_dead() -> None:
    sae = _randomised(SaeConfig(d_in=8, num_latents=40, k=3))
    x = torch.randn(12, 8)
    assert float(sae(x, dead_mask=torch.zeros(40, dtype=torch.bool), k_aux=0).auxk_loss) == 0.0
    with pytest.raises(ValueError, match="k_aux must be positive"):
        sae(x, dead_mask=torch.arange(40) < 4, k_aux=0)
    with pytest.raises(ValueError, match="dead_mask"):
        sae(x, dead_mask=torch.ones(40))  # not bool


@pytest.mark.parametrize("every", [5, 2])  # the dense path over the dead subset; the sparse kernels
def test_variance_of_divides_every_loss_and_total_variance_only_the_fvus(every: int) -> None:
    sae = _randomised(SaeConfig(d_in=8, num_latents=40, k=3, multi_topk=True), seed=5)
    x = torch.randn(30, 8)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::every] = True
    base = sae(x, dead_mask=dead, k_aux=4)
    assert float(base.auxk_loss.detach()) > 0 and float(base.multi_topk_fvu.detach()) > 0

    def doubled(z: torch.Tensor) -> torch.Tensor:
        return 2.0 * (z - z.mean(0)).pow(2).sum()

    scaled = sae(x, dead_mask=dead, k_aux=4, variance_of=doubled)
    for field in ("fvu", "auxk_loss", "multi_topk_fvu"):
        torch.testing.assert_close(getattr(scaled, field), getattr(base, field) / 2, msg=field)
    total = 4.0 * (x - x.mean(0)).pow(2).sum()
    given = sae(x, dead_mask=dead, k_aux=4, total_variance=total, variance_of=doubled)
    torch.testing.assert_close(given.fvu, base.fvu / 4)
    torch.testing.assert_close(given.multi_topk_fvu, base.multi_topk_fvu / 4)
    torch.testing.assert_close(given.auxk_loss, base.auxk_loss / 2)  # over the residual's variance


@pytest.mark.parametrize("normalize", [False, True])
def test_auxk_dense_subset_and_sparse_paths_agree_with_multi_topk(
    monkeypatch: pytest.MonkeyPatch, normalize: bool
) -> None:
    import mmsae.sae.model as sae_model

    cfg = SaeConfig(d_in=8, num_latents=40, k=2, multi_topk=True)
    x = torch.randn(30, 8)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::5] = True  # 8 of 40: the dense path at the default ratio
    results = []
    for ratio in (sae_model.AUX_SUBSET_RATIO, 100):  # 100: too many dead for the dense path, the sparse one
        monkeypatch.setattr(sae_model, "AUX_SUBSET_RATIO", ratio)
        sae = _randomised(cfg, seed=6)
        sae.normalize_in_forward = normalize
        out = sae(x, dead_mask=dead, k_aux=5)
        (out.fvu + out.auxk_loss + out.multi_topk_fvu).backward()
        results.append((out, {name: p.grad for name, p in sae.named_parameters()}))
    (subset, subset_grads), (sparse, sparse_grads) = results
    assert float(subset.auxk_loss.detach()) > 0
    for field in ("fvu", "auxk_loss", "multi_topk_fvu"):
        torch.testing.assert_close(getattr(subset, field), getattr(sparse, field), msg=field)
    for name, grad in subset_grads.items():
        torch.testing.assert_close(grad, sparse_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_multi_topk_fvu_reconstructs_with_4k_latents_and_returns_the_top_k() -> None:
    cfg = SaeConfig(d_in=8, num_latents=40, k=2, multi_topk=True)
    sae = _randomised(cfg, seed=4)
    x = torch.randn(20, 8)
    out = sae(x)
    assert out.latent_indices.shape == (20, 2)
    _, ref_k = _dense_forward(sae, x, 2)
    _, ref_4k = _dense_forward(sae, x, 8)
    tv = (x - x.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.fvu, (x - ref_k).pow(2).sum() / tv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.multi_topk_fvu, (x - ref_4k).pow(2).sum() / tv, rtol=1e-5, atol=1e-6)


def test_training_step_losses_weights_the_terms_and_reports_metrics() -> None:
    sae = _randomised(SaeConfig(d_in=8, num_latents=40, k=3, multi_topk=True))
    out = sae(torch.randn(16, 8), dead_mask=torch.arange(40) < 10)
    loss, losses, metrics = sae.training_step_losses(out, auxk_alpha=0.25, multi_topk_weight=0.5)
    torch.testing.assert_close(loss, out.fvu + 0.25 * out.auxk_loss + 0.5 * out.multi_topk_fvu)
    assert set(losses) == {"fvu", "auxk", "multi_topk_fvu"}
    assert losses["auxk"].item() > 0
    assert 0 < float(metrics["l0"]) <= 3
    torch.testing.assert_close(metrics["explained_variance"], 1 - out.fvu.detach())
    fired = sae.fired_latents(out)
    assert float(metrics["frac_fired"]) == pytest.approx(fired.float().mean().item())
    assert not any(t.requires_grad for t in metrics.values())


def test_fired_latents_counts_only_positive_activations() -> None:
    sae = TopKSAE(SaeConfig(d_in=4, num_latents=8, k=2))
    acts = torch.tensor([[1.0, 0.0], [0.5, 0.2]])
    idx = torch.tensor([[3, 5], [3, 6]])
    out = ForwardOutput(torch.zeros(2, 4), acts, idx, torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0))
    assert sae.fired_latents(out).nonzero().flatten().tolist() == [3, 6]


def test_gradient_projection_removes_the_parallel_part_only() -> None:
    sae = _randomised(SaeConfig(d_in=6, num_latents=20, k=3))
    sae(torch.randn(10, 6)).fvu.backward()
    before = sae.W_dec.grad.clone()
    sae.remove_gradient_parallel_to_decoder_directions()
    after = sae.W_dec.grad
    w = sae.W_dec.detach()
    torch.testing.assert_close((after * w).sum(1), torch.zeros(20), atol=1e-7, rtol=0)
    torch.testing.assert_close(after, before - (before * w).sum(1, keepdim=True) * w)
    sae.W_dec.grad = None
    with pytest.raises(RuntimeError, match="no gradient"):
        sae.remove_gradient_parallel_to_decoder_directions()


def test_set_decoder_norm_to_unit_norm_rescales_rows_without_turning_them() -> None:
    sae = TopKSAE(SaeConfig(d_in=6, num_latents=20, k=3))
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.1, 5.0, 20)[:, None])
    direction = sae.W_dec.detach() / torch.linalg.vector_norm(sae.W_dec.detach(), dim=1, keepdim=True)
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(torch.linalg.vector_norm(sae.W_dec, dim=1), torch.ones(20))
    torch.testing.assert_close(sae.W_dec.detach(), direction)


def test_bfloat16_input_is_encoded_in_the_sae_dtype_and_returned_in_its_own() -> None:
    sae = _randomised(SaeConfig(d_in=8, num_latents=24, k=3))
    x = torch.randn(6, 8)
    out16 = sae(x.to(torch.bfloat16))
    assert out16.sae_out.dtype == torch.bfloat16
    assert out16.fvu.dtype == torch.float32
    with pytest.raises(ValueError, match="expected d_in = 8"):
        sae(torch.randn(3, 7))


def test_a_few_hundred_adam_steps_learn_sparse_synthetic_data() -> None:
    torch.manual_seed(0)
    d, m, k = 16, 64, 4
    dictionary = F.normalize(torch.randn(32, d), dim=1)
    codes = torch.rand(512, 32) * (torch.rand(512, 32) < 0.08)
    data = codes @ dictionary + 0.5
    sae = TopKSAE(SaeConfig(d_in=d, num_latents=m, k=k))
    sae.init_b_dec(data)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    first = None
    for step in range(300):
        batch = data[torch.randint(0, 512, (128,))]
        out = sae(batch)
        loss, _, _ = sae.training_step_losses(out)
        first = out.fvu.item() if first is None else first
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
        del step
    final = sae(data).fvu.item()
    assert final < 0.25 * first, (first, final)
