"""The train stage: DeepSpeed on the CPU, one rank vs two, resume after kill -9, bad input."""

from __future__ import annotations

import json
import logging
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

from mmsae import activations, storage, tracking
from mmsae.config import RunConfig, TrainConfig
from mmsae.stages import train
from mmsae.stages._base import KEY_FIELD, OutputMismatchError, StageContext
from mmsae.training import engine, evaluation
from mmsae.training.loop import Trainer
from mmsae.training.state import RESUME_KEY, STATE_DIR
from mmsae.training.stream import BatchStream, heldout_images

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
                widths: dict[str, int] | None = None, seed: int = 0, text_tokens: int = 4) -> str:
    """Shards of planted features at ``uri``, as the cache stage lays them out (``seed``: other tokens; the
    last ``text_tokens`` of each image are text)."""
    files, shards = {}, {h: [] for h in hookpoints}
    img = 0
    for s in range(n_shards):
        n = rows_per_image * images_per_shard
        image_idx = torch.arange(img, img + images_per_shard).repeat_interleave(rows_per_image)
        token_pos = torch.arange(rows_per_image).repeat(images_per_shard)
        view = torch.where(token_pos < rows_per_image - text_tokens, 0, -1).to(torch.int16)
        for hi, h in enumerate(hookpoints):
            acts = planted(n, seed=100_000 * seed + 1000 * s + hi)[:, : (widths or {}).get(h, D)]
            if poison is not None and s == poison:
                acts[5, 3] = float("nan")
            cols = {"acts": acts, "image_idx": image_idx, "token_pos": token_pos, "view": view,
                    "row": torch.zeros(n, dtype=torch.int16), "col": torch.zeros(n, dtype=torch.int16)}
            name = f"{h}/{activations.shard_name(0, s)}"
            data = activations.encode_shard(cols, {"hookpoint": h})
            storage.write_bytes(storage.join(uri, name), data)
            files[name] = storage.sha256_file(storage.join(uri, name)) if not storage.is_s3(uri) else None
            shards[h].append({"name": name, "rows": n, "first_image": img, "end_image": img + images_per_shard})
            if count_nonfinite:  # as the cache stage records it
                shards[h][-1]["nonfinite"] = int((~torch.isfinite(acts)).any(1).sum())
        img += images_per_shard
    storage.write_manifest(uri, activations.KIND, files=list(files), extra={
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
    assert engine.default_lr(2**14) == pytest.approx(2e-4)
    assert engine.default_lr(2**17) == pytest.approx(2e-4 / 8**0.5)
    m = [engine.lr_multiplier(s, 100, 10, "cosine", 0.1) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(m[10:], m[11:], strict=False))
    assert m[-1] == pytest.approx(0.1, abs=1e-3)


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_the_schedule_reaches_its_final_fraction_at_its_last_step(decay):
    schedule = engine.lr_schedule(TrainConfig(lr_warmup_steps=5, lr_decay=decay, lr_final_fraction=0.25), 50)
    m = [schedule(s) for s in range(50)]
    assert m[0] == pytest.approx(0.2) and m[4] == 1.0
    assert m[-1] == pytest.approx(0.25, rel=1e-12) and m[-2] > 0.25


def test_stream_batches_do_not_depend_on_world_size(tmp_path):
    uri = make_shards(str(tmp_path / "acts"))
    shards = activations.ActivationShards(uri)
    one = [b["layers.1"] for _, b in BatchStream(shards, ["layers.1"], 64, epochs=2, seed=3).iterate()]
    halves = [
        [b["layers.1"] for _, b in BatchStream(shards, ["layers.1"], 64, epochs=2, seed=3, rank=r, world=2).iterate()]
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
        shards = activations.ActivationShards(uri)
        read: list[str] = []
        real_read = shards.read

        def counting(ref):
            read.append(ref.name)
            return real_read(ref)

        shards.read = counting
        stream = BatchStream(shards, ["layers.1", "layers.2"], 64, epochs=2, seed=3, window_shards=3,
                               heldout_fraction=0.1, rank=rank, world=world,
                               group=torch.distributed.new_group(backend="gloo"))
        batches = [{h: x.clone() for h, x in b.items()} for _, b in stream.iterate()]
        torch.save({"batches": batches, "read": read}, f"{out}-{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_shared_reads_give_each_rank_its_slices_and_read_each_shard_once(tmp_path):
    import torch.multiprocessing as mp

    uri = make_shards(str(tmp_path / "acts"), n_shards=7, hookpoints=("layers.1", "layers.2"))
    shards = activations.ActivationShards(uri)
    one = [b for _, b in BatchStream(shards, ["layers.1", "layers.2"], 64, epochs=2, seed=3, window_shards=3,
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
    shards = activations.ActivationShards(uri)
    stream = BatchStream(shards, ["layers.1"], 64, epochs=2, seed=1)
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
    for k in engine.LAUNCHER_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.9.8.7")  # set by the user: kept as it was
    shards = make_shards(str(tmp_path / "acts"), n_shards=2)
    for run in range(2):  # and a second run in the same process makes its own group again
        train.run(cfg_for(shards, tmp_path / f"sae{run}", max_steps=3))
        assert not torch.distributed.is_initialized()
        assert {k: os.environ.get(k) for k in engine.LAUNCHER_ENV} == {
            "RANK": None, "WORLD_SIZE": None, "LOCAL_RANK": None, "MASTER_ADDR": "10.9.8.7", "MASTER_PORT": None}


def test_resume_is_refused_for_other_settings_or_rewritten_shards(tmp_path):
    shards = make_shards(str(tmp_path / "acts"), n_shards=2)
    out = tmp_path / "sae"
    first = train.run(cfg_for(shards, out, max_steps=6, checkpoint_every=3))
    (out / "manifest.json").unlink()  # as if the run had died after its last state
    with pytest.raises(OutputMismatchError,
                       match=r"training states .*setting train\.k: 4 -> 2; setting train\.lr: 0\.01 -> 0\.02"):
        train.run(cfg_for(shards, out, max_steps=6, checkpoint_every=3, k=2, lr=2e-2))
    # settings that do not change what is trained may differ: it resumes at the end and seals the same SAE
    again = train.run(cfg_for(shards, out, max_steps=6, checkpoint_every=3, log_every=1, eval_lm_images=0))
    assert again.figures["steps"] == 6 and again.figures["heldout_fvu_image"] == first.figures["heldout_fvu_image"]
    (out / "manifest.json").unlink()
    make_shards(shards, n_shards=2)  # rewritten at the same place
    with pytest.raises(OutputMismatchError, match=r"training states .*input shards was rewritten"):
        train.run(cfg_for(shards, out, max_steps=6, checkpoint_every=3))


def test_shards_rewritten_at_the_same_uri_are_not_served_the_old_sae(tmp_path):
    shards = make_shards(str(tmp_path / "acts"), n_shards=2)
    out = tmp_path / "sae"
    first = train.run(cfg_for(shards, out, max_steps=6))
    old_weights, old_print = _weights(out), storage.fingerprint(shards)
    sealed_at = (out / "manifest.json").stat().st_mtime_ns
    # the same settings and shards: the SAE there is reused, not trained again
    assert train.run(cfg_for(shards, out, max_steps=6, log_every=1)).figures == first.figures
    assert (out / "manifest.json").stat().st_mtime_ns == sealed_at
    make_shards(shards, n_shards=2, seed=1)  # the cache ran again over other images: new shards, same URI
    with pytest.raises(OutputMismatchError, match=r"train\.out .*'sae' artifact .*input shards was rewritten"):
        train.run(cfg_for(shards, out, max_steps=6))
    assert (out / "manifest.json").stat().st_mtime_ns == sealed_at  # refused: left as it was
    replace = cfg_for(shards, out, max_steps=6)
    replace.run.overwrite = True
    second = train.run(replace)
    recorded = storage.read_manifest(str(out), kind=train.KIND).extra[KEY_FIELD]["fingerprints"]["shards"]
    assert recorded == storage.fingerprint(shards) != old_print
    assert not torch.equal(_weights(out)["W_dec"], old_weights["W_dec"])
    # trained afresh on the new shards (the old states dropped, not resumed): as a run elsewhere on them
    fresh = train.run(cfg_for(shards, tmp_path / "fresh", max_steps=6))
    assert second.figures == fresh.figures
    assert all(torch.equal(a, b) for a, b in zip(_weights(out).values(), _weights(tmp_path / "fresh").values(),
                                                 strict=True))


def test_states_of_rewritten_shards_are_refused_or_dropped_under_overwrite(tmp_path):
    shards = make_shards(str(tmp_path / "acts"), n_shards=2)
    out = tmp_path / "sae"
    train.run(cfg_for(shards, out, max_steps=6, checkpoint_every=3))
    (out / "manifest.json").unlink()  # as if the run had died after its last state
    make_shards(shards, n_shards=2, seed=1)
    with pytest.raises(OutputMismatchError, match=r"training states .*input shards was rewritten"):
        train.run(cfg_for(shards, out, max_steps=6, checkpoint_every=3))
    assert (out / STATE_DIR / "latest").read_text().strip() == "step00000006"  # refused: left as they were
    replace = cfg_for(shards, out, max_steps=6, checkpoint_every=3)
    replace.run.overwrite = True
    again = train.run(replace)
    key = json.loads((out / STATE_DIR / RESUME_KEY).read_text())
    assert key["fingerprints"]["shards"] == storage.fingerprint(shards)
    fresh = train.run(cfg_for(shards, tmp_path / "fresh", max_steps=6, checkpoint_every=3))
    assert again.figures == fresh.figures
    assert torch.equal(_weights(out)["W_dec"], _weights(tmp_path / "fresh")["W_dec"])


def test_only_the_newest_states_are_kept_and_an_s3_state_resumes_on_a_fresh_machine(tmp_path, s3_env, monkeypatch):
    monkeypatch.setenv("MMSAE_CACHE_DIR", str(tmp_path / "cache-a"))
    shards = make_shards(str(tmp_path / "acts"), n_shards=2)
    local = train.run(cfg_for(shards, tmp_path / "local", max_steps=9, checkpoint_every=2, keep_checkpoints=1))
    assert sorted(p.name for p in (tmp_path / "local" / STATE_DIR).glob("step*")) == ["step00000009"]
    out = s3_env + "/sae"

    def on_s3():
        cfg = cfg_for(shards, tmp_path / "unused", max_steps=9, checkpoint_every=2)
        cfg.train.out = out
        return cfg

    remote = train.run(on_s3())
    state = storage.join(out, STATE_DIR)
    assert {n.split("/")[0] for n in storage.list_files(state)} == {
        "step00000008", "step00000009", "latest", RESUME_KEY}
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
def test_total_steps_are_the_batches_the_stream_yields(tmp_path, tokens):
    shards = activations.ActivationShards(make_shards(str(tmp_path / "acts"), n_shards=7))
    stream = BatchStream(shards, ["layers.1"], 32, epochs=2, window_shards=2, tokens=tokens,
                           heldout_fraction=0.2)
    actual = sum(1 for _ in stream.iterate())
    assert stream.total_steps() == actual


def test_total_steps_read_the_index_columns_only(tmp_path):
    shards = activations.ActivationShards(make_shards(str(tmp_path / "acts"), n_shards=3))
    shards.read = lambda ref: pytest.fail(f"{ref.name} read whole")
    stream = BatchStream(shards, ["layers.1"], 32, tokens="image", heldout_fraction=0.2)
    assert stream.total_steps() > 0


def _logged(monkeypatch) -> dict[int, dict[str, float]]:
    """Every progress metric the train stage logs, by step."""
    logged: dict[int, dict[str, float]] = {}
    log_progress = StageContext.log_progress

    def spy(self, metrics, step):
        logged[step] = dict(metrics)
        log_progress(self, metrics, step)

    monkeypatch.setattr(StageContext, "log_progress", spy)
    return logged


def test_the_schedule_ends_at_its_final_fraction_on_the_last_step_run(tmp_path, monkeypatch):
    # the held-out share differs from window to window: the first window's share misjudges the run's length
    shards = make_shards(str(tmp_path / "acts"), n_shards=6)
    cfg = cfg_for(shards, tmp_path / "sae", epochs=2, batch_size=32, log_every=1, lr_final_fraction=0.25)
    logged = _logged(monkeypatch)
    figures = train.run(cfg).figures
    stream = BatchStream(activations.ActivationShards(shards), ["layers.1"], 32, epochs=2,
                         seed=cfg.train.seed, window_shards=2, heldout_fraction=0.1)
    run = sum(1 for _ in stream.iterate())
    assert figures["steps"] == run == max(logged) == len(logged)
    lrs = [logged[s]["layers.1/lr"] for s in range(1, run + 1)]  # the rate each step was taken with
    assert lrs[0] == pytest.approx(1e-2 / 5) and max(lrs) == pytest.approx(1e-2)
    assert lrs[-1] == pytest.approx(1e-2 * 0.25, rel=1e-6) and lrs[-2] > lrs[-1]


def test_a_resumed_run_keeps_the_schedule_of_an_uninterrupted_one(tmp_path, monkeypatch):
    shards = make_shards(str(tmp_path / "acts"), n_shards=4)
    kw = {"epochs": 2, "log_every": 1, "checkpoint_every": 4, "lr_final_fraction": 0.25}
    logged = _logged(monkeypatch)
    whole = train.run(cfg_for(shards, tmp_path / "whole", **kw)).figures
    reference = {s: m["layers.1/lr"] for s, m in logged.items()}
    logged.clear()
    step = Trainer._step

    def dies_at_step_7(self, *args, **kwargs):
        if len(logged) == 6:
            raise RuntimeError("killed")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_step", dies_at_step_7)
    with pytest.raises(RuntimeError, match="killed"):
        train.run(cfg_for(shards, tmp_path / "sae", **kw))
    monkeypatch.setattr(Trainer, "_step", step)
    logged.clear()
    resumed = train.run(cfg_for(shards, tmp_path / "sae", **kw)).figures
    stream = BatchStream(activations.ActivationShards(shards), ["layers.1"], 64, epochs=2, window_shards=2,
                         heldout_fraction=0.1)
    run = sum(1 for _ in stream.iterate())
    assert min(logged) == 5 and resumed["steps"] == whole["steps"] == max(reference) == run
    assert {s: m["layers.1/lr"] for s, m in logged.items()} == {s: reference[s] for s in logged}
    assert reference[whole["steps"]] == pytest.approx(1e-2 * 0.25, rel=1e-6)


def test_a_state_of_another_schedule_length_is_not_resumed(tmp_path, monkeypatch):
    shards = make_shards(str(tmp_path / "acts"), n_shards=2)
    out = tmp_path / "sae"
    train.run(cfg_for(shards, out, checkpoint_every=3))
    (out / "manifest.json").unlink()  # as if the run had died after its last state
    total_steps = BatchStream.total_steps
    monkeypatch.setattr(BatchStream, "total_steps", lambda self: total_steps(self) + 1)
    with pytest.raises(train.TrainError, match=r"follows a schedule of (\d+) steps.* give (?!\1)\d+"):
        train.run(cfg_for(shards, out, checkpoint_every=3))


def test_total_steps_of_shards_on_s3_read_byte_ranges(tmp_path, s3_env):
    shards = activations.ActivationShards(make_shards(s3_env + "/acts", n_shards=3))
    shards.read = lambda ref: pytest.fail(f"{ref.name} read whole")
    stream = BatchStream(shards, ["layers.1"], 32, window_shards=2, tokens="text", heldout_fraction=0.2)
    local = BatchStream(activations.ActivationShards(make_shards(str(tmp_path / "acts"), n_shards=3)),
                        ["layers.1"], 32, window_shards=2, tokens="text", heldout_fraction=0.2)
    assert stream.counts() == local.counts() and stream.total_steps() == sum(1 for _ in local.iterate()) > 0


def test_no_heldout_image_gives_no_heldout_figures_and_says_why(tmp_path, caplog):
    shards = make_shards(str(tmp_path / "acts"), n_shards=2, images_per_shard=13)
    cfg = cfg_for(shards, tmp_path / "sae", heldout_fraction=0.01, max_steps=3)
    assert not heldout_images(torch.arange(26), 0.01, cfg.train.seed).any()  # none of the 26 is held out
    with caplog.at_level(logging.WARNING, logger="mmsae"):
        figures = train.run(cfg).figures
    assert figures["heldout"] == "none: 26 images at heldout_fraction 0.01"
    assert figures["heldout_tokens_image"] == figures["heldout_tokens_text"] == 0
    assert not [name for name in figures if name.startswith(("heldout_fvu", "heldout_never_fired"))], figures
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("26 images" in w and "0.01" in w for w in warnings), warnings
    metrics = tracking.metric_values(figures)
    assert "heldout" not in metrics and metrics["heldout_tokens_image"] == 0.0
    summary = (tmp_path / "work" / "summary" / "layers" / "-2" / "train.json").read_text()  # the config's one layer
    assert json.loads(summary) == figures and "NaN" not in summary


def test_a_token_kind_without_heldout_tokens_gets_no_heldout_figures(tmp_path):
    shards = make_shards(str(tmp_path / "acts"), n_shards=2, text_tokens=0)  # image tokens only
    figures = train.run(cfg_for(shards, tmp_path / "sae", max_steps=5)).figures
    assert figures["heldout_tokens_text"] == 0 and "heldout_fvu_text" not in figures
    assert figures["heldout_tokens_image"] > 0 and 0 < figures["heldout_fvu_image"]
    assert 0 <= figures["heldout_never_fired_pct"] < 100 and "heldout" not in figures


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
    with pytest.raises(activations.ShardFormatError, match=r"shard-000-00001\.safetensors: 1 rows hold NaN or inf") as e:
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
        latest = out / STATE_DIR / "latest"
        if latest.exists() and latest.read_text().strip() >= "step00000010":
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "mmsae.cli", "--debug", *_cli(out, shards, **kw)],
                             env=_env(tmp_path), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
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
    """Cache the toy LMM on the toy world's captioned images, train, and measure the LM loss with the SAE
    spliced in. The toy LMM is trained long enough (two text layers) for its captions to depend on the image
    tokens at layer 0, so zeroing them costs loss and the share an SAE recovers is meaningful."""
    import numpy as np
    from PIL import Image

    from mmsae.config import ToyLMMConfig, ToyWorldConfig
    from mmsae.data import toyworld
    from mmsae.models import load_lmm, toy
    from mmsae.stages import cache

    world = ToyWorldConfig(n_train=160, n_heldout=12, max_size=96, seed=11)
    toy_cfg = ToyLMMConfig(base_size=32, patch_size=16, vision_hidden=32, vision_layers=1, vision_heads=2,
                           text_hidden=32, text_layers=2, text_heads=2, steps=300, batch_size=16, lr=3e-3)
    model, _ = toy.get_or_train(toy_cfg, world, cache_dir=tmp_path / "toy-cache")
    toyworld.build(world, tmp_path / "world")
    cfg = RunConfig()
    cfg.tracking.enabled = False
    cfg.run.workdir = str(tmp_path / "work")
    cfg.cache = cfg.cache.model_copy(update={
        "image_set": str(tmp_path / "world"), "split": "train", "model": str(model), "prompt": toy.PROMPT,
        "out": str(tmp_path / "acts"), "layers": [0], "num_workers": 0})
    cache.run(cfg)
    cfg.train = TrainConfig.model_validate({
        **cfg.train.model_dump(), "shards": str(tmp_path / "acts"), "out": str(tmp_path / "sae"),
        "num_latents": 128, "k": 8, "batch_size": 64, "max_steps": 100, "lr_warmup_steps": 2,
        "tokens": "image", "heldout_fraction": 0.2, "eval_lm_images": 8})
    f = train.run(cfg).figures
    assert f["lm_eval_images"] == 8
    for key in ("lm_loss_clean", "lm_loss_sae", "lm_loss_zero", "loss_recovered"):
        assert np.isfinite(f[key]), (key, f)
    zero, sae, clean = f["lm_loss_zero"], f["lm_loss_sae"], f["lm_loss_clean"]
    assert clean < sae < zero, f  # the SAE loses some of what the layer carries, zeroing it loses more
    assert f["loss_recovered"] == pytest.approx((zero - sae) / (zero - clean), rel=1e-9)
    assert 0.3 < f["loss_recovered"] < 1.0, f
    assert f["lm_delta_loss"] == pytest.approx(sae - clean, rel=1e-9)

    # the splice itself: identity leaves the loss unchanged, zeros change it
    lmm = load_lmm(str(model))
    scene = toyworld.generate(world, "train", 1)[0]
    enc = lmm.processor(images=[Image.fromarray(scene.image)], text=[f"{toy.PROMPT} {scene.caption}"],
                        return_tensors="pt")
    labels = enc["input_ids"].clone()
    where = torch.ones_like(labels, dtype=torch.bool)
    clean = evaluation.spliced_loss(lmm, enc, labels)
    assert evaluation.spliced_loss(lmm, enc, labels, "layers.0", where, lambda x: x) == pytest.approx(clean, rel=1e-5)
    assert evaluation.spliced_loss(lmm, enc, labels, "layers.0", where, torch.zeros_like) != pytest.approx(clean, rel=1e-3)


def test_a_released_engine_is_destroyed_even_when_the_block_fails():
    from mmsae.training.engine import released

    class Engine:
        destroyed = 0

        def destroy(self):
            self.destroyed += 1

    engine = Engine()
    with pytest.raises(RuntimeError, match="step failed"), released(engine) as held:
        assert held is engine and engine.destroyed == 0
        raise RuntimeError("step failed")
    assert engine.destroyed == 1

