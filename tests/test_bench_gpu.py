"""The GPU profile (``python -m bench gpu``) runs end to end on the CPU at its tiny shapes."""

from __future__ import annotations

import json

import pytest
import torch

from bench import __main__ as bench_main
from bench import gpu


def test_gpu_profile_runs_tiny_on_the_cpu_and_writes_gpu_json(tmp_path, monkeypatch):
    monkeypatch.setenv(gpu.TINY_ENV, "1")
    monkeypatch.setenv(gpu.PARTIAL_ENV, str(tmp_path / "gpu.partial.json"))
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
    assert train["auxk"]["in_timed_step"] and train["auxk"]["losses_finite"] is True
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
    assert 0 < mine["mine_over_encode_throughput"] and 0 < mine["mine_over_encode_beyond_reading"]
    assert set(mine["median_seconds"]) == {"read", "encode", "mine"}
    assert result["seconds"]["total"] > 0
    partial = json.loads((tmp_path / "gpu.partial.json").read_text())  # written after each part, the last one
    assert {"peak", "train", "cache", "mine"} <= set(partial) and partial["failed"] == {}


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


def test_a_failing_part_is_reported_and_the_others_still_run(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("no room on the device")

    monkeypatch.setattr(gpu, "cache_part", broken)
    monkeypatch.setenv(gpu.PARTIAL_ENV, str(tmp_path / "partial.json"))
    threads = torch.get_num_threads()
    try:
        result = gpu.main(tiny=True)
    finally:
        torch.set_num_threads(threads)
    assert result["failed"] == {"cache": "RuntimeError: no room on the device"}
    assert result["train"]["tokens_per_s"] > 0
    assert "mine" not in result and "cache" not in result
    assert json.loads((tmp_path / "partial.json").read_text())["failed"] == result["failed"]


def test_decoding_workers_fall_back_to_the_main_process_without_shared_memory(tmp_path, monkeypatch, caplog):
    assert gpu.decoding_workers(2, str(tmp_path)) == 2  # this machine's disk has room for two
    assert gpu.decoding_workers(0, str(tmp_path)) == 0
    monkeypatch.setattr(gpu.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 64 * 2**20})())
    assert gpu.decoding_workers(6, "/dev/shm") == 0
    assert "/dev/shm has 67 MB free, 6 decoding workers need" in caplog.text



def test_device_busy_time_counts_kernels_but_not_the_labels_shown_on_the_device():
    from types import SimpleNamespace

    from bench import _timing as timing

    def event(name, device, microseconds):
        kind = torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU
        return SimpleNamespace(name=name, device_type=kind,
                               time_range=SimpleNamespace(elapsed_us=lambda: microseconds))

    events = [event("sae.encode.product", True, 900.0), event("ampere_sgemm", True, 800.0),
              event("void topk_kernel", True, 150.0), event("aten::mm", False, 1000.0)]
    assert timing._device_busy_seconds(events) == pytest.approx(950e-6)
