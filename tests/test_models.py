"""Tiny model builders, loading from directories and s3:// URIs, hook point resolution and activation capture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mmsae.models.hooks import HookPoint, HookPointError, capture, resolve_hookpoint, run_and_capture
from mmsae.models.loading import (
    LlavaOnevisionImageOnlyProcessor,
    ModelFormatError,
    cache_dir_for,
    detect_family,
    load_lmm,
)
from mmsae.models.tiny import build_tiny, save_tiny

torch.set_num_threads(1)

FAMILIES = ["llava", "llava_next", "llava_onevision"]


def _inputs(processor, family, seed=0):
    rng = np.random.RandomState(seed)
    img = Image.fromarray(rng.randint(0, 255, (40, 56, 3), dtype=np.uint8))
    images = [[img]] if family == "llava_onevision" else [img]
    return processor(images=images, text=["USER: <image>\nwhat is in this image?"], return_tensors="pt")


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_tiny_model_loads_back_with_identical_logits(family, tmp_path):
    model, processor = build_tiny(family, seed=3)
    save_tiny(family, tmp_path / "m", seed=3)
    loaded = load_lmm(tmp_path / "m")
    assert loaded.family == family
    assert loaded.path == tmp_path / "m"
    assert loaded.config.model_type == family
    assert not loaded.model.training
    assert type(loaded.processor.image_processor).__name__.endswith("ImageProcessorPil")
    inputs = _inputs(processor, family)
    inputs2 = _inputs(loaded.processor, family)
    for key, value in inputs.items():
        if torch.is_tensor(value):
            torch.testing.assert_close(inputs2[key], value, rtol=0, atol=0)
    with torch.no_grad():
        a = model(**inputs).logits
        b = loaded.model(**inputs2).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_onevision_processor_settings_survive_a_round_trip(tmp_path):
    save_tiny("llava_onevision", tmp_path, vision_aspect_ratio="anyres_max_4")
    loaded = load_lmm(tmp_path)
    assert isinstance(loaded.processor, LlavaOnevisionImageOnlyProcessor)
    assert loaded.processor.vision_aspect_ratio == "anyres_max_4"
    assert loaded.processor.num_image_tokens == 16
    assert loaded.config.vision_aspect_ratio == "anyres_max_4"


def test_load_in_bfloat16_casts_the_weights(tmp_path):
    save_tiny("llava", tmp_path)
    loaded = load_lmm(tmp_path, dtype="bfloat16")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_lmm(tmp_path, dtype="float8")


def test_a_non_llava_checkpoint_is_refused_naming_what_was_found(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ModelFormatError) as err:
        load_lmm(tmp_path)
    msg = str(err.value)
    assert "'bert'" in msg and "BertModel" in msg and str(tmp_path / "config.json") in msg
    assert "llava_onevision" in msg


def test_a_directory_without_config_json_says_so(tmp_path):
    with pytest.raises(ModelFormatError, match="no config.json"):
        load_lmm(tmp_path)
    with pytest.raises(ModelFormatError, match="does not exist"):
        load_lmm(tmp_path / "missing")


def test_family_is_detected_from_architectures_when_model_type_is_missing(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["LlavaNextForConditionalGeneration"]})
    )
    assert detect_family(tmp_path) == "llava_next"


def test_a_model_without_processor_files_is_refused(tmp_path):
    model, _ = build_tiny("llava")
    model.save_pretrained(tmp_path)
    with pytest.raises(ModelFormatError, match="processor_config.json"):
        load_lmm(tmp_path)


def _fake_s3(monkeypatch, tmp_path, download_dir, remote_fingerprint):
    """Point mmsae.storage's S3 downloads and fingerprints at fakes; the download cache at ``tmp_path/cache``."""
    from mmsae import storage
    from mmsae.storage import transfer

    monkeypatch.setattr(transfer, "download_dir", download_dir)  # where download_cached looks it up
    monkeypatch.setattr(storage, "fingerprint", remote_fingerprint)
    monkeypatch.setenv("MMSAE_CACHE_DIR", str(tmp_path / "cache"))


def test_s3_uri_is_downloaded_once_into_a_cache_keyed_by_uri_and_content(tmp_path, monkeypatch):
    remote = {"dir": save_tiny("llava_next", tmp_path / "remote", seed=1), "fingerprint": "1" * 64}
    calls: list[tuple[str, Path]] = []

    def download_dir(uri: str, local_dir) -> None:
        calls.append((uri, Path(local_dir)))
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        for f in remote["dir"].iterdir():
            (Path(local_dir) / f.name).write_bytes(f.read_bytes())

    _fake_s3(monkeypatch, tmp_path, download_dir, lambda uri: remote["fingerprint"])
    uri = "s3://bucket/models/tiny-next"
    first = load_lmm(uri)
    second = load_lmm(uri)
    assert len(calls) == 1 and calls[0][0] == uri
    assert first.path == second.path == cache_dir_for(uri, "1" * 64)
    assert first.path.is_relative_to(tmp_path / "cache")
    assert first.family == "llava_next"
    assert cache_dir_for("s3://bucket/models/other", "1" * 64) != cache_dir_for(uri, "1" * 64)

    # the model is rewritten at the same URI: its new content is downloaded, not the stale copy served
    remote["dir"] = save_tiny("llava_next", tmp_path / "remote2", seed=2)
    remote["fingerprint"] = "2" * 64
    third = load_lmm(uri)
    assert len(calls) == 2 and third.path == cache_dir_for(uri, "2" * 64) != first.path
    new = dict(third.model.named_parameters())
    assert any(not torch.equal(p, new[n]) for n, p in first.model.named_parameters())


def test_unsupported_uri_scheme_is_refused():
    with pytest.raises(ModelFormatError, match="unsupported model URI"):
        load_lmm("hf://llava-hf/llava-1.5-7b-hf")


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_are_tiny_and_reproducible_by_seed_alone(family):
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    a, processor = build_tiny(family, seed=1)
    assert torch.equal(torch.get_rng_state(), global_state)  # the global random state is left alone
    torch.manual_seed(456)  # another global state: the same weights
    b, _ = build_tiny(family, seed=1)
    c, _ = build_tiny(family, seed=2)
    assert not a.training
    assert sum(p.numel() for p in a.parameters()) < 200_000  # what keeps the tests that build them quick
    assert a.config.text_config.hidden_size == 64 and a.config.text_config.num_hidden_layers == 2
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    inputs = _inputs(processor, family)
    with torch.no_grad():
        torch.testing.assert_close(a(**inputs).logits, b(**inputs).logits, rtol=0, atol=0)
        assert not torch.equal(a(**inputs).logits, c(**inputs).logits)


def test_unknown_tiny_family_is_refused():
    with pytest.raises(ValueError, match="unknown model family 'bert'"):
        build_tiny("bert")


def test_tiny_sizes_are_configurable():
    model, processor = build_tiny(
        "llava_next", image_size=48, patch_size=16, text_layers=3, grid_pinpoints=[[48, 96], [96, 48]]
    )
    assert model.config.vision_config.image_size == 48
    assert len(model.model.language_model.layers) == 3
    assert model.config.image_grid_pinpoints == [[48, 96], [96, 48]]
    assert processor.image_processor.image_grid_pinpoints == [[48, 96], [96, 48]]
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id


# ------------------------------------------------------------------------------------------------ hooks


@pytest.fixture(scope="module")
def llava4():
    return build_tiny("llava", text_layers=4)


def test_layer_indices_and_names_resolve_to_the_same_decoder_layer(llava4):
    model, _ = llava4
    layer = model.model.language_model.layers[3]
    for spec in (
        3,
        -1,
        "3",
        "layers.3",
        "model.layers.3",
        "language_model.layers.3",
        "model.language_model.layers.3",
    ):
        hp = resolve_hookpoint(model, spec)
        assert hp.module is layer and hp.name == "layers.3" and hp.index == 3, spec
    mlp = resolve_hookpoint(model, "model.language_model.layers.2.mlp")
    assert mlp.module is model.model.language_model.layers[2].mlp
    assert (mlp.name, mlp.index) == ("layers.2.mlp", 2)
    norm = resolve_hookpoint(model, "norm")
    assert norm.module is model.model.language_model.norm and norm.index is None
    proj = resolve_hookpoint(model, "model.multi_modal_projector")
    assert proj.module is model.model.multi_modal_projector and proj.index is None


def test_out_of_range_layer_names_the_valid_range(llava4):
    model, _ = llava4
    for spec in (7, -5, "layers.7", "model.language_model.layers.4.mlp"):
        with pytest.raises(HookPointError) as err:
            resolve_hookpoint(model, spec)
        assert "the language model has 4 decoder layers (0..3" in str(err.value), spec


def test_unknown_hook_point_lists_near_matches(llava4):
    model, _ = llava4
    with pytest.raises(HookPointError, match=r"did you mean: .*layers\.3"):
        resolve_hookpoint(model, "layrs.3")
    with pytest.raises(HookPointError, match="unknown hook point"):
        resolve_hookpoint(model, "nothing.like.this")


def test_capture_equals_hidden_states_of_a_non_final_layer(llava4):
    model, processor = llava4
    inputs = _inputs(processor, "llava")
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    before = len(model.model.language_model.layers[1]._forward_hooks)
    with torch.no_grad(), capture(model, [1, "layers.2"]) as acts:
        model(**inputs)
    assert set(acts) == {"layers.1", "layers.2"}
    torch.testing.assert_close(acts["layers.1"], out.hidden_states[2], rtol=0, atol=0)
    torch.testing.assert_close(acts["layers.2"], out.hidden_states[3], rtol=0, atol=0)
    assert len(model.model.language_model.layers[1]._forward_hooks) == before, "hooks are removed afterwards"


def test_stop_early_skips_later_layers_and_captures_the_same_tensor(llava4):
    model, processor = llava4
    inputs = _inputs(processor, "llava")
    layers = model.model.language_model.layers
    before = [len(layer._forward_hooks) for layer in layers]
    later_calls = []
    handle = model.model.language_model.layers[3].register_forward_hook(lambda *a: later_calls.append(1))
    try:
        full = run_and_capture(model, inputs, ["layers.0", "layers.1.mlp"], stop_early=False)
        assert len(later_calls) == 1
        early = run_and_capture(model, inputs, ["layers.0", "layers.1.mlp"], stop_early=True)
        assert len(later_calls) == 1, "layer 3 did not run"
    finally:
        handle.remove()
    for name in full:
        torch.testing.assert_close(early[name], full[name], rtol=0, atol=0)
    assert [len(layer._forward_hooks) for layer in layers] == before


def test_capture_takes_the_first_element_of_tuple_outputs():
    class Layer(nn.Module):
        def forward(self, x):
            return (x * 2, "extra")

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer(), Layer()])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)[0]
            return x

    lm = LM()
    x = torch.ones(2, 3)
    acts = run_and_capture(lm, {"x": x}, 0)
    torch.testing.assert_close(acts["layers.0"], x * 2)
    assert isinstance(resolve_hookpoint(lm, -1), HookPoint)


def test_a_failed_download_leaves_no_cache_entry_and_is_retried(tmp_path, monkeypatch):
    src = save_tiny("llava", tmp_path / "remote")
    attempts = []

    def download_dir(uri: str, local_dir) -> None:
        attempts.append(uri)
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / "config.json").write_bytes((src / "config.json").read_bytes())
        if len(attempts) == 1:
            raise ConnectionError("connection reset")
        for f in src.iterdir():
            (Path(local_dir) / f.name).write_bytes(f.read_bytes())

    _fake_s3(monkeypatch, tmp_path, download_dir, lambda uri: "f" * 64)
    with pytest.raises(ConnectionError):
        load_lmm("s3://bucket/tiny")
    assert not cache_dir_for("s3://bucket/tiny", "f" * 64).exists()
    assert not list((tmp_path / "cache" / "models").iterdir())  # no partial download left behind
    assert load_lmm("s3://bucket/tiny").family == "llava"
    assert len(attempts) == 2


@pytest.mark.services
def test_model_rewritten_on_s3_is_downloaded_afresh(s3_env, tmp_path, monkeypatch):
    from mmsae import storage

    monkeypatch.setenv("MMSAE_CACHE_DIR", str(tmp_path / "cache"))
    uri = storage.join(s3_env, "models", "tiny")
    storage.upload_dir(save_tiny("llava", tmp_path / "a", seed=1), uri)
    first = load_lmm(uri)
    assert load_lmm(uri).path == first.path  # unchanged: the cached copy
    storage.upload_dir(save_tiny("llava", tmp_path / "b", seed=2), uri)  # same names, other weights
    second = load_lmm(uri)
    assert second.path != first.path
    want = dict(load_lmm(tmp_path / "b").model.named_parameters())
    for name, p in second.model.named_parameters():
        torch.testing.assert_close(p, want[name], rtol=0, atol=0)


def test_package_exports_resolve_lazily():
    import mmsae.models as models
    from mmsae.models.geometry import token_geometry

    assert models.token_geometry is token_geometry
    assert models.load_lmm is load_lmm
    with pytest.raises(AttributeError):
        models.no_such_name  # noqa: B018
