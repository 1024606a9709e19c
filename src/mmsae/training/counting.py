"""The held-out split, and exact counts of the rows a run trains on, from the shards' index columns alone.

Held-out images are chosen by a seeded hash of their image index (:func:`heldout_images`). The learning-rate
schedule's length is the number of batches the stream yields
(:meth:`mmsae.training.stream.BatchStream.total_steps`), which these counts give exactly: per shard, the
rows of the trained token kind whose image is not held out. Only the byte ranges of the columns a count
needs are read (the safetensors header, then ``image_idx`` and ``view``), never the activations; with
every token kind trained on and nothing held out the manifest's row counts suffice and nothing is read.
The same pass counts the images and the held-out images.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from mmsae import storage
from mmsae.activations import ActivationShards, ShardFormatError, ShardRef, token_mask

READERS = 8
"""Shards whose index columns are read at once (small ranged reads: latency, not bandwidth, bounds them)."""
_HEADER_GUESS = 16_384
"""Bytes read first: the 8-byte header length and, for shards of a few columns, the whole header."""
_DTYPES = {"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}


def heldout_images(image_idx: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Bool mask: rows whose image is held out (a seeded hash of the image index, stable across runs)."""
    if fraction <= 0:
        return torch.zeros_like(image_idx, dtype=torch.bool)
    h = (image_idx.to(torch.int64) * 0x9E3779B1 + (seed + 1) * 0x85EBCA77) % 1_000_003
    return h < int(fraction * 1_000_003)


@dataclass(frozen=True)
class RowCounts:
    """What a run's shards hold for it: rows trained on per shard (manifest order), images, held-out images
    (the image counts are None with a held-out fraction of 0: then no image index is read)."""

    kept: list[int]
    images: int | None
    heldout_images: int | None


def count_rows(shards: ActivationShards, hookpoint: str, tokens: str, heldout_fraction: float, seed: int, *,
               rank: int = 0, world: int = 1, group: Any = None) -> RowCounts:
    """Count the rows of ``hookpoint``'s shards that are trained on; with a ``group`` of ``world`` ranks
    each rank reads every ``world``-th shard and the counts are summed over the group."""
    refs = shards.shards(hookpoint)
    columns = (("image_idx",) if heldout_fraction > 0 else ()) + (("view",) if tokens != "all" else ())
    if not columns:
        return RowCounts([ref.rows for ref in refs], None, None)

    def count(ref: ShardRef) -> tuple[int, int, int]:
        cols = read_index_columns(shards, ref, columns)
        keep = token_mask(cols, tokens) if "view" in cols else torch.ones(ref.rows, dtype=torch.bool)
        if "image_idx" not in cols:
            return int(keep.sum()), 0, 0
        held = heldout_images(cols["image_idx"], heldout_fraction, seed)
        images = torch.unique(cols["image_idx"])
        return (int((keep & ~held).sum()), int(images.numel()),
                int(heldout_images(images, heldout_fraction, seed).sum()))

    mine = list(range(rank, len(refs), world)) if group is not None else list(range(len(refs)))
    totals = torch.zeros(len(refs) + 2, dtype=torch.int64)
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        for s, (kept, images, held) in zip(mine, pool.map(lambda s: count(refs[s]), mine), strict=True):
            totals[s] += kept
            totals[-2] += images
            totals[-1] += held
    if group is not None:
        torch.distributed.all_reduce(totals, group=group)
    counted = totals.tolist()
    if "image_idx" not in columns:
        return RowCounts(counted[:-2], None, None)
    return RowCounts(counted[:-2], counted[-2], counted[-1])


def read_index_columns(shards: ActivationShards, ref: ShardRef,
                       names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The index columns ``names`` of one shard, read as byte ranges of its safetensors file (no checksum:
    the stream checks each shard when it reads the whole)."""
    uri = storage.join(shards.uri, ref.name)
    head = storage.read_range(uri, 0, _HEADER_GUESS)
    if len(head) < 8:
        raise ShardFormatError(f"{uri} is not a safetensors shard (it holds {len(head)} bytes)")
    header_end = 8 + int.from_bytes(head[:8], "little")
    if header_end > len(head):
        head += storage.read_range(uri, len(head), header_end)
    try:
        header = json.loads(head[8:header_end])
    except ValueError as e:
        raise ShardFormatError(f"{uri} has no readable safetensors header: {e}") from e
    out = {}
    for name in names:
        entry = header.get(name)
        if entry is None or entry.get("dtype") not in _DTYPES or entry.get("shape") != [ref.rows]:
            raise ShardFormatError(f"{uri}: column {name} is {entry}; expected {ref.rows} integers, as the "
                                   f"manifest lists")
        begin, end = entry["data_offsets"]
        data = bytearray(storage.read_range(uri, header_end + begin, header_end + end))
        dtype = _DTYPES[entry["dtype"]]
        out[name] = torch.frombuffer(data, dtype=dtype) if data else torch.zeros(0, dtype=dtype)
    return out
