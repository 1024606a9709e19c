"""Images in, shard sets out: the cache stage's batches, forward pass and background shard-set writer.

`image_loader` decodes and preprocesses batches of images (bad images skipped and reported, not raised);
`forward_rows` runs one forward pass cut after the deepest hook point and returns, per hook point, the
kept rows with their geometry columns (`keep_mask`: the token kinds, views and seeded share kept);
`SetBuffer` gathers whole batches into a shard set; `SetWriter` writes sets on background threads (several
at once, each set's record and progress committed in order), so encoding and writing overlap the forward
passes. `StageTimes` adds up the seconds each part takes
(the stage logs them; ``python -m bench cache`` reports them).
"""

from __future__ import annotations

import io
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmsae import activations
from mmsae.config import CacheConfig


class CacheWriteError(RuntimeError):
    """A shard set could not be written (or follows one that could not)."""


MAIN_PARTS = ("setup", "load_model", "wait_images", "forward", "geometry", "copies", "wait_writer", "seal")
"""The main thread's parts, in order; their sum is the rank's wall-clock time less small bookkeeping."""
WRITER_PARTS = ("concat", "encode", "hash", "write", "check", "records")
"""The writer threads' parts, summed over the threads (overlapping the main thread's, except while it waits
in ``wait_writer``)."""


class StageTimes:
    """Seconds a rank of the cache stage spends per part; ``with times("forward"): ...`` adds to a part.

    Main-thread parts (:data:`MAIN_PARTS`) follow each other; the writer threads' (:data:`WRITER_PARTS`,
    prefixed ``writer_``, summed over the threads) run beside them.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, part: str, seconds: float) -> None:
        with self._lock:
            self.seconds[part] = self.seconds.get(part, 0.0) + seconds

    @contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(part, time.perf_counter() - t0)

    def summary(self) -> str:
        """One line, the parts in order with their seconds."""
        order = [*MAIN_PARTS, *(f"writer_{p}" for p in WRITER_PARTS)]
        names = [p for p in order if p in self.seconds] + sorted(set(self.seconds) - set(order))
        return ", ".join(f"{p} {self.seconds[p]:.2f} s" for p in names)


@dataclass
class SetBuffer:
    """The shard set being filled: whole batches of rows, and what it will record about its images."""

    first_image: int
    parts: dict[str, list[dict[str, torch.Tensor]]]
    images: list[list[int]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0

    @classmethod
    def empty(cls, first_image: int, hook_names: list[str]) -> SetBuffer:
        return cls(first_image, {h: [] for h in hook_names})



class ImageBatches(torch.utils.data.Dataset):
    """Chunk j -> decoded, preprocessed batch; bad images are skipped and reported, not raised."""

    def __init__(self, ds, chunks: list[list[int]], processor, prompt: str):
        self.ds, self.chunks, self.processor, self.prompt = ds, chunks, processor, prompt

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, j: int) -> dict[str, Any]:
        ok, images, sizes, skipped = [], [], [], []
        for i in self.chunks[j]:
            row = self.ds[i]
            try:
                img = decode_image(row["image"])
            except Exception as e:  # noqa: BLE001 - any bad image (PIL's DecompressionBombError too) is skipped
                skipped.append({"image_idx": i, "name": image_name(row), "error": f"{type(e).__name__}: {e}"})
                continue
            ok.append(i)
            images.append(img)
            sizes.append(img.size)
        inputs = None
        if images:
            inputs = self.processor(images=images, text=[self.prompt] * len(images), padding=True,
                                    return_tensors="pt")
        return {"ok": ok, "sizes": sizes, "skipped": skipped, "inputs": inputs}


def image_name(row: dict[str, Any]) -> str:
    """What names an image of a set to a person: its file's path, else its ``id``, else '' (its row only)."""
    cell = row.get("image")
    if isinstance(cell, dict) and cell.get("path"):
        return str(cell["path"])
    return str(row.get("id") or "")


def decode_image(value: Any) -> Image.Image:
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


def image_loader(ds, chunks, processor, prompt, num_workers):
    import datasets

    if "image" in ds.features and isinstance(ds.features["image"], datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))
    return torch.utils.data.DataLoader(
        ImageBatches(ds, chunks, processor, prompt), batch_size=None, shuffle=False,
        num_workers=num_workers, prefetch_factor=2 if num_workers else None,
    )


@torch.inference_mode()
def forward_rows(lmm, hooks, batch, c: CacheConfig, capture,
                 times: StageTimes | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """One forward pass; returns per hook point the kept rows with their geometry columns.

    ``times`` gets the parts ``forward``, ``geometry`` (token geometry, the kept tokens and their index
    columns) and ``copies`` (the kept rows gathered, cast and brought to the host).
    """
    from mmsae.models import token_geometry

    times = times or StageTimes()
    inputs = batch["inputs"]
    with times("forward"):
        device = next(lmm.model.parameters()).device
        model_inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
        if "pixel_values" in model_inputs:
            model_inputs["pixel_values"] = model_inputs["pixel_values"].to(next(lmm.model.parameters()).dtype)
        with capture(lmm.model, hooks, stop_early=True) as acts:
            lmm.model(**model_inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the forward's own time (the copies below would wait for it anyway)
    with times("geometry"):
        ids = inputs["input_ids"]
        attn = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        geo = token_geometry(lmm.family, lmm.config, ids, inputs.get("image_sizes"), lmm.processor,
                             batch_num_images=inputs.get("batch_num_images"))
        view = torch.as_tensor(np.asarray(geo.view))
        # position in the unpadded sequence, so padding (left or right) never changes a row
        pos = torch.cumsum(attn.long(), dim=1) - 1
        b_idx = torch.as_tensor(batch["ok"], dtype=torch.int64)[:, None].expand_as(ids)
        sel = keep_mask(c, view, attn, b_idx, pos).nonzero(as_tuple=True)
        index_cols = {
            "image_idx": b_idx[sel],
            "token_pos": pos[sel].to(torch.int32),
            "view": view[sel].to(torch.int16),
            "row": torch.as_tensor(np.asarray(geo.row))[sel].to(torch.int16),
            "col": torch.as_tensor(np.asarray(geo.col))[sel].to(torch.int16),
        }
    out = {}
    dtype = activations.DTYPES[c.dtype]
    with times("copies"):
        for h in hooks:
            x = acts[h.name]
            rows = x[sel[0].to(x.device), sel[1].to(x.device)].to("cpu", dtype)
            out[h.name] = {"acts": rows, **index_cols}
    return out


def keep_mask(c: CacheConfig, view: torch.Tensor, attn: torch.Tensor, image_idx: torch.Tensor,
              pos: torch.Tensor) -> torch.Tensor:
    """Which tokens of a batch ``[batch, seq]`` to cache: ``cache.tokens``, then ``cache.views`` and
    ``cache.token_fraction`` (a choice by image index and unpadded position only, so batching never changes it)."""
    is_text = view == activations.VIEW_TEXT
    if c.tokens == "image":
        keep = ~is_text & attn
    elif c.tokens == "text":
        keep = is_text & attn
    else:
        keep = attn.clone()
    if c.views == "base":
        keep &= is_text | (view == 0)
    if c.token_fraction < 1.0:
        keep &= token_hash_unit(image_idx, pos, c.token_seed) < c.token_fraction
    return keep


_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0xD1B54A32D192ED03)


def token_hash_unit(image_idx: torch.Tensor, pos: torch.Tensor, seed: int) -> torch.Tensor:
    """A uniform number in [0, 1) per token from (seed, image index, position): splitmix64 in uint64."""
    with np.errstate(over="ignore"):
        x = (np.asarray(image_idx, dtype=np.uint64) * np.uint64(_MIX[0])
             + np.asarray(pos, dtype=np.uint64) * np.uint64(_MIX[3])
             + np.uint64(seed % 2**64) * np.uint64(_MIX[1]) + np.uint64(_MIX[2]))
        x ^= x >> np.uint64(30)
        x *= np.uint64(_MIX[1])
        x ^= x >> np.uint64(27)
        x *= np.uint64(_MIX[2])
        x ^= x >> np.uint64(31)
    return torch.from_numpy((x >> np.uint64(11)).astype(np.float64) / float(2**53))


def concat_rows(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in activations.COLUMNS}


@dataclass(frozen=True)
class WrittenSet:
    """A shard set whose files are written: what its record will say, and the bytes written."""

    record: dict[str, Any]
    bytes: int


class SetWriter:
    """Writes shard sets on background threads, so that encoding and writing overlap the forward passes.

    ``write_files(index, buffer, end_image)`` encodes and writes one set's shard files and returns a
    :class:`WrittenSet`; up to ``writers`` sets are written at once. ``commit(index, written, progress)``
    then writes the set's record and the progress that counts it, one set at a time and in index order (on one
    more thread), each only after that set's files are all written: progress never counts a set whose files
    are missing, nor one after a set that is. Once a set fails, the later ones are neither written nor
    recorded (files of a later set already written stay unrecorded; a resumed run writes that set again).
    """

    def __init__(self, write_files: Callable[[int, SetBuffer, int], WrittenSet],
                 commit: Callable[[int, WrittenSet, dict[str, Any]], None], writers: int = 1):
        if writers < 1:
            raise ValueError(f"writers must be at least 1, got {writers}")
        self._write_files = write_files
        self._commit_set = commit
        self._files = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="shard-writer")
        self._commits = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-commit")
        self._pending: deque[Future[int]] = deque()
        self._lock = threading.Lock()
        self._first_failed: int | None = None

    def submit(self, index: int, buf: SetBuffer, end_image: int, progress: dict[str, Any]) -> None:
        files = self._files.submit(self._write, index, buf, end_image)
        self._pending.append(self._commits.submit(self._commit, index, files, progress))

    def _write(self, index: int, buf: SetBuffer, end_image: int) -> WrittenSet:
        self._raise_if_failed_before(index, "written")
        try:
            return self._write_files(index, buf, end_image)
        except BaseException:
            self._failed(index)
            raise

    def _commit(self, index: int, files: Future[WrittenSet], progress: dict[str, Any]) -> int:
        written = files.result()  # this set's own failure, as it was raised
        self._raise_if_failed_before(index, "recorded")
        try:
            self._commit_set(index, written, progress)
        except BaseException:
            self._failed(index)
            raise
        return written.bytes

    def _failed(self, index: int) -> None:
        with self._lock:
            self._first_failed = index if self._first_failed is None else min(self._first_failed, index)

    def _raise_if_failed_before(self, index: int, what: str) -> None:
        with self._lock:
            first = self._first_failed
        if first is not None and first < index:
            raise CacheWriteError(f"shard set {index} not {what}: set {first} before it failed")

    def reap(self, in_flight: int) -> int:
        """Wait until at most ``in_flight`` sets are left in flight (bounded memory); raise a failed write.

        Returns the bytes the committed sets wrote.
        """
        written = 0
        while self._pending and (self._pending[0].done() or len(self._pending) > in_flight):
            written += self._pending.popleft().result()
        return written

    def close(self) -> None:
        """Stop: sets not started are dropped, the ones being written finish and are committed if they can be
        (a set queued behind them is neither written nor recorded; a resumed run writes it)."""
        self._files.shutdown(wait=False, cancel_futures=True)  # the commits of cancelled sets fail, unrecorded
        self._commits.shutdown(wait=True, cancel_futures=True)
        self._files.shutdown(wait=True)
