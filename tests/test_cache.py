"""The cache stage on tiny LLaVA-family models: geometry, batching, resume, data parallelism, bad input."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from datetime import timedelta
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from mmsae import activations as A
from mmsae import caching, storage
from mmsae.config import RunConfig
from mmsae.models import capture, load_lmm, resolve_hookpoint, save_tiny, token_geometry
from mmsae.stages import cache
from mmsae.stages._base import OutputMismatchError

SIZES = [(40, 40), (64, 32), (30, 70), (50, 45), (33, 33), (70, 20), (48, 64), (41, 39)]


def _png(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(w: int = 40000, h: int = 40000) -> bytes:
    """A PNG whose header claims ``w`` x ``h`` pixels: PIL refuses it with DecompressionBombError on open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def make_image_set(path: Path, sizes=SIZES, corrupt: tuple[int, ...] = (), seed: int = 0,
                   cells_at: dict[int, bytes] | None = None) -> str:
    """Save an image set of random PNGs (``corrupt``: undecodable bytes; ``cells_at``: these bytes instead)."""
    cells = []
    for i, (w, h) in enumerate(sizes):
        data = b"not an image at all" if i in corrupt else _png(w, h, i + 1000 * seed)
        data = (cells_at or {}).get(i, data)
        cells.append({"bytes": data, "path": None})
    ds = datasets.Dataset.from_dict({"image": cells}, features=datasets.Features({"image": datasets.Image()}))
    ds.save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-world")
    models = {f: str(save_tiny(f, root / f, text_layers=3)) for f in ("llava", "llava_next", "llava_onevision")}
    return {"images": make_image_set(root / "images"), "models": models, "root": root}


def _cfg(out, image_set, model, **cache_kw) -> RunConfig:
    cfg = RunConfig()
    cfg.tracking.enabled = False
    cfg.run.workdir = str(out).rsplit("/", 1)[0] + "/work"
    # most tests skip bad images on purpose; the limit has its own test
    cfg.cache = cfg.cache.model_copy(update={"image_set": image_set, "model": model, "out": str(out),
                                             "num_workers": 0, "max_skipped": 100, **cache_kw})
    return cfg


def _all_rows(uri: str, hookpoint: str) -> dict[str, torch.Tensor]:
    shards = A.ActivationShards(uri)
    parts = list(shards.iter_shards(hookpoint))
    return {k: torch.cat([p[k] for p in parts]) for k in A.COLUMNS}


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
def test_rows_equal_single_image_forward_and_geometry(world, tmp_path, family):
    """Every cached row is the activation of that token in an unbatched forward, with its geometry."""
    out = tmp_path / "acts"
    cfg = _cfg(out, world["images"], world["models"][family], layers=[0, -1], tokens="all", batch_size=3,
               shard_rows=50)
    result = cache.run(cfg)
    assert result.figures["images"] == len(SIZES)
    lmm = load_lmm(world["models"][family])
    hooks = [resolve_hookpoint(lmm.model, layer) for layer in (0, -1)]
    shards = A.ActivationShards(str(out))
    assert shards.hookpoints == [h.name for h in hooks]
    assert shards.d == lmm.config.text_config.hidden_size
    assert len(shards.shards()) > 1  # several shards, each whole images
    for h in hooks:
        rows = _all_rows(str(out), h.name)
        for i, (w, hgt) in enumerate(SIZES):
            img = Image.open(io.BytesIO(_png(w, hgt, i))).convert("RGB")
            inputs = lmm.processor(images=[img], text=["<image>"], return_tensors="pt")
            with capture(lmm.model, hooks) as acts, torch.inference_mode():
                lmm.model(**inputs)
            ref = acts[h.name][0]
            geo = token_geometry(family, lmm.config, inputs["input_ids"], inputs.get("image_sizes"),
                                 lmm.processor, batch_num_images=inputs.get("batch_num_images"))
            mine = rows["image_idx"] == i
            pos = rows["token_pos"][mine].long()
            assert sorted(pos.tolist()) == list(range(ref.shape[0]))  # every token, once
            torch.testing.assert_close(rows["acts"][mine], ref[pos], atol=2e-5, rtol=1e-4)
            assert np.array_equal(rows["view"][mine].numpy(), geo.view[0][pos.numpy()])
            assert np.array_equal(rows["row"][mine].numpy(), geo.row[0][pos.numpy()])
            assert np.array_equal(rows["col"][mine].numpy(), geo.col[0][pos.numpy()])
            n_image_tokens = int((inputs["input_ids"][0] == lmm.config.image_token_id).sum())
            assert int((rows["view"][mine] != A.VIEW_TEXT).sum()) == n_image_tokens


def test_image_tokens_only_by_default_and_dtype(world, tmp_path):
    out = tmp_path / "acts"
    cache.run(_cfg(out, world["images"], world["models"]["llava_next"], dtype="bfloat16"))
    shards = A.ActivationShards(str(out))
    rows = _all_rows(str(out), shards.hookpoints[0])
    assert rows["acts"].dtype == torch.bfloat16
    assert (rows["view"] != A.VIEW_TEXT).all()
    assert set(rows["view"].tolist()) >= {0, 1, A.VIEW_NEWLINE}  # base view, tiles and newlines
    m = storage.read_manifest(str(out), kind=A.KIND)
    assert m.extra["figures"]["images"] == len(SIZES)
    assert m.inputs["model"] == world["models"]["llava_next"]


def test_corrupt_images_are_skipped_and_listed(tmp_path, world):
    images = make_image_set(tmp_path / "imgs", corrupt=(1, 5))
    out = tmp_path / "acts"
    result = cache.run(_cfg(out, images, world["models"]["llava"]))
    assert result.figures["images"] == len(SIZES) - 2
    assert result.figures["images_skipped"] == 2
    m = storage.read_manifest(str(out), kind=A.KIND)
    assert [s["image_idx"] for s in m.extra["skipped"]] == [1, 5]
    rows = _all_rows(str(out), m.extra["hookpoints"][0])
    assert not set(rows["image_idx"].tolist()) & {1, 5}


def test_skipped_images_are_named_warned_about_and_bounded(tmp_path, world, caplog):
    sizes = [SIZES[i % len(SIZES)] for i in range(10)]
    cells = []
    for i, (w, h) in enumerate(sizes):
        data = _png(w, h, i)
        if i == 2:
            data = data[: len(data) // 2]  # a truncated PNG
        if i == 7:
            data = b"a text file named .png"
        cells.append({"bytes": data, "path": f"photo-{i}.png"})
    ds = datasets.Dataset.from_dict({"image": cells}, features=datasets.Features({"image": datasets.Image()}))
    images = str(tmp_path / "imgs")
    ds.save_to_disk(images)

    with caplog.at_level(logging.WARNING, logger="mmsae.stages.cache"):
        cache.run(_cfg(tmp_path / "acts", images, world["models"]["llava"], max_skipped=0.2))
    skipped = storage.read_manifest(str(tmp_path / "acts"), kind=A.KIND).extra["skipped"]
    assert [(s["image_idx"], s["name"]) for s in skipped] == [(2, "photo-2.png"), (7, "photo-7.png")]
    warning = caplog.text
    assert "2 of 10 images" in warning and "photo-2.png" in warning and "photo-7.png" in warning
    assert f"{images} row 2" in warning

    with pytest.raises(cache.CacheError, match=r"2 images .* more than cache.max_skipped = 1(\.0)? allows \(1\)"):
        cache.run(_cfg(tmp_path / "strict", images, world["models"]["llava"], max_skipped=1))
    with pytest.raises(cache.CacheError, match=r"max_skipped = 0\.1 allows \(1\).*photo-2\.png"):
        cache.run(_cfg(tmp_path / "share", images, world["models"]["llava"], max_skipped=0.1, batch_size=2))


def test_relative_input_paths_are_recorded_absolute(tmp_path, world, monkeypatch):
    images = Path(make_image_set(tmp_path / "data" / "imgs", sizes=SIZES[:3]))
    shutil.copytree(world["models"]["llava"], tmp_path / "data" / "model")
    monkeypatch.chdir(tmp_path / "data")
    cfg = _cfg("acts", "imgs", "model")
    cfg.run.workdir = "work"
    result = cache.run(cfg)
    assert result.uri == str(tmp_path / "data" / "acts")
    inputs = storage.read_manifest(result.uri, kind=A.KIND).inputs
    assert inputs == {"image_set": str(images), "model": str(tmp_path / "data" / "model")}
    monkeypatch.chdir(tmp_path)  # elsewhere, the shards still name inputs that exist
    shards = A.ActivationShards(result.uri)
    assert storage.exists(shards.image_set) and storage.exists(shards.model)


def test_image_table_lists_every_cached_image_size_as_images_json_does(tmp_path, world):
    images = make_image_set(tmp_path / "imgs", corrupt=(1, 5))
    out = tmp_path / "acts"
    cache.run(_cfg(out, images, world["models"]["llava"]))
    listed = storage.read_json(str(out / "images.json"))["images"]
    table = A.ActivationShards(str(out)).image_sizes()
    assert (out / "images.bin").stat().st_size == 24 * len(listed) == 24 * len(table)
    assert table.ids().tolist() == [i for i, _, _ in listed]
    assert [table[i] for i, _, _ in listed] == [(w, h) for _, w, h in listed]
    assert 1 not in table and 5 not in table
    with pytest.raises(KeyError, match="image 5 was not cached"):
        table[5]
    storage.verify_artifact(str(out), kind=A.KIND)  # the table is checksummed like every file


def test_no_usable_image_is_an_error(tmp_path, world):
    images = make_image_set(tmp_path / "imgs", sizes=SIZES[:3], corrupt=(0, 1, 2))
    with pytest.raises(cache.CacheError, match="no usable image"):
        cache.run(_cfg(tmp_path / "acts", images, world["models"]["llava"]))


def test_layer_out_of_range_names_the_valid_range(tmp_path, world):
    with pytest.raises(ValueError, match=r"out of range.*0\.\.2"):
        cache.run(_cfg(tmp_path / "acts", world["images"], world["models"]["llava"], layers=[7]))


def test_completed_artifact_is_reused_and_other_config_refused(tmp_path, world):
    out = tmp_path / "acts"
    cfg = _cfg(out, world["images"], world["models"]["llava"])
    cache.run(cfg)
    before = {n: storage.read_bytes(storage.join(str(out), n)) for n in storage.list_files(str(out))}
    cache.run(cfg)
    after = {n: storage.read_bytes(storage.join(str(out), n)) for n in storage.list_files(str(out))}
    assert before == after
    with pytest.raises(OutputMismatchError, match=r"setting layers: \[-2\] -> \[1\].*run.overwrite=true"):
        cache.run(_cfg(out, world["images"], world["models"]["llava"], layers=[1]))
    assert {n: storage.read_bytes(storage.join(str(out), n)) for n in storage.list_files(str(out))} == before


def test_cache_to_s3(world, s3_env):
    out = storage.join(s3_env, "acts")
    cache.run(_cfg(out, world["images"], world["models"]["llava_next"], shard_rows=100))
    storage.verify_artifact(out, kind=A.KIND)
    shards = A.ActivationShards(out)
    assert shards.num_rows() > 0
    assert not [n for n in storage.list_files(out) if n.startswith("progress-")]


# ------------------------------------------------------------------------------------------------
# progress records: small per shard set, and a crash between a set's record and the progress


def test_progress_writes_stay_small_as_the_run_grows(tmp_path, world, monkeypatch):
    """Each shard set records only its own images; the progress file stays a few numbers all run long."""
    images = make_image_set(tmp_path / "imgs", sizes=[SIZES[i % len(SIZES)] for i in range(24)])
    written: list[tuple[str, str]] = []
    real_write_json = storage.write_json

    def spy(uri, obj, **kw):
        written.append((str(uri), json.dumps(obj)))
        real_write_json(uri, obj, **kw)

    monkeypatch.setattr(storage, "write_json", spy)
    out = tmp_path / "acts"
    cache.run(_cfg(out, images, world["models"]["llava_next"], batch_size=2, shard_rows=60))
    counters = [len(text) for uri, text in written if uri.endswith("progress-000.json")]
    records = [json.loads(text) for uri, text in written if "/progress-000/" in uri]
    assert len(records) >= 10 and len(counters) == len(records) + 1  # progress after each set and when done
    assert max(counters) - min(counters) < 40
    seen = []
    for rec in records:
        (shard,) = rec["shards"].values()
        ids = [i for i, _, _ in rec["images"]]
        assert all(shard["first_image"] <= i < shard["end_image"] for i in ids)
        seen += ids
    assert seen == list(range(24))
    assert not [n for n in storage.list_files(str(out)) if n.startswith("progress-")]


class _Crash(Exception):
    pass


def test_temporary_files_of_a_run_killed_while_sealing_are_removed(tmp_path, world, monkeypatch):
    """kill -9 during sealing leaves the temp files of images.json / images.bin / manifest.json behind."""
    images = make_image_set(tmp_path / "imgs", sizes=SIZES[:4])
    out = tmp_path / "acts"
    cfg = _cfg(out, images, world["models"]["llava"])
    monkeypatch.setattr(cache, "_seal", lambda *a, **k: (_ for _ in ()).throw(_Crash()))
    with pytest.raises(_Crash):
        cache.run(cfg)
    monkeypatch.undo()
    left = [".mmsae-tmp-images.json.k9x", ".mmsae-tmp-images.bin.k9x", ".mmsae-tmp-manifest.json.k9x"]
    for name in left:
        (out / name).write_bytes(b"half written")
    cache.run(cfg)
    assert not [p.name for p in out.rglob(".mmsae-tmp-*")]
    storage.verify_artifact(str(out), kind=A.KIND)


def test_crash_between_set_record_and_progress_resumes_byte_identical(tmp_path, world, monkeypatch):
    """Killed after a set's shards and record are written, before progress counts it: the set is redone."""
    sizes = [SIZES[i % len(SIZES)] for i in range(12)]
    images = make_image_set(tmp_path / "imgs", sizes=sizes, corrupt=(3, 10, 11))  # 10, 11: after the last set
    model = world["models"]["llava_next"]
    ref = tmp_path / "ref"
    cache.run(_cfg(ref, images, model, batch_size=2, shard_rows=50))

    out = tmp_path / "crashed"
    real_save = cache._save_progress

    def save_then_crash(uri, rank, progress):
        if progress["next_shard"] == 3:
            raise _Crash
        real_save(uri, rank, progress)

    monkeypatch.setattr(cache, "_save_progress", save_then_crash)
    with pytest.raises(_Crash):
        cache.run(_cfg(out, images, model, batch_size=2, shard_rows=50))
    assert (out / "progress-000" / "00002.json").exists()  # the set's record was written ...
    assert storage.read_json(str(out / "progress-000.json"))["next_shard"] == 2  # ... but not counted
    monkeypatch.setattr(cache, "_save_progress", real_save)

    cache.run(_cfg(out, images, model, batch_size=2, shard_rows=50))
    got, want = _files(out), _files(ref)
    assert sorted(got) == sorted(want)
    assert [n for n in want if n != "manifest.json" and got[n] != want[n]] == []
    m = storage.read_manifest(str(out), kind=A.KIND)
    assert m.files == storage.read_manifest(str(ref), kind=A.KIND).files
    assert [s["image_idx"] for s in m.extra["skipped"]] == [3, 10, 11]


def test_progress_of_an_older_format_is_refused(tmp_path, world):
    out = tmp_path / "acts"
    cfg = _cfg(out, world["images"], world["models"]["llava"])
    old = {"key": cache.output_key(cfg.cache).to_json(), "next_chunk": 1, "images": [[0, 40, 40]]}
    storage.write_json(str(out / "progress-000.json"), old)
    with pytest.raises(OutputMismatchError, match="progress format 1"):
        cache.run(cfg)


# ------------------------------------------------------------------------------------------------
# inputs rewritten in place, world size, other artifacts, bad data


def _rebuild_image_set(path: Path, **kw) -> str:
    shutil.rmtree(path)
    return make_image_set(path, **kw)


def test_image_set_or_model_rewritten_in_place_is_refused_then_replaced_on_overwrite(tmp_path, world, caplog):
    """Same config, same URIs, other content (as the toy-world stage rebuilds them): the old shards are never
    returned; the stage refuses naming the input, and run.overwrite remakes them."""
    images = make_image_set(tmp_path / "imgs", sizes=SIZES[:4])
    model = str(save_tiny("llava", tmp_path / "model", text_layers=3, seed=1))
    out = tmp_path / "acts"
    cfg = _cfg(out, images, model)
    assert cache.run(cfg).figures["images"] == 4

    _rebuild_image_set(tmp_path / "imgs", sizes=SIZES[:6], seed=1)
    with pytest.raises(OutputMismatchError, match=r"input image_set was rewritten or replaced"):
        cache.run(cfg)
    assert A.ActivationShards(str(out)).num_rows() == _all_rows(str(out), "layers.1")["acts"].shape[0]
    ref = tmp_path / "ref"
    cache.run(_cfg(ref, images, model))
    cfg.run.overwrite = True
    with caplog.at_level(logging.WARNING, logger="mmsae.stages._base"):
        assert cache.run(cfg).figures["images"] == 6
    assert "input image_set" in caplog.text and "replacing" in caplog.text
    got, want = _files(out), _files(ref)
    assert sorted(got) == sorted(want)
    assert [n for n in want if n != "manifest.json" and got[n] != want[n]] == []

    shutil.rmtree(tmp_path / "model")
    save_tiny("llava", tmp_path / "model", text_layers=3, seed=2)  # same architecture, other weights
    before = _all_rows(str(out), "layers.1")["acts"]
    cfg.run.overwrite = False
    with pytest.raises(OutputMismatchError, match=r"input model was rewritten or replaced"):
        cache.run(cfg)
    cfg.run.overwrite = True
    cache.run(cfg)
    after = _all_rows(str(out), "layers.1")["acts"]
    assert before.shape == after.shape and not torch.equal(before, after)
    storage.verify_artifact(str(out), kind=A.KIND)


def _crash_after_first_shard(monkeypatch, cfg) -> None:
    """Run the cache stage until the progress after its second shard would be saved, then fail there."""
    real_save = cache._save_progress

    def save_then_crash(uri, rank, progress):
        if progress["next_shard"] == 2:
            raise _Crash
        real_save(uri, rank, progress)

    monkeypatch.setattr(cache, "_save_progress", save_then_crash)
    with pytest.raises(_Crash):
        cache.run(cfg)
    monkeypatch.setattr(cache, "_save_progress", real_save)


def test_partial_run_from_inputs_rewritten_since_is_refused_or_restarted_on_overwrite(tmp_path, world, monkeypatch, caplog):
    model = world["models"]["llava_next"]
    sizes = [SIZES[i % len(SIZES)] for i in range(10)]
    images = make_image_set(tmp_path / "imgs", sizes=sizes)
    out = tmp_path / "crashed"
    _crash_after_first_shard(monkeypatch, _cfg(out, images, model, batch_size=2, shard_rows=50))
    assert storage.read_json(str(out / "progress-000.json"))["next_shard"] == 1

    _rebuild_image_set(tmp_path / "imgs", sizes=sizes, seed=7)  # same count and sizes, other pixels
    ref = tmp_path / "ref"
    cache.run(_cfg(ref, images, model, batch_size=2, shard_rows=50))
    cfg = _cfg(out, images, model, batch_size=2, shard_rows=50)
    with pytest.raises(OutputMismatchError, match=r"partial run.*input image_set"):
        cache.run(cfg)
    cfg.run.overwrite = True
    with caplog.at_level(logging.WARNING, logger="mmsae.stages.cache"):
        cache.run(cfg)
    got, want = _files(out), _files(ref)
    assert sorted(got) == sorted(want)
    assert [n for n in want if n != "manifest.json" and got[n] != want[n]] == []
    assert "starts again from scratch" in caplog.text


def test_resume_under_another_world_size_is_refused_naming_both(tmp_path, world, monkeypatch):
    model = world["models"]["llava"]
    images = make_image_set(tmp_path / "imgs", sizes=[SIZES[i % len(SIZES)] for i in range(8)])
    out = tmp_path / "acts"
    _crash_after_first_shard(monkeypatch, _cfg(out, images, model, batch_size=2, shard_rows=20))
    progress = storage.read_json(str(out / "progress-000.json"))
    assert (progress["world_size"], progress["lo"], progress["hi"]) == (1, 0, 8)

    monkeypatch.setattr(cache, "_dist_env", lambda: (0, 2, 0))  # rank 0 of 2 would take images [0, 4)
    with pytest.raises(cache.CacheError) as err:
        cache.run(_cfg(out, images, model, batch_size=2, shard_rows=20))
    msg = str(err.value)
    assert str(out) in msg and "world size 1" in msg and "world size 2" in msg
    assert "[0, 8)" in msg and "[0, 4)" in msg and "delete" in msg


def test_process_group_gets_a_long_timeout(monkeypatch):
    import inspect

    from torch.distributed import constants

    signature = inspect.signature(torch.distributed.init_process_group)
    calls = []

    def init_process_group(*args, **kwargs):  # records the arguments however they are passed
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert cache._dist_env() == (1, 2, 1)
    assert len(calls) == 1
    timeout = calls[0]["timeout"]
    assert timeout == cache.DIST_TIMEOUT and timeout >= timedelta(hours=24)
    defaults = [constants.default_pg_timeout, constants.default_pg_nccl_timeout or constants.default_pg_timeout]
    assert all(timeout > default for default in defaults)  # torch's own would cut off a rank that is hours behind
    assert calls[0]["backend"] == ("nccl" if torch.cuda.is_available() else "gloo")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert cache._dist_env() == (0, 1, 0) and len(calls) == 1  # one process: no process group


def test_out_holding_another_kind_of_artifact_is_refused(tmp_path, world):
    out = tmp_path / "acts"
    storage.write_bytes(str(out / "weights.bin"), b"precious")
    storage.write_manifest(str(out), "sae")
    with pytest.raises(OutputMismatchError, match=rf"{out}.*'sae' artifact"):
        cache.run(_cfg(out, world["images"], world["models"]["llava"]))
    assert storage.read_manifest(str(out)).kind == "sae"
    assert (out / "weights.bin").read_bytes() == b"precious"
    odd = tmp_path / "odd"
    storage.write_text(str(odd / "manifest.json"), '{"not": "an mmsae manifest"}')
    with pytest.raises(OutputMismatchError, match=rf"{odd} holds a manifest.json that cannot be read"):
        cache.run(_cfg(odd, world["images"], world["models"]["llava"]))


def test_decompression_bomb_is_skipped_not_fatal(tmp_path, world):
    images = make_image_set(tmp_path / "imgs", sizes=SIZES[:4], cells_at={2: _bomb_png()})
    out = tmp_path / "acts"
    result = cache.run(_cfg(out, images, world["models"]["llava"]))
    assert result.figures["images"] == 3 and result.figures["images_skipped"] == 1
    (skip,) = storage.read_manifest(str(out), kind=A.KIND).extra["skipped"]
    assert skip["image_idx"] == 2 and skip["error"].startswith("DecompressionBombError:")


def test_manifest_records_each_hook_points_width(tmp_path, world):
    out = tmp_path / "acts"
    cache.run(_cfg(out, world["images"], world["models"]["llava"], layers=[0, "layers.1.mlp.up_proj"]))
    lmm = load_lmm(world["models"]["llava"])
    hidden, inner = lmm.config.text_config.hidden_size, lmm.config.text_config.intermediate_size
    assert hidden != inner
    extra = storage.read_manifest(str(out), kind=A.KIND).extra
    assert extra["dims"] == {"layers.0": hidden, "layers.1.mlp.up_proj": inner}
    assert extra["d"] == hidden
    assert _all_rows(str(out), "layers.1.mlp.up_proj")["acts"].shape[1] == inner


def test_the_stage_reports_its_seconds_per_part(tmp_path, world, caplog):
    times = caching.StageTimes()
    t0 = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="mmsae.stages.cache"):
        cache.run(_cfg(tmp_path / "acts", world["images"], world["models"]["llava"], batch_size=2, shard_rows=40),
                  times=times)
    wall = time.perf_counter() - t0
    parts = times.seconds
    assert {"setup", "load_model", "wait_images", "forward", "geometry", "copies", "wait_writer", "seal"} <= set(parts)
    assert {f"writer_{p}" for p in caching.WRITER_PARTS} <= set(parts)
    assert all(seconds >= 0 for seconds in parts.values())
    assert 0 < sum(parts[p] for p in caching.MAIN_PARTS) <= wall  # the main thread's parts follow each other
    assert "seconds per part: setup" in caplog.text


def test_rows_with_nan_or_inf_are_counted_per_shard_and_warned(tmp_path, world, monkeypatch, caplog):
    real_forward = caching.forward_rows
    poisoned = {1: float("nan"), 5: float("inf")}

    def forward(*args, **kw):
        out = real_forward(*args, **kw)
        for cols in out.values():
            acts = cols["acts"].clone()  # an inference tensor: edit a copy
            for i, value in poisoned.items():
                rows = (cols["image_idx"] == i).nonzero().flatten()
                acts[rows[:3], 0] = value  # three rows of each poisoned image
            cols["acts"] = acts
        return out

    monkeypatch.setattr(caching, "forward_rows", forward)
    out = tmp_path / "acts"
    with caplog.at_level(logging.WARNING, logger="mmsae.stages.cache"):
        cache.run(_cfg(out, world["images"], world["models"]["llava"], batch_size=2, shard_rows=40))
    extra = storage.read_manifest(str(out), kind=A.KIND).extra
    refs = extra["shards"]["layers.1"]
    assert sum(r["nonfinite"] for r in refs) == 6
    for ref in refs:
        rows = A.decode_shard(storage.read_bytes(storage.join(str(out), ref["name"])))[0]
        bad = int((~torch.isfinite(rows["acts"])).any(dim=1).sum())
        assert ref["nonfinite"] == bad
        assert (ref["name"] in caplog.text) == (bad > 0)


# ------------------------------------------------------------------------------------------------
# processes: kill -9 and resume; two ranks


def _cli_args(out: Path, images: str, model: str, **kw) -> list[str]:
    sets = {"cache.image_set": images, "cache.model": model, "cache.out": str(out), "cache.num_workers": 0,
            "tracking.enabled": "false", "run.workdir": str(out.parent / "work"), **kw}
    args = ["cache"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    sizes = [SIZES[i % len(SIZES)] for i in range(40)]
    return make_image_set(root / "images", sizes=sizes)


def test_kill_9_then_rerun_gives_byte_identical_shards(tmp_path, world, many_images):
    model = world["models"]["llava_next"]
    kw = {"cache.batch_size": 2, "cache.shard_rows": 100, "cache.layers": "[0, 2]"}
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "mmsae.cli", *_cli_args(ref, many_images, model, **kw)],
                   check=True, env=_env(), capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mmsae.cli", *_cli_args(out, many_images, model, **kw)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / "progress-000.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.exists() and len(list((out / "layers.0").glob("shard-*"))) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()

    subprocess.run([sys.executable, "-m", "mmsae.cli", *_cli_args(out, many_images, model, **kw)],
                   check=True, env=_env(), capture_output=True)
    got, want = _files(out), _files(ref)
    assert set(got) ^ set(want) == set()
    # every data file byte for byte; the manifest differs only in its creation time
    bad = [n for n in want if got[n] != want[n] and n != "manifest.json"]
    assert bad == [], (got[bad[0]][:600], want[bad[0]][:600])
    m_got, m_want = storage.read_manifest(str(out)), storage.read_manifest(str(ref))
    assert m_got.files == m_want.files
    assert m_got.extra["shards"] == m_want.extra["shards"]


def test_two_ranks_union_equals_one_process(tmp_path, world, many_images):
    model = world["models"]["llava_next"]
    kw = {"cache.batch_size": 4, "cache.shard_rows": 200}
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "mmsae.cli", *_cli_args(one, many_images, model, **kw)],
                   check=True, env=_env(), capture_output=True)
    two = tmp_path / "two"
    port = 29000 + os.getpid() % 1000
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         "-m", "mmsae.cli", *_cli_args(two, many_images, model, **kw)],
        env=_env(), capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    m = storage.read_manifest(str(two), kind=A.KIND)
    assert m.extra["world_size"] == 2
    assert {int(n.split("-")[1]) for n in m.files if n.startswith("layers.")} == {0, 1}

    def table(uri):
        hp = A.ActivationShards(uri).hookpoints[0]
        rows = _all_rows(uri, hp)
        order = torch.argsort(rows["image_idx"] * 100000 + rows["token_pos"].long())
        return {k: v[order] for k, v in rows.items()}

    a, b = table(str(one)), table(str(two))
    for k in A.INDEX_COLUMNS:
        assert torch.equal(a[k], b[k]), k
    torch.testing.assert_close(a["acts"], b["acts"], atol=1e-5, rtol=1e-5)


def test_base_view_only_and_token_fraction_keep_a_deterministic_subset(world, tmp_path):
    """views=base keeps view-0 rows only; token_fraction keeps about that share, the same rows whatever
    the batching, a subset of the full cache with identical activations; another token_seed picks others."""
    model = world["models"]["llava_next"]
    full = _all_rows(str(cache.run(_cfg(tmp_path / "full", world["images"], model, batch_size=3)).uri), "layers.1")
    base = _all_rows(str(cache.run(_cfg(tmp_path / "base", world["images"], model, views="base")).uri), "layers.1")
    assert set(base["view"].tolist()) == {0}
    assert len(base["view"]) == int((full["view"] == 0).sum())

    def key(rows):
        return [(int(i), int(p)) for i, p in zip(rows["image_idx"], rows["token_pos"], strict=True)]

    full_rows = dict(zip(key(full), full["acts"], strict=True))
    picked = {}
    for name, kw in {"a": {"batch_size": 3}, "b": {"batch_size": 8, "shard_rows": 40},
                     "seed": {"token_seed": 1}}.items():
        out = cache.run(_cfg(tmp_path / name, world["images"], model, token_fraction=0.25, **kw)).uri
        picked[name] = _all_rows(str(out), "layers.1")
    assert key(picked["a"]) == key(picked["b"])
    assert key(picked["a"]) != key(picked["seed"])
    share = len(picked["a"]["view"]) / len(full["view"])
    assert 0.18 < share < 0.32, share
    assert set(key(picked["a"])) <= set(full_rows)
    for (image, pos), acts in zip(key(picked["a"]), picked["a"]["acts"], strict=True):
        torch.testing.assert_close(acts, full_rows[(image, pos)])
    assert set(picked["a"]["view"].tolist()) >= {0, 1}  # every view is sampled from


def test_settings_added_later_leave_the_key_of_shards_made_before_them(tmp_path):
    """A sealed cache made before views / token_fraction existed stays reusable at their defaults."""
    cfg = _cfg(tmp_path / "acts", str(tmp_path), str(tmp_path))
    key = cache.output_key(cfg.cache)
    assert not set(cache.ADDED_LATER) & set(key.config)
    cfg.cache = cfg.cache.model_copy(update={"token_fraction": 0.5})
    assert cache.output_key(cfg.cache).changes(key.to_json()) == ["setting token_fraction: (unset) -> 0.5"]


def test_several_writers_write_the_same_bytes_as_one(tmp_path, world, monkeypatch):
    """Sets finishing out of order (the first one slowed down) change no byte of the artifact."""
    images, model = world["images"], world["models"]["llava_next"]
    one = tmp_path / "one"
    cache.run(_cfg(one, images, model, batch_size=1, shard_rows=20, writers=1))

    real = cache._write_set_files

    def slow_first(out, rank, index, buf, end_image, times=None):
        if index == 0:
            time.sleep(0.5)
        return real(out, rank, index, buf, end_image, times)

    monkeypatch.setattr(cache, "_write_set_files", slow_first)
    several = tmp_path / "several"
    cache.run(_cfg(several, images, model, batch_size=1, shard_rows=20, writers=3))
    got, want = _files(several), _files(one)
    assert len([n for n in want if "shard-" in n]) >= 3
    assert sorted(got) == sorted(want)
    assert [n for n in want if n != "manifest.json" and got[n] != want[n]] == []


def test_writer_count_leaves_the_output_key(tmp_path):
    cfg = _cfg(tmp_path / "acts", str(tmp_path), str(tmp_path), writers=1)
    key = cache.output_key(cfg.cache)
    assert cache.output_key(cfg.cache.model_copy(update={"writers": 5})).changes(key.to_json()) == []
