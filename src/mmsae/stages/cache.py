"""Stage cache: run an LMM over an image set and store one or more layers' activations as shards.

Reads: an image set (``cache.image_set``) and an LMM (``cache.model``; LLaVA, LLaVA-NeXT or
LLaVA-OneVision). Writes: an activation-shard artifact at ``cache.out`` (format in
``mmsae.activations``): every kept token's activation with its image, sequence position, view (base
image or AnyRes tile), and patch row/column.

- Memory is bounded whatever the image set's size: a shard is written as soon as it is full
  (`mmsae.caching` holds the batches, the forward pass and the background writer).
- Resumable: after every shard set a rank records what the set holds (``progress-RRR/NNNNN.json``) and
  then where it stands (``progress-RRR.json``, a few numbers); a rerun with the same config continues
  after the last complete set, and the result is byte-for-byte the same. Both are small and written once
  per set, so bookkeeping costs the same at the millionth image as at the first.
- Reuse follows the stages' one rule (`mmsae.stages._base`): sealed shards, or a partial run, are reused
  only when made from the same config and the same model and image set (their fingerprints); otherwise the
  stage refuses, naming what changed, unless ``run.overwrite`` is set. A folder holding another kind of
  artifact is always refused.
- Data-parallel: under ``torchrun`` or the ``deepspeed`` launcher (RANK / WORLD_SIZE / LOCAL_RANK) each
  rank takes a contiguous block of images and writes its own shards; rank 0 seals the artifact with one
  manifest once every rank is done. A partial run resumes only under the world size it was started with.
  The ranks' process group waits up to `DIST_TIMEOUT` for each other (ranks may finish hours apart).
- Unreadable images (whatever the decoder raises, a decompression bomb included) are skipped, counted and
  listed in the manifest; a set with no usable image is an error.
- Each shard's manifest entry counts its rows holding NaN or inf (``nonfinite``, warned about when > 0),
  and the manifest records each hook point's width (``dims``; ``d`` is the first one's), the split and the
  prompt the images were given with.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mmsae import activations, caching, storage
from mmsae.caching import SetBuffer, SetWriter, StageTimes, WrittenSet
from mmsae.config import CacheConfig, RunConfig
from mmsae.stages._base import (
    KEY_FIELD,
    OutputKey,
    OutputMismatchError,
    StageContext,
    StageOutputs,
    dist_env,
    mismatch_message,
    model_prompt,
    resolve_uri,
    reusable_output,
    stage_context,
)

log = logging.getLogger(__name__)

STEP = "cache"
PROGRESS = "progress-{rank:03d}.json"
SET_RECORDS = "progress-{rank:03d}"
PROGRESS_VERSION = 4
"""4: progress records the output key (config and input fingerprints), the world size and the rank's block."""
DIST_TIMEOUT = timedelta(hours=24)
"""How long a rank of the cache's process group waits for the others (the barrier before sealing among
them): ranks given slow images can finish hours after the others, and torch's default (30 minutes for
gloo) would kill rank 0 while it waits. A module constant, not a config field."""
NOT_IN_KEY = ("num_workers", "writers", "device", "max_skipped", "image_set", "model", "out")
"""Settings that do not change the bytes written (the inputs count through their fingerprints)."""
ADDED_LATER = ("views", "token_fraction", "token_seed")
"""Settings added after shards were first sealed; in the key only when they differ from their defaults."""


class CacheError(RuntimeError):
    """The cache stage cannot go on (no usable image, a mismatch with an earlier partial run, ...)."""


@dataclass
class _Progress:
    """Where one rank stands: shard sets ``0 .. next_shard - 1`` are written; resume from ``next_chunk``."""

    key: dict[str, Any]
    """The `OutputKey` (config and input fingerprints) the run started with."""
    world_size: int = 1
    lo: int = 0
    """The rank's block of images is ``[lo, hi)`` (contiguous blocks of the ``world_size`` ranks)."""
    hi: int = 0
    next_chunk: int = 0
    next_shard: int = 0
    done: bool = False
    skipped: list[dict[str, Any]] = field(default_factory=list)
    """Once done: images skipped after the last shard set (the sets' records list the others)."""
    version: int = PROGRESS_VERSION

    def to_json(self) -> dict[str, Any]:
        """A snapshot (a deep copy: the writer threads commit it while the loop goes on)."""
        return copy.deepcopy(self.__dict__)


def run(cfg: RunConfig, image_set: str | None = None, model: str | None = None,
        parent_run_id: str | None = None, *, times: StageTimes | None = None) -> StageOutputs:
    """Cache activations; ``image_set`` / ``model`` override the config's URIs (pipeline inputs).

    ``times``: filled with this rank's seconds per part (`mmsae.caching.StageTimes`), which are also logged.
    """
    image_set, model = image_set or cfg.cache.image_set, model or cfg.cache.model
    if not image_set:
        raise CacheError("cache.image_set is empty: give the image set's URI")
    if not model:
        raise CacheError("cache.model is empty: give the LMM's URI")
    c = cfg.cache.model_copy(update={
        "image_set": storage.absolute(image_set),
        "model": storage.absolute(model),
        "out": resolve_uri(None, cfg.cache.out, cfg.run.workdir, STEP),
    })
    ranks = _dist_env()
    with stage_context(cfg, STEP, {"cache": c.model_dump(mode="json")}, parent_run_id, ranks, output=c.out) as ctx:
        figures = _cache(c, ctx, times if times is not None else StageTimes())
        ctx.finish(figures)
    return StageOutputs(c.out, figures)


def output_key(c: CacheConfig) -> OutputKey:
    """What shards must be made from to be reused or resumed: the config that shapes their bytes, and the
    fingerprints of the model and the image set (rewritten at the same URI, they are different inputs)."""
    config = c.model_dump(mode="json", exclude=set(NOT_IN_KEY))
    defaults = CacheConfig().model_dump(mode="json")
    for name in ADDED_LATER:  # at their defaults they change nothing: shards made before them stay reusable
        if config[name] == defaults[name]:
            del config[name]
    try:
        return OutputKey.of(config, {"model": c.model, "image_set": c.image_set})
    except FileNotFoundError as e:
        raise CacheError(str(e)) from e


# --------------------------------------------------------------------------------------------------

def _dist_env() -> tuple[int, int, int]:
    """The launcher's ranks; joins their process group (waiting up to `DIST_TIMEOUT`) when there are several."""
    rank, world, local_rank = dist_env()
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend, timeout=DIST_TIMEOUT)
    return rank, world, local_rank


def _cache(c: CacheConfig, ctx: StageContext, times: StageTimes) -> dict[str, Any]:
    from mmsae.data.images import load_image_set
    from mmsae.models import capture, load_lmm, resolve_hookpoint

    with times("setup"):
        key = output_key(c)
        sealed = reusable_output(c.out, activations.KIND, key, overwrite=ctx.overwrite, setting="cache.out",
                                 context=ctx)
        if sealed is not None:
            return dict(sealed.extra["figures"])
        ds = load_image_set(c.image_set, c.split)
        n_total = len(ds) if c.max_images is None else min(len(ds), c.max_images)
        if n_total == 0:
            raise CacheError(f"image set {c.image_set} has no images")
        rank, world = ctx.rank, ctx.world
        lo, hi = rank * n_total // world, (rank + 1) * n_total // world
        chunks = [list(range(i, min(i + c.batch_size, hi))) for i in range(lo, hi, c.batch_size)]

    with times("load_model"):
        lmm = load_lmm(c.model, dtype=c.model_dtype, device=ctx.device(c.device))
    with times("setup"):
        hooks = [resolve_hookpoint(lmm.model, layer) for layer in c.layers]
        hook_names = [h.name for h in hooks]
        if len(set(hook_names)) != len(hook_names):
            raise CacheError(f"cache.layers names the same hook point twice: {hook_names}")
        prompt = c.prompt if c.prompt is not None else model_prompt(c.model)
        _remove_stale_temps(c.out, ctx)
        progress = _load_progress(c.out, rank, hook_names,
                                  _Progress(key=key.to_json(), world_size=world, lo=lo, hi=hi), overwrite=ctx.overwrite)
    t0 = time.perf_counter()
    images_done = rows_done = 0
    if not progress.done:
        todo = chunks[progress.next_chunk :]
        with times("setup"):
            loader = caching.image_loader(ds, todo, lmm.processor, prompt, c.num_workers)
        step = functools.partial(caching.forward_rows, lmm, hooks, c=c, capture=capture, times=times)
        first_image = todo[0][0] if todo else hi
        images_done, rows_done = _cache_chunks(c, ctx, chunks, progress, first_image, loader, step, hook_names,
                                               skip_limit(c, n_total), times)
    elapsed = time.perf_counter() - t0
    ctx.barrier()
    log.info("cache rank %d, seconds per part: %s", rank, times.summary())
    if not ctx.is_main:
        return {}
    run_info = {"key": key, "world": world, "hook_names": hook_names, "prompt": prompt, "elapsed": elapsed,
                "images_done": images_done, "rows_done": rows_done, "images_total": n_total}
    with times("seal"):
        return _seal(c, lmm, run_info)


SEALING_FILES = (activations.IMAGES_FILE, activations.IMAGE_TABLE_FILE, storage.MANIFEST_NAME)
"""What rank 0 alone writes while sealing; every other file of the artifact belongs to one rank."""


def _remove_stale_temps(out: str, ctx: StageContext) -> None:
    """Delete the temporary files a writer killed mid-write left: each rank those of its own files (progress,
    set records, shards), rank 0 also those of the files it writes while sealing."""
    rank = ctx.rank
    storage.remove_stale_temps(_records_uri(out, rank))
    owned = [f"progress-{rank:03d}", f"shard-{rank:03d}-"] + (list(SEALING_FILES) if ctx.is_main else [])
    for prefix in owned:
        storage.remove_stale_temps(out, of=prefix)


_Step = Callable[[dict[str, Any]], dict[str, dict[str, torch.Tensor]]]
"""A loaded batch -> per hook point, its kept rows and their geometry columns (`mmsae.caching.forward_rows`)."""


def skip_limit(c: CacheConfig, n_images: int) -> int:
    """The most images of ``n_images`` that may fail to decode (``cache.max_skipped``: a share, or a count)."""
    return int(c.max_skipped * n_images) if c.max_skipped < 1 else int(c.max_skipped)


def _cache_chunks(c: CacheConfig, ctx: StageContext, chunks: list[list[int]], progress: _Progress,
                  first_image: int, loader: Iterable[dict[str, Any]], step: _Step,
                  hook_names: list[str], max_skipped: int, times: StageTimes) -> tuple[int, int]:
    """Run the batches of ``loader`` (chunks ``progress.next_chunk`` on) through ``step``; write shard sets.

    Marks ``progress`` done at the end; returns the images and rows cached. Fails as soon as this rank alone
    has skipped more than ``max_skipped`` images.
    """
    t0 = time.perf_counter()
    rank = ctx.rank
    images_done = rows_done = bytes_written = skipped = 0
    writer = SetWriter(functools.partial(_write_set_files, c.out, rank, times=times),
                       functools.partial(_commit_set, c.out, rank, times=times), c.writers)
    buf = SetBuffer.empty(first_image, hook_names)
    bar = tqdm(total=len(chunks), initial=progress.next_chunk, desc=f"cache rank {rank}", unit="batch",
               disable=not ctx.is_main)
    batches = iter(loader)
    try:
        for j in range(progress.next_chunk, len(chunks)):
            with times("wait_images"):
                batch = next(batches)
            buf.skipped.extend(batch["skipped"])
            skipped += len(batch["skipped"])
            if skipped > max_skipped:
                raise CacheError(_too_many_skipped(c, skipped, max_skipped, buf.skipped or batch["skipped"]))
            if batch["ok"]:
                cols = step(batch)
                for h in hook_names:
                    buf.parts[h].append(cols[h])
                n_rows = int(cols[hook_names[0]]["acts"].shape[0])
                buf.rows += n_rows
                rows_done += n_rows
                images_done += len(batch["ok"])
                buf.images.extend([i, w, h] for i, (w, h) in zip(batch["ok"], batch["sizes"], strict=True))
            end_image = chunks[j][-1] + 1
            if buf.rows >= c.shard_rows or (j == len(chunks) - 1 and buf.rows > 0):
                index = progress.next_shard
                progress.next_chunk, progress.next_shard = j + 1, index + 1
                writer.submit(index, buf, end_image, progress.to_json())
                buf = SetBuffer.empty(end_image, hook_names)
                with times("wait_writer"):
                    bytes_written += writer.reap(in_flight=c.writers + 1)
                seconds = time.perf_counter() - t0
                ctx.log_progress({"images_per_s": images_done / seconds, "tokens_per_s": rows_done / seconds,
                                  "bytes_written": bytes_written}, step=progress.next_shard)
            elif buf.rows == 0:
                buf.first_image = end_image
            bar.update(1)
        with times("wait_writer"):
            writer.reap(in_flight=0)
    finally:
        bar.close()
        writer.close()
    progress.next_chunk, progress.done, progress.skipped = len(chunks), True, buf.skipped
    _save_progress(c.out, rank, progress.to_json())
    return images_done, rows_done


# ---------------------------------------------------------------------------------------------------
# durability: shards, progress, seal

def _progress_uri(out: str, rank: int) -> str:
    return storage.join(out, PROGRESS.format(rank=rank))


def _records_uri(out: str, rank: int) -> str:
    return storage.join(out, SET_RECORDS.format(rank=rank))


def _record_uri(out: str, rank: int, index: int) -> str:
    return storage.join(_records_uri(out, rank), f"{index:05d}.json")


def _write_set_files(out: str, rank: int, index: int, buf: SetBuffer, end_image: int,
                     times: StageTimes | None = None) -> WrittenSet:
    """Encode and write the shard files of set ``index`` (one per hook point); return what its record says.

    ``times`` gets the parts ``writer_concat``, ``writer_encode``, ``writer_hash``, ``writer_write`` and
    ``writer_check`` (rows holding NaN or inf).
    """
    times = times or StageTimes()
    files: dict[str, dict[str, Any]] = {}
    shards: dict[str, dict[str, Any]] = {}
    dims: dict[str, int] = {}
    for h, parts in buf.parts.items():
        name = f"{h}/{activations.shard_name(rank, index)}"
        with times("writer_concat"):
            cols = caching.concat_rows(parts)
        with times("writer_encode"):
            data = activations.encode_shard(cols, {"hookpoint": h, "first_image": buf.first_image,
                                                   "end_image": end_image})
        with times("writer_write"):
            storage.write_bytes(storage.join(out, name), data)
        with times("writer_hash"):
            files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        with times("writer_check"):
            nonfinite = _nonfinite_rows(cols["acts"])
        if nonfinite:
            log.warning("shard %s holds %d of %d rows with NaN or inf activations",
                        storage.join(out, name), nonfinite, int(cols["acts"].shape[0]))
        shards[h] = {"name": name, "rows": int(cols["acts"].shape[0]), "first_image": buf.first_image,
                     "end_image": end_image, "nonfinite": nonfinite}
        dims[h] = int(cols["acts"].shape[1])
    record = {"files": files, "shards": shards, "dims": dims, "images": buf.images, "skipped": buf.skipped}
    return WrittenSet(record, sum(f["bytes"] for f in files.values()))


def _commit_set(out: str, rank: int, index: int, written: WrittenSet, progress: dict[str, Any],
                times: StageTimes | None = None) -> None:
    """Write set ``index``'s record, then the progress that counts it (``times``: ``writer_records``).

    In this order, and only once the set's files are written (:class:`~mmsae.caching.SetWriter` sees to
    it), progress never counts a set whose files are not all written.
    """
    with (times or StageTimes())("writer_records"):
        storage.write_json(_record_uri(out, rank, index), written.record, indent=None)
        _save_progress(out, rank, progress)


def _nonfinite_rows(acts: torch.Tensor) -> int:
    """Rows of ``acts`` [n, d] holding a NaN or an inf.

    One pass of row sums first (a NaN or inf makes its row's sum non-finite; a finite row's float32 sum
    overflows only past ~3e38), then the exact test on the rows whose sum is not finite: ~5x cheaper than
    testing every value when (as almost always) no row is.
    """
    flat = acts.reshape(acts.shape[0], -1)
    suspects = (~torch.isfinite(flat.sum(dim=1, dtype=torch.float32))).nonzero().squeeze(1)
    if suspects.numel() == 0:
        return 0
    return int((~torch.isfinite(flat.index_select(0, suspects))).any(dim=1).sum())


def _save_progress(out: str, rank: int, progress: dict[str, Any]) -> None:
    storage.write_json(_progress_uri(out, rank), progress)


def _load_progress(out: str, rank: int, hook_names: list[str], fresh: _Progress, overwrite: bool) -> _Progress:
    """The rank's progress from an earlier run of the same key, or ``fresh``; drops unrecorded sets.

    A partial run of another config or other inputs is refused (or, under ``run.overwrite``, dropped and
    started afresh); a run with another world size or image block is refused, since resuming it would cache
    some images twice and others never.
    """
    uri = _progress_uri(out, rank)
    progress = fresh
    if storage.exists(uri):
        data = storage.read_json(uri)
        changes = _progress_changes(data, fresh)
        if changes and not overwrite:
            raise OutputMismatchError(mismatch_message("a partial run", uri, changes, "cache.out"))
        if changes:
            log.warning("%s: dropping a partial run made from another config or other inputs (run.overwrite: %s); "
                        "rank %d starts again from scratch", uri, "; ".join(changes[:8]), rank)
        else:
            _check_same_block(out, rank, data, fresh)
            progress = _Progress(**data)
            log.info("rank %d resumes at batch %d (%d shard sets done)", rank, progress.next_chunk,
                     progress.next_shard)
    _drop_unrecorded_sets(out, rank, hook_names, progress.next_shard)
    return progress


def _progress_changes(data: dict[str, Any], fresh: _Progress) -> list[str]:
    """What differs between a recorded partial run and this one's key (an older format is a change too)."""
    if data.get("version") != PROGRESS_VERSION:
        return [f"progress format {data.get('version', 1)}, this version resumes format {PROGRESS_VERSION}"]
    return OutputKey(**fresh.key).changes(data.get("key"))


def _check_same_block(out: str, rank: int, data: dict[str, Any], fresh: _Progress) -> None:
    old = (data.get("world_size"), data.get("lo"), data.get("hi"))
    if old != (fresh.world_size, fresh.lo, fresh.hi):
        raise CacheError(
            f"{out} holds a partial run made with world size {old[0]} (rank {rank} took images "
            f"[{old[1]}, {old[2]})), but this run has world size {fresh.world_size} (rank {rank} takes "
            f"images [{fresh.lo}, {fresh.hi})): resuming would cache some images twice and others "
            f"never. Rerun with world size {old[0]} to resume it, or delete {out} to start over"
        )


def _drop_unrecorded_sets(out: str, rank: int, hook_names: list[str], next_shard: int) -> None:
    """Sets written after the last recorded progress (killed in between) are redone: drop their files."""
    records = SET_RECORDS.format(rank=rank)
    stale = [storage.join(h, n) for h in hook_names for n in storage.list_files(storage.join(out, h))
             if (parsed := activations.parse_shard_name(n)) and parsed[0] == rank and parsed[1] >= next_shard]
    stale += [storage.join(records, n) for n in storage.list_files(storage.join(out, records))
              if not (n.removesuffix(".json").isdigit() and int(n.removesuffix(".json")) < next_shard)]
    for name in stale:
        storage.delete(storage.join(out, name))


def _read_rank(out: str, rank: int) -> _Progress | None:
    uri = _progress_uri(out, rank)
    return _Progress(**storage.read_json(uri)) if storage.exists(uri) else None


@dataclass
class _Merged:
    """Every rank's set records merged: what the manifest lists."""

    files: dict[str, dict[str, Any]]
    shards: dict[str, list[dict[str, Any]]]
    dims: dict[str, int] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    images: int = 0


def _seal(c: CacheConfig, lmm, run_info: dict[str, Any]) -> dict[str, Any]:
    """Rank 0: merge every rank's set records into one manifest (written last) and drop the progress files."""
    world, hook_names = run_info["world"], run_info["hook_names"]
    ranks = [_read_rank(c.out, r) for r in range(world)]
    not_done = [r for r, p in enumerate(ranks) if p is None or not p.done]
    if not_done:
        raise CacheError(f"ranks {not_done} did not finish; rerun to resume them")
    merged = _merge_records(c, ranks, hook_names)
    _check_skipped(c, merged.skipped, run_info["images_total"])
    shards, elapsed = merged.shards, run_info["elapsed"]
    figures = {
        "images": merged.images,
        "images_skipped": len(merged.skipped),
        "tokens": sum(s["rows"] for s in shards[hook_names[0]]),
        "shards": len(shards[hook_names[0]]),
        "images_per_s_rank0": run_info["images_done"] / elapsed if elapsed > 0 else 0.0,
        "tokens_per_s_rank0": run_info["rows_done"] / elapsed if elapsed > 0 else 0.0,
        "bytes_written": sum(f["bytes"] for f in merged.files.values()),
    }
    storage.write_manifest(
        c.out, activations.KIND, files=merged.files, config={"cache": c.model_dump(mode="json")},
        inputs={"image_set": c.image_set, "model": c.model}, format_version=activations.FORMAT_VERSION,
        extra={
            KEY_FIELD: run_info["key"].to_json(), "hookpoints": hook_names,
            "d": merged.dims[hook_names[0]], "dims": {h: merged.dims[h] for h in hook_names}, "dtype": c.dtype,
            "tokens": c.tokens, "split": c.split, "prompt": run_info["prompt"],
            "family": lmm.family, "world_size": world, "shards": shards, "figures": figures,
            "skipped": merged.skipped, "geometry": _grid_info(lmm),
        },
    )
    for r in range(world):
        storage.delete(_records_uri(c.out, r))
        storage.delete(_progress_uri(c.out, r))
    log.info("sealed %s: %s", c.out, figures)
    return figures


def _check_skipped(c: CacheConfig, skipped: list[dict[str, Any]], n_images: int) -> None:
    """Warn of every image that could not be decoded (count and the first few); fail past ``cache.max_skipped``."""
    if not skipped:
        return
    limit = skip_limit(c, n_images)
    if len(skipped) > limit:
        raise CacheError(_too_many_skipped(c, len(skipped), limit, skipped))
    log.warning("%d of %d images of %s could not be decoded and were skipped (all listed in the manifest): %s",
                len(skipped), n_images, c.image_set, _describe_skipped(c, skipped))


def _too_many_skipped(c: CacheConfig, count: int, limit: int, examples: list[dict[str, Any]]) -> str:
    return (f"{count} images of {c.image_set} could not be decoded, more than cache.max_skipped = {c.max_skipped} "
            f"allows ({limit}): {_describe_skipped(c, examples)}. Fix or remove them, or raise cache.max_skipped")


def _describe_skipped(c: CacheConfig, skipped: list[dict[str, Any]], first: int = 3) -> str:
    def one(entry: dict[str, Any]) -> str:
        name = entry.get("name") or ""
        return (f"{c.image_set} row {entry['image_idx']}" + (f" ({name})" if name else "")
                + f": {entry['error']}")

    more = f"; and {len(skipped) - first} more" if len(skipped) > first else ""
    return "; ".join(one(entry) for entry in skipped[:first]) + more


def _merge_records(c: CacheConfig, ranks: list[_Progress], hook_names: list[str]) -> _Merged:
    """Read every rank's set records in order and write ``images.json`` as they stream by.

    Ranks hold ascending contiguous blocks and their sets follow each other, so sealing holds one record
    at a time, not a list of every image.
    """
    merged = _Merged(files={}, shards={h: [] for h in hook_names})
    last = -1
    with storage.atomic_writer(storage.join(c.out, activations.IMAGES_FILE)) as raw, \
            storage.atomic_writer(storage.join(c.out, activations.IMAGE_TABLE_FILE)) as raw_table, \
            ThreadPoolExecutor(max_workers=8) as pool:  # many small reads: overlap their latency on S3
        out, table = _HashingWriter(raw), _HashingWriter(raw_table)
        out.write('{"images": [')
        for r, progress in enumerate(ranks):
            uris = [_record_uri(c.out, r, i) for i in range(progress.next_shard)]
            for uri, record in zip(uris, pool.map(storage.read_json, uris), strict=True):
                _merge_one(merged, uri, record, hook_names)
                for entry in record["images"]:
                    if int(entry[0]) <= last:
                        raise CacheError(f"{uri} lists image {entry[0]} after image {last}: the ranks' records "
                                         f"of {c.out} overlap; delete the folder and cache again")
                    out.write((", " if merged.images else "") + json.dumps(entry))
                    table.write(np.asarray(entry, dtype=activations.IMAGE_TABLE_ROW).tobytes())
                    last, merged.images = int(entry[0]), merged.images + 1
            merged.skipped.extend(progress.skipped)
        if not merged.images:
            raise CacheError(
                f"image set {c.image_set} has no usable image: all {len(merged.skipped)} images failed to decode "
                f"(first: {merged.skipped[0]['error'] if merged.skipped else 'none'})"
            )
        out.write('], "skipped": ' + json.dumps(merged.skipped, sort_keys=True) + "}")
    merged.files[activations.IMAGES_FILE] = {"sha256": out.digest.hexdigest(), "bytes": out.size}
    merged.files[activations.IMAGE_TABLE_FILE] = {"sha256": table.digest.hexdigest(), "bytes": table.size}
    return merged


def _merge_one(merged: _Merged, uri: str, record: dict[str, Any], hook_names: list[str]) -> None:
    merged.files.update(record["files"])
    for h in hook_names:
        merged.shards[h].append(record["shards"][h])
        width = int(record["dims"][h])
        if merged.dims.setdefault(h, width) != width:
            raise CacheError(f"{uri} records width {width} for hook point {h}, but earlier shard "
                             f"sets hold width {merged.dims[h]}")
    merged.skipped.extend(record["skipped"])


class _HashingWriter:
    """Writes text or bytes to a binary file, keeping the sha256 and size of what was written."""

    def __init__(self, raw):
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def write(self, text: str | bytes) -> None:
        data = text.encode() if isinstance(text, str) else text
        self.raw.write(data)
        self.digest.update(data)
        self.size += len(data)


def _grid_info(lmm) -> dict[str, Any]:
    vc = lmm.config.vision_config
    info: dict[str, Any] = {"image_size": int(vc.image_size), "patch_size": int(vc.patch_size),
                            "grid": int(vc.image_size) // int(vc.patch_size)}
    pinpoints = getattr(lmm.config, "image_grid_pinpoints", None)
    if pinpoints:
        info["image_grid_pinpoints"] = [list(p) for p in pinpoints]
    return info
