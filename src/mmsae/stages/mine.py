"""Stage mine: stream activation shards through an SAE and keep, per feature, its top images and their maps.

Reads: an activation-shard artifact (``mine.shards``; ``mmsae.activations``) and an SAE (``mine.sae``: the
train stage's output, or one folder in sparsify's layout); for heat maps and ground truth also the image
set and the LMM's image geometry that the shards' manifest names. Writes a top-examples artifact at
``mine.out`` (format in ``mmsae.examples``): per feature its top-K images by score (max or mean over the
image's tokens), activating images sampled across score quantiles, random images where it never fires,
its token and image frequencies and its max and mean activation; the per-token activation maps of every
kept image over all its views; heat-map PNGs; and, when the image set has planted concepts, the
ground-truth figures (``mmsae.groundtruth``).

Memory is bounded by features x K whatever the number of images (:class:`Miner`): each shard is encoded
in batches of whole images; a batch's [features x images] scores (a block of at most ``mine.max_block``)
are merged into running per-feature top-K tensors with ``torch.topk``; the quantile pool is a bottom-k
sample under a seeded hash of (feature, image), merged the same way, and the negatives come from a
bottom-k sample of images under a seeded hash of the image, so both are uniform and do not depend on how
the images fall into shards; token maps are kept only for (feature, image) pairs still held and are
purged when the pairs leave. A sealed artifact with the same config and inputs is not mined again.

Heat maps are rendered for the top images (``mmsae.heatmaps``): the overlays of one feature share a
scale (its largest activation on a patch token of those images), the masked renderings use each image's
own maximum.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mmsae import activations as A
from mmsae import examples as E
from mmsae import storage, tracking
from mmsae.config import MineConfig, RunConfig
from mmsae.stages.common import record_summary, stage_uri

log = logging.getLogger(__name__)

STEP = "mine"
MAP_COLUMNS = ("view", "row", "col", "token_pos")
"""Index columns of a shard that the maps keep (besides feature, image_idx and act)."""
_STORE = ("pidx", "cell", "token_pos", "act")
"""Row columns of the miner's map store. Each store entry also holds ``upair``: its distinct pairs (feature
position << 32 | image); a row's ``pidx`` points into them and ``cell`` packs its view, row and col. Membership
and ordering are decided per pair, not per row (a pair has tens of rows)."""
PURGE_GROWTH = 3
"""The map store is purged of pairs no longer held once it has grown this many times since the last purge."""
_NO_KEY = 1 << 62
"""Sentinel of an empty sample slot: larger than every hash key."""
_KEY_MASK = (1 << 62) - 1


class MineError(RuntimeError):
    """The mine stage cannot run on its inputs; the message names the input and what was expected."""


class SelectionError(ValueError):
    """A feature selection that does not follow the syntax of ``mine.select``."""


@dataclass(frozen=True)
class MineOutputs:
    uri: str
    figures: dict[str, Any]


def run(cfg: RunConfig, shards: str | None = None, sae: str | None = None,
        parent_run_id: str | None = None) -> MineOutputs:
    """Mine top examples; ``shards`` / ``sae`` override the config's URIs (the pipeline's inputs)."""
    m = cfg.mine.model_copy(update={
        "shards": shards or cfg.mine.shards or stage_uri(cfg.run.workdir, "cache"),
        "sae": sae or cfg.mine.sae or stage_uri(cfg.run.workdir, "train"),
        "out": cfg.mine.out or stage_uri(cfg.run.workdir, STEP),
    })
    with tracking.stage_run(
        STEP, parent_run_id=parent_run_id, config={"mine": m.model_dump(mode="json")},
        uri=cfg.tracking.uri, experiment=cfg.tracking.experiment, enabled=cfg.tracking.enabled,
    ) as tr:
        figures = _mine(m, tr)
        tr.log_metrics({k: v for k, v in figures.items() if isinstance(v, int | float) and not isinstance(v, bool)})
        record_summary(cfg.run.workdir, STEP, figures)
    return MineOutputs(m.out, figures)


# ---------------------------------------------------------------------------------------------------
# feature selection


@dataclass(frozen=True)
class Selection:
    """A parsed ``mine.select``: how later stages pick features from the mined ones."""

    how: str
    ids: tuple[int, ...] = ()
    low: float = 0.0
    high: float = 1.0
    n: int = 0


def parse_selection(how: str) -> Selection:
    """Parse ``all``, ``ids:3,17``, ``frequency:LO..HI``, ``most_active:N`` or ``random:N``."""
    text = how.strip()
    kind, _, arg = text.partition(":")
    try:
        if text == "all":
            return Selection("all")
        if kind == "ids" and arg:
            return Selection("ids", ids=tuple(int(x) for x in arg.split(",")))
        if kind == "frequency" and ".." in arg:
            lo, hi = (float(x) for x in arg.split("..", 1))
            if not 0 <= lo <= hi:
                raise ValueError(f"need 0 <= LO <= HI, got {lo}..{hi}")
            return Selection("frequency", low=lo, high=hi)
        if kind in ("most_active", "random") and arg:
            n = int(arg)
            if n < 0:
                raise ValueError("N must be >= 0")
            return Selection(kind, n=n)
    except ValueError as e:
        raise SelectionError(f"feature selection {how!r}: {e}") from None
    raise SelectionError(
        f"feature selection {how!r}: expected all, ids:3,17,42, frequency:LO..HI, most_active:N or random:N")


def select_features(records: Iterable[E.FeatureRecord], how: str | Selection, seed: int = 0) -> list[int]:
    """Feature ids picked from mined records, in ascending order.

    ``ids``: those of the ids that were mined; ``frequency:LO..HI``: token frequency within [LO, HI];
    ``most_active:N``: the N highest token frequencies (ties: lower id); ``random:N``: N drawn with ``seed``
    among the features with at least one activating image.
    """
    sel = parse_selection(how) if isinstance(how, str) else how
    recs = sorted(records, key=lambda r: r.feature)
    if sel.how == "all":
        out = [r.feature for r in recs]
    elif sel.how == "ids":
        mined = {r.feature for r in recs}
        missing = sorted(set(sel.ids) - mined)
        if missing:
            log.warning("selection asks for features %s that were not mined", missing[:20])
        out = sorted(set(sel.ids) & mined)
    elif sel.how == "frequency":
        out = [r.feature for r in recs if sel.low <= r.frequency <= sel.high]
    elif sel.how == "most_active":
        out = sorted(r.feature for r in sorted(recs, key=lambda r: (-r.frequency, r.feature))[: sel.n])
    else:
        alive = [r.feature for r in recs if r.image_frequency > 0]
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(alive), generator=g)[: sel.n].tolist()
        out = sorted(alive[i] for i in perm)
    return out


# ---------------------------------------------------------------------------------------------------
# the streaming miner


_SPLITMIX_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_SPLITMIX_M2 = 0x94D049BB133111EB - (1 << 64)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch shifts arithmetically)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps as in uint64), cut to 62 bits."""
    x = x ^ _shr(x, 30)
    x = x * _SPLITMIX_M1
    x = x ^ _shr(x, 27)
    x = x * _SPLITMIX_M2
    x = x ^ _shr(x, 31)
    return x & _KEY_MASK


@dataclass
class MineResult:
    """What :meth:`Miner.finish` returns: records by feature id, and the maps of the kept images."""

    records: list[E.FeatureRecord]
    maps: dict[str, torch.Tensor]
    tokens: int
    images: int
    peak_state_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Miner:
    """Running per-feature top-K, quantile pool, negatives, statistics and token maps over batches of images.

    Feed it the encoded tokens of whole images (:meth:`add`, or :meth:`add_shard` with an encoder), then
    call :meth:`finish`. A batch is reduced to its active (feature, image) pairs and their scores; only
    pairs that beat a feature's current K-th score (or sample key) are merged, through ``torch.topk`` over
    the features they touch. State: ``[F, K]`` top images, ``[F, R]`` quantile pool (R = pool x quantiles x
    examples), a pool of ``P`` random images with a ``[F, P]`` bit per (feature, image) saying whether it
    fired, per-feature statistics, and the token maps of the (feature, image) pairs currently held, purged
    whenever they have grown PURGE_GROWTH times since the last purge; none of it grows with the number of images.

    Samples are bottom-k samples under seeded hashes, so they are uniform and independent of how images fall
    into shards and batches: the quantile pool holds, per feature, the activating images with the lowest
    hash of (feature, image); the negative pool holds the ``P`` images with the lowest hash of the image, and a
    feature's negatives are the first ``n_random`` of them (in hash order) on which it never fires.
    """

    def __init__(self, num_latents: int, features: Sequence[int] | None = None, *, top_k: int = 10,
                 score: str = "max", n_quantiles: int = 5, quantile_examples: int = 1, quantile_pool: int = 2,
                 n_random: int = 5, negative_pool: int | None = None, seed: int = 0,
                 device: torch.device | str = "cpu", max_block: int = 2**22, purge_slack: int = 1 << 16,
                 image_labels: torch.Tensor | None = None):
        if score not in ("max", "mean"):
            raise ValueError(f"score {score!r}: expected 'max' or 'mean'")
        self.device = torch.device(device)
        dev = self.device
        self.num_latents = int(num_latents)
        if features:
            ids = torch.as_tensor(list(features), dtype=torch.int64)
            bad = ids[(ids < 0) | (ids >= num_latents)]
            if bad.numel():
                raise MineError(f"features {bad.tolist()[:10]} are out of range: the SAE has {num_latents} latents")
            if ids.unique().numel() != ids.numel():
                raise MineError("the features to mine name some ids twice")
            ids = ids.sort().values
            self.lut: torch.Tensor | None = torch.full((num_latents,), -1, dtype=torch.int64, device=dev)
            self.lut[ids.to(dev)] = torch.arange(len(ids), device=dev)
        else:
            ids = torch.arange(num_latents)
            self.lut = None
        self.ids = ids
        F = self.F = len(ids)
        self.K, self.score = int(top_k), score
        self.Q, self.per_q = int(n_quantiles), int(quantile_examples)
        self.R = self.Q * self.per_q * int(quantile_pool)
        self.NR = int(n_random)
        self.P = 0 if self.NR == 0 else int(negative_pool or max(64, 16 * self.NR))
        if self.P and self.P < self.NR:
            raise ValueError(f"negative_pool {self.P} is smaller than n_random {self.NR}")
        self.max_images = max(1, int(max_block) // F)
        self.purge_slack = int(purge_slack)
        self.top_score = torch.full((F, self.K), -math.inf, device=dev)
        self.top_image = torch.full((F, self.K), -1, dtype=torch.int64, device=dev)
        self.res_key = torch.full((F, self.R), _NO_KEY, dtype=torch.int64, device=dev)
        self.res_image = torch.full((F, self.R), -1, dtype=torch.int64, device=dev)
        self.res_score = torch.zeros((F, self.R), device=dev)
        self.pool_key = torch.full((self.P,), _NO_KEY, dtype=torch.int64, device=dev)
        self.pool_image = torch.full((self.P,), -1, dtype=torch.int64, device=dev)
        self.pool_fired = torch.zeros((F, self.P), dtype=torch.bool, device=dev)
        self.token_count = torch.zeros(F, dtype=torch.int64, device=dev)
        self.image_count = torch.zeros(F, dtype=torch.int64, device=dev)
        self.act_sum = torch.zeros(F, dtype=torch.float64, device=dev)
        self.act_max = torch.zeros(F, device=dev)
        # optional image labels (bool [images, C], by image_idx): per feature, the images of each label it fires on
        self.image_labels = None if image_labels is None else image_labels.to(dev, torch.bool)
        C = 0 if image_labels is None else int(image_labels.shape[1])
        self.label_hits = torch.zeros((F, C), dtype=torch.int64, device=dev)
        self.label_images = torch.zeros(C, dtype=torch.int64, device=dev)
        salt = (int(seed) % 2**31 + 1) * 0x632BE59BD9B4E019 % 2**62
        self._image_salt = salt
        self.fhash = _mix(ids.to(dev) * 2 + 1 + salt)
        self.store: list[dict[str, torch.Tensor]] = []
        self.stored_rows = 0
        self._rows_after_purge = 0
        self.tokens = 0
        self.images = 0
        self.peak_state_bytes = 0

    def image_keys(self, images: torch.Tensor) -> torch.Tensor:
        """The seeded hash of image ids that orders the negative pool."""
        return _mix(images * 2 + self._image_salt)

    # -- feeding ----------------------------------------------------------------------------------------

    def batches(self, cols: Mapping[str, torch.Tensor], batch_rows: int) -> Iterable[slice]:
        """Row slices of whole images, each at most ``batch_rows`` rows (or one image) and ``max_images`` images.

        ``cols["image_idx"]`` must be grouped by image (as shards are).
        """
        img = cols["image_idx"]
        if img.numel() == 0:
            return
        _, counts = torch.unique_consecutive(img, return_counts=True)
        ends = torch.cumsum(counts, 0)
        n_img = len(counts)
        i = 0
        while i < n_img:
            start = int(ends[i - 1]) if i else 0
            j = int(torch.searchsorted(ends, start + batch_rows, right=True))
            j = min(max(j, i + 1), i + self.max_images, n_img)
            yield slice(start, int(ends[j - 1]))
            i = j

    def add_shard(self, cols: Mapping[str, torch.Tensor], encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                  batch_rows: int = 8192) -> None:
        """Mine one shard's rows (already filtered to the tokens to mine) with ``encode(x) -> (acts, indices)``."""
        cols = _grouped(cols)
        if not bool((cols["image_idx"] < 2**31).all()):
            raise MineError("image indices must be below 2**31")
        for sl in self.batches(cols, batch_rows):
            part = {c: v[sl] for c, v in cols.items()}
            acts, idx = encode(part["acts"])
            self.add(acts, idx, part)

    @torch.no_grad()
    def add(self, top_acts: torch.Tensor, top_indices: torch.Tensor, cols: Mapping[str, torch.Tensor]) -> None:
        """Fold in the encoded rows ``[n, k]`` of whole images; ``cols`` holds image_idx, view, row, col, token_pos."""
        dev = self.device
        F = self.F
        img_rows = cols["image_idx"].to(dev)
        images, local = torch.unique(img_rows, return_inverse=True)  # sorted image ids, row -> 0..G-1
        G = len(images)
        if G == 0:
            return
        self.tokens += int(img_rows.numel())
        self.images += G
        vals = top_acts.to(dev).float()
        idx = top_indices.to(dev).long()
        pos = self.lut[idx] if self.lut is not None else idx
        er, ej = ((vals > 0) & (pos >= 0)).nonzero(as_tuple=True)
        f = pos[er, ej]
        v = vals[er, ej]
        g = local[er]
        self.token_count += torch.bincount(f, minlength=F)
        self.act_sum += torch.bincount(f, weights=v.double(), minlength=F)
        self.act_max.scatter_reduce_(0, f, v, reduce="amax")

        # the batch's active (feature, image) pairs, as flat keys f * G + g (at most max_block of them), and
        # their scores: scattered into a dense block, then read back where they are set
        flat = f * G + g
        dense = torch.zeros(F * G, device=dev)
        if self.score == "max":
            dense.scatter_reduce_(0, flat, v, reduce="amax")
        else:
            dense.index_add_(0, flat, v)
        pairs = dense.nonzero().squeeze(1)
        score = dense[pairs]
        pf, pg = pairs // G, pairs % G
        if self.score == "mean":
            score /= torch.bincount(local, minlength=G)[pg]
        self.image_count += torch.bincount(pf, minlength=F)
        if self.image_labels is not None:
            self._count_labels(images, pf, pg)
        ikeys = self.image_keys(images)
        kept = [self._merge_top(pf, pg, score, images)]
        if self.R:
            kept.append(self._merge_pool(pf, pg, score, images, ikeys))
        if self.P:
            self._merge_negative_pool(pf, pg, images, ikeys)
        self._keep_maps(torch.cat(kept), flat, er, f, v, images, g, cols)
        self.peak_state_bytes = max(self.peak_state_bytes, self.state_bytes())

    def _count_labels(self, images: torch.Tensor, pf: torch.Tensor, pg: torch.Tensor) -> None:
        n = self.image_labels.shape[0]
        if int(images[-1]) >= n:  # images are sorted
            raise MineError(f"image {int(images[-1])} has no labels: the image set's labels cover {n} images")
        lab = self.image_labels[images]  # [G, C]
        self.label_images += lab.sum(0)
        self.label_hits.index_add_(0, pf, lab[pg].to(torch.int64))

    @staticmethod
    def _rows(pf: torch.Tensor, pg: torch.Tensor, cand: torch.Tensor, G: int, fill, *values: torch.Tensor):
        """The features of the candidate pairs and, per value, a ``[features, G]`` matrix of it (``fill`` elsewhere)."""
        rows, r = torch.unique(pf[cand], return_inverse=True)
        g = pg[cand]
        mats = []
        for val, fv in zip(values, fill, strict=True):
            mat = torch.full((len(rows), G), fv, dtype=val.dtype, device=val.device)
            mat[r, g] = val[cand]
            mats.append(mat)
        return rows, mats

    def _merge_top(self, pf, pg, score, images) -> torch.Tensor:
        G, K = len(images), self.K
        cand = score > self.top_score[pf, -1]
        if not bool(cand.any()):
            return pf[:0]
        rows, (mat,) = self._rows(pf, pg, cand, G, (-math.inf,), score)
        best, at = torch.cat([self.top_score[rows], mat], 1).topk(K, dim=1)
        old = at < K
        img = torch.where(old, self.top_image[rows].gather(1, at.clamp(max=K - 1)), images[(at - K).clamp(min=0)])
        img[best == -math.inf] = -1
        self.top_score[rows] = best
        self.top_image[rows] = img
        rr, cc = (~old & (img >= 0)).nonzero(as_tuple=True)
        return rows[rr] * G + (at[rr, cc] - K)

    def _merge_pool(self, pf, pg, score, images, ikeys) -> torch.Tensor:
        G, R = len(images), self.R
        keys = _mix(self.fhash[pf] ^ ikeys[pg])
        cand = keys < self.res_key[pf, -1]
        if not bool(cand.any()):
            return pf[:0]
        rows, (kmat, smat) = self._rows(pf, pg, cand, G, (_NO_KEY, 0.0), keys, score)
        low, at = torch.cat([self.res_key[rows], kmat], 1).topk(R, dim=1, largest=False)
        old = at < R
        new_at = (at - R).clamp(min=0)
        img = torch.where(old, self.res_image[rows].gather(1, at.clamp(max=R - 1)), images[new_at])
        img[low == _NO_KEY] = -1
        self.res_score[rows] = torch.where(old, self.res_score[rows].gather(1, at.clamp(max=R - 1)),
                                           smat.gather(1, new_at))
        self.res_key[rows] = low
        self.res_image[rows] = img
        rr, cc = (~old & (img >= 0)).nonzero(as_tuple=True)
        return rows[rr] * G + new_at[rr, cc]

    def _merge_negative_pool(self, pf, pg, images, ikeys) -> None:
        cand = (ikeys < self.pool_key[-1]).nonzero().squeeze(1)
        if cand.numel() == 0:
            return
        P = self.P
        low, at = torch.cat([self.pool_key, ikeys[cand]]).topk(P, largest=False)
        # which features fire on the entering images: a column per candidate image
        col = torch.full((len(images),), -1, dtype=torch.int64, device=self.device)
        col[cand] = torch.arange(len(cand), device=self.device)
        fired_new = torch.zeros((self.F, len(cand)), dtype=torch.bool, device=self.device)
        hit = col[pg] >= 0
        fired_new[pf[hit], col[pg[hit]]] = True
        self.pool_fired = torch.cat([self.pool_fired, fired_new], 1)[:, at]
        self.pool_image = torch.cat([self.pool_image, images[cand]])[at]
        self.pool_image[low == _NO_KEY] = -1
        self.pool_key = low

    def _keep_maps(self, kept, flat, er, f, v, images, g, cols) -> None:
        """Store the active tokens of the (feature, image) pairs of this batch that the samples now hold."""
        if kept.numel() == 0:
            return
        G = len(images)
        ukeys = torch.unique(kept)  # the held pairs' flat keys (a pair may enter the top and the pool)
        slot = torch.full((self.F * G,), -1, dtype=torch.int32, device=self.device)
        slot[ukeys] = torch.arange(len(ukeys), dtype=torch.int32, device=self.device)
        pidx = slot[flat]
        sel = (pidx >= 0).nonzero().squeeze(1)  # once: every boolean-mask index would search the mask again
        rows_kept = er[sel].cpu()
        entry = {"upair": ((ukeys // G) << 32 | images[ukeys % G]).cpu(), "pidx": pidx[sel].cpu(),
                 "cell": _pack_cell(cols, rows_kept), "token_pos": cols["token_pos"][rows_kept], "act": v[sel].cpu()}
        self.store.append(entry)
        self.stored_rows += int(rows_kept.numel())
        if self.stored_rows > PURGE_GROWTH * self._rows_after_purge + self.purge_slack:
            self.purge()

    # -- bookkeeping ------------------------------------------------------------------------------------

    def _held_keys(self, quantile_images: torch.Tensor | None = None) -> torch.Tensor:
        """``feature_position << 32 | image`` of every pair whose maps are kept."""
        parts = [self.top_image, quantile_images if quantile_images is not None else self.res_image]
        keys = []
        for held in parts:
            pos = torch.arange(self.F, device=held.device)[:, None].expand_as(held)
            ok = held >= 0
            keys.append((pos[ok] << 32) | held[ok])
        return torch.cat(keys).cpu()

    def _stored(self) -> dict[str, torch.Tensor]:
        """The store as one entry (``pidx`` offset into the concatenated ``upair``)."""
        if not self.store:
            return {"upair": torch.zeros(0, dtype=torch.int64), "pidx": torch.zeros(0, dtype=torch.int32),
                    "cell": torch.zeros(0, dtype=torch.int64), "token_pos": torch.zeros(0, dtype=torch.int32),
                    "act": torch.zeros(0)}
        if len(self.store) == 1:
            return self.store[0]
        offsets = np.cumsum([0] + [len(e["upair"]) for e in self.store[:-1]]).tolist()
        out = {c: torch.cat([e[c] for e in self.store]) for c in _STORE if c != "pidx"}
        out["upair"] = torch.cat([e["upair"] for e in self.store])
        out["pidx"] = torch.cat([e["pidx"] + off for e, off in zip(self.store, offsets, strict=True)])
        return out

    def _held_rows(self, quantile_images: torch.Tensor | None = None):
        """The store as one entry, which of its pairs are held, and the rows of those pairs."""
        cols = self._stored()
        ok = _member(cols["upair"], self._held_keys(quantile_images))
        return cols, ok, ok[cols["pidx"]].nonzero().squeeze(1)

    def purge(self, quantile_images: torch.Tensor | None = None) -> None:
        """Drop the stored tokens of pairs no longer held."""
        cols, ok, keep = self._held_rows(quantile_images)
        renumber = torch.cumsum(ok, 0, dtype=torch.int32) - 1
        entry = {c: cols[c][keep] for c in _STORE if c != "pidx"}
        self.store = [{**entry, "upair": cols["upair"][ok], "pidx": renumber[cols["pidx"][keep]]}]
        self.stored_rows = self._rows_after_purge = int(keep.numel())

    def state_bytes(self) -> int:
        """Bytes held by the running state (samples, statistics and stored maps)."""
        fixed = sum(t.numel() * t.element_size() for t in (
            self.top_score, self.top_image, self.res_key, self.res_image, self.res_score, self.pool_key,
            self.pool_image, self.pool_fired, self.token_count, self.image_count, self.act_sum, self.act_max,
            self.label_hits))
        return fixed + sum(t.numel() * t.element_size() for s in self.store for t in s.values())

    # -- results ----------------------------------------------------------------------------------------

    def finish(self) -> MineResult:
        """Records by feature id (quantiles chosen from the pool) and the maps of the top and quantile images."""
        # the records are many small acyclic objects: the cyclic collector would only rescan the heap
        with _gc_paused():
            return self._finish()

    def _finish(self) -> MineResult:
        top_s, top_i = self.top_score.tolist(), self.top_image.tolist()
        q_image, q_score, q_bucket = self._quantile_table()
        negatives = self._negatives()
        tok, imgs = self.token_count.tolist(), self.image_count.tolist()
        s_sum, s_max = self.act_sum.tolist(), self.act_max.tolist()
        ids = self.ids.tolist()
        width = max(1, self.Q * self.per_q)
        qi, qs, qb = q_image.tolist(), q_score.tolist(), q_bucket.tolist()
        records = []
        for p in range(self.F):
            top = [{"image_idx": i, "score": s} for i, s in zip(top_i[p], top_s[p], strict=True) if i >= 0]
            quantiles = [{"image_idx": i, "score": s, "quantile": q}
                         for i, s, q in zip(qi[p], qs[p], qb[p], strict=True) if i >= 0]
            n_tok = tok[p]
            records.append(E.FeatureRecord(
                feature=ids[p],
                frequency=n_tok / self.tokens if self.tokens else 0.0,
                image_frequency=imgs[p] / self.images if self.images else 0.0,
                max_activation=s_max[p],
                mean_activation=s_sum[p] / n_tok if n_tok else 0.0,
                top=top, quantiles=quantiles, negatives=negatives[p],
            ))
        quant_rows = q_image if self.Q else torch.full((self.F, width), -1, dtype=torch.int64)
        cols, ok, keep = self._held_rows(quant_rows.to(self.device))
        # by feature, image, token position: the held pairs' rank in (feature, image) order, then the position
        held_pairs = ok.nonzero().squeeze(1)
        rank = torch.full((len(ok),), -1, dtype=torch.int64)
        rank[held_pairs[torch.argsort(cols["upair"][held_pairs])]] = torch.arange(len(held_pairs))
        pidx = cols["pidx"][keep]
        order = keep[torch.sort(rank[pidx] << 32 | cols["token_pos"][keep].to(torch.int64), stable=True).indices]
        pair = cols["upair"][cols["pidx"][order]]
        view, row, col = _unpack_cell(cols["cell"][order])
        maps = {"feature": self.ids[pair >> 32], "image_idx": pair & 0xFFFFFFFF, "view": view, "row": row,
                "col": col, "token_pos": cols["token_pos"][order], "act": cols["act"][order]}
        maps = {c: maps[c].to(E.MAP_DTYPES[c]) for c in E.MAP_DTYPES}
        self.store = []
        extra = {}
        if self.image_labels is not None:
            extra = {"label_hits": self.label_hits.cpu(), "label_images": self.label_images.cpu(),
                     "image_count": self.image_count.cpu()}
        return MineResult(records, maps, self.tokens, self.images, self.peak_state_bytes, extra)

    def _negatives(self) -> list[list[int]]:
        """Per feature, the first ``n_random`` pool images (in hash order) on which it never fired."""
        if self.P == 0:
            return [[] for _ in range(self.F)]
        ok = (~self.pool_fired) & (self.pool_image >= 0)[None, :]
        # rank of each usable pool image within its feature's row; keep the first NR
        take = ok & (torch.cumsum(ok.to(torch.int32), 1) <= self.NR)
        images = self.pool_image.tolist()
        return [[images[j] for j in row] for row in _row_indices(take)]

    def _quantile_table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per feature, the quantile examples, as ``[F, Q * per_q]`` image, score and quantile (image -1: none).

        From the pool (a uniform sample of activating images), drop the top images, order the rest by (score,
        image, key), cut them into Q equal-count buckets (bucket q holds positions ``q*n//Q .. (q+1)*n//Q``)
        and take the ``per_q`` images with the lowest hash keys of each, in (quantile, key) order.
        """
        F, R, Q, width = self.F, self.R, self.Q, self.Q * self.per_q
        if Q == 0:
            empty = torch.zeros((F, 0))
            return empty.long(), empty, empty.long()
        key, img, score = self.res_key.cpu(), self.res_image.cpu(), self.res_score.cpu()
        top = self.top_image.cpu()
        valid = (key < _NO_KEY) & ~(img[:, :, None] == top[:, None, :]).any(-1)

        def by(order: torch.Tensor, values: torch.Tensor) -> torch.Tensor:  # stable re-sort of an order by values
            return order.gather(1, torch.argsort(values.gather(1, order), dim=1, stable=True))

        order = torch.argsort(key, dim=1, stable=True)
        order = by(order, img)
        order = by(order, torch.where(valid, score, math.inf))  # invalid entries last
        n = valid.sum(1, keepdim=True)
        j = torch.arange(R)[None, :]
        bounds = torch.arange(Q)[None, :] * n // Q  # [F, Q]: first position of each bucket
        bucket = torch.where(j < n, (bounds[:, None, :] <= j[:, :, None]).sum(-1) - 1, Q)  # [F, R], Q: none
        # within a bucket, by key: re-sort the positions by key, then (stably) by bucket
        k_at = key.gather(1, order)
        pos = torch.argsort(k_at, dim=1, stable=True)
        pos = pos.gather(1, torch.argsort(bucket.gather(1, pos), dim=1, stable=True))
        b = bucket.gather(1, pos)
        rank = j - torch.searchsorted(b.contiguous(), b.contiguous())  # rank within the bucket
        take = (b < Q) & (rank < self.per_q)
        slot = torch.where(take, torch.cumsum(take, 1) - 1, width)  # packed to the left, in (bucket, key) order
        src = order.gather(1, pos)
        out_img = torch.full((F, width + 1), -1, dtype=torch.int64)
        out_score = torch.zeros((F, width + 1))
        out_q = torch.zeros((F, width + 1), dtype=torch.int64)
        out_img.scatter_(1, slot, torch.where(take, img.gather(1, src), -1))
        out_score.scatter_(1, slot, score.gather(1, src))
        out_q.scatter_(1, slot, b)
        return out_img[:, :width], out_score[:, :width], out_q[:, :width]


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _pack_cell(cols: Mapping[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """view, row and col of the given rows in one int64 (16 bits each, offset to be non-negative)."""
    v, r, c = (cols[k][rows].to(torch.int64) + 32768 for k in ("view", "row", "col"))
    return v << 32 | r << 16 | c


def _unpack_cell(cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ((cell >> 32) - 32768, ((cell >> 16) & 0xFFFF) - 32768, (cell & 0xFFFF) - 32768)


def _member(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Bool mask of the elements of ``x`` found in ``keys`` (binary search in the sorted keys: no sort of ``x``)."""
    if keys.numel() == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    keys = torch.sort(keys).values
    at = torch.searchsorted(keys, x).clamp_(max=keys.numel() - 1)
    return keys[at] == x


def _row_indices(mask: torch.Tensor) -> list[list[int]]:
    """Per row of a bool matrix, the column indices that are set."""
    rr, cc = mask.nonzero(as_tuple=True)
    counts = torch.bincount(rr, minlength=mask.shape[0]).tolist()
    flat = cc.tolist()
    out, start = [], 0
    for n in counts:
        out.append(flat[start : start + n])
        start += n
    return out


def _grouped(cols: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The columns with rows grouped by image (a stable sort when they are not already in order)."""
    img = cols["image_idx"]
    if img.numel() > 1 and not bool((img[1:] >= img[:-1]).all()):
        order = torch.argsort(img, stable=True)
        return {c: v[order] for c, v in cols.items()}
    return dict(cols)


# ---------------------------------------------------------------------------------------------------
# the stage


def _device(m: MineConfig) -> torch.device:
    if m.device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(m.device)


def resolve_sae(m: MineConfig, shards: A.ActivationShards) -> tuple[str, str]:
    """(SAE folder, hook point) to mine: ``mine.sae`` itself when it is one SAE folder, else
    ``<sae>/[<variant>/]<hookpoint>`` of the train stage's output."""
    from mmsae.sae.checkpoint import CFG_FILENAME

    hp = m.hookpoint or shards.hookpoints[0]
    if hp not in shards.hookpoints:
        raise MineError(f"hook point {hp!r} is not in the shards at {m.shards}; they hold {shards.hookpoints}")
    if storage.exists(storage.join(m.sae, CFG_FILENAME)):
        return m.sae, hp
    variant = m.variant
    try:
        sealed = storage.read_manifest(m.sae, kind="sae")
        names = sorted({v.get("name", "") for v in sealed.extra.get("variants", [])})
    except (FileNotFoundError, storage.ManifestError):
        names = []
    if not variant and len(names) > 1:
        raise MineError(f"the SAEs at {m.sae} are a sweep of {names}; choose one with mine.variant")
    path = storage.join(m.sae, *([variant] if variant else []), hp)
    if not storage.exists(storage.join(path, CFG_FILENAME)):
        raise MineError(f"no SAE for hook point {hp!r} at {path} (expected {CFG_FILENAME} and sae.safetensors "
                        f"in sparsify's layout)")
    return path, hp


def _shard_images(shards: A.ActivationShards) -> dict[int, tuple[int, int]]:
    """image_idx -> (width, height) from the shards' images.json."""
    if "images.json" not in shards.manifest.files:
        raise MineError(f"the shards at {shards.uri} have no images.json listing image sizes")
    data = json.loads(storage.read_verified_bytes(shards.uri, "images.json", shards.manifest))
    return {int(i): (int(w), int(h)) for i, w, h in data["images"]}


def inputs_fingerprint(m: MineConfig) -> str | None:
    """sha256 of the inputs' manifests (shards, and the SAE's when it has one): it changes when an input is
    rewritten at the same URI. None when the shards have no manifest."""
    import hashlib

    digest = hashlib.sha256()
    for uri in (m.shards, m.sae):
        name = storage.join(uri, storage.MANIFEST_NAME)
        if storage.exists(name):
            digest.update(storage.read_bytes(name))
        elif uri == m.shards:
            return None
    return digest.hexdigest()


def _mine(m: MineConfig, tr) -> dict[str, Any]:
    try:
        sealed = storage.read_manifest(m.out, kind=E.KIND)
    except (FileNotFoundError, storage.ManifestError):
        sealed = None
    fingerprint = inputs_fingerprint(m)
    if sealed is not None:
        if (sealed.config == {"mine": m.model_dump(mode="json")} and fingerprint is not None
                and sealed.extra.get("inputs_fingerprint") == fingerprint):
            log.info("top examples already mined at %s", m.out)
            return dict(sealed.extra["figures"])
        log.info("%s holds top examples of another config or other inputs: replacing them", m.out)
        storage.delete(storage.join(m.out, storage.MANIFEST_NAME))
        for name in sealed.files:
            storage.delete(storage.join(m.out, name))

    try:
        shards = A.ActivationShards(m.shards)
    except (FileNotFoundError, storage.ManifestError) as e:
        raise MineError(f"no activation shards at {m.shards}: {e}") from e
    sae_path, hp = resolve_sae(m, shards)
    from mmsae.sae.checkpoint import load_sae

    device = _device(m)
    sae = load_sae(sae_path, device=device, dtype=m.dtype)
    if sae.d_in != shards.dim(hp):
        raise MineError(f"the SAE at {sae_path} takes inputs of width {sae.d_in}, but the activations of {hp} at "
                        f"{m.shards} have width {shards.dim(hp)}")
    sizes = _shard_images(shards)
    image_set = shards.manifest.inputs.get("image_set", "")
    split = (shards.manifest.config or {}).get("cache", {}).get("split")
    model = shards.manifest.inputs.get("model", "")
    family = str(shards.manifest.extra.get("family", ""))
    need_images = m.heatmaps != "none"
    ds = info = None
    if need_images or image_set:
        if not image_set:
            raise MineError(f"the shards at {m.shards} name no image set, which heat maps need; "
                            "set mine.heatmaps=none")
        from mmsae.data.images import load_image_set

        ds = load_image_set(image_set, split)
        if model:
            from mmsae.heatmaps import load_patch_info

            info = load_patch_info(model, family or None)
        elif need_images:
            raise MineError(f"the shards at {m.shards} name no model, whose image geometry heat maps need; "
                            "set mine.heatmaps=none")

    labels, concept_names = None, []
    if ds is not None:
        from mmsae import groundtruth as GT

        if GT.has_ground_truth(ds):
            concept_names, labels = GT.concept_labels(ds["concepts"])
    miner = Miner(sae.num_latents, m.features or None, top_k=m.top_k, score=m.score, n_quantiles=m.n_quantiles,
                  quantile_examples=m.quantile_examples, quantile_pool=m.quantile_pool, n_random=m.n_random,
                  seed=m.seed, device=device, max_block=m.max_block, image_labels=labels)

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = sae.encode(x.to(device, sae.dtype))
        return out.top_acts, out.top_indices

    t0 = time.perf_counter()
    refs = shards.shards(hp)
    bar = tqdm(total=len(refs), desc="mine", unit="shard")
    with torch.inference_mode():
        for n, ref in enumerate(refs, start=1):
            cols = shards.read(ref)
            keep = A.token_mask(cols, m.tokens)
            miner.add_shard({c: v[keep] for c, v in cols.items()}, encode, m.batch_rows)
            dt = time.perf_counter() - t0
            tr.log_metrics({"tokens_per_s": miner.tokens / dt, "images": miner.images,
                            "state_mib": miner.state_bytes() / 2**20}, step=n)
            bar.update(1)
    bar.close()
    if miner.tokens == 0:
        raise MineError(f"the shards at {m.shards} hold no {m.tokens} tokens for hook point {hp!r}")
    result = miner.finish()
    seconds = time.perf_counter() - t0
    selected = select_features(result.records, m.select, m.seed)

    files: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def put(name: str, data: bytes) -> None:
        storage.write_bytes(storage.join(m.out, name), data)
        with lock:
            files[name] = {"sha256": _sha256(data), "bytes": len(data)}

    put(E.FEATURES_FILE, "".join(json.dumps(r.to_json()) + "\n" for r in result.records).encode())
    put(E.MAPS_FILE, E.encode_maps(result.maps))
    referenced = sorted({t["image_idx"] for r in result.records for t in r.top}
                        | {q["image_idx"] for r in result.records for q in r.quantiles}
                        | {i for r in result.records for i in r.negatives})
    put(E.IMAGES_FILE, json.dumps({str(i): {"width": sizes[i][0], "height": sizes[i][1]} for i in referenced},
                                  sort_keys=True).encode())

    alive = sum(1 for r in result.records if r.top)
    figures: dict[str, Any] = {
        "features_mined": len(result.records),
        "features_alive": alive,
        "dead_pct": 100.0 * (1 - alive / len(result.records)) if result.records else 0.0,
        "features_selected": len(selected),
        "images": result.images,
        "tokens": result.tokens,
        "tokens_per_s": result.tokens / seconds if seconds > 0 else 0.0,
        "map_rows": int(result.maps["feature"].numel()),
        "peak_state_mib": result.peak_state_bytes / 2**20,
    }
    if not m.features:  # every latent mined: the frequencies add up to the mean number active per token
        figures["mean_l0"] = float(sum(r.frequency for r in result.records))

    index = _pair_index(result.maps)

    def tokens_of(feature: int, image: int) -> dict[str, np.ndarray]:
        s, e = index.get((feature, image), (0, 0))
        return {c: v[s:e].numpy() for c, v in result.maps.items()}

    if need_images:
        chosen = set(selected)
        which = result.records if m.heatmaps == "mined" else [r for r in result.records if r.feature in chosen]
        written = _render_heatmaps(which, ds, sizes, info, tokens_of, m, put)
        figures["heatmaps"] = written

    if labels is not None:
        detectors = GT.best_detectors(result.extra["label_hits"], result.extra["image_count"],
                                      result.extra["label_images"], concept_names, miner.ids.tolist())
        matches = GT.concept_matches(
            result.records, ds["concepts"], top_k=m.top_k, tokens_of=tokens_of, mask_of=GT.mask_reader(ds),
            info=info, image_ids=sorted(sizes), threshold=m.gt_iou_threshold, detectors=detectors)
        gt_fig = GT.summarize(matches, m.gt_kinds)
        figures.update(gt_fig)
        gt_rows = {"kinds": list(m.gt_kinds), "threshold": m.gt_iou_threshold, "iou": GT.IOU_METHOD,
                   "figures": gt_fig, "concepts": [x.to_json() for x in matches]}
        put(E.GROUND_TRUTH_FILE, json.dumps(gt_rows, indent=2).encode())

    storage.write_manifest(
        m.out, E.KIND, files=files, config={"mine": m.model_dump(mode="json")},
        inputs={"sae": m.sae, "shards": m.shards, "image_set": image_set}, format_version=E.FORMAT_VERSION,
        extra={"hookpoint": hp, "family": family, "num_latents": sae.num_latents, "k": sae.cfg.k,
               "score": m.score, "top_k": m.top_k, "n_quantiles": m.n_quantiles, "n_random": m.n_random,
               "features": [r.feature for r in result.records], "selected": selected, "figures": figures,
               "sae_path": sae_path, "tokens": m.tokens, "inputs_fingerprint": fingerprint},
    )
    log.info("mined %d features at %s: %s", len(result.records), m.out, figures)
    return figures


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _pair_index(maps: Mapping[str, torch.Tensor]) -> dict[tuple[int, int], tuple[int, int]]:
    """(feature, image_idx) -> row range of the maps (sorted by feature, image)."""
    f = maps["feature"].numpy().astype(np.int64)
    img = maps["image_idx"].numpy()
    if len(f) == 0:
        return {}
    change = np.flatnonzero((np.diff(f) != 0) | (np.diff(img) != 0)) + 1
    starts = np.concatenate([[0], change]).tolist()
    ends = np.concatenate([change, [len(f)]]).tolist()
    return {(int(f[s]), int(img[s])): (s, e) for s, e in zip(starts, ends, strict=True)}


def _render_heatmaps(records: Sequence[E.FeatureRecord], ds, sizes: Mapping[int, tuple[int, int]], info,
                     tokens_of, m: MineConfig, put: Callable[[str, bytes], None]) -> int:
    """Overlay and masked PNGs of the top images of ``records``; returns the number of files written."""
    from PIL import Image

    from mmsae.heatmaps import activation_map, png_bytes, render_masked, render_overlay

    images = ds.select_columns(["image"])

    @lru_cache(maxsize=512)
    def image(i: int) -> Image.Image:
        img = images[i]["image"].convert("RGB")
        if img.size != sizes[i]:
            raise MineError(f"image {i} of the image set is {img.size} (width, height), but the shards recorded "
                            f"{sizes[i]}: the image set is not the one that was cached")
        return img

    jobs = [(r, rank, t["image_idx"]) for r in records for rank, t in enumerate(r.top[: m.heatmap_top])]
    # the overlays of one feature share a scale: its largest activation on a drawable (patch) token
    vmax: dict[int, float] = {}
    for rec, _, i in jobs:
        t = tokens_of(rec.feature, i)
        drawn = t["act"][t["view"] >= 0]
        vmax[rec.feature] = max(vmax.get(rec.feature, 0.0), float(drawn.max()) if drawn.size else 0.0)

    def one(job) -> int:
        rec, rank, i = job
        img = image(i)
        heat = activation_map(tokens_of(rec.feature, i), (img.height, img.width), info)
        put(E.heatmap_name(rec.feature, "overlay", rank, i),
            png_bytes(render_overlay(img, heat, vmax[rec.feature] or None)))
        put(E.heatmap_name(rec.feature, "masked", rank, i), png_bytes(render_masked(img, heat)))
        return 2

    # rendering releases the GIL in torch and Pillow, and writes to S3 wait on the network: overlap them
    workers = max(1, min(8, 2 * (os.cpu_count() or 1)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return sum(tqdm(pool.map(one, jobs), total=len(jobs), desc="heat maps", unit="image"))

