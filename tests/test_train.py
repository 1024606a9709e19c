"""The train stage: DeepSpeed on the CPU, one rank vs two, resume after kill -9, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmsae import activations as A
from mmsae import storage
from mmsae.config import RunConfig, TrainConfig
from mmsae.stages import train

D, ATOMS, SPARSITY = 32, 48, 3


def planted(n: int, seed: int) -> torch.Tensor:
    """Tokens made of SPARSITY of ATOMS fixed unit directions with positive weights, plus an offset."""
    g = torch.Generator().manual_seed(1234)
    atoms = torch.nn.functional.normalize(torch.randn(ATOMS, D, generator=g), dim=1)
    offset = torch.randn(D, generator=g) * 2
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(ATOMS, generator=g)[:SPARSITY] for _ in range(n)])
    w = torch.rand(n, SPARSITY, generator=g) * 2 + 0.5
    return (w[:, :, None] * atoms[idx]).sum(1) + offset + 0.01 * torch.randn(n, D, generator=g)


def make_shards(uri: str, n_shards: int = 6, rows_per_image: int = 20, images_per_shard: int = 30,
                hookpoints=("layers.1",), poison: int | None = None, count_nonfinite: bool = False,
                widths: dict[str, int] | None = None) -> str:
    files, shards = {}, {h: [] for h in hookpoints}
    img = 0
    for s in range(n_shards):
        n = rows_per_image * images_per_shard
        image_idx = torch.arange(img, img + images_per_shard).repeat_interleave(rows_per_image)
        token_pos = torch.arange(rows_per_image).repeat(images_per_shard)
        view = torch.where(token_pos < rows_per_image - 4, 0, -1).to(torch.int16)  # last 4 tokens are text
        for hi, h in enumerate(hookpoints):
            acts = planted(n, seed=1000 * s + hi)[:, : (widths or {}).get(h, D)]
            if poison is not None and s == poison:
                acts[5, 3] = float("nan")
            cols = {"acts": acts, "image_idx": image_idx, "token_pos": token_pos, "view": view,
                    "row": torch.zeros(n, dtype=torch.int16), "col": torch.zeros(n, dtype=torch.int16)}
            name = f"{h}/{A.shard_name(0, s)}"
            data = A.encode_shard(cols, {"hookpoint": h})
            storage.write_bytes(storage.join(uri, name), data)
            files[name] = storage.sha256_file(storage.join(uri, name)) if not storage.is_s3(uri) else None
            shards[h].append({"name": name, "rows": n, "first_image": img, "end_image": img + images_per_shard})
            if count_nonfinite:  # as the cache stage records it
                shards[h][-1]["nonfinite"] = int((~torch.isfinite(acts)).any(1).sum())
        img += images_per_shard
    storage.write_manifest(uri, A.KIND, files=list(files), extra={
        "hookpoints": list(hookpoints), "d": D, "dims": {h: (widths or {}).get(h, D) for h in hookpoints},
        "dtype": "float32", "shards": shards})
    return uri


def cfg_for(shards: str, out: Path, **train_kw) -> RunConfig:
    cfg = RunConfig()
    cfg.tracking.enabled = False
    cfg.run.workdir = str(out.parent / "work")
    cfg.train = TrainConfig.model_validate({
        **cfg.train.model_dump(), "shards": shards, "out": str(out), "num_latents": 64, "k": 4, "batch_size": 64, "lr": 1e-2,
        "lr_warmup_steps": 5, "log_every": 10, "checkpoint_every": 1000, "dead_tokens": 2000,
        "heldout_fraction": 0.1, "window_shards": 2, **train_kw})
    return cfg


def test_lr_scaling_and_schedule():
    assert train.default_lr(2**14) == pytest.approx(2e-4)
    assert train.default_lr(2**17) == pytest.approx(2e-4 / 8**0.5)
    m = [train.lr_multiplier(s, 100, 10, "cosine", 0.1) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(m[10:], m[11:], strict=False))
    assert m[-1] == pytest.approx(0.1, abs=1e-3)


def test_stream_batches_do_not_depend_on_world_size(tmp_path):
    uri = make_shards(str(tmp_path / "acts"))
    shards = A.ActivationShards(uri)
    one = [b["layers.1"] for _, b in A.BatchStream(shards, ["layers.1"], 64, epochs=2, seed=3).iterate()]
    halves = [
        [b["layers.1"] for _, b in A.BatchStream(shards, ["layers.1"], 64, epochs=2, seed=3, rank=r, world=2).iterate()]
        for r in range(2)
    ]
    assert len(one) == len(halves[0]) == len(halves[1]) > 10
    for g, a, b in zip(one, *halves, strict=True):
        assert torch.equal(g, torch.cat([a, b]))
    # every training row at most once per epoch; the two epochs differ in order
    per_epoch = len(one) // 2
    assert not torch.equal(one[0], one[per_epoch])


def _shared_stream_rank(rank: int, world: int, init: str, uri: str, out: str) -> None:
    """One rank of a gloo group streaming with shared reads: saves its batches and the shards it read."""
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        shards = A.ActivationShards(uri)
        read: list[str] = []
        real_read = shards.read

        def counting(ref):
            read.append(ref.name)
            return real_read(ref)

        shards.read = counting
        stream = A.BatchStream(shards, ["layers.1", "layers.2"], 64, epochs=2, seed=3, window_shards=3,
                               heldout_fraction=0.1, rank=rank, world=world,
                               group=torch.distributed.new_group(backend="gloo"))
        batches = [{h: x.clone() for h, x in b.items()} for _, b in stream.iterate()]
        torch.save({"batches": batches, "read": read}, f"{out}-{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_shared_reads_give_each_rank_its_slices_and_read_each_shard_once(tmp_path):
    import torch.multiprocessing as mp

    uri = make_shards(str(tmp_path / "acts"), n_shards=7, hookpoints=("layers.1", "layers.2"))
    shards = A.ActivationShards(uri)
    one = [b for _, b in A.BatchStream(shards, ["layers.1", "layers.2"], 64, epochs=2, seed=3, window_shards=3,
                                        heldout_fraction=0.1).iterate()]
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_shared_stream_rank, args=(2, init, uri, str(tmp_path / "rank")), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank-{r}.pt") for r in range(2)]
    assert len(one) == len(got[0]["batches"]) == len(got[1]["batches"]) > 5
    for g, a, b in zip(one, got[0]["batches"], got[1]["batches"], strict=True):
        for h in ("layers.1", "layers.2"):
            assert torch.equal(g[h], torch.cat([a[h], b[h]]))
    # each shard read once per epoch by one rank (not once per rank): 2 epochs x 2 hook points x 7 shards
    reads = Counter(got[0]["read"] + got[1]["read"])
    assert len(reads) == 14 and set(reads.values()) == {2} and got[0]["read"] and got[1]["read"]


def test_stream_resumes_mid_window(tmp_path):
    uri = make_shards(str(tmp_path / "acts"))
    shards = A.ActivationShards(uri)
    stream = A.BatchStream(shards, ["layers.1"], 64, epochs=2, seed=1)
    full = list(stream.iterate())
    state, _ = full[6]
    rest = list(stream.iterate(state))
    assert len(rest) == len(full) - 7
    for (sa, a), (sb, b) in zip(rest, full[7:], strict=True):
        assert sa == sb and torch.equal(a["layers.1"], b["layers.1"])


def test_training_learns_planted_features_and_writes_sparsify_layout(tmp_path):
    shards = make_shards(str(tmp_path / "acts"))
    out = tmp_path / "sae"
    result = train.run(cfg_for(shards, out, epochs=4))
    f = result.figures
    assert f["heldout_fvu_image"] < 0.25, f
    assert f["heldout_fvu_text"] < 0.25, f
    assert 0 <= f["dead_pct"] <= 100 and 0 <= f["heldout_never_fired_pct"] <= 100
    cfg = json.loads((out / "layers.1" / "cfg.json").read_text())
    assert cfg["d_in"] == D and cfg["num_latents"] == 64 and cfg["k"] == 4
    tensors = load_file(out / "layers.1" / "sae.safetensors")
    assert set(tensors) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    norms = tensors["W_dec"].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-4, rtol=0)
    storage.verify_artifact(str(out), kind=train.KIND)


def test_in_process_run_leaves_no_process_group_or_launcher_variables(tmp_path, monkeypatch):
    # A one-rank run inside a long-lived process (a test session, a notebook, a local pipeline that
    # spawns the next stage) must not leave RANK/MASTER_PORT behind: a child process would inherit
    # them and try to join a group whose store the parent still holds.
    for k in train._LAUNCHER_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.9.8.7")  # set by the user: kept as it was
    shards = make_shards(str(tmp_path / "acts"), n_shards=2)
    for run in range(2):  # and a second run in the same process makes its own group again
        train.run(cfg_for(shards, tmp_path / f"sae{run}", max_steps=3))
        assert not torch.distributed.is_initialized()
        assert {k: os.environ.get(k) for k in train._LAUNCHER_ENV} == {
            "RANK": None, "WORLD_SIZE": None, "LOCAL_RANK": None, "MASTER_ADDR": "10.9.8.7", "MASTER_PORT": None}


def test_resume_is_refused_for_other_settings_or_rewritten_shards(tmp_path):
    shards = make_shards(str(tmp_path / "acts"), n_shards=2)
    out = tmp_path / "sae"
    first = train.run(cfg_for(shards, out, max_steps=6, checkpoint_every=3))
    (out / "manifest.json").unlink()  # as if the run had died after its last state
    with pytest.raises(train.TrainError, match=r"cannot resume: .*train\.k 4 -> 2.*train\.lr 0\.01 -> 0\.02"):
        train.run(cfg_for(shards, out, max_steps=6, checkpoint_every=3, k=2, lr=2e-2))
    # settings that do not change what is trained may differ: it resumes at the end and seals the same SAE
    again = train.run(cfg_for(shards, out, max_steps=6, checkpoint_every=3, log_every=1, eval_lm_images=0))
    assert again.figures["steps"] == 6 and again.figures["heldout_fvu_image"] == first.figures["heldout_fvu_image"]
    (out / "manifest.json").unlink()
    make_shards(shards, n_shards=2)  # rewritten at the same place
    with pytest.raises(train.TrainError, match="were rewritten since"):
        train.run(cfg_for(shards, out, max_steps=6, checkpoint_every=3))


def test_only_the_newest_states_are_kept_and_an_s3_state_resumes_on_a_fresh_machine(tmp_path, s3_env, monkeypatch):
    monkeypatch.setenv("MMSAE_CACHE_DIR", str(tmp_path / "cache-a"))
    shards = make_shards(str(tmp_path / "acts"), n_shards=2)
    local = train.run(cfg_for(shards, tmp_path / "local", max_steps=9, checkpoint_every=2, keep_checkpoints=1))
    assert sorted(p.name for p in (tmp_path / "local" / train.STATE_DIR).glob("step*")) == ["step00000009"]
    out = s3_env + "/sae"

    def on_s3():
        cfg = cfg_for(shards, tmp_path / "unused", max_steps=9, checkpoint_every=2)
        cfg.train.out = out
        return cfg

    remote = train.run(on_s3())
    state = storage.join(out, train.STATE_DIR)
    assert {n.split("/")[0] for n in storage.list_files(state)} == {
        "step00000008", "step00000009", "latest", train.RESUME_KEY}
    assert storage.read_text(storage.join(state, "latest")).strip() == "step00000009"
    assert remote.figures["heldout_fvu_image"] == local.figures["heldout_fvu_image"]
    sae = storage.read_bytes(storage.join(out, "layers.1", "sae.safetensors"))
    # a new machine (empty local cache) picks the run up from S3 after it died before sealing
    storage.delete(storage.join(out, "manifest.json"))
    monkeypatch.setenv("MMSAE_CACHE_DIR", str(tmp_path / "cache-b"))
    resumed = train.run(on_s3())
    assert resumed.figures["steps"] == 9
    assert storage.read_bytes(storage.join(out, "layers.1", "sae.safetensors")) == sae


@pytest.mark.parametrize("tokens", ["all", "image", "text"])
def test_estimated_steps_are_the_batches_the_stream_yields(tmp_path, tokens):
    shards = A.ActivationShards(make_shards(str(tmp_path / "acts"), n_shards=7))
    stream = A.BatchStream(shards, ["layers.1"], 32, epochs=2, window_shards=2, tokens=tokens,
                           heldout_fraction=0.2)
    actual = sum(1 for _ in stream.iterate())
    assert abs(stream.estimated_steps() - actual) <= max(1, actual // 20), (stream.estimated_steps(), actual)


def test_hook_points_of_different_widths_get_saes_of_their_widths(tmp_path):
    shards = make_shards(str(tmp_path / "acts"), n_shards=2, hookpoints=("layers.1", "layers.1.mlp"),
                         widths={"layers.1.mlp": 24})
    train.run(cfg_for(shards, tmp_path / "sae", max_steps=3, num_latents=None, expansion_factor=2))
    cfgs = {h: json.loads((tmp_path / "sae" / h / "cfg.json").read_text()) for h in ("layers.1", "layers.1.mlp")}
    assert (cfgs["layers.1"]["d_in"], cfgs["layers.1.mlp"]["d_in"]) == (D, 24)
    assert (cfgs["layers.1"]["num_latents"], cfgs["layers.1.mlp"]["num_latents"]) == (2 * D, 48)


def test_sweep_trains_several_saes_from_one_pass(tmp_path):
    shards = make_shards(str(tmp_path / "acts"), hookpoints=("layers.1", "layers.2"))
    out = tmp_path / "sae"
    result = train.run(cfg_for(shards, out, sweep=[{"k": 2}, {"k": 8, "num_latents": 96}], max_steps=20))
    for v in ("k2-m64", "k8-m96"):
        for h in ("layers.1", "layers.2"):
            assert (out / v / h / "sae.safetensors").exists()
    assert result.figures["k8-m96/layers.2/heldout_fvu_image"] < result.figures["k2-m64/layers.2/heldout_fvu_image"]


def test_nan_in_a_shard_is_an_error_naming_it(tmp_path):
    # counted when the shards were written: refused before anything is trained or saved
    shards = make_shards(str(tmp_path / "counted"), poison=4, count_nonfinite=True)
    with pytest.raises(train.TrainError, match=r"NaN or inf.*shard-000-00004.*1 rows"):
        train.run(cfg_for(shards, tmp_path / "sae"))
    assert not (tmp_path / "sae").exists()
    # not counted (shards of another tool): found when the shard is read, naming that shard alone
    shards = make_shards(str(tmp_path / "acts"), poison=1)
    with pytest.raises(A.ShardFormatError, match=r"shard-000-00001\.safetensors: 1 rows hold NaN or inf") as e:
        train.run(cfg_for(shards, tmp_path / "sae2"))
    assert "shard-000-00000" not in str(e.value) and "shard-000-00002" not in str(e.value)


def test_missing_shards_and_unknown_hookpoint_are_clear_errors(tmp_path):
    with pytest.raises(train.TrainError, match="no activation shards"):
        train.run(cfg_for(str(tmp_path / "nothing"), tmp_path / "sae"))
    shards = make_shards(str(tmp_path / "acts"))
    with pytest.raises(train.TrainError, match=r"layers\.9"):
        train.run(cfg_for(shards, tmp_path / "sae", hookpoints=["layers.9"]))


# ------------------------------------------------------------------------------------------------
# processes


def _cli(out: Path, shards: str, **kw) -> list[str]:
    sets = {"train.shards": shards, "train.out": str(out), "train.num_latents": 64, "train.k": 4,
            "train.batch_size": 64, "train.lr": 1e-2, "train.lr_warmup_steps": 5, "train.epochs": 3,
            "train.dead_tokens": 2000, "train.window_shards": 2, "tracking.enabled": "false",
            "run.workdir": str(out.parent / "work"), **kw}
    args = ["train"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "torch-extensions")
    return env


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "layers.1" / "sae.safetensors")


def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path):
    shards = make_shards(str(tmp_path / "acts"))
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "mmsae.cli", *_cli(one, shards)], check=True, env=_env(tmp_path),
                   capture_output=True)
    port = 29500 + os.getpid() % 500
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         "-m", "mmsae.cli", *_cli(two, shards)], env=_env(tmp_path), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    a, b = _weights(one), _weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)
    # no DeepSpeed C++ op was compiled (no JIT build anywhere)
    ext = tmp_path / "torch-extensions"
    assert not ext.exists() or not any(ext.rglob("*.so"))


def test_resume_after_kill_continues_identically(tmp_path):
    shards = make_shards(str(tmp_path / "acts"))
    ref, out = tmp_path / "ref", tmp_path / "killed"
    kw = {"train.checkpoint_every": 5}
    subprocess.run([sys.executable, "-m", "mmsae.cli", *_cli(ref, shards, **kw)], check=True,
                   env=_env(tmp_path), capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "mmsae.cli", *_cli(out, shards, **kw)], env=_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        latest = out / train.STATE_DIR / "latest"
        if latest.exists() and latest.read_text().strip() >= "step00000010":
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    subprocess.run([sys.executable, "-m", "mmsae.cli", *_cli(out, shards, **kw)], check=True,
                   env=_env(tmp_path), capture_output=True)
    a, b = _weights(ref), _weights(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((out / "metrics.json").read_text()) == json.loads((ref / "metrics.json").read_text())


def test_continue_from_a_saved_sae_and_refuse_a_width_mismatch(tmp_path):
    shards = make_shards(str(tmp_path / "acts"))
    first = tmp_path / "first"
    a = train.run(cfg_for(shards, first, epochs=2))
    again = train.run(cfg_for(shards, tmp_path / "again", init_from=str(first), num_latents=999, k=1, max_steps=5,
                              lr=1e-4))
    assert again.figures["heldout_fvu_image"] < a.figures["heldout_fvu_image"] + 0.05  # starts where it ended
    assert json.loads((tmp_path / "again" / "layers.1" / "cfg.json").read_text())["num_latents"] == 64

    from mmsae.sae.checkpoint import save_sae
    from mmsae.sae.model import SaeConfig, TopKSAE

    wide = tmp_path / "wide"
    save_sae(TopKSAE(SaeConfig(d_in=D + 1, num_latents=16, k=2)), str(wide / "layers.1"))
    with pytest.raises(train.TrainError, match=rf"width {D + 1}.*width {D}"):
        train.run(cfg_for(shards, tmp_path / "bad", init_from=str(wide)))


def test_lm_loss_with_sae_spliced_in_on_captioned_images(tmp_path):
    """Cache a tiny LLaVA-NeXT on captioned images, train, and measure the LM loss with the SAE spliced in."""
    import datasets
    import numpy as np
    from PIL import Image

    from mmsae.models import load_lmm, save_tiny
    from mmsae.stages import cache

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(40)]
    captions = ["a red square" if i % 2 else "a blue square" for i in range(40)]
    datasets.Dataset.from_dict({"image": images, "caption": captions}).save_to_disk(str(tmp_path / "imgs"))
    model = str(save_tiny("llava_next", tmp_path / "lmm", text_layers=2))
    cfg = RunConfig()
    cfg.tracking.enabled = False
    cfg.run.workdir = str(tmp_path / "work")
    cfg.cache = cfg.cache.model_copy(update={"image_set": str(tmp_path / "imgs"), "model": model,
                                             "out": str(tmp_path / "acts"), "layers": [0], "num_workers": 0})
    cache.run(cfg)
    cfg.train = TrainConfig.model_validate({
        **cfg.train.model_dump(), "shards": str(tmp_path / "acts"), "out": str(tmp_path / "sae"),
        "num_latents": 128, "k": 8, "batch_size": 64, "max_steps": 30, "lr_warmup_steps": 2,
        "tokens": "image", "heldout_fraction": 0.2, "eval_lm_images": 4})
    f = train.run(cfg).figures
    assert f["lm_eval_images"] == 4
    for key in ("lm_loss_clean", "lm_loss_sae", "lm_loss_zero", "loss_recovered"):
        assert np.isfinite(f[key]), (key, f)
    assert f["lm_loss_zero"] != f["lm_loss_clean"]

    # the splice itself: identity leaves the loss unchanged, zeros change it
    lmm = load_lmm(model)
    enc = lmm.processor(images=[images[0]], text=["<image> a red square"], return_tensors="pt")
    labels = enc["input_ids"].clone()
    where = torch.ones_like(labels, dtype=torch.bool)
    clean = train._spliced_loss(lmm, enc, labels)
    assert train._spliced_loss(lmm, enc, labels, "layers.0", where, lambda x: x) == pytest.approx(clean, rel=1e-5)
    assert train._spliced_loss(lmm, enc, labels, "layers.0", where, torch.zeros_like) != pytest.approx(clean, rel=1e-3)
