"""The training batch stream: activation-shard rows shuffled across shards, deterministic, resumable, and
split over data-parallel ranks so that the global batches do not depend on the world size.

Reads the shards through :class:`mmsae.activations.ActivationShards`; writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmsae import storage
from mmsae.activations import ActivationShards, ShardFormatError, token_mask
from mmsae.training.counting import RowCounts, count_rows, heldout_images

__all__ = ["BatchStream", "StreamState", "heldout_images"]


@dataclass
class StreamState:
    """Where a :class:`BatchStream` stands: resume a run by handing this back."""

    epoch: int = 0
    window: int = 0
    batch: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "window": self.window, "batch": self.batch}


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
        self._counts: RowCounts | None = None
        self.n_shards = len(shards.shards(hookpoints[0]))
        for h in hookpoints[1:]:
            if len(shards.shards(h)) != self.n_shards:
                raise ShardFormatError(f"hook points {hookpoints[0]} and {h} of {shards.uri} differ in shard count")

    def windows(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n_shards, generator=g).tolist()
        w = self.window_shards
        return [order[i : i + w] for i in range(0, len(order), w)]

    def counts(self) -> RowCounts:
        """The rows trained on per shard, and the images and held-out images (counted once, from the index
        columns alone; with a group each rank counts every ``world``-th shard)."""
        if self._counts is None:
            self._counts = count_rows(self.shards, self.hookpoints[0], self.tokens, self.heldout_fraction,
                                      self.seed, rank=self.rank, world=self.world, group=self.group)
        return self._counts

    def total_steps(self) -> int:
        """The batches the whole run yields, exactly: per window, its rows trained on cut into whole batches.
        With a group, every rank must call this (before :meth:`iterate`)."""
        kept = self.counts().kept
        return sum(sum(kept[s] for s in window) // self.batch_size
                   for epoch in range(self.epochs) for window in self.windows(epoch))

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
