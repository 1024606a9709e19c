"""The activation-shard format: what the cache stage writes and the train and mine stages read.

An activation-shard artifact is a directory (local or ``s3://``)::

    manifest.json                                  kind "activation_shards", written last
    <hookpoint>/shard-RRR-NNNNN.safetensors        rank RRR's shard NNNNN of one hook point
    progress-RRR.json                              rank RRR's resume point (removed when the artifact is sealed)
    progress-RRR/NNNNN.json                        the images of rank RRR's shard set NNNNN (removed likewise)
    images.json                                    per image: dataset row, width, height (and the skipped ones)

A shard holds whole images only, so shard boundaries are the same for every hook point, and holds the
columns ``acts`` [n, d] (the configured dtype), ``image_idx`` [n] (row of the image set), ``token_pos``
[n] (position in the unpadded sequence), ``view`` [n] (0 base image, i AnyRes tile i, -1 text, -2 an
image-newline token, -3 a vision CLS token), ``row`` and ``col`` [n] (patch grid cell; -1 where none). Its safetensors metadata
records the hook point and the image range ``[first_image, end_image)`` it covers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mmsae import storage

KIND = "activation_shards"
FORMAT_VERSION = 1
INDEX_COLUMNS = ("image_idx", "token_pos", "view", "row", "col")
COLUMNS = ("acts", *INDEX_COLUMNS)
INDEX_DTYPES = {"image_idx": torch.int64, "token_pos": torch.int32, "view": torch.int16, "row": torch.int16, "col": torch.int16}
VIEW_TEXT = -1
VIEW_NEWLINE = -2
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SHARD_RE = re.compile(r"^shard-(\d{3})-(\d{5})\.safetensors$")


class ShardFormatError(ValueError):
    """A shard or shard directory that does not follow the format; the message names the file."""


def shard_name(rank: int, index: int) -> str:
    return f"shard-{rank:03d}-{index:05d}.safetensors"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    m = _SHARD_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def encode_shard(columns: dict[str, torch.Tensor], metadata: dict[str, Any]) -> bytes:
    """Serialise one shard; the bytes depend only on the data and metadata (no time stamps)."""
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        raise ShardFormatError(f"shard lacks columns {missing}; expected {list(COLUMNS)}")
    n = columns["acts"].shape[0]
    for c in INDEX_COLUMNS:
        if columns[c].shape != (n,):
            raise ShardFormatError(f"column {c} has shape {tuple(columns[c].shape)}; expected ({n},)")
    tensors = {"acts": columns["acts"].contiguous()}
    tensors.update({c: columns[c].to(INDEX_DTYPES[c]).contiguous() for c in INDEX_COLUMNS})
    # one metadata key: safetensors does not keep the order of several, and the bytes must be reproducible
    return st_save(tensors, metadata={"mmsae": json.dumps(metadata, sort_keys=True)})


def decode_shard(data: bytes, name: str = "<shard>") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a shard's columns and metadata from its bytes."""
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except Exception as e:  # safetensors raises its own error types
        raise ShardFormatError(f"{name} is not a readable safetensors shard: {e}") from e
    missing = [c for c in COLUMNS if c not in tensors]
    if missing:
        raise ShardFormatError(f"{name} lacks columns {missing}; expected {list(COLUMNS)}")
    meta = json.loads(header.get("__metadata__", {}).get("mmsae", "{}"))
    return tensors, meta


@dataclass(frozen=True)
class ShardRef:
    """One shard of an artifact: its hook point, file name (relative to the artifact) and image range."""

    hookpoint: str
    name: str
    rows: int
    first_image: int
    end_image: int
    nonfinite: int | None = None
    """Rows holding NaN or inf, as counted when the shard was written (None: not recorded)."""


class ActivationShards:
    """A sealed activation-shard artifact, opened for reading (checksums verified on every read)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.manifest = storage.read_manifest(uri, kind=KIND)
        extra = self.manifest.extra
        self.hookpoints: list[str] = list(extra["hookpoints"])
        self.d: int = int(extra["d"])
        """Width of the first hook point's activations (see :meth:`dim` for each hook point)."""
        self.dims: dict[str, int] = {h: int(extra.get("dims", {}).get(h, self.d)) for h in self.hookpoints}
        self.dtype: str = str(extra["dtype"])
        self._shards: dict[str, list[ShardRef]] = {
            h: [ShardRef(h, s["name"], s["rows"], s["first_image"], s["end_image"], s.get("nonfinite"))
                for s in extra["shards"][h]]
            for h in self.hookpoints
        }

    def dim(self, hookpoint: str) -> int:
        """Width of the activations of ``hookpoint``."""
        if hookpoint not in self.dims:
            raise KeyError(f"hook point {hookpoint!r} is not in {self.uri}; it holds {self.hookpoints}")
        return self.dims[hookpoint]

    def shards(self, hookpoint: str | None = None) -> list[ShardRef]:
        hp = hookpoint or self.hookpoints[0]
        if hp not in self._shards:
            raise KeyError(f"hook point {hp!r} is not in {self.uri}; it holds {self.hookpoints}")
        return list(self._shards[hp])

    def read(self, ref: ShardRef) -> dict[str, torch.Tensor]:
        data = storage.read_verified_bytes(self.uri, ref.name, self.manifest)
        tensors, _ = decode_shard(data, storage.join(self.uri, ref.name))
        return tensors

    def iter_shards(self, hookpoint: str | None = None) -> Iterator[dict[str, torch.Tensor]]:
        for ref in self.shards(hookpoint):
            yield self.read(ref)

    def num_rows(self, hookpoint: str | None = None) -> int:
        return sum(s.rows for s in self.shards(hookpoint))


# ---------------------------------------------------------------------------------------------------
# Training batches: shuffled across shards, deterministic, resumable, split over data-parallel ranks


@dataclass
class StreamState:
    """Where a :class:`BatchStream` stands: resume a run by handing this back."""

    epoch: int = 0
    window: int = 0
    batch: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "window": self.window, "batch": self.batch}


def heldout_images(image_idx: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Bool mask: rows whose image is held out (a seeded hash of the image index, stable across runs)."""
    if fraction <= 0:
        return torch.zeros_like(image_idx, dtype=torch.bool)
    h = (image_idx.to(torch.int64) * 0x9E3779B1 + (seed + 1) * 0x85EBCA77) % 1_000_003
    return h < int(fraction * 1_000_003)


def token_mask(cols: dict[str, torch.Tensor], tokens: str) -> torch.Tensor:
    """Rows of the chosen kind: 'image' (every image token), 'text', or 'all'."""
    if tokens == "all":
        return torch.ones_like(cols["view"], dtype=torch.bool)
    is_text = cols["view"] == VIEW_TEXT
    return ~is_text if tokens == "image" else is_text


class BatchStream:
    """Yields ``(state_after, {hookpoint: x [rows_per_rank, d]})`` batches of a global size.

    Every epoch permutes the shards (seeded by ``seed`` and the epoch); ``window_shards`` consecutive shards
    form a window whose rows (every hook point alike) are permuted together and cut into global batches;
    rank ``r`` of ``world`` takes the ``r``-th slice of each global batch, so the global batches do not depend
    on the world size. Rows that do not fill a whole batch at the end of a window are left out of that
    epoch. The next window is read in a background thread while the current one is consumed.

    With a ``group`` (a process group of the ``world`` ranks, used by the reading thread alone), each shard of
    a window is read by one rank only and the rows are exchanged (one all-to-all per window), so storage
    traffic does not grow with the number of ranks; without one, every rank reads every shard of a window.
    Either way rank ``r`` gets the same rows. Every rank must consume the same windows in the same order.
    """

    def __init__(
        self,
        shards: ActivationShards,
        hookpoints: list[str],
        batch_size: int,
        *,
        epochs: int = 1,
        seed: int = 0,
        window_shards: int = 4,
        rank: int = 0,
        world: int = 1,
        tokens: str = "all",
        heldout_fraction: float = 0.0,
        dtype: torch.dtype = torch.float32,
        group: Any = None,
    ):
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} does not divide by the world size {world}")
        self.shards, self.hookpoints = shards, hookpoints
        self.batch_size, self.epochs, self.seed = batch_size, epochs, seed
        self.window_shards, self.rank, self.world = window_shards, rank, world
        self.tokens, self.heldout_fraction, self.dtype = tokens, heldout_fraction, dtype
        self.group = group if world > 1 else None
        self.n_shards = len(shards.shards(hookpoints[0]))
        for h in hookpoints[1:]:
            if len(shards.shards(h)) != self.n_shards:
                raise ShardFormatError(f"hook points {hookpoints[0]} and {h} of {shards.uri} differ in shard count")

    def windows(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n_shards, generator=g).tolist()
        w = self.window_shards
        return [order[i : i + w] for i in range(0, len(order), w)]

    def estimated_steps(self) -> int:
        """Batches in the whole run: per window, its rows from the manifest times the share of rows that are
        trained on (the token kind, not held out), measured on the first window, cut into whole batches."""
        refs = self.shards.shards(self.hookpoints[0])
        first = self.windows(0)[0]
        rows = kept = 0
        for s in first:
            cols = self.shards.read(refs[s])
            rows += int(cols["view"].numel())
            kept += int(self._keep(cols).sum())
        share = kept / rows if rows else 0.0
        steps = 0
        for epoch in range(self.epochs):
            for window in self.windows(epoch):
                steps += int(share * sum(refs[s].rows for s in window)) // self.batch_size
        return max(1, steps)

    def _keep(self, cols: dict[str, torch.Tensor]) -> torch.Tensor:
        return token_mask(cols, self.tokens) & ~heldout_images(cols["image_idx"], self.heldout_fraction, self.seed)

    def _load_window(self, epoch: int, wi: int, shard_ids: list[int]) -> dict[str, torch.Tensor]:
        """The window's rows (every shard read here), permuted: ``[rows, d]`` per hook point."""
        parts = [self._read_kept(s) for s in shard_ids]
        n = sum(int(p[self.hookpoints[0]].shape[0]) for p in parts)
        perm = self._window_perm(epoch, wi, n)
        return {h: torch.cat([p[h] for p in parts])[perm].to(self.dtype) for h in self.hookpoints}

    def _window_perm(self, epoch: int, wi: int, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 10_007 + wi)
        return torch.randperm(n, generator=g)

    def _read_kept(self, shard_index: int) -> dict[str, torch.Tensor]:
        """The rows of one shard that are trained on, per hook point (NaN/inf refused, naming the shard)."""
        refs = {h: self.shards.shards(h)[shard_index] for h in self.hookpoints}
        out: dict[str, torch.Tensor] = {}
        first = None
        for h in self.hookpoints:
            cols = self.shards.read(refs[h])
            if first is None:
                first, keep = cols, self._keep(cols)
            elif not torch.equal(cols["token_pos"], first["token_pos"]):
                raise ShardFormatError(f"shard {refs[h].name} rows do not line up with {refs[self.hookpoints[0]].name}")
            x = cols["acts"][keep]
            bad = int((~torch.isfinite(x)).any(dim=1).sum())
            if bad:
                raise ShardFormatError(f"{storage.join(self.shards.uri, refs[h].name)}: {bad} rows hold NaN "
                                       f"or inf (hook point {h})")
            out[h] = x
        return out

    def _load_window_shared(self, epoch: int, wi: int, shard_ids: list[int]) -> dict[str, torch.Tensor]:
        """This rank's rows of the window's global batches, ``[n_batches * per_rank, d]`` per hook point, in
        batch order; each shard read by one rank, the rows sent to the ranks whose batch slices hold them."""
        dist, world, rank, group = torch.distributed, self.world, self.rank, self.group
        mine = [j for j in range(len(shard_ids)) if j % world == rank]
        parts = {j: self._read_kept(shard_ids[j]) for j in mine}
        h0 = self.hookpoints[0]
        counts = torch.zeros(len(shard_ids), dtype=torch.int64)
        for j, x in parts.items():
            counts[j] = x[h0].shape[0]
        dist.all_reduce(counts, group=group)
        starts = torch.cumsum(counts, 0) - counts
        n = int(counts.sum())
        perm = self._window_perm(epoch, wi, n)
        where = torch.empty(n, dtype=torch.int64)
        where[perm] = torch.arange(n)  # global position of each row of the window's concatenation
        per_rank = self.batch_size // world
        used = n // self.batch_size * self.batch_size
        widths = [self.shards.dim(h) for h in self.hookpoints]
        if mine:
            rows = torch.cat([torch.cat([parts[j][h].float() for h in self.hookpoints], 1) for j in mine])
            pos = where[torch.cat([torch.arange(int(starts[j]), int(starts[j] + counts[j])) for j in mine])]
        else:
            rows, pos = torch.zeros(0, sum(widths)), torch.zeros(0, dtype=torch.int64)
        keep = pos < used
        rows, pos = rows[keep], pos[keep]
        dest = (pos % self.batch_size) // per_rank
        slot = pos // self.batch_size * per_rank + pos % per_rank
        order = torch.argsort(dest, stable=True)
        rows, slot = rows[order], slot[order]
        send = torch.bincount(dest, minlength=world)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        send_l, recv_l = send.tolist(), recv.tolist()
        got = rows.new_empty(sum(recv_l), rows.shape[1])
        dist.all_to_all_single(got, rows.contiguous(), recv_l, send_l, group=group)
        got_slot = slot.new_empty(sum(recv_l))
        dist.all_to_all_single(got_slot, slot.contiguous(), recv_l, send_l, group=group)
        local = got.new_empty(used // world, rows.shape[1])
        local[got_slot] = got  # slots are this rank's local row indices
        out, at = {}, 0
        for h, w in zip(self.hookpoints, widths, strict=True):
            out[h] = local[:, at : at + w].to(self.dtype)
            at += w
        return out

    def __iter__(self):
        raise TypeError("use stream.iterate(state)")

    def iterate(self, state: StreamState | None = None):
        from concurrent.futures import ThreadPoolExecutor

        state = state or StreamState()
        plan = [(e, wi, ids) for e in range(state.epoch, self.epochs) for wi, ids in enumerate(self.windows(e))
                if e > state.epoch or wi >= state.window]
        if not plan:
            return
        per_rank = self.batch_size // self.world
        shared = self.group is not None
        load = self._load_window_shared if shared else self._load_window
        lo, hi = (0, per_rank) if shared else (self.rank * per_rank, (self.rank + 1) * per_rank)
        step = per_rank if shared else self.batch_size
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(load, *plan[0])
            for i, (epoch, wi, _ids) in enumerate(plan):
                rows = future.result()
                if i + 1 < len(plan):
                    future = pool.submit(load, *plan[i + 1])
                n_batches = next(iter(rows.values())).shape[0] // step
                start = state.batch if (epoch, wi) == (state.epoch, state.window) else 0
                for b in range(start, n_batches):
                    base = b * step
                    after = StreamState(epoch, wi, b + 1)
                    yield after, {h: x[base + lo : base + hi] for h, x in rows.items()}
