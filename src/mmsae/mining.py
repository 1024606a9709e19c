"""The streaming miner: per SAE feature, its top images, sampled images, statistics and token maps.

Memory is bounded by features x K whatever the number of images (:class:`Miner`): the encoded tokens of
whole images come in batches; a batch's [features x images] scores (a block of at most ``mine.max_block``)
are merged into running per-feature top-K tensors with ``torch.topk``; the quantile pool is a bottom-k
sample under a seeded hash of (feature, image), merged the same way, and the negatives come from a bottom-k
sample of images under a seeded hash of the image, so both are uniform and do not depend on how the images
fall into shards or batches; token maps are kept only for (feature, image) pairs still held and are purged
when the pairs leave. Each feature's activations are counted in a histogram (:mod:`mmsae.histogram`).
Codes holding NaN or inf are refused (:class:`NonFiniteCodesError`): they would rank first.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mmsae.config import MineConfig
from mmsae.examples import MAP_DTYPES, FeatureRecord
from mmsae.histogram import DoublingHistogram

Encoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``encode(x) -> (top_acts, top_indices)``, each ``[rows, k]``."""

ROW_COLUMNS = ("pair_index", "cell", "token_pos", "act")
"""Row columns of the miner's map store. Each store entry also holds ``pairs``: its distinct pairs (feature
position << 32 | image); a row's ``pair_index`` points into them and ``cell`` packs its view, row and col.
Membership and ordering are decided per pair, not per row (a pair has tens of rows)."""
PURGE_GROWTH = 3
"""The map store is purged of pairs no longer held once it has grown this many times since the last purge."""
PURGE_SLACK = 1 << 16
"""Rows the map store may hold beyond ``PURGE_GROWTH`` times its size after the last purge."""
EMPTY_KEY = 1 << 62
"""Sentinel of an empty sample slot: larger than every hash key."""
KEY_MASK = (1 << 62) - 1
HISTOGRAM_BINS = 32
"""Bins of each feature's activation histogram (linear over [0, a power of two above its maximum))."""
_SPLITMIX_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_SPLITMIX_M2 = 0x94D049BB133111EB - (1 << 64)


class MineError(RuntimeError):
    """Mining cannot run on its inputs; the message names the input and what was expected."""


class NonFiniteCodesError(MineError):
    """Encoded activations holding NaN or inf (from non-finite inputs, or an SAE that overflowed)."""


def negative_pool_size(n_random: int) -> int:
    """Images in the seeded sample that negatives are drawn from: ``max(64, 16 * n_random)`` (0: none)."""
    return 0 if n_random == 0 else max(64, 16 * n_random)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch shifts arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps as in uint64), cut to 62 bits."""
    x = x ^ _shift_right(x, 30)
    x = x * _SPLITMIX_M1
    x = x ^ _shift_right(x, 27)
    x = x * _SPLITMIX_M2
    x = x ^ _shift_right(x, 31)
    return x & KEY_MASK


@dataclass
class MineResult:
    """What :meth:`Miner.finish` returns: records by feature id, and the maps of the kept images."""

    records: list[FeatureRecord]
    maps: dict[str, torch.Tensor]
    tokens: int
    images: int
    peak_state_bytes: int = 0
    label_counts: dict[str, torch.Tensor] = field(default_factory=dict)
    """With image labels: ``label_hits`` [features, labels], ``label_images`` [labels], ``image_count``."""


@dataclass(frozen=True)
class _BatchPairs:
    """A batch's active (feature position, image) pairs with their scores, and the batch's images."""

    feature: torch.Tensor
    image: torch.Tensor
    """Position of the pair's image in ``images``."""
    score: torch.Tensor
    images: torch.Tensor
    """The batch's image ids, sorted."""
    image_keys: torch.Tensor

    @property
    def n_images(self) -> int:
        return len(self.images)


class Miner:
    """Running per-feature top-K, quantile pool, negatives, statistics and token maps over batches of images.

    Feed it the encoded tokens of whole images (:meth:`add`, or :meth:`add_shard` with an encoder), then
    call :meth:`finish`. A batch is reduced to its active (feature, image) pairs and their scores; only
    pairs that beat a feature's current K-th score (or sample key) are merged, through ``torch.topk`` over
    the features they touch. State: ``[features, top_k]`` top images, a ``[features, quantile_pool_size]``
    quantile pool (pool x quantiles x examples), a pool of ``negative_pool_size`` random images with a bit per
    (feature, image) saying whether it fired, per-feature statistics, and the token maps of the (feature,
    image) pairs currently held, purged whenever they have grown PURGE_GROWTH times since the last purge;
    none of it grows with the number of images.

    Samples are bottom-k samples under seeded hashes, so they are uniform and independent of how images fall
    into shards and batches: the quantile pool holds, per feature, the activating images with the lowest
    hash of (feature, image); the negative pool holds the images with the lowest hash of the image, and a
    feature's negatives are the first ``n_random`` of them (in hash order) on which it never fires.
    """

    def __init__(self, num_latents: int, features: Sequence[int] | None, *, top_k: int, score: str,
                 n_quantiles: int, quantile_examples: int, quantile_pool: int, n_random: int,
                 negative_pool_size: int, seed: int, max_block: int, device: torch.device | str,
                 image_labels: torch.Tensor | None = None, purge_slack: int = PURGE_SLACK):
        if score not in ("max", "mean"):
            raise ValueError(f"score {score!r}: expected 'max' or 'mean'")
        if n_random and negative_pool_size < n_random:
            raise ValueError(f"negative pool of {negative_pool_size} images is smaller than n_random {n_random}")
        self.device = torch.device(device)
        self.num_latents = int(num_latents)
        self._set_features(features)
        self.top_k, self.score = int(top_k), score
        self.n_quantiles, self.quantile_examples = int(n_quantiles), int(quantile_examples)
        self.quantile_pool_size = self.n_quantiles * self.quantile_examples * int(quantile_pool)
        self.n_random = int(n_random)
        self.negative_pool_size = int(negative_pool_size) if self.n_random else 0
        self.max_images_per_batch = max(1, int(max_block) // self.num_features)
        self.purge_slack = int(purge_slack)
        self._allocate_state(image_labels)
        self._image_salt = (int(seed) % 2**31 + 1) * 0x632BE59BD9B4E019 % 2**62
        self.feature_hash = splitmix(self.feature_ids.to(self.device) * 2 + 1 + self._image_salt)
        self.map_store: list[dict[str, torch.Tensor]] = []
        self.stored_rows = 0
        self._rows_after_purge = 0
        self.tokens = 0
        self.images = 0
        self.peak_state_bytes = 0

    @classmethod
    def from_config(cls, m: MineConfig, num_latents: int, device: torch.device | str = "cpu",
                    image_labels: torch.Tensor | None = None, purge_slack: int = PURGE_SLACK) -> Miner:
        """A miner with the settings of ``mine`` (its features, samples, score, seed and block size)."""
        return cls(num_latents, m.features or None, top_k=m.top_k, score=m.score, n_quantiles=m.n_quantiles,
                   quantile_examples=m.quantile_examples, quantile_pool=m.quantile_pool, n_random=m.n_random,
                   negative_pool_size=negative_pool_size(m.n_random), seed=m.seed, max_block=m.max_block,
                   device=device, image_labels=image_labels, purge_slack=purge_slack)

    def _set_features(self, features: Sequence[int] | None) -> None:
        """``feature_ids`` (sorted) and ``position_of`` (latent id -> position, -1: not mined; None: all)."""
        if not features:
            self.feature_ids = torch.arange(self.num_latents)
            self.position_of: torch.Tensor | None = None
        else:
            ids = torch.as_tensor(list(features), dtype=torch.int64)
            bad = ids[(ids < 0) | (ids >= self.num_latents)]
            if bad.numel():
                raise MineError(f"features {bad.tolist()[:10]} are out of range: the SAE has {self.num_latents} "
                                f"latents")
            if ids.unique().numel() != ids.numel():
                raise MineError("the features to mine name some ids twice")
            self.feature_ids = ids.sort().values
            self.position_of = torch.full((self.num_latents,), -1, dtype=torch.int64, device=self.device)
            self.position_of[self.feature_ids.to(self.device)] = torch.arange(len(ids), device=self.device)
        self.num_features = len(self.feature_ids)

    def _allocate_state(self, image_labels: torch.Tensor | None) -> None:
        device, n = self.device, self.num_features
        self.top_score = torch.full((n, self.top_k), -math.inf, device=device)
        self.top_image = torch.full((n, self.top_k), -1, dtype=torch.int64, device=device)
        pool = self.quantile_pool_size
        self.quantile_key = torch.full((n, pool), EMPTY_KEY, dtype=torch.int64, device=device)
        self.quantile_image = torch.full((n, pool), -1, dtype=torch.int64, device=device)
        self.quantile_score = torch.zeros((n, pool), device=device)
        negatives = self.negative_pool_size
        self.negative_key = torch.full((negatives,), EMPTY_KEY, dtype=torch.int64, device=device)
        self.negative_image = torch.full((negatives,), -1, dtype=torch.int64, device=device)
        self.negative_fired = torch.zeros((n, negatives), dtype=torch.bool, device=device)
        self.token_count = torch.zeros(n, dtype=torch.int64, device=device)
        self.image_count = torch.zeros(n, dtype=torch.int64, device=device)
        self.act_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.act_max = torch.zeros(n, device=device)
        self.histogram = DoublingHistogram(n, HISTOGRAM_BINS, device)
        # optional image labels (bool [images, labels], by image_idx): per feature, the images of each label it
        # fires on
        self.image_labels = None if image_labels is None else image_labels.to(device, torch.bool)
        n_labels = 0 if image_labels is None else int(image_labels.shape[1])
        self.label_hits = torch.zeros((n, n_labels), dtype=torch.int64, device=device)
        self.label_images = torch.zeros(n_labels, dtype=torch.int64, device=device)

    def image_keys(self, images: torch.Tensor) -> torch.Tensor:
        """The seeded hash of image ids that orders the negative pool."""
        return splitmix(images * 2 + self._image_salt)

    # -- feeding ----------------------------------------------------------------------------------------

    def batches(self, cols: Mapping[str, torch.Tensor], batch_rows: int) -> Iterable[slice]:
        """Row slices of whole images, each at most ``batch_rows`` rows (or one image) and
        ``max_images_per_batch`` images. ``cols["image_idx"]`` must be grouped by image (as shards are)."""
        image_of_row = cols["image_idx"]
        if image_of_row.numel() == 0:
            return
        _, counts = torch.unique_consecutive(image_of_row, return_counts=True)
        ends = torch.cumsum(counts, 0)
        n_images = len(counts)
        first = 0
        while first < n_images:
            start = int(ends[first - 1]) if first else 0
            end = int(torch.searchsorted(ends, start + batch_rows, right=True))
            end = min(max(end, first + 1), first + self.max_images_per_batch, n_images)
            yield slice(start, int(ends[end - 1]))
            first = end

    def add_shard(self, cols: Mapping[str, torch.Tensor], encode: Encoder, batch_rows: int) -> None:
        """Mine one shard's rows (already filtered to the tokens to mine), encoded by ``encode`` in batches of
        whole images of at most ``batch_rows`` rows."""
        cols = _grouped(cols)
        if not bool((cols["image_idx"] < 2**31).all()):
            raise MineError("image indices must be below 2**31")
        for rows in self.batches(cols, batch_rows):
            part = {name: column[rows] for name, column in cols.items()}
            acts, indices = encode(part["acts"])
            self.add(acts, indices, part)

    @torch.no_grad()
    def add(self, top_acts: torch.Tensor, top_indices: torch.Tensor, cols: Mapping[str, torch.Tensor]) -> None:
        """Fold in the encoded rows ``[n, k]`` of whole images; ``cols`` holds image_idx, view, row, col, token_pos."""
        device, n_features = self.device, self.num_features
        image_of_row = cols["image_idx"].to(device)
        images, image_pos_of_row = torch.unique(image_of_row, return_inverse=True)  # sorted ids, row -> position
        n_images = len(images)
        if n_images == 0:
            return
        values = top_acts.to(device).float()
        finite = torch.isfinite(values).all(1)
        if not bool(finite.all()):
            raise NonFiniteCodesError(f"{int((~finite).sum())} of {len(finite)} encoded rows hold NaN or inf")
        self.tokens += int(image_of_row.numel())
        self.images += n_images
        latents = top_indices.to(device).long()
        positions = self.position_of[latents] if self.position_of is not None else latents
        code_row, code_slot = ((values > 0) & (positions >= 0)).nonzero(as_tuple=True)
        feature = positions[code_row, code_slot]  # the active codes: feature position, activation, image position
        act = values[code_row, code_slot]
        self.token_count += torch.bincount(feature, minlength=n_features)
        self.act_sum += torch.bincount(feature, weights=act.double(), minlength=n_features)
        self.act_max.scatter_reduce_(0, feature, act, reduce="amax")
        self.histogram.add(feature, act)

        # the batch's active (feature, image) pairs, as flat keys feature * n_images + image (at most max_block
        # of them), and their scores: scattered into a dense block, then read back where they are set
        flat_key = feature * n_images + image_pos_of_row[code_row]
        dense = torch.zeros(n_features * n_images, device=device)
        if self.score == "max":
            dense.scatter_reduce_(0, flat_key, act, reduce="amax")
        else:
            dense.index_add_(0, flat_key, act)
        active = dense.nonzero().squeeze(1)
        score = dense[active]
        pair_image = active % n_images
        if self.score == "mean":
            score /= torch.bincount(image_pos_of_row, minlength=n_images)[pair_image]
        pairs = _BatchPairs(active // n_images, pair_image, score, images, self.image_keys(images))
        self.image_count += torch.bincount(pairs.feature, minlength=n_features)
        if self.image_labels is not None:
            self._count_labels(pairs)
        kept = [self._merge_top(pairs)]
        if self.quantile_pool_size:
            kept.append(self._merge_quantile_pool(pairs))
        if self.negative_pool_size:
            self._merge_negative_pool(pairs)
        self._keep_maps(torch.cat(kept), flat_key, code_row, act, images, cols)
        self.peak_state_bytes = max(self.peak_state_bytes, self.state_bytes())

    def _count_labels(self, pairs: _BatchPairs) -> None:
        n = self.image_labels.shape[0]
        if int(pairs.images[-1]) >= n:  # images are sorted
            raise MineError(f"image {int(pairs.images[-1])} has no labels: the image set's labels cover {n} images")
        labels = self.image_labels[pairs.images]  # [images, labels]
        self.label_images += labels.sum(0)
        self.label_hits.index_add_(0, pairs.feature, labels[pairs.image].to(torch.int64))

    @staticmethod
    def _candidate_matrices(pairs: _BatchPairs, candidate: torch.Tensor, fills: Sequence[Any],
                            *values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The features of the candidate pairs and, per value, a ``[features, images]`` matrix of it (the
        value's ``fills`` entry elsewhere)."""
        rows, row_of_pair = torch.unique(pairs.feature[candidate], return_inverse=True)
        image = pairs.image[candidate]
        matrices = []
        for value, fill in zip(values, fills, strict=True):
            matrix = torch.full((len(rows), pairs.n_images), fill, dtype=value.dtype, device=value.device)
            matrix[row_of_pair, image] = value[candidate]
            matrices.append(matrix)
        return rows, matrices

    def _merge_top(self, pairs: _BatchPairs) -> torch.Tensor:
        """Merge the pairs that beat a feature's K-th score; the flat keys of those now held."""
        k = self.top_k
        candidate = pairs.score > self.top_score[pairs.feature, -1]
        if not bool(candidate.any()):
            return pairs.feature[:0]
        rows, (scores,) = self._candidate_matrices(pairs, candidate, (-math.inf,), pairs.score)
        best, at = torch.cat([self.top_score[rows], scores], 1).topk(k, dim=1)
        was_held = at < k
        image = torch.where(was_held, self.top_image[rows].gather(1, at.clamp(max=k - 1)),
                            pairs.images[(at - k).clamp(min=0)])
        image[best == -math.inf] = -1
        self.top_score[rows] = best
        self.top_image[rows] = image
        entered_row, entered_col = (~was_held & (image >= 0)).nonzero(as_tuple=True)
        return rows[entered_row] * pairs.n_images + (at[entered_row, entered_col] - k)

    def _merge_quantile_pool(self, pairs: _BatchPairs) -> torch.Tensor:
        """Merge the pairs whose (feature, image) hash is below a feature's largest pool key; the flat keys
        of those now held."""
        size = self.quantile_pool_size
        keys = splitmix(self.feature_hash[pairs.feature] ^ pairs.image_keys[pairs.image])
        candidate = keys < self.quantile_key[pairs.feature, -1]
        if not bool(candidate.any()):
            return pairs.feature[:0]
        rows, (key_matrix, score_matrix) = self._candidate_matrices(pairs, candidate, (EMPTY_KEY, 0.0), keys,
                                                                    pairs.score)
        lowest, at = torch.cat([self.quantile_key[rows], key_matrix], 1).topk(size, dim=1, largest=False)
        was_held = at < size
        held_at = at.clamp(max=size - 1)
        new_at = (at - size).clamp(min=0)
        image = torch.where(was_held, self.quantile_image[rows].gather(1, held_at), pairs.images[new_at])
        image[lowest == EMPTY_KEY] = -1
        self.quantile_score[rows] = torch.where(was_held, self.quantile_score[rows].gather(1, held_at),
                                                score_matrix.gather(1, new_at))
        self.quantile_key[rows] = lowest
        self.quantile_image[rows] = image
        entered_row, entered_col = (~was_held & (image >= 0)).nonzero(as_tuple=True)
        return rows[entered_row] * pairs.n_images + new_at[entered_row, entered_col]

    def _merge_negative_pool(self, pairs: _BatchPairs) -> None:
        """Merge the batch's images whose hash is below the pool's largest key, with the features firing on them."""
        candidate = (pairs.image_keys < self.negative_key[-1]).nonzero().squeeze(1)
        if candidate.numel() == 0:
            return
        lowest, at = torch.cat([self.negative_key, pairs.image_keys[candidate]]).topk(self.negative_pool_size,
                                                                                      largest=False)
        # which features fire on the entering images: a column per candidate image
        column = torch.full((pairs.n_images,), -1, dtype=torch.int64, device=self.device)
        column[candidate] = torch.arange(len(candidate), device=self.device)
        fired = torch.zeros((self.num_features, len(candidate)), dtype=torch.bool, device=self.device)
        hit = column[pairs.image] >= 0
        fired[pairs.feature[hit], column[pairs.image[hit]]] = True
        self.negative_fired = torch.cat([self.negative_fired, fired], 1)[:, at]
        self.negative_image = torch.cat([self.negative_image, pairs.images[candidate]])[at]
        self.negative_image[lowest == EMPTY_KEY] = -1
        self.negative_key = lowest

    def _keep_maps(self, kept: torch.Tensor, flat_key: torch.Tensor, code_row: torch.Tensor, act: torch.Tensor,
                   images: torch.Tensor, cols: Mapping[str, torch.Tensor]) -> None:
        """Store the active tokens of the (feature, image) pairs of this batch that the samples now hold."""
        if kept.numel() == 0:
            return
        n_images = len(images)
        held = torch.unique(kept)  # the held pairs' flat keys (a pair may enter the top and the pool)
        index_of_key = torch.full((self.num_features * n_images,), -1, dtype=torch.int32, device=self.device)
        index_of_key[held] = torch.arange(len(held), dtype=torch.int32, device=self.device)
        pair_index = index_of_key[flat_key]
        chosen = (pair_index >= 0).nonzero().squeeze(1)  # once: every boolean-mask index would search the mask
        rows = code_row[chosen].cpu()
        entry = {"pairs": ((held // n_images) << 32 | images[held % n_images]).cpu(),
                 "pair_index": pair_index[chosen].cpu(), "cell": _pack_cell(cols, rows),
                 "token_pos": cols["token_pos"][rows], "act": act[chosen].cpu()}
        self.map_store.append(entry)
        self.stored_rows += int(rows.numel())
        if self.stored_rows > PURGE_GROWTH * self._rows_after_purge + self.purge_slack:
            self.purge()

    # -- bookkeeping ------------------------------------------------------------------------------------

    def _held_keys(self, quantile_images: torch.Tensor | None = None) -> torch.Tensor:
        """``feature_position << 32 | image`` of every pair whose maps are kept."""
        keys = []
        for held in (self.top_image, self.quantile_image if quantile_images is None else quantile_images):
            position = torch.arange(self.num_features, device=held.device)[:, None].expand_as(held)
            present = held >= 0
            keys.append((position[present] << 32) | held[present])
        return torch.cat(keys).cpu()

    def _stored(self) -> dict[str, torch.Tensor]:
        """The store as one entry (``pair_index`` offset into the concatenated ``pairs``)."""
        if not self.map_store:
            return {"pairs": torch.zeros(0, dtype=torch.int64), "pair_index": torch.zeros(0, dtype=torch.int32),
                    "cell": torch.zeros(0, dtype=torch.int64), "token_pos": torch.zeros(0, dtype=torch.int32),
                    "act": torch.zeros(0)}
        if len(self.map_store) == 1:
            return self.map_store[0]
        offsets = np.cumsum([0] + [len(e["pairs"]) for e in self.map_store[:-1]]).tolist()
        out = {c: torch.cat([e[c] for e in self.map_store]) for c in ROW_COLUMNS if c != "pair_index"}
        out["pairs"] = torch.cat([e["pairs"] for e in self.map_store])
        out["pair_index"] = torch.cat([e["pair_index"] + offset
                                       for e, offset in zip(self.map_store, offsets, strict=True)])
        return out

    def _held_rows(self, quantile_images: torch.Tensor | None = None):
        """The store as one entry, which of its pairs are held, and the rows of those pairs."""
        stored = self._stored()
        held = _member(stored["pairs"], self._held_keys(quantile_images))
        return stored, held, held[stored["pair_index"]].nonzero().squeeze(1)

    def purge(self, quantile_images: torch.Tensor | None = None) -> None:
        """Drop the stored tokens of pairs no longer held."""
        stored, held, keep = self._held_rows(quantile_images)
        renumber = torch.cumsum(held, 0, dtype=torch.int32) - 1
        entry = {c: stored[c][keep] for c in ROW_COLUMNS if c != "pair_index"}
        self.map_store = [{**entry, "pairs": stored["pairs"][held], "pair_index": renumber[stored["pair_index"][keep]]}]
        self.stored_rows = self._rows_after_purge = int(keep.numel())

    def map_store_bytes(self) -> int:
        """Bytes held by the stored token maps."""
        return sum(t.numel() * t.element_size() for entry in self.map_store for t in entry.values())

    def state_bytes(self) -> int:
        """Bytes held by the running state (samples, statistics and stored maps)."""
        fixed = sum(t.numel() * t.element_size() for t in (
            self.top_score, self.top_image, self.quantile_key, self.quantile_image, self.quantile_score,
            self.negative_key, self.negative_image, self.negative_fired, self.token_count, self.image_count,
            self.act_sum, self.act_max, self.label_hits))
        return fixed + self.histogram.nbytes() + self.map_store_bytes()

    # -- results ----------------------------------------------------------------------------------------

    def finish(self) -> MineResult:
        """Records by feature id (quantiles chosen from the pool) and the maps of the top and quantile images."""
        # the records are many small acyclic objects: the cyclic collector would only rescan the heap
        with _gc_paused():
            quantile_image, quantile_score, quantile_bucket = self._quantile_table()
            records = self._records(quantile_image, quantile_score, quantile_bucket)
            if not self.n_quantiles:
                quantile_image = torch.full((self.num_features, 1), -1, dtype=torch.int64)
            maps = self._held_maps(quantile_image.to(self.device))
        label_counts = {}
        if self.image_labels is not None:
            label_counts = {"label_hits": self.label_hits.cpu(), "label_images": self.label_images.cpu(),
                            "image_count": self.image_count.cpu()}
        return MineResult(records, maps, self.tokens, self.images, self.peak_state_bytes, label_counts)

    def _records(self, quantile_image: torch.Tensor, quantile_score: torch.Tensor,
                 quantile_bucket: torch.Tensor) -> list[FeatureRecord]:
        top_score, top_image = self.top_score.tolist(), self.top_image.tolist()
        negatives = self._negatives()
        token_count, image_count = self.token_count.tolist(), self.image_count.tolist()
        act_sum, act_max = self.act_sum.tolist(), self.act_max.tolist()
        histogram, upper = self.histogram.counts.tolist(), self.histogram.upper().tolist()
        q_image, q_score, q_bucket = quantile_image.tolist(), quantile_score.tolist(), quantile_bucket.tolist()
        records = []
        for p, feature in enumerate(self.feature_ids.tolist()):
            top = [{"image_idx": i, "score": s} for i, s in zip(top_image[p], top_score[p], strict=True) if i >= 0]
            quantiles = [{"image_idx": i, "score": s, "quantile": q}
                         for i, s, q in zip(q_image[p], q_score[p], q_bucket[p], strict=True) if i >= 0]
            tokens = token_count[p]
            records.append(FeatureRecord(
                feature=feature,
                frequency=tokens / self.tokens if self.tokens else 0.0,
                image_frequency=image_count[p] / self.images if self.images else 0.0,
                max_activation=act_max[p],
                mean_activation=act_sum[p] / tokens if tokens else 0.0,
                top=top, quantiles=quantiles, negatives=negatives[p],
                histogram=histogram[p], histogram_upper=upper[p],
            ))
        return records

    def _held_maps(self, quantile_images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored tokens of the held pairs, by feature, image and token position; empties the store."""
        stored, held, keep = self._held_rows(quantile_images)
        # the held pairs' rank in (feature, image) order, then the token position
        held_pairs = held.nonzero().squeeze(1)
        rank = torch.full((len(held),), -1, dtype=torch.int64)
        rank[held_pairs[torch.argsort(stored["pairs"][held_pairs])]] = torch.arange(len(held_pairs))
        pair_index = stored["pair_index"][keep]
        sort_key = rank[pair_index] << 32 | stored["token_pos"][keep].to(torch.int64)
        order = keep[torch.sort(sort_key, stable=True).indices]
        pair = stored["pairs"][stored["pair_index"][order]]
        view, row, col = _unpack_cell(stored["cell"][order])
        maps = {"feature": self.feature_ids[pair >> 32], "image_idx": pair & 0xFFFFFFFF, "view": view, "row": row,
                "col": col, "token_pos": stored["token_pos"][order], "act": stored["act"][order]}
        self.map_store = []
        return {c: maps[c].to(MAP_DTYPES[c]) for c in MAP_DTYPES}

    def _negatives(self) -> list[list[int]]:
        """Per feature, the first ``n_random`` pool images (in hash order) on which it never fired."""
        if self.negative_pool_size == 0:
            return [[] for _ in range(self.num_features)]
        usable = (~self.negative_fired) & (self.negative_image >= 0)[None, :]
        # rank of each usable pool image within its feature's row; keep the first n_random
        take = usable & (torch.cumsum(usable.to(torch.int32), 1) <= self.n_random)
        images = self.negative_image.tolist()
        return [[images[j] for j in row] for row in _row_indices(take)]

    def _quantile_table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per feature, the quantile examples, as ``[features, n_quantiles * quantile_examples]`` image, score
        and quantile (image -1: none).

        From the pool (a uniform sample of activating images), drop the top images, order the rest by (score,
        image, key), cut them into n_quantiles equal-count buckets (bucket q holds positions ``q*n//Q ..
        (q+1)*n//Q``) and take the ``quantile_examples`` images with the lowest hash keys of each, in
        (quantile, key) order.
        """
        n_features, size, n_buckets = self.num_features, self.quantile_pool_size, self.n_quantiles
        width = n_buckets * self.quantile_examples
        if n_buckets == 0:
            empty = torch.zeros((n_features, 0))
            return empty.long(), empty, empty.long()
        key, image, score = self.quantile_key.cpu(), self.quantile_image.cpu(), self.quantile_score.cpu()
        top = self.top_image.cpu()
        valid = (key < EMPTY_KEY) & ~(image[:, :, None] == top[:, None, :]).any(-1)

        def by(order: torch.Tensor, values: torch.Tensor) -> torch.Tensor:  # stable re-sort of an order by values
            return order.gather(1, torch.argsort(values.gather(1, order), dim=1, stable=True))

        order = torch.argsort(key, dim=1, stable=True)
        order = by(order, image)
        order = by(order, torch.where(valid, score, math.inf))  # invalid entries last
        n_valid = valid.sum(1, keepdim=True)
        position = torch.arange(size)[None, :]
        bounds = torch.arange(n_buckets)[None, :] * n_valid // n_buckets  # [features, buckets]: first positions
        bucket = torch.where(position < n_valid, (bounds[:, None, :] <= position[:, :, None]).sum(-1) - 1,
                             n_buckets)  # [features, size]; n_buckets: none
        # within a bucket, by key: re-sort the positions by key, then (stably) by bucket
        by_key = torch.argsort(key.gather(1, order), dim=1, stable=True)
        by_key = by_key.gather(1, torch.argsort(bucket.gather(1, by_key), dim=1, stable=True))
        bucket_at = bucket.gather(1, by_key).contiguous()
        rank = position - torch.searchsorted(bucket_at, bucket_at)  # rank within the bucket
        take = (bucket_at < n_buckets) & (rank < self.quantile_examples)
        slot = torch.where(take, torch.cumsum(take, 1) - 1, width)  # packed to the left, in (bucket, key) order
        source = order.gather(1, by_key)
        out_image = torch.full((n_features, width + 1), -1, dtype=torch.int64)
        out_score = torch.zeros((n_features, width + 1))
        out_bucket = torch.zeros((n_features, width + 1), dtype=torch.int64)
        out_image.scatter_(1, slot, torch.where(take, image.gather(1, source), -1))
        out_score.scatter_(1, slot, score.gather(1, source))
        out_bucket.scatter_(1, slot, bucket_at)
        return out_image[:, :width], out_score[:, :width], out_bucket[:, :width]


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
    view, row, col = (cols[k][rows].to(torch.int64) + 32768 for k in ("view", "row", "col"))
    return view << 32 | row << 16 | col


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
    rows, cols = mask.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=mask.shape[0]).tolist()
    flat, ends = cols.tolist(), np.cumsum(counts).tolist()
    return [flat[end - n : end] for n, end in zip(counts, ends, strict=True)]


def _grouped(cols: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The columns with rows grouped by image (a stable sort when they are not already in order)."""
    image_of_row = cols["image_idx"]
    if image_of_row.numel() > 1 and not bool((image_of_row[1:] >= image_of_row[:-1]).all()):
        order = torch.argsort(image_of_row, stable=True)
        return {c: v[order] for c, v in cols.items()}
    return dict(cols)
