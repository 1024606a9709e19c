"""The GPU profile (``python -m bench gpu``) runs end to end on the CPU at its tiny shapes."""

from __future__ import annotations

import json

import pytest
import torch

from bench import __main__ as bench_main
from bench import gpu


def test_gpu_profile_runs_tiny_on_the_cpu_and_writes_gpu_json(tmp_path, monkeypatch):
    monkeypatch.setenv(gpu.TINY_ENV, "1")
    threads = torch.get_num_threads()
    try:
        assert bench_main.main(["--out", str(tmp_path), "gpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["profile"] == "tiny"
    assert result["failed"] == {}
    assert result["setup"]["train"]["d_in"] == gpu.TINY.train.d_in
    train = result["train"]
    assert train["tokens_per_s"] > 0 and 0 < train["fraction_of_measured_peak"]
    assert train["auxk"]["in_timed_step"]
    assert set(train["parts"]) == {"forward", "backward", "step"}
    assert train["engine"]["zero_stage_used"] == gpu.TINY.train_zero_stage == 2
    assert train["bare_tokens_per_s"] > 0 and {"auxk", "bare"} == set(train["breakdown"])
    assert "decode_aux" in train["breakdown"]["auxk"] and "decode_aux" not in train["breakdown"]["bare"]
    cache = result["cache"]
    assert cache["images"] == gpu.TINY.images and cache["image_tokens"] > gpu.TINY.images
    assert cache["stage_over_forward_truncated"] > 0 and cache["bytes_written"] > 0
    assert cache["hookpoint"] == f"layers.{gpu.TINY.layer}"
    assert "shards_uri" not in cache
    assert cache["writer_bytes_per_s"] > 0 and cache["last_stage_seconds_per_part"]["forward"] > 0
    mine = result["mine"]
    assert mine["tokens"] == cache["image_tokens"]
    assert 0 < mine["mine_over_encode_throughput"]
    assert result["seconds"]["total"] > 0


def test_full_profile_has_the_seed_shapes_and_is_chosen_only_on_a_gpu(monkeypatch):
    monkeypatch.delenv(gpu.TINY_ENV, raising=False)
    full = gpu.FULL
    assert (full.train.d_in, full.train.num_latents, full.train.k) == (4096, 131072, 128)
    assert full.text["hidden_size"] == 4096 and full.text["num_hidden_layers"] == 32
    assert full.text["num_key_value_heads"] == 8 and full.text["vocab_size"] == 128256
    assert (full.vision["image_size"], full.vision["patch_size"], full.vision["num_hidden_layers"]) == (336, 14, 24)
    assert gpu.choose_profile(None, torch.device("cpu")) is gpu.TINY
    assert gpu.choose_profile(None, torch.device("cuda", 0)) is gpu.FULL
    monkeypatch.setenv(gpu.TINY_ENV, "1")
    assert gpu.choose_profile(None, torch.device("cuda", 0)) is gpu.TINY


@pytest.mark.parametrize("family_shape", [gpu.TINY])
def test_built_model_has_the_profile_geometry(tmp_path, family_shape):
    lmm = gpu.build_lmm(family_shape, torch.device("cpu"), torch.float32, tmp_path)
    assert lmm.config.text_config.hidden_size == family_shape.text["hidden_size"]
    assert lmm.config.image_grid_pinpoints == family_shape.pinpoints
    assert (tmp_path / "config.json").exists() and not list(tmp_path.glob("*.safetensors"))


def test_a_failing_part_is_reported_and_the_others_still_run(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no room on the device")

    monkeypatch.setattr(gpu, "cache_part", broken)
    threads = torch.get_num_threads()
    try:
        result = gpu.main(tiny=True)
    finally:
        torch.set_num_threads(threads)
    assert result["failed"] == {"cache": "RuntimeError: no room on the device"}
    assert result["train"]["tokens_per_s"] > 0
    assert "mine" not in result and "cache" not in result
