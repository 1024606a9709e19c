"""The activation-shard format: what the cache stage writes and the train and mine stages read.

An activation-shard artifact is a directory (local or ``s3://``)::

    manifest.json                                  kind "activation_shards", written last
    <hookpoint>/shard-RRR-NNNNN.safetensors        rank RRR's shard NNNNN of one hook point
    progress-RRR.json                              rank RRR's resume point (removed when the artifact is sealed)
    progress-RRR/NNNNN.json                        the images of rank RRR's shard set NNNNN (removed likewise)
    images.json                                    per image: dataset row, width, height (and the skipped ones)
    images.bin                                     the same rows as a binary table (see `ImageTable`)

The manifest names the inputs (``image_set``, ``model``) and records in ``extra`` the hook points, their
widths, the dtype, the split of the image set and the prompt the images were given with (``split``,
``prompt``): what the stages that read the shards need to find the images and run the model as it was run.

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

import numpy as np
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


IMAGES_FILE = "images.json"
IMAGE_TABLE_FILE = "images.bin"
IMAGE_TABLE_ROW = np.dtype("<i8")
"""``images.bin`` holds one row of three little-endian int64 (image_idx, width, height) per cached image,
ascending by image_idx: row r lies at bytes ``[24 r, 24 r + 24)``."""


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


class ImageTable:
    """Image sizes by image_idx over a sorted ``[n, 3]`` int64 table: 24 bytes an image, no per-image object."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __contains__(self, image_idx: int) -> bool:
        return self._row(image_idx) is not None

    def __getitem__(self, image_idx: int) -> tuple[int, int]:
        row = self._row(image_idx)
        if row is None:
            raise KeyError(f"image {image_idx} was not cached")
        return int(self.rows[row, 1]), int(self.rows[row, 2])

    def _row(self, image_idx: int) -> int | None:
        row = int(np.searchsorted(self.rows[:, 0], image_idx))
        return row if row < len(self) and int(self.rows[row, 0]) == image_idx else None

    def ids(self) -> np.ndarray:
        """Every cached image_idx, ascending."""
        return self.rows[:, 0]


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
        self.image_set: str = self.manifest.inputs.get("image_set", "")
        """URI of the image set the activations were taken over ('' when not recorded)."""
        self.model: str = self.manifest.inputs.get("model", "")
        """URI of the LMM the activations were taken from ('' when not recorded)."""
        cache_config = (self.manifest.config or {}).get("cache", {})
        self.split: str | None = extra.get("split", cache_config.get("split"))
        """Split of the image set that was cached (None: its default split)."""
        self.prompt: str | None = extra.get("prompt", cache_config.get("prompt"))
        """The text the images were given with (None when not recorded: the model's own prompt)."""
        self._shards: dict[str, list[ShardRef]] = {
            h: [ShardRef(h, s["name"], s["rows"], s["first_image"], s["end_image"], s.get("nonfinite"))
                for s in extra["shards"][h]]
            for h in self.hookpoints
        }

    def image_sizes(self) -> ImageTable:
        """The (width, height) of every cached image, by image_idx (read from ``images.bin``, whose rows are
        looked up by binary search; shards written before it existed fall back to ``images.json``)."""
        if IMAGE_TABLE_FILE in self.manifest.files:
            data = storage.read_verified_bytes(self.uri, IMAGE_TABLE_FILE, self.manifest)
            return ImageTable(np.frombuffer(data, dtype=IMAGE_TABLE_ROW).reshape(-1, 3))
        if IMAGES_FILE not in self.manifest.files:
            raise ShardFormatError(f"the shards at {self.uri} list no image sizes ({IMAGE_TABLE_FILE} or "
                                   f"{IMAGES_FILE})")
        rows = json.loads(storage.read_verified_bytes(self.uri, IMAGES_FILE, self.manifest))["images"]
        return ImageTable(np.asarray(rows, dtype=IMAGE_TABLE_ROW).reshape(-1, 3))

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


def token_mask(cols: dict[str, torch.Tensor], tokens: str) -> torch.Tensor:
    """Rows of the chosen kind: 'image' (every image token), 'text', or 'all'."""
    if tokens == "all":
        return torch.ones_like(cols["view"], dtype=torch.bool)
    is_text = cols["view"] == VIEW_TEXT
    return ~is_text if tokens == "image" else is_text
