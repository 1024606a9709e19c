"""Heat maps: a feature's per-token activations drawn on the original image, from every view.

Reads per-token activations of one (feature, image) pair (columns ``view``, ``row``, ``col``, ``act``, as the
top-examples artifact stores them), the image's size and the model's image geometry (a
:class:`~mmsae.models.geometry.PatchInfo`, read from the model's config and processor files by
:func:`load_patch_info`). Writes nothing itself: :func:`png_bytes` gives the bytes a caller stores.

How a map is made (:func:`activation_map`): each view (the base view 0 and every AnyRes tile i >= 1) is a
``grid x grid`` array of activations laid over the part of the original image that view covers. Where that
part lies comes from :func:`~mmsae.models.geometry.patch_box`, which undoes the processor's resize, crop
and padding per cell; the cells of one view form a regular grid, so the per-view map from grid coordinates
to image pixels is affine (:func:`view_affine`). Each view is resampled bilinearly onto the image pixels it
covers (cell values sit at cell centres) and the views are combined by their maximum, so the tiles add
detail at their higher resolution where they are stronger than the base view. Image-newline and CLS
tokens have no place in the image and are left out of the map. A map may be sampled on a smaller pixel grid
than the image's (``size``): the pixel centres of that grid are placed on the original image, so the
geometry stays the original's and the map stays aligned with the image scaled to that size
(:func:`fit_size` gives the size of a bounded rendering).

Two renderings (:func:`render_overlay`, :func:`render_masked`): a magnitude overlay for people (a colour
map whose opacity grows with the activation) and the masked style of the explainer prompt (the image
darkened towards black where the feature is inactive, graded by the activation, never binarised).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmsae import storage
from mmsae.models.geometry import PatchInfo, patch_box, patch_info

log = logging.getLogger(__name__)

__all__ = [
    "COLORMAP",
    "HeatmapError",
    "activation_map",
    "colormap",
    "fit_size",
    "load_patch_info",
    "png_bytes",
    "render_masked",
    "render_overlay",
    "view_affine",
]

COLORMAP = np.array(
    [
        (0, 0, 4),
        (40, 11, 84),
        (101, 21, 110),
        (159, 42, 99),
        (212, 72, 66),
        (245, 125, 21),
        (250, 193, 39),
        (252, 255, 164),
    ],
    dtype=np.float32,
)
"""Anchor colours (dark to bright) of the overlay's colour map, interpolated linearly (an inferno-like ramp)."""

MASK_DARKEN = 0.88
"""How far towards black the masked rendering takes a pixel where the feature is inactive."""
OVERLAY_OPACITY = 0.75
"""Opacity of the overlay's colour where the activation is at its maximum (zero where it is inactive)."""

_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


class HeatmapError(ValueError):
    """Activations or geometry that cannot be drawn (bad columns, unknown model files); the message says which."""


# ---------------------------------------------------------------------------------------------------
# geometry


def load_patch_info(model_uri: str, family: str | None = None) -> PatchInfo:
    """The image geometry of the LMM at ``model_uri`` (local folder or ``s3://``), from its small files only.

    Reads ``config.json`` and the processor's ``processor_config.json`` (or ``preprocessor_config.json``);
    the weights are not read. ``family`` overrides the config's ``model_type``.
    """
    from transformers import AutoConfig

    from mmsae.models.loading import FAMILIES

    def read(name: str) -> dict[str, Any] | None:
        uri = storage.join(model_uri, name)
        return storage.read_json(uri) if storage.exists(uri) else None

    cfg_json = read("config.json")
    if cfg_json is None:
        raise HeatmapError(f"no config.json at {model_uri}: expected a model folder written by save_pretrained")
    processor: dict[str, Any] | None = None
    for name in _PROCESSOR_FILES:
        processor = read(name)
        if processor is not None:
            break
    with tempfile.TemporaryDirectory(prefix="mmsae-config-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(cfg_json))
        config = AutoConfig.from_pretrained(tmp)
    fam = family or str(getattr(config, "model_type", ""))
    if fam not in FAMILIES:
        raise HeatmapError(f"model at {model_uri} has model_type {fam!r}; expected one of {', '.join(FAMILIES)}")
    return patch_info(fam, config, processor)


@functools.lru_cache(maxsize=8192)
def view_affine(info: PatchInfo, image_hw: tuple[int, int], view: int) -> tuple[float, float, float, float]:
    """``(ox, sx, oy, sy)``: grid coordinate ``u`` of a view (cell ``c`` spans ``[c, c + 1]``) lies at image
    pixel ``ox + u * sx`` across and ``oy + v * sy`` down.

    Found from the cells' boxes (:func:`patch_box`): every cell edge that falls strictly inside the image is
    exact, and two of them fix the line. A view with fewer exact edges (it reaches past the image on both
    sides of a line of cells) is fitted through its edges as clipped to the image.
    """
    h, w = image_hw
    g = info.grid
    xs = [patch_box(info.family, None, image_hw, view, 0, c, info) for c in range(g)]
    ys = [patch_box(info.family, None, image_hw, view, r, 0, info) for r in range(g)]
    ox, sx = _fit_edges([(c, b[0]) for c, b in enumerate(xs)] + [(c + 1, b[2]) for c, b in enumerate(xs)], w)
    oy, sy = _fit_edges([(r, b[1]) for r, b in enumerate(ys)] + [(r + 1, b[3]) for r, b in enumerate(ys)], h)
    return ox, sx, oy, sy


def _fit_edges(edges: list[tuple[int, float]], size: int) -> tuple[float, float]:
    eps = 1e-6
    exact = {m: v for m, v in edges if eps < v < size - eps}
    pts = exact if len(exact) >= 2 else dict(edges)
    m = np.array(list(pts.keys()), dtype=np.float64)
    v = np.array(list(pts.values()), dtype=np.float64)
    if np.ptp(m) == 0:
        raise HeatmapError(f"cannot place a view's cells on an image of side {size}: edges {edges}")
    slope, offset = np.polyfit(m, v, 1)
    return float(offset), float(slope)


# ---------------------------------------------------------------------------------------------------
# maps


def fit_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """``(width, height)`` scaled down so that the long side is at most ``max_side`` (aspect ratio kept, each
    side at least 1); unchanged when it already fits or ``max_side`` is None."""
    width, height = int(size[0]), int(size[1])
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def activation_map(tokens: Mapping[str, Any], image_hw: tuple[int, int], info: PatchInfo,
                   size: tuple[int, int] | None = None) -> np.ndarray:
    """The activation resampled onto the original image: float32 ``[height, width]``, in activation units.

    ``tokens`` holds equal-length columns ``view``, ``row``, ``col`` and ``act`` (other columns are ignored);
    tokens of views < 0 (text, image newline, CLS) have no place in the image and are skipped. ``size``
    (height, width): sample the map on a grid of that many pixels spanning the image instead (the image's
    geometry unchanged), e.g. for a rendering of the image scaled down to that size.
    """
    for c in ("view", "row", "col", "act"):
        if c not in tokens:
            raise HeatmapError(f"activation tokens lack column {c!r}; expected view, row, col and act")
    h, w = int(image_hw[0]), int(image_hw[1])
    out_h, out_w = (h, w) if size is None else (int(size[0]), int(size[1]))
    view = np.asarray(tokens["view"]).astype(np.int64)
    row = np.asarray(tokens["row"]).astype(np.int64)
    col = np.asarray(tokens["col"]).astype(np.int64)
    act = np.asarray(tokens["act"]).astype(np.float32)
    out = torch.zeros(out_h, out_w)
    g = info.grid
    keep = view >= 0
    if keep.any() and ((row[keep] < 0) | (row[keep] >= g) | (col[keep] < 0) | (col[keep] >= g)).any():
        raise HeatmapError(f"activation tokens hold cells outside the {g}x{g} grid of a view")
    # the output pixels' centres, in the original image's pixel coordinates
    px = (torch.arange(out_w, dtype=torch.float64) + 0.5) * (w / out_w)
    py = (torch.arange(out_h, dtype=torch.float64) + 0.5) * (h / out_h)
    for v in np.unique(view[keep]).tolist():
        sel = keep & (view == v)
        grid = torch.zeros(g * g)
        grid.scatter_reduce_(0, torch.from_numpy(row[sel] * g + col[sel]), torch.from_numpy(act[sel]),
                             reduce="amax")
        ox, sx, oy, sy = view_affine(info, (h, w), int(v))
        u = (px - ox) / sx  # grid coordinates of pixel centres, in [0, g] inside the view
        t = (py - oy) / sy
        covered = ((t >= 0) & (t <= g))[:, None] & ((u >= 0) & (u <= g))[None, :]
        if not bool(covered.any()):
            continue
        samp = torch.stack(torch.broadcast_tensors((2 * u / g - 1)[None, :], (2 * t / g - 1)[:, None]), dim=-1)
        vals = torch.nn.functional.grid_sample(
            grid.reshape(1, 1, g, g), samp[None].float(), mode="bilinear", padding_mode="border",
            align_corners=False)[0, 0]
        out = torch.maximum(out, torch.where(covered, vals, torch.zeros(())))
    return out.numpy()


# ---------------------------------------------------------------------------------------------------
# renderings


def _unit(heat: np.ndarray, vmax: float | None) -> np.ndarray:
    top = float(heat.max()) if vmax is None else float(vmax)
    if top <= 0:
        return np.zeros_like(heat, dtype=np.float32)
    return np.clip(heat / top, 0.0, 1.0).astype(np.float32)


def _rgb(image: Image.Image, heat: np.ndarray) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    if rgb.shape[:2] != heat.shape:
        raise HeatmapError(f"heat map of shape {heat.shape} does not match the image's {rgb.shape[:2]} (height, width)")
    return rgb


def colormap(values: np.ndarray) -> np.ndarray:
    """RGB float32 ``[..., 3]`` of values in [0, 1] through :data:`COLORMAP`."""
    pos = np.clip(values, 0.0, 1.0) * (len(COLORMAP) - 1)
    lo = np.floor(pos).astype(np.int64).clip(0, len(COLORMAP) - 2)
    frac = (pos - lo)[..., None]
    return COLORMAP[lo] * (1 - frac) + COLORMAP[lo + 1] * frac


def render_overlay(image: Image.Image, heat: np.ndarray, vmax: float | None = None,
                   opacity: float = OVERLAY_OPACITY) -> Image.Image:
    """The image with the colour-mapped activation over it, its opacity proportional to the activation.

    ``vmax``: the activation drawn at full colour and opacity (e.g. the feature's maximum, so images of one
    feature compare); default the map's own maximum.
    """
    rgb = _rgb(image, heat)
    m = _unit(heat, vmax)
    a = (opacity * m)[..., None]
    out = rgb * (1 - a) + colormap(m) * a
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), mode="RGB")


def render_masked(image: Image.Image, heat: np.ndarray, vmax: float | None = None,
                  darken: float = MASK_DARKEN) -> Image.Image:
    """The image darkened towards black where the feature is inactive: brightness ``1 - darken * (1 - m)`` for
    the activation ``m`` as a share of ``vmax`` (default the map's maximum). Graded, not a binary mask."""
    rgb = _rgb(image, heat)
    m = _unit(heat, vmax)
    out = rgb * (1 - darken * (1 - m))[..., None]
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), mode="RGB")


def png_bytes(image: Image.Image) -> bytes:
    """PNG bytes of an image (fast compression: heat maps are many and small)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
