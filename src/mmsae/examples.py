"""The top-examples artifact: what the mine stage writes and the explain, score and report stages read.

A top-examples artifact is a directory (local or ``s3://``)::

    manifest.json          kind "top_examples", format 2 (format 1, without histograms and logit tokens,
                           is still read), written last. inputs: sae, shards, image_set.
                           extra: hookpoint, family, num_latents, k, score ("max" | "mean"), top_k,
                           n_quantiles, n_random, features (the mined ids), selected (the ids later stages
                           take), figures (headline numbers), heatmap_max_side
    features.jsonl         one object per mined feature, by feature id: feature, frequency (share of tokens
                           where it is active), image_frequency (share of images where it is active on at
                           least one token), max_activation, mean_activation (over active tokens),
                           top [{image_idx, score}] (descending, at most top_k), quantiles [{image_idx, score,
                           quantile}] (activating images outside the top, sampled per score quantile, quantile
                           0 the lowest), negatives [image_idx] (random images where it never fires),
                           histogram [counts] (its nonzero activations per token in equal bins over
                           [0, histogram_upper); histogram_upper a power of two above max_activation, 0
                           when it never fired), promoted and suppressed [{token, logit}] (the tokens its
                           decoder direction raises and lowers most through the LMM's unembedding, highest
                           first and lowest first; empty when not computed, see mmsae.unembed)
    maps.safetensors       flat columns feature int32, image_idx int64, view int16, row int16, col int16,
                           token_pos int32, act float32: every token (every view: base image 0, AnyRes tile
                           i >= 1, image newline -2) of every kept (top or quantile) image where that
                           feature's activation is non-zero; sorted by feature, image_idx, token_pos
    images.json            {"<image_idx>": {"width", "height"}} for every image referenced
    heatmaps/f{feature:06d}/{kind}-{rank:02d}-{image_idx}.png
                           kind "overlay" (magnitude over the image) or "masked" (inactive regions darkened),
                           rank the image's place in the feature's top list; at most heatmap_max_side
                           pixels on the long side (aspect ratio kept; smaller images at their own size)
    ground_truth.json      only for image sets with planted concepts (the toy world): per concept its
                           best-matching feature, top-K precision and IoU (see mmsae.groundtruth)

:class:`TopExamples` reads one (checksums verified on every read).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mmsae import storage

__all__ = [
    "FEATURES_FILE",
    "FORMAT_VERSION",
    "GROUND_TRUTH_FILE",
    "HEATMAP_KINDS",
    "IMAGES_FILE",
    "KIND",
    "MAPS_FILE",
    "MAP_DTYPES",
    "READABLE_VERSIONS",
    "FeatureNotMinedError",
    "FeatureRecord",
    "TopExamples",
    "TopExamplesError",
    "decode_maps",
    "encode_maps",
    "heatmap_name",
]

KIND = "top_examples"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Format versions :class:`TopExamples` reads (version 1 lacks histograms and logit tokens)."""
FEATURES_FILE = "features.jsonl"
MAPS_FILE = "maps.safetensors"
IMAGES_FILE = "images.json"
HEATMAP_DIR = "heatmaps"
GROUND_TRUTH_FILE = "ground_truth.json"
HEATMAP_KINDS = ("overlay", "masked")
MAP_DTYPES: dict[str, torch.dtype] = {
    "feature": torch.int32,
    "image_idx": torch.int64,
    "view": torch.int16,
    "row": torch.int16,
    "col": torch.int16,
    "token_pos": torch.int32,
    "act": torch.float32,
}
"""The columns of ``maps.safetensors`` and their dtypes."""

_HEATMAP_RE = re.compile(r"^heatmaps/f(\d{6,})/(overlay|masked)-(\d{2,})-(\d+)\.png$")


class TopExamplesError(ValueError):
    """A top-examples artifact that does not follow the format; the message names the file."""


class FeatureNotMinedError(TopExamplesError, KeyError):
    """A feature id that the artifact does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def heatmap_name(feature: int, kind: str, rank: int, image_idx: int) -> str:
    """File name (relative to the artifact) of a heat map."""
    if kind not in HEATMAP_KINDS:
        raise ValueError(f"heat-map kind {kind!r}; expected one of {HEATMAP_KINDS}")
    return f"{HEATMAP_DIR}/f{feature:06d}/{kind}-{rank:02d}-{image_idx}.png"


@dataclass
class FeatureRecord:
    """One line of ``features.jsonl``; ``top`` and ``quantiles`` entries are dicts as in the file."""

    feature: int
    frequency: float
    image_frequency: float
    max_activation: float
    mean_activation: float
    top: list[dict[str, Any]] = field(default_factory=list)
    """``{"image_idx": int, "score": float}``, descending score."""
    quantiles: list[dict[str, Any]] = field(default_factory=list)
    """``{"image_idx": int, "score": float, "quantile": int}``."""
    negatives: list[int] = field(default_factory=list)
    histogram: list[int] = field(default_factory=list)
    """Counts of its nonzero activations per token in equal bins over ``[0, histogram_upper)``."""
    histogram_upper: float = 0.0
    promoted: list[dict[str, Any]] = field(default_factory=list)
    """``{"token": str, "logit": float}``: the tokens its decoder direction raises most, highest first."""
    suppressed: list[dict[str, Any]] = field(default_factory=list)
    """``{"token": str, "logit": float}``: the tokens it lowers most, lowest first."""

    @property
    def top_images(self) -> list[int]:
        return [int(t["image_idx"]) for t in self.top]

    @property
    def quantile_images(self) -> list[int]:
        return [int(q["image_idx"]) for q in self.quantiles]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = FEATURES_FILE) -> FeatureRecord:
        try:
            return cls(
                feature=int(data["feature"]),
                frequency=float(data["frequency"]),
                image_frequency=float(data["image_frequency"]),
                max_activation=float(data["max_activation"]),
                mean_activation=float(data["mean_activation"]),
                top=[{"image_idx": int(t["image_idx"]), "score": float(t["score"])} for t in data["top"]],
                quantiles=[{"image_idx": int(q["image_idx"]), "score": float(q["score"]),
                            "quantile": int(q["quantile"])} for q in data["quantiles"]],
                negatives=[int(i) for i in data["negatives"]],
                histogram=[int(c) for c in data.get("histogram", [])],
                histogram_upper=float(data.get("histogram_upper") or 0.0),
                promoted=_logit_tokens(data.get("promoted", [])),
                suppressed=_logit_tokens(data.get("suppressed", [])),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TopExamplesError(f"{source}: a line does not hold a feature record ({type(e).__name__}: {e})") from e


def _logit_tokens(entries: Any) -> list[dict[str, Any]]:
    return [{"token": str(t["token"]), "logit": float(t["logit"])} for t in entries]


def encode_maps(columns: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise the map columns (cast to :data:`MAP_DTYPES`; all of one length)."""
    missing = [c for c in MAP_DTYPES if c not in columns]
    if missing:
        raise TopExamplesError(f"map columns {missing} are missing; expected {list(MAP_DTYPES)}")
    n = int(columns["feature"].shape[0])
    bad = [c for c in MAP_DTYPES if tuple(columns[c].shape) != (n,)]
    if bad:
        raise TopExamplesError(f"map columns {bad} are not of length {n}")
    return st_save({c: columns[c].to(dt).contiguous() for c, dt in MAP_DTYPES.items()})


def decode_maps(data: bytes, name: str = MAPS_FILE) -> dict[str, np.ndarray]:
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types
        raise TopExamplesError(f"{name} is not a readable safetensors file: {e}") from e
    missing = [c for c in MAP_DTYPES if c not in tensors]
    if missing:
        raise TopExamplesError(f"{name} lacks columns {missing}; expected {list(MAP_DTYPES)}")
    return {c: tensors[c].numpy() for c in MAP_DTYPES}


class TopExamples:
    """A sealed top-examples artifact, opened for reading."""

    def __init__(self, uri: str):
        self.uri = uri
        self.manifest = storage.read_manifest(uri, kind=KIND)
        if self.manifest.format_version not in READABLE_VERSIONS:
            raise storage.ManifestError(f"{uri} has format version {self.manifest.format_version} of {KIND!r}; "
                                        f"this version of mmsae reads versions {list(READABLE_VERSIONS)}")
        self._heatmaps: dict[tuple[int, int, str], str] = {}
        for name in self.manifest.files:
            m = _HEATMAP_RE.match(name)
            if m:
                self._heatmaps[(int(m.group(1)), int(m.group(4)), m.group(2))] = name

    def _read(self, name: str) -> bytes:
        return storage.read_verified_bytes(self.uri, name, self.manifest)

    @property
    def extra(self) -> dict[str, Any]:
        return self.manifest.extra

    @property
    def selected(self) -> list[int]:
        """The feature ids later stages take (the mine stage's ``select``)."""
        return [int(f) for f in self.extra.get("selected", self.extra.get("features", []))]

    @cached_property
    def _records(self) -> dict[int, FeatureRecord]:
        out: dict[int, FeatureRecord] = {}
        src = storage.join(self.uri, FEATURES_FILE)
        for n, line in enumerate(self._read(FEATURES_FILE).decode().splitlines(), start=1):
            if line.strip():
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TopExamplesError(f"{src} line {n} is not JSON: {e}") from e
                rec = FeatureRecord.from_json(data, f"{src} line {n}")
                out[rec.feature] = rec
        return out

    def features(self) -> list[FeatureRecord]:
        """Every mined feature's record, by feature id."""
        return [self._records[f] for f in sorted(self._records)]

    def feature(self, feature_id: int) -> FeatureRecord:
        rec = self._records.get(int(feature_id))
        if rec is None:
            raise FeatureNotMinedError(
                f"feature {feature_id} is not in {self.uri} ({len(self._records)} features mined)")
        return rec

    @cached_property
    def _maps(self) -> tuple[dict[str, np.ndarray], dict[tuple[int, int], tuple[int, int]]]:
        cols = decode_maps(self._read(MAPS_FILE), storage.join(self.uri, MAPS_FILE))
        index: dict[tuple[int, int], tuple[int, int]] = {}
        f, img = cols["feature"].astype(np.int64), cols["image_idx"]
        if len(f):
            change = np.flatnonzero((np.diff(f) != 0) | (np.diff(img) != 0)) + 1
            starts = np.concatenate([[0], change])
            ends = np.concatenate([change, [len(f)]])
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
                index[(int(f[s]), int(img[s]))] = (s, e)
        return cols, index

    def activation_tokens(self, feature_id: int, image_idx: int) -> dict[str, np.ndarray]:
        """The maps rows of one (feature, image) pair: every column of ``maps.safetensors``, possibly empty."""
        cols, index = self._maps
        s, e = index.get((int(feature_id), int(image_idx)), (0, 0))
        return {c: v[s:e] for c, v in cols.items()}

    def heatmap_uri(self, feature_id: int, image_idx: int, kind: str = "overlay") -> str | None:
        """URI of a heat map of a top image (None when none was rendered)."""
        if kind not in HEATMAP_KINDS:
            raise ValueError(f"heat-map kind {kind!r}; expected one of {HEATMAP_KINDS}")
        name = self._heatmaps.get((int(feature_id), int(image_idx), kind))
        return storage.join(self.uri, name) if name else None

    def heatmap_bytes(self, feature_id: int, image_idx: int, kind: str = "overlay") -> bytes | None:
        """The PNG bytes of a heat map (checksum verified), or None when none was rendered."""
        name = self._heatmaps.get((int(feature_id), int(image_idx), kind))
        return self._read(name) if name else None

    @cached_property
    def _images(self) -> dict[int, tuple[int, int]]:
        data = json.loads(self._read(IMAGES_FILE))
        return {int(k): (int(v["width"]), int(v["height"])) for k, v in data.items()}

    def image_size(self, image_idx: int) -> tuple[int, int]:
        """``(width, height)`` of a referenced image."""
        try:
            return self._images[int(image_idx)]
        except KeyError:
            raise TopExamplesError(f"image {image_idx} is not referenced by {self.uri}") from None

    def ground_truth(self) -> dict[str, Any] | None:
        """The ground-truth report (image sets with planted concepts only), else None."""
        if GROUND_TRUTH_FILE not in self.manifest.files:
            return None
        return json.loads(self._read(GROUND_TRUTH_FILE))
