"""The toy world: generated scenes of simple objects with known concepts and pixel masks.

Each scene is a plain background with one or more non-overlapping objects; every object has a colour, a
texture, a size (small or large), a shape and a position. A scene carries its caption (objects from left to
right, e.g. "a large red striped square and a small blue dotted square"), its concept list
(``color:red``, ``texture:striped``, ``size:large``, and ``shape:...`` when the world has several shapes), one
binary mask per concept (the union of the pixels of the objects with that concept) and per-object records.

Reads nothing. ``build`` writes a Hugging Face ``datasets.DatasetDict`` (splits ``train`` and ``heldout``,
drawn from disjoint seed streams) with ``save_to_disk`` under a local path or an ``s3://`` URI, plus the
artifact's ``manifest.json`` (kind ``image_set``).

Generation is deterministic: scene ``i`` of a split depends only on (seed, split, i), so the same seed gives
byte-identical images whatever the number of scenes asked for.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmsae.config import ToyWorldConfig

log = logging.getLogger(__name__)

SPLITS: dict[str, int] = {"train": 0, "heldout": 1}
"""Split name -> its seed-stream index (distinct streams keep the splits disjoint)."""

SIZES: dict[str, tuple[int, int]] = {"small": (11, 14), "large": (23, 29)}
"""Size name -> (smallest, largest) side of the object's bounding box in pixels. The smallest large side is more
than 1.5 times the largest small side, so the two stay apart after an image of 64..96 px is rescaled to a
common size (as LLaVA-NeXT's AnyRes does)."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 50),
    "purple": (155, 60, 210),
    "orange": (245, 140, 30),
    "white": (235, 235, 235),
    "cyan": (40, 215, 225),
    "pink": (245, 130, 190),
    "brown": (140, 85, 40),
}
"""Colour names the generator knows, with their nominal RGB (each object jitters it by a few levels)."""

TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted", "checkered", "grid")
"""Texture names the generator knows; every pattern has a 4-pixel period, so it shows inside one patch."""

SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "diamond", "cross")
"""Shape names the generator knows."""

CONCEPT_KINDS: tuple[str, ...] = ("color", "texture", "size", "shape")
"""Concept prefixes, in the order they appear in a caption's object phrase (size first in the text)."""

COLOR_JITTER = 15
"""Per-channel jitter of an object's colour, in 0..255 levels."""
DARK_FACTOR = 0.15
"""Brightness of a texture's dark pixels relative to the object's colour (solid has none)."""
BACKGROUND_MAX = 90
"""Brightest background grey level (objects are brighter, so they stand out)."""
MIN_DX = 8
"""Least horizontal distance between object centres, so that left-to-right order is visible."""
PLACEMENT_TRIES = 60
"""Placement attempts per object before the scene is drawn with fewer objects."""


class ToyWorldError(ValueError):
    """A toy-world config that names something the generator cannot draw, or a bad split."""


@dataclass(frozen=True)
class ObjectRecord:
    """One drawn object: its attributes and where it lies (pixel box [x0, x1) x [y0, y1))."""

    shape: str
    color: str
    texture: str
    size: str
    x0: int
    y0: int
    x1: int
    y1: int
    cx: float
    cy: float
    area: int
    rgb: tuple[int, int, int]

    def concepts(self, with_shape: bool) -> list[str]:
        out = [f"color:{self.color}", f"texture:{self.texture}", f"size:{self.size}"]
        if with_shape:
            out.append(f"shape:{self.shape}")
        return out

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.texture} {self.shape}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "color": self.color,
            "texture": self.texture,
            "size": self.size,
            "x0": self.x0,
            "y0": self.y0,
            "x1": self.x1,
            "y1": self.y1,
            "cx": self.cx,
            "cy": self.cy,
            "area": self.area,
            "rgb": list(self.rgb),
        }


@dataclass
class Scene:
    """A generated image with its caption, concepts, per-concept masks and objects (left to right)."""

    id: str
    image: np.ndarray
    """(height, width, 3) uint8."""
    caption: str
    objects: list[ObjectRecord]
    concepts: list[str]
    masks: list[np.ndarray] = field(repr=False)
    """One (height, width) bool mask per concept, aligned with ``concepts``."""

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image, mode="RGB")

    def mask(self, concept: str) -> np.ndarray:
        """The mask of one concept (all False when the scene does not show it)."""
        if concept in self.concepts:
            return self.masks[self.concepts.index(concept)]
        return np.zeros((self.height, self.width), dtype=bool)


def caption_for(objects: list[ObjectRecord]) -> str:
    """The caption of objects already ordered left to right: "a X", "a X and a Y", "a X, a Y and a Z"."""
    phrases = [o.phrase() for o in objects]
    if len(phrases) <= 2:
        return " and ".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def vocabulary() -> list[str]:
    """Every word a caption can contain, in a fixed order (the toy LMM's tokenizer is built from it)."""
    words = ["a", "and", ","]
    words += list(SIZES) + list(COLORS) + list(TEXTURES) + list(SHAPES)
    return words


def check_config(cfg: ToyWorldConfig) -> None:
    """Raise ToyWorldError when the config names colours, textures or shapes the generator cannot draw."""
    for kind, names, known in (
        ("colors", cfg.colors, COLORS),
        ("textures", cfg.textures, TEXTURES),
        ("shapes", cfg.shapes, SHAPES),
    ):
        if not names:
            raise ToyWorldError(f"toyworld.{kind} is empty; expected at least one of {list(known)}")
        bad = [n for n in names if n not in known]
        if bad:
            raise ToyWorldError(f"toyworld.{kind}: unknown {bad}; expected names among {list(known)}")
        if len(set(names)) != len(names):
            raise ToyWorldError(f"toyworld.{kind} has duplicates: {names}")
    if cfg.min_size > cfg.max_size:
        raise ToyWorldError(
            f"toyworld.min_size ({cfg.min_size}) is larger than toyworld.max_size ({cfg.max_size})"
        )
    if cfg.min_size < 2 * SIZES["large"][1]:
        raise ToyWorldError(
            f"toyworld.min_size ({cfg.min_size}) must be at least {2 * SIZES['large'][1]} px "
            "so that two large objects fit"
        )


def _shape_mask(shape: str, side: int) -> np.ndarray:
    """A (side, side) bool mask of a shape filling its box."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    c = (side - 1) / 2.0
    dx, dy = xx - c, yy - c
    r = side / 2.0
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "triangle":  # apex up, base on the bottom row
        return np.abs(dx) <= (yy + 1) / 2.0
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "cross":
        arm = side / 6.0
        return (np.abs(dx) <= arm) | (np.abs(dy) <= arm)
    raise ToyWorldError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")


def _texture_on(texture: str, x0: int, y0: int, side: int) -> np.ndarray:
    """A (side, side) bool pattern for the box at (x0, y0): True where the object shows its full colour, False
    where it is dark. Patterns are laid on the image's pixel grid (like a wallpaper the object cuts out), so
    every object of a texture shows the same phase: a model whose patches are multiples of 4 px on the image
    grid sees one fixed pattern per texture, which it learns far faster than a pattern of any phase."""
    yy, xx = np.mgrid[y0 : y0 + side, x0 : x0 + side]
    if texture == "solid":
        return np.ones((side, side), dtype=bool)
    if texture == "striped":  # horizontal bands, 2 px bright then 2 px dark
        return (yy % 4) < 2
    if texture == "dotted":  # a 2x2 bright dot every 4 px on the dark colour
        return ((yy % 4) < 2) & ((xx % 4) < 2)
    if texture == "checkered":  # 2 px checks
        return ((yy // 2 + xx // 2) % 2) == 0
    if texture == "grid":  # 1 px dark lines every 4 px
        return ((yy % 4) != 3) & ((xx % 4) != 3)
    raise ToyWorldError(f"unknown texture {texture!r}; expected one of {list(TEXTURES)}")


def _split_index(split: str) -> int:
    if split not in SPLITS:
        raise ToyWorldError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    return SPLITS[split]


def _place(
    rng: np.random.Generator, side: int, width: int, height: int, boxes: list[tuple[int, int, int, int]]
) -> tuple[int, int] | None:
    """Top-left corner for a side x side box that keeps a 2 px gap to the others, or None."""
    for _ in range(PLACEMENT_TRIES):
        x0 = int(rng.integers(1, width - side))
        y0 = int(rng.integers(1, height - side))
        cx = x0 + side / 2.0
        ok = True
        for bx0, by0, bx1, by1 in boxes:
            overlap = x0 < bx1 + 2 and bx0 < x0 + side + 2 and y0 < by1 + 2 and by0 < y0 + side + 2
            if overlap or abs(cx - (bx0 + bx1) / 2.0) < MIN_DX:
                ok = False
                break
        if ok:
            return x0, y0
    return None


def _image_size(cfg: ToyWorldConfig, rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): sides of min_size + k * size_step up to max_size; with ``long_side_max`` the longer side
    is max_size and only the other one varies (either side may be the longer)."""
    sides = np.arange(cfg.min_size, cfg.max_size + 1, cfg.size_step)
    a = int(sides[rng.integers(len(sides))])
    if not cfg.long_side_max:
        return a, int(sides[rng.integers(len(sides))])
    return (cfg.max_size, a) if rng.random() < 0.5 else (a, cfg.max_size)


def generate_scene(cfg: ToyWorldConfig, split: str, index: int) -> Scene:
    """Scene ``index`` of ``split``: a function of (cfg, split, index) only."""
    rng = np.random.default_rng([cfg.seed, _split_index(split), index])
    width, height = _image_size(cfg, rng)
    grey = rng.integers(0, BACKGROUND_MAX + 1)
    tint = rng.integers(-10, 11, size=3)
    bg = np.clip(grey + tint, 0, 255).astype(np.uint8)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[...] = bg

    n_objects = int(rng.integers(1, cfg.max_objects + 1))
    drawn: list[tuple[ObjectRecord, np.ndarray]] = []
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(n_objects):
        size = "small" if rng.random() < 0.5 else "large"
        lo, hi = SIZES[size]
        side = int(rng.integers(lo, hi + 1))
        color = cfg.colors[int(rng.integers(len(cfg.colors)))]
        texture = cfg.textures[int(rng.integers(len(cfg.textures)))]
        shape = cfg.shapes[int(rng.integers(len(cfg.shapes)))]
        jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
        corner = _place(rng, side, width, height, boxes)
        if corner is None:
            continue
        x0, y0 = corner
        rgb = np.clip(np.array(COLORS[color]) + jitter, 0, 255)
        local = _shape_mask(shape, side)
        on = _texture_on(texture, x0, y0, side)
        colored = np.where(on[..., None], rgb, np.round(rgb * DARK_FACTOR)).astype(np.uint8)
        region = image[y0 : y0 + side, x0 : x0 + side]
        region[local] = colored[local]
        full = np.zeros((height, width), dtype=bool)
        full[y0 : y0 + side, x0 : x0 + side] = local
        ys, xs = np.nonzero(local)
        rec = ObjectRecord(
            shape=shape,
            color=color,
            texture=texture,
            size=size,
            x0=x0,
            y0=y0,
            x1=x0 + side,
            y1=y0 + side,
            cx=float(x0 + xs.mean() + 0.5),
            cy=float(y0 + ys.mean() + 0.5),
            area=int(local.sum()),
            rgb=(int(rgb[0]), int(rgb[1]), int(rgb[2])),
        )
        boxes.append((x0, y0, x0 + side, y0 + side))
        drawn.append((rec, full))

    drawn.sort(key=lambda t: t[0].cx)
    objects = [rec for rec, _ in drawn]
    with_shape = len(cfg.shapes) > 1
    masks_by_concept: dict[str, np.ndarray] = {}
    for rec, full in drawn:
        for concept in rec.concepts(with_shape):
            if concept in masks_by_concept:
                masks_by_concept[concept] = masks_by_concept[concept] | full
            else:
                masks_by_concept[concept] = full.copy()
    concepts = sorted(masks_by_concept, key=_concept_sort_key)
    return Scene(
        id=f"{split}-{cfg.seed}-{index:06d}",
        image=image,
        caption=caption_for(objects),
        objects=objects,
        concepts=concepts,
        masks=[masks_by_concept[c] for c in concepts],
    )


def _concept_sort_key(concept: str) -> tuple[int, str]:
    kind, _, name = concept.partition(":")
    return CONCEPT_KINDS.index(kind), name


def generate(cfg: ToyWorldConfig, split: str, n: int, start: int = 0) -> list[Scene]:
    """Scenes ``start .. start+n-1`` of a split (``train`` or ``heldout``)."""
    check_config(cfg)
    _split_index(split)
    return [generate_scene(cfg, split, i) for i in range(start, start + n)]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def features():
    """The ``datasets.Features`` of a toy-world image set."""
    from datasets import Features, List, Value
    from datasets import Image as HFImage

    obj = {
        "shape": Value("string"),
        "color": Value("string"),
        "texture": Value("string"),
        "size": Value("string"),
        "x0": Value("int32"),
        "y0": Value("int32"),
        "x1": Value("int32"),
        "y1": Value("int32"),
        "cx": Value("float32"),
        "cy": Value("float32"),
        "area": Value("int32"),
        "rgb": List(Value("int32")),
    }
    return Features(
        {
            "id": Value("string"),
            "image": HFImage(),
            "caption": Value("string"),
            "concepts": List(Value("string")),
            "masks": List(HFImage()),
            "objects": List(obj),
            "width": Value("int32"),
            "height": Value("int32"),
        }
    )


def to_dataset(scenes: list[Scene]):
    """A ``datasets.Dataset`` of scenes: images and masks stored as PNG bytes (masks in mode "1")."""
    from datasets import Dataset

    columns: dict[str, list[Any]] = {k: [] for k in features()}
    for s in scenes:
        columns["id"].append(s.id)
        columns["image"].append({"bytes": _png(s.image), "path": None})
        columns["caption"].append(s.caption)
        columns["concepts"].append(list(s.concepts))
        columns["masks"].append([{"bytes": _png(m), "path": None} for m in s.masks])
        columns["objects"].append([o.to_dict() for o in s.objects])
        columns["width"].append(s.width)
        columns["height"].append(s.height)
    return Dataset.from_dict(columns, features=features())


def build(cfg: ToyWorldConfig, out_uri: str | os.PathLike[str],
          manifest_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate both splits and write them as an image set (DatasetDict + manifest) under ``out_uri``.

    ``manifest_extra`` is added to the manifest's ``extra`` (the stage records its output key there).

    A local ``out_uri`` is written in a temporary folder beside it and renamed into place (replacing an older
    image set there); an ``s3://`` URI is written locally, then uploaded, manifest last.
    Returns ``{"uri", "splits": {name: rows}, "bytes", "files", "seconds", "concepts"}``.
    """
    from datasets import DatasetDict

    from mmsae import storage

    check_config(cfg)
    t0 = time.perf_counter()
    out = str(out_uri)
    remote = storage.is_s3(out)
    if remote:
        work = Path(tempfile.mkdtemp(prefix="toyworld-"))
    else:
        target = Path(out.removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        counts = {"train": cfg.n_train, "heldout": cfg.n_heldout}
        parts = {}
        all_concepts: set[str] = set()
        for split, n in counts.items():
            scenes = generate(cfg, split, n)
            for s in scenes:
                all_concepts.update(s.concepts)
            parts[split] = to_dataset(scenes)
            log.info("toy world: %d %s scenes generated", n, split)
        DatasetDict(parts).save_to_disk(str(work))
        files = {
            str(p.relative_to(work)): {"sha256": storage.sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(work.rglob("*"))
            if p.is_file()
        }
        extra = {
            "splits": counts,
            "concepts": sorted(all_concepts, key=_concept_sort_key),
            "columns": list(features()),
            **(manifest_extra or {}),
        }
        manifest_args = {
            "kind": "image_set",
            "files": files,
            "config": cfg.model_dump(mode="json"),
            "inputs": {},
            "extra": extra,
            "format_version": 1,
        }
        if remote:
            storage.upload_dir(str(work), out)
            storage.write_manifest(out, **manifest_args)
        else:
            storage.write_manifest(str(work), **manifest_args)
            if target.exists():
                shutil.rmtree(target)
            os.replace(work, target)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    info = {
        "uri": out,
        "splits": counts,
        "bytes": sum(f["bytes"] for f in files.values()),
        "files": len(files),
        "seconds": round(time.perf_counter() - t0, 3),
        "concepts": extra["concepts"],
    }
    log.info("toy world written to %s: %s", out, {k: v for k, v in info.items() if k != "concepts"})
    return info
