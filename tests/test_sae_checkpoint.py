"""SAE checkpoints: sparsify layout round trip and released-file compatibility, SAELens export, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmsae.sae import SaeConfig, TopKSAE
from mmsae.sae.checkpoint import (
    CheckpointError,
    export_saelens,
    list_hookpoints,
    load_many,
    load_sae,
    load_saelens,
    read_config,
    save_many,
    save_sae,
)


def _trained_like(cfg: SaeConfig, seed: int = 0) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
        sae.encoder.weight.add_(torch.randn_like(sae.encoder.weight) * 0.05)
    return sae


def _assert_same_sae(a: TopKSAE, b: TopKSAE, x: torch.Tensor) -> None:
    for (name, p), (name_b, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert name == name_b
        assert torch.equal(p, q), name
    oa, ob = a(x), b(x)
    assert torch.equal(oa.sae_out, ob.sae_out)
    assert torch.equal(oa.latent_indices, ob.latent_indices)


def test_save_then_load_restores_weights_config_and_outputs(tmp_path: Path) -> None:
    cfg = SaeConfig(d_in=8, expansion_factor=4, k=3, multi_topk=False)
    sae = _trained_like(cfg)
    path = save_sae(sae, tmp_path / "model.layers.1")
    cfg_json = json.loads((tmp_path / "model.layers.1" / "cfg.json").read_text())
    assert cfg_json == {
        "expansion_factor": 4,
        "normalize_decoder": True,
        "num_latents": 0,
        "k": 3,
        "multi_topk": False,
        "d_in": 8,
    }
    with safe_open(str(tmp_path / "model.layers.1" / "sae.safetensors"), framework="pt") as fh:
        assert {n: list(fh.get_slice(n).get_shape()) for n in fh.keys()} == {
            "encoder.weight": [32, 8],
            "encoder.bias": [32],
            "W_dec": [32, 8],
            "b_dec": [8],
        }
    loaded = load_sae(path)
    assert loaded.cfg == cfg
    _assert_same_sae(sae, loaded, torch.randn(5, 8))
    assert all(p.requires_grad for p in loaded.parameters())


def test_released_sparsify_directory_written_by_hand_loads_in_its_file_dtype(tmp_path: Path) -> None:
    # What lmms-lab/llama3-llava-next-8b-hf-sae-131k ships, scaled down: cfg.json with a legacy key and
    # bf16 weights named as sparsify names them.
    d, m, k = 8, 64, 4
    hook = tmp_path / "model.layers.24"
    hook.mkdir()
    cfg = {"expansion_factor": 8, "normalize_decoder": True, "num_latents": m, "k": k, "multi_topk": False}
    cfg |= {"d_in": d, "signed": False}
    (hook / "cfg.json").write_text(json.dumps(cfg))
    gen = torch.Generator().manual_seed(0)
    w_enc = torch.randn(m, d, generator=gen)
    w_dec = torch.nn.functional.normalize(torch.randn(m, d, generator=gen), dim=1)
    b_enc, b_dec = torch.randn(m, generator=gen) * 0.1, torch.randn(d, generator=gen)
    tensors = {"encoder.weight": w_enc, "encoder.bias": b_enc, "W_dec": w_dec, "b_dec": b_dec}
    save_file({n: t.to(torch.bfloat16) for n, t in tensors.items()}, str(hook / "sae.safetensors"))

    sae = load_sae(hook)
    assert sae.dtype == torch.bfloat16
    assert (sae.num_latents, sae.cfg.k, sae.d_in) == (m, k, d)
    x = torch.randn(6, d)
    acts, idx = sae.encode(x)
    w16 = {n: t.to(torch.bfloat16).float() for n, t in tensors.items()}
    pre = torch.relu(
        (x.to(torch.bfloat16).float() - w16["b_dec"]) @ w16["encoder.weight"].t() + w16["encoder.bias"]
    )
    want = torch.zeros(6, m).scatter(1, pre.topk(k).indices, pre.topk(k).values)
    got = torch.zeros(6, m).scatter(1, idx, acts.float())
    torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)

    as_f32 = load_sae(hook, dtype="float32")
    assert as_f32.dtype == torch.float32
    torch.testing.assert_close(as_f32.W_dec.detach(), w16["W_dec"])


def test_missing_tensor_and_shape_mismatch_name_the_file_and_tensor(tmp_path: Path) -> None:
    sae = _trained_like(SaeConfig(d_in=4, num_latents=16, k=2))
    hook = Path(save_sae(sae, tmp_path / "h"))
    weights = hook / "sae.safetensors"
    state = {n: t.contiguous() for n, t in sae.state_dict().items()}

    save_file({n: t for n, t in state.items() if n != "b_dec"}, str(weights))
    with pytest.raises(CheckpointError, match=r"sae\.safetensors.*missing \['b_dec'\]"):
        load_sae(hook)

    save_file({**state, "W_dec": torch.zeros(16, 5)}, str(weights))
    with pytest.raises(
        CheckpointError, match=r"sae\.safetensors: tensor 'W_dec' has shape \[16, 5\], expected \[16, 4\]"
    ):
        load_sae(hook)

    save_file({**state, "W_skip": torch.zeros(4, 4)}, str(weights))
    with pytest.raises(CheckpointError, match=r"unexpected \['W_skip'\]"):
        load_sae(hook)

    weights.unlink()
    with pytest.raises(CheckpointError, match=r"sae\.safetensors does not exist"):
        load_sae(hook)


def test_bad_config_files_are_refused_with_the_file_named(tmp_path: Path) -> None:
    hook = tmp_path / "h"
    with pytest.raises(CheckpointError, match=r"h/cfg\.json does not exist"):
        read_config(hook)
    hook.mkdir()
    (hook / "cfg.json").write_text(json.dumps({"d_in": 4, "num_latents": 8, "k": 2, "signed": True}))
    with pytest.raises(CheckpointError, match=r"cfg\.json: SAE config key 'signed' = True is not supported"):
        read_config(hook)
    (hook / "cfg.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        read_config(hook)


def test_config_without_d_in_takes_it_from_the_weights_header(tmp_path: Path) -> None:
    sae = _trained_like(SaeConfig(d_in=6, num_latents=18, k=2))
    hook = Path(save_sae(sae, tmp_path / "h"))
    raw = json.loads((hook / "cfg.json").read_text())
    del raw["d_in"]
    (hook / "cfg.json").write_text(json.dumps(raw))
    assert read_config(hook).d_in == 6
    _assert_same_sae(sae, load_sae(hook), torch.randn(3, 6))


def test_load_many_returns_hookpoints_in_natural_order(tmp_path: Path) -> None:
    saes = {f"layers.{i}": _trained_like(SaeConfig(d_in=4, num_latents=8, k=2), seed=i) for i in (10, 2, 1)}
    save_many(saes, tmp_path)
    (tmp_path / "layers.3").mkdir()
    (tmp_path / "layers.3" / "cfg.json").write_text("{}")  # no weights: not a hookpoint
    assert list_hookpoints(tmp_path) == ["layers.1", "layers.2", "layers.10"]
    loaded = load_many(tmp_path)
    assert list(loaded) == ["layers.1", "layers.2", "layers.10"]
    x = torch.randn(3, 4)
    for name, sae in loaded.items():
        _assert_same_sae(saes[name], sae, x)
    with pytest.raises(CheckpointError, match="no SAE found under"):
        load_many(tmp_path / "empty")


def test_saelens_export_has_saelens_names_and_reads_back_to_the_same_function(tmp_path: Path) -> None:
    sae = _trained_like(SaeConfig(d_in=8, num_latents=40, k=5))
    out = Path(export_saelens(sae, tmp_path / "saelens", hook_name="model.layers.24", model_name="tiny"))
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk"
    assert (cfg["d_in"], cfg["d_sae"], cfg["k"], cfg["dtype"]) == (8, 40, 5, "float32")
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "model.layers.24" and cfg["metadata"]["model_name"] == "tiny"
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")
    with safe_open(str(out / "sae_weights.safetensors"), framework="pt") as fh:
        shapes = {n: list(fh.get_slice(n).get_shape()) for n in fh.keys()}
        assert torch.equal(fh.get_tensor("W_enc"), sae.encoder.weight.detach().t())
    assert shapes == {"W_enc": [8, 40], "b_enc": [40], "W_dec": [40, 8], "b_dec": [8]}

    back = load_saelens(out)
    assert back.cfg.k == 5 and back.num_latents == 40 and back.cfg.normalize_decoder
    _assert_same_sae(sae, back, torch.randn(7, 8))


def test_saelens_reader_refuses_configs_with_a_different_forward_pass(tmp_path: Path) -> None:
    sae = _trained_like(SaeConfig(d_in=4, num_latents=12, k=2))
    out = Path(export_saelens(sae, tmp_path / "s", hook_name="h"))
    cfg = json.loads((out / "cfg.json").read_text())
    for key, value, message in [
        ("architecture", "jumprelu", "architecture 'jumprelu' is not supported"),
        ("apply_b_dec_to_input", False, "apply_b_dec_to_input = False is not supported"),
        ("rescale_acts_by_decoder_norm", True, "rescale_acts_by_decoder_norm = True"),
    ]:
        (out / "cfg.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(CheckpointError, match=message):
            load_saelens(out)
