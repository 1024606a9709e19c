"""Stage cache: run an LMM over an image set and store one or more layers' activations as shards.

Reads: an image set (``cache.image_set``) and an LMM (``cache.model``; LLaVA, LLaVA-NeXT or
LLaVA-OneVision). Writes: an activation-shard artifact at ``cache.out`` (format in
``mmsae.activations``): every kept token's activation with its image, sequence position, view (base
image or AnyRes tile), and patch row/column.

- Memory is bounded whatever the image set's size: a shard is written as soon as it is full.
- Resumable: after every shard set a rank records what the set holds (``progress-RRR/NNNNN.json``) and
  then where it stands (``progress-RRR.json``, a few numbers); a rerun with the same config continues
  after the last complete set, and the result is byte-for-byte the same. Both are small and written once
  per set, so bookkeeping costs the same at the millionth image as at the first.
- Inputs are fingerprinted (`mmsae.storage.fingerprint`: an input's manifest, else its files' names, sizes
  and modification times or its objects' keys, sizes and ETags). A model or image set rewritten at the
  same URI (as the toy-world stage does when its settings change) is cached afresh: a sealed artifact of
  the same config is replaced, a partial run is restarted from scratch, each with a warning. Another
  config at ``cache.out`` is an error, as is a folder holding another kind of artifact.
- Data-parallel: under ``torchrun`` or the ``deepspeed`` launcher (RANK / WORLD_SIZE / LOCAL_RANK) each
  rank takes a contiguous block of images and writes its own shards; rank 0 seals the artifact with one
  manifest once every rank is done. A partial run resumes only under the world size it was started with.
  The ranks' process group waits up to `DIST_TIMEOUT` for each other (ranks may finish hours apart).
- Unreadable images (whatever the decoder raises, a decompression bomb included) are skipped, counted and
  listed in the manifest; a set with no usable image is an error.
- Each shard's manifest entry counts its rows holding NaN or inf (``nonfinite``, warned about when > 0),
  and the manifest records each hook point's width (``dims``; ``d`` is the first one's).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from mmsae import activations as A
from mmsae import storage, tracking
from mmsae.config import CacheConfig, RunConfig, dump_config
from mmsae.stages.common import model_prompt, record_summary, stage_uri

log = logging.getLogger(__name__)

STEP = "cache"
PROGRESS = "progress-{rank:03d}.json"
SET_RECORDS = "progress-{rank:03d}"
PROGRESS_VERSION = 3
"""3: progress records the inputs' fingerprint and the world size and image block of its rank."""
IMAGES_FILE = "images.json"
DIST_TIMEOUT = timedelta(hours=24)
"""How long a rank of the cache's process group waits for the others (the barrier before sealing among
them): ranks given slow images can finish hours after the others, and torch's default (30 minutes for
gloo) would kill rank 0 while it waits. A module constant, not a config field."""


class CacheError(RuntimeError):
    """The cache stage cannot go on (no usable image, a mismatch with an earlier partial run, ...)."""


@dataclass(frozen=True)
class CacheOutputs:
    uri: str
    figures: dict[str, Any]


@dataclass
class _Progress:
    """Where one rank stands: shard sets ``0 .. next_shard - 1`` are written; resume from ``next_chunk``."""

    config_hash: str
    inputs_fingerprint: str = ""
    """`inputs_fingerprint` of the model and image set the run started with."""
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
        return dict(self.__dict__)


@dataclass
class _SetBuffer:
    """The shard set being filled: whole batches of rows, and what it will record about its images."""

    first_image: int
    parts: dict[str, list[dict[str, torch.Tensor]]]
    images: list[list[int]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0

    @classmethod
    def empty(cls, first_image: int, hook_names: list[str]) -> _SetBuffer:
        return cls(first_image, {h: [] for h in hook_names})


def run(cfg: RunConfig, image_set: str | None = None, model: str | None = None,
        parent_run_id: str | None = None) -> CacheOutputs:
    """Cache activations; ``image_set`` / ``model`` override the config's URIs (pipeline inputs)."""
    c = cfg.cache.model_copy(update={
        "image_set": image_set or cfg.cache.image_set,
        "model": model or cfg.cache.model,
        "out": cfg.cache.out or stage_uri(cfg.run.workdir, STEP),
    })
    if not c.image_set:
        raise CacheError("cache.image_set is empty: give the image set's URI")
    if not c.model:
        raise CacheError("cache.model is empty: give the LMM's URI")
    rank, world, local_rank = _dist_env()
    with tracking.stage_run(
        STEP, parent_run_id=parent_run_id, config={"cache": c.model_dump(mode="json")},
        uri=cfg.tracking.uri, experiment=cfg.tracking.experiment,
        enabled=cfg.tracking.enabled and rank == 0,
    ) as tr:
        figures = _cache(c, rank, world, local_rank, tr)
        if rank == 0:
            tr.log_metrics(figures)
            record_summary(cfg.run.workdir, STEP, figures)
    return CacheOutputs(c.out, figures)


def config_hash(c: CacheConfig) -> str:
    """What of the config must match for a rerun to resume earlier work (everything that changes the bytes).

    The inputs behind the URIs must match too: see `inputs_fingerprint`.
    """
    keep = c.model_dump(mode="json", exclude={"num_workers", "device"})
    return hashlib.sha256(dump_config(CacheConfig(**keep)).encode()).hexdigest()[:16]


def inputs_fingerprint(c: CacheConfig) -> str:
    """A fingerprint of the content of the model and the image set (`mmsae.storage.fingerprint` of each).

    It changes when either is rewritten at the same URI, so shards cached from the old one are not reused.
    """
    parts = {}
    for name, uri in (("model", c.model), ("image_set", c.image_set)):
        try:
            parts[name] = storage.fingerprint(uri)
        except FileNotFoundError as e:
            raise CacheError(f"cache.{name} {uri} does not exist ({e}); expected a local path, file:// or "
                             f"s3:// URI of the {name.replace('_', ' ')}") from e
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------

def _dist_env() -> tuple[int, int, int]:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend, timeout=DIST_TIMEOUT)
    return rank, world, local_rank


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _device(c: CacheConfig, local_rank: int) -> torch.device:
    if c.device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(c.device)


def _cache(c: CacheConfig, rank: int, world: int, local_rank: int, tr: tracking.StageTracker) -> dict[str, Any]:
    from mmsae.data.images import load_image_set
    from mmsae.models import capture, load_lmm, resolve_hookpoint

    chash = config_hash(c)
    fingerprint = inputs_fingerprint(c)
    sealed = _read_sealed(c.out)
    if sealed is not None:
        if sealed.extra.get("config_hash") != chash:
            raise CacheError(
                f"{c.out} already holds activation shards made with another config "
                f"(hash {sealed.extra.get('config_hash')} != {chash}); choose another cache.out"
            )
        if sealed.extra.get("inputs_fingerprint") == fingerprint:
            log.info("activation shards already complete at %s", c.out)
            return dict(sealed.extra["figures"])
        log.warning(
            "%s holds activation shards of this config made from other inputs (fingerprint %s != %s: the "
            "model %s or the image set %s changed since); replacing them", c.out,
            sealed.extra.get("inputs_fingerprint"), fingerprint, c.model, c.image_set,
        )
        _barrier(world)  # every rank has read the manifest before it goes
        if rank == 0:
            _drop_sealed(c.out, sealed)
        _barrier(world)

    ds = load_image_set(c.image_set, c.split)
    n_total = len(ds) if c.max_images is None else min(len(ds), c.max_images)
    if n_total == 0:
        raise CacheError(f"image set {c.image_set} has no images")
    lo, hi = rank * n_total // world, (rank + 1) * n_total // world
    chunks = [list(range(i, min(i + c.batch_size, hi))) for i in range(lo, hi, c.batch_size)]

    lmm = load_lmm(c.model, dtype=c.model_dtype, device=_device(c, local_rank))
    hooks = [resolve_hookpoint(lmm.model, layer) for layer in c.layers]
    hook_names = [h.name for h in hooks]
    if len(set(hook_names)) != len(hook_names):
        raise CacheError(f"cache.layers names the same hook point twice: {hook_names}")
    prompt = c.prompt if c.prompt is not None else model_prompt(c.model)

    # temporary files left by a writer killed mid-write
    storage.remove_stale_temps(_records_uri(c.out, rank))
    for own in (f"progress-{rank:03d}", f"shard-{rank:03d}-"):
        storage.remove_stale_temps(c.out, of=own)
    progress = _load_progress(c.out, rank, hook_names, _Progress(
        config_hash=chash, inputs_fingerprint=fingerprint, world_size=world, lo=lo, hi=hi))
    t0 = time.perf_counter()
    images_done = rows_done = 0
    if not progress.done:
        todo = chunks[progress.next_chunk :]
        loader = _loader(ds, todo, lmm.processor, prompt, c.num_workers)
        step = functools.partial(_forward, lmm, hooks, c=c, capture=capture)
        first_image = todo[0][0] if todo else hi
        images_done, rows_done = _cache_chunks(c, rank, chunks, progress, first_image, loader, step,
                                               hook_names, tr)
    elapsed = time.perf_counter() - t0
    _barrier(world)
    if rank != 0:
        return {}
    return _seal(c, chash, fingerprint, world, hook_names, lmm, elapsed, images_done, rows_done)


_Step = Callable[[dict[str, Any]], dict[str, dict[str, torch.Tensor]]]
"""A loaded batch -> per hook point, its kept rows and their geometry columns (`_forward`)."""


def _cache_chunks(c: CacheConfig, rank: int, chunks: list[list[int]], progress: _Progress, first_image: int,
                  loader: Iterable[dict[str, Any]], step: _Step, hook_names: list[str],
                  tr: tracking.StageTracker) -> tuple[int, int]:
    """Run the batches of ``loader`` (chunks ``progress.next_chunk`` on) through ``step``; write shard sets.

    Marks ``progress`` done at the end; returns the images and rows cached.
    """
    t0 = time.perf_counter()
    images_done = rows_done = bytes_written = 0
    writer = _SetWriter(c.out, rank)
    buf = _SetBuffer.empty(first_image, hook_names)
    bar = tqdm(total=len(chunks), initial=progress.next_chunk, desc=f"cache rank {rank}", unit="batch",
               disable=rank != 0)
    try:
        for j, batch in enumerate(loader, start=progress.next_chunk):
            buf.skipped.extend(batch["skipped"])
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
                buf = _SetBuffer.empty(end_image, hook_names)
                bytes_written += writer.reap(in_flight=2)
                dt = time.perf_counter() - t0
                tr.log_metrics({"images_per_s": images_done / dt, "tokens_per_s": rows_done / dt,
                                "bytes_written": bytes_written}, step=progress.next_shard)
            elif buf.rows == 0:
                buf.first_image = end_image
            bar.update(1)
        writer.reap(in_flight=0)
    finally:
        bar.close()
        writer.close()
    progress.next_chunk, progress.done, progress.skipped = len(chunks), True, buf.skipped
    _save_progress(c.out, rank, progress.to_json())
    return images_done, rows_done


# ---------------------------------------------------------------------------------------------------
# images in, tokens out

class _Batches(torch.utils.data.Dataset):
    """Chunk j -> decoded, preprocessed batch; bad images are skipped and reported, not raised."""

    def __init__(self, ds, chunks: list[list[int]], processor, prompt: str):
        self.ds, self.chunks, self.processor, self.prompt = ds, chunks, processor, prompt

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, j: int) -> dict[str, Any]:
        ok, images, sizes, skipped = [], [], [], []
        for i in self.chunks[j]:
            try:
                img = _decode(self.ds[i]["image"])
            except Exception as e:  # noqa: BLE001 - any bad image (PIL's DecompressionBombError too) is skipped
                skipped.append({"image_idx": i, "error": f"{type(e).__name__}: {e}"})
                continue
            ok.append(i)
            images.append(img)
            sizes.append(img.size)
        inputs = None
        if images:
            inputs = self.processor(images=images, text=[self.prompt] * len(images), padding=True,
                                    return_tensors="pt")
        return {"ok": ok, "sizes": sizes, "skipped": skipped, "inputs": inputs}


def _decode(value: Any) -> Image.Image:
    """An image cell (bytes/path dict from an undecoded HF column, or a PIL image) as RGB.

    Errors name the data, never an object's address, so a resumed run lists them byte for byte the same.
    """
    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, dict) and value.get("bytes"):
        data = value["bytes"]
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise UnidentifiedImageError(
                f"cannot identify image data ({len(data)} bytes starting {data[:8]!r})") from None
    elif isinstance(value, dict) and value.get("path"):
        img = Image.open(value["path"])
    else:
        raise ValueError(f"no image data in cell of type {type(value).__name__}")
    img.load()
    if img.width < 1 or img.height < 1:
        raise ValueError(f"empty image {img.size}")
    return img if img.mode == "RGB" else img.convert("RGB")


def _loader(ds, chunks, processor, prompt, num_workers):
    import datasets

    if "image" in ds.features and isinstance(ds.features["image"], datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))
    return torch.utils.data.DataLoader(
        _Batches(ds, chunks, processor, prompt), batch_size=None, shuffle=False,
        num_workers=num_workers, prefetch_factor=2 if num_workers else None,
    )


@torch.inference_mode()
def _forward(lmm, hooks, batch, c: CacheConfig, capture) -> dict[str, dict[str, torch.Tensor]]:
    """One forward pass; returns per hook point the kept rows with their geometry columns."""
    from mmsae.models import token_geometry

    inputs = batch["inputs"]
    device = next(lmm.model.parameters()).device
    model_inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
    if "pixel_values" in model_inputs:
        model_inputs["pixel_values"] = model_inputs["pixel_values"].to(next(lmm.model.parameters()).dtype)
    with capture(lmm.model, hooks, stop_early=True) as acts:
        lmm.model(**model_inputs)
    ids = inputs["input_ids"]
    attn = inputs.get("attention_mask", torch.ones_like(ids)).bool()
    geo = token_geometry(lmm.family, lmm.config, ids, inputs.get("image_sizes"), lmm.processor,
                         batch_num_images=inputs.get("batch_num_images"))
    view = torch.as_tensor(np.asarray(geo.view))
    if c.tokens == "image":
        keep = (view != A.VIEW_TEXT) & attn
    elif c.tokens == "text":
        keep = (view == A.VIEW_TEXT) & attn
    else:
        keep = attn.clone()
    # position in the unpadded sequence, so padding (left or right) never changes a row
    pos = torch.cumsum(attn.long(), dim=1) - 1
    b_idx = torch.as_tensor(batch["ok"], dtype=torch.int64)[:, None].expand_as(ids)
    sel = keep.nonzero(as_tuple=True)
    index_cols = {
        "image_idx": b_idx[sel],
        "token_pos": pos[sel].to(torch.int32),
        "view": view[sel].to(torch.int16),
        "row": torch.as_tensor(np.asarray(geo.row))[sel].to(torch.int16),
        "col": torch.as_tensor(np.asarray(geo.col))[sel].to(torch.int16),
    }
    out = {}
    dtype = A.DTYPES[c.dtype]
    for h in hooks:
        x = acts[h.name]
        rows = x[sel[0].to(x.device), sel[1].to(x.device)].to("cpu", dtype)
        out[h.name] = {"acts": rows, **index_cols}
    return out


def _concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in A.COLUMNS}


# ---------------------------------------------------------------------------------------------------
# durability: shards, progress, seal

def _progress_uri(out: str, rank: int) -> str:
    return storage.join(out, PROGRESS.format(rank=rank))


def _records_uri(out: str, rank: int) -> str:
    return storage.join(out, SET_RECORDS.format(rank=rank))


def _record_uri(out: str, rank: int, index: int) -> str:
    return storage.join(_records_uri(out, rank), f"{index:05d}.json")


def _write_set(out: str, rank: int, index: int, buf: _SetBuffer, end_image: int,
               progress: dict[str, Any]) -> int:
    """Encode and write shard set ``index``, then its record, then the progress that counts it.

    In this order, progress never counts a set whose files are not all written. Returns the bytes written.
    """
    files: dict[str, dict[str, Any]] = {}
    shards: dict[str, dict[str, Any]] = {}
    dims: dict[str, int] = {}
    for h, parts in buf.parts.items():
        name = f"{h}/{A.shard_name(rank, index)}"
        cols = _concat(parts)
        data = A.encode_shard(cols, {"hookpoint": h, "first_image": buf.first_image, "end_image": end_image})
        storage.write_bytes(storage.join(out, name), data)
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        nonfinite = _nonfinite_rows(cols["acts"])
        if nonfinite:
            log.warning("shard %s holds %d of %d rows with NaN or inf activations",
                        storage.join(out, name), nonfinite, int(cols["acts"].shape[0]))
        shards[h] = {"name": name, "rows": int(cols["acts"].shape[0]), "first_image": buf.first_image,
                     "end_image": end_image, "nonfinite": nonfinite}
        dims[h] = int(cols["acts"].shape[1])
    record = {"files": files, "shards": shards, "dims": dims, "images": buf.images, "skipped": buf.skipped}
    storage.write_json(_record_uri(out, rank, index), record, indent=None)
    _save_progress(out, rank, progress)
    return sum(f["bytes"] for f in files.values())


def _nonfinite_rows(acts: torch.Tensor) -> int:
    """Rows of ``acts`` [n, d] holding a NaN or an inf."""
    return int((~torch.isfinite(acts)).reshape(acts.shape[0], -1).any(dim=1).sum())


def _save_progress(out: str, rank: int, progress: dict[str, Any]) -> None:
    storage.write_json(_progress_uri(out, rank), progress)


class _SetWriter:
    """Writes shard sets in order on one background thread: encoding and writing overlap the forward passes.

    Once a write fails, the later ones write nothing: progress must never count a set after a missing one.
    """

    def __init__(self, out: str, rank: int):
        self.out, self.rank = out, rank
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: deque[Future[int]] = deque()
        self._failed = False

    def submit(self, index: int, buf: _SetBuffer, end_image: int, progress: dict[str, Any]) -> None:
        self._pending.append(self._pool.submit(self._write, index, buf, end_image, progress))

    def _write(self, index: int, buf: _SetBuffer, end_image: int, progress: dict[str, Any]) -> int:
        if self._failed:
            raise CacheError(f"shard set {index} not written: an earlier set failed to write")
        try:
            return _write_set(self.out, self.rank, index, buf, end_image, progress)
        except BaseException:
            self._failed = True
            raise

    def reap(self, in_flight: int) -> int:
        """Wait until at most ``in_flight`` sets are left in flight (bounded memory); raise a failed write.

        Returns the bytes the finished writes wrote.
        """
        written = 0
        while self._pending and (self._pending[0].done() or len(self._pending) > in_flight):
            written += self._pending.popleft().result()
        return written

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _load_progress(out: str, rank: int, hook_names: list[str], fresh: _Progress) -> _Progress:
    """The rank's progress from an earlier run with the same config, or ``fresh``; drops unrecorded sets.

    A run of another config is refused; a run from other inputs (fingerprint) is dropped, with a warning, and
    started afresh; a run with another world size or image block is refused, since resuming it would cache
    some images twice and others never.
    """
    uri = _progress_uri(out, rank)
    chash = fresh.config_hash
    p = fresh
    if storage.exists(uri):
        data = storage.read_json(uri)
        if data.get("config_hash") != chash:
            raise CacheError(
                f"{uri} records a partial run made with another config (hash {data.get('config_hash')} != "
                f"{chash}); rerun with the same config to resume, or choose another cache.out"
            )
        if data.get("version") != PROGRESS_VERSION:
            raise CacheError(
                f"{uri} is in progress format {data.get('version', 1)}, but this version resumes only format "
                f"{PROGRESS_VERSION}; choose another cache.out"
            )
        if data.get("inputs_fingerprint") != fresh.inputs_fingerprint:
            log.warning(
                "%s records a partial run made from other inputs (fingerprint %s != %s: the model or the image "
                "set changed since); rank %d starts again from scratch", uri, data.get("inputs_fingerprint"),
                fresh.inputs_fingerprint, rank,
            )
        else:
            old = (data.get("world_size"), data.get("lo"), data.get("hi"))
            if old != (fresh.world_size, fresh.lo, fresh.hi):
                raise CacheError(
                    f"{out} holds a partial run made with world size {old[0]} (rank {rank} took images "
                    f"[{old[1]}, {old[2]})), but this run has world size {fresh.world_size} (rank {rank} takes "
                    f"images [{fresh.lo}, {fresh.hi})): resuming would cache some images twice and others "
                    f"never. Rerun with world size {old[0]} to resume it, or delete {out} to start over"
                )
            p = _Progress(**data)
            log.info("rank %d resumes at batch %d (%d shard sets done)", rank, p.next_chunk, p.next_shard)
    # sets written after the last recorded progress (killed in between) are redone: drop their files
    records = SET_RECORDS.format(rank=rank)
    stale = [storage.join(h, n) for h in hook_names for n in storage.list_files(storage.join(out, h))
             if (parsed := A.parse_shard_name(n)) and parsed[0] == rank and parsed[1] >= p.next_shard]
    stale += [storage.join(records, n) for n in storage.list_files(storage.join(out, records))
              if not (n.removesuffix(".json").isdigit() and int(n.removesuffix(".json")) < p.next_shard)]
    for name in stale:
        storage.delete(storage.join(out, name))
    return p


def _read_sealed(out: str) -> storage.Manifest | None:
    """The manifest of an activation-shard artifact at ``out``; None if there is no manifest.

    A manifest of another kind, or one that is not an mmsae manifest, is an error: that folder is not ours
    to overwrite.
    """
    try:
        manifest = storage.read_manifest(out)
    except storage.ManifestError as e:
        if not storage.exists(storage.join(out, storage.MANIFEST_NAME)):
            return None
        raise CacheError(
            f"cache.out {out} holds a {storage.MANIFEST_NAME} that cannot be read ({e}); expected an "
            f"activation-shard artifact ({A.KIND!r}) or no manifest: choose another cache.out"
        ) from e
    if manifest.kind != A.KIND:
        raise CacheError(
            f"cache.out {out} holds a {manifest.kind!r} artifact, not activation shards ({A.KIND!r}); "
            "choose another cache.out (or delete that folder to reuse it)"
        )
    return manifest


def _drop_sealed(out: str, sealed: storage.Manifest) -> None:
    """Delete a sealed artifact: its manifest first (it is no longer complete), then the files it lists."""
    storage.delete(storage.join(out, storage.MANIFEST_NAME))
    for name in sealed.files:
        storage.delete(storage.join(out, name))


def _read_rank(out: str, rank: int) -> _Progress | None:
    uri = _progress_uri(out, rank)
    return _Progress(**storage.read_json(uri)) if storage.exists(uri) else None


def _seal(c: CacheConfig, chash: str, fingerprint: str, world: int, hook_names: list[str], lmm,
          elapsed: float, images_done: int, rows_done: int) -> dict[str, Any]:
    """Rank 0: merge every rank's set records into one manifest (written last) and drop the progress files."""
    ranks = [_read_rank(c.out, r) for r in range(world)]
    not_done = [r for r, p in enumerate(ranks) if p is None or not p.done]
    if not_done:
        raise CacheError(f"ranks {not_done} did not finish; rerun to resume them")
    files: dict[str, dict[str, Any]] = {}
    shards: dict[str, list[dict[str, Any]]] = {h: [] for h in hook_names}
    skipped: list[dict[str, Any]] = []
    dims: dict[str, int] = {}
    n_images, last = 0, -1
    digest, size = hashlib.sha256(), 0

    def emit(fh, text: str) -> None:
        nonlocal size
        data = text.encode()
        fh.write(data)
        digest.update(data)
        size += len(data)

    # images.json is written as the records stream by (ranks hold ascending contiguous blocks, their sets
    # follow each other), so sealing holds one record at a time, not a list of every image
    with storage.atomic_writer(storage.join(c.out, IMAGES_FILE)) as fh, \
            ThreadPoolExecutor(max_workers=8) as pool:  # many small reads: overlap their latency on S3
        emit(fh, '{"images": [')
        for r, p in enumerate(ranks):
            uris = [_record_uri(c.out, r, i) for i in range(p.next_shard)]
            for uri, rec in zip(uris, pool.map(storage.read_json, uris), strict=True):
                files.update(rec["files"])
                for h in hook_names:
                    shards[h].append(rec["shards"][h])
                    d = int(rec["dims"][h])
                    if dims.setdefault(h, d) != d:
                        raise CacheError(f"{uri} records width {d} for hook point {h}, but earlier shard "
                                         f"sets hold width {dims[h]}")
                for entry in rec["images"]:
                    if int(entry[0]) <= last:
                        raise CacheError(f"{uri} lists image {entry[0]} after image {last}: the ranks' records "
                                         f"of {c.out} overlap; delete the folder and cache again")
                    emit(fh, (", " if n_images else "") + json.dumps(entry))
                    last, n_images = int(entry[0]), n_images + 1
                skipped.extend(rec["skipped"])
            skipped.extend(p.skipped)
        if not n_images:
            raise CacheError(
                f"image set {c.image_set} has no usable image: all {len(skipped)} images failed to decode "
                f"(first: {skipped[0]['error'] if skipped else 'none'})"
            )
        emit(fh, '], "skipped": ' + json.dumps(skipped, sort_keys=True) + "}")
    files[IMAGES_FILE] = {"sha256": digest.hexdigest(), "bytes": size}
    total_rows = sum(s["rows"] for s in shards[hook_names[0]])
    figures = {
        "images": n_images,
        "images_skipped": len(skipped),
        "tokens": total_rows,
        "shards": len(shards[hook_names[0]]),
        "images_per_s_rank0": images_done / elapsed if elapsed > 0 else 0.0,
        "tokens_per_s_rank0": rows_done / elapsed if elapsed > 0 else 0.0,
        "bytes_written": sum(f["bytes"] for f in files.values()),
    }
    storage.write_manifest(
        c.out, A.KIND, files=files, config={"cache": c.model_dump(mode="json")},
        inputs={"image_set": c.image_set, "model": c.model}, format_version=A.FORMAT_VERSION,
        extra={
            "config_hash": chash, "inputs_fingerprint": fingerprint, "hookpoints": hook_names,
            "d": dims[hook_names[0]], "dims": {h: dims[h] for h in hook_names}, "dtype": c.dtype,
            "tokens": c.tokens,
            "family": lmm.family, "world_size": world, "shards": shards, "figures": figures,
            "skipped": skipped, "geometry": _grid_info(lmm),
        },
    )
    for r in range(world):
        storage.delete(_records_uri(c.out, r))
        storage.delete(_progress_uri(c.out, r))
    log.info("sealed %s: %s", c.out, figures)
    return figures


def _grid_info(lmm) -> dict[str, Any]:
    vc = lmm.config.vision_config
    info: dict[str, Any] = {"image_size": int(vc.image_size), "patch_size": int(vc.patch_size),
                            "grid": int(vc.image_size) // int(vc.patch_size)}
    pinpoints = getattr(lmm.config, "image_grid_pinpoints", None)
    if pinpoints:
        info["image_grid_pinpoints"] = [list(p) for p in pinpoints]
    return info
