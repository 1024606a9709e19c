"""Where each image token of a LLaVA-family input comes from: which view of which image, which patch cell.

Reads a model config (and optionally its processor) plus a processed batch's ``input_ids`` and ``image_sizes``;
writes nothing. The layout is computed from the config alone, the way transformers 5 packs image features:

* **LLaVA**: one view, the base image; its vision tokens (CLS dropped by the ``default`` feature strategy) in
  row-major order.
* **LLaVA-NeXT / LLaVA-OneVision**: the base view (``grid x grid`` cells), then the AnyRes tiles merged into one
  grid (tile rows x tile columns), with the rows or columns that only hold the processor's padding removed
  (``unpad_image``), and an image-newline token closing each merged row. OneVision then shrinks a merged grid
  larger than ``anyres_max_N`` allows by bilinear interpolation; each shrunken cell is attributed to the tile cell
  under its centre. Images of a multi-image OneVision sample get only the base view plus one newline.

`token_geometry` labels every token; `patch_box` maps a (view, row, col) cell back to a box in the original
image's pixels, undoing the processor's resize, crop and padding, so activations can be drawn on the image.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "VIEW_CLS",
    "VIEW_NEWLINE",
    "VIEW_TEXT",
    "GeometryError",
    "PatchInfo",
    "TokenGeometry",
    "anyres_grid_shape",
    "image_token_count",
    "patch_box",
    "patch_info",
    "select_best_resolution",
    "token_geometry",
]

VIEW_TEXT = -1
"""``view`` of a text (or padding) token."""
VIEW_NEWLINE = -2
"""``view`` of an image-newline token (LLaVA-NeXT / OneVision); its ``row`` is the merged row it closes."""
VIEW_CLS = -3
"""``view`` of a vision CLS token kept by the ``full`` feature strategy of a CLIP tower."""

_FAMILIES = ("llava", "llava_next", "llava_onevision")


class GeometryError(ValueError):
    """Token positions that do not fit the image layout the config implies, or an unsupported config."""


# ----------------------------------------------------------------------------------------------------------------
# Description of the model's and processor's image handling
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchInfo:
    """Everything the token layout and the pixel mapping depend on, read from a config (+ processor)."""

    family: str
    image_token_id: int
    tile_size: int
    """Side in pixels of the vision tower's input (the base view and each AnyRes tile)."""
    patch_size: int
    grid: int
    """Patch cells per side of one view (``tile_size // patch_size``)."""
    has_cls: bool
    """The vision tower emits a CLS token before the patch tokens (CLIP yes, SigLIP no)."""
    select_strategy: str
    """'default' drops the first vision token, 'full' keeps them all."""
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    """AnyRes resolutions as (height, width); empty for LLaVA."""
    max_num_patches: int | None = None
    """OneVision's ``anyres_max_N``: merged grids above N views' worth of cells are shrunk."""
    # Processor side (pixels), used by patch_box.
    size_shortest_edge: int | None = None
    """Resize so that the shorter side has this length (keeping aspect), else to ``size_hw``."""
    size_hw: tuple[int, int] | None = None
    crop_hw: tuple[int, int] | None = None
    """Centre crop after the resize; None when the processor does not crop."""
    pad_base_to_square: bool = False
    """LLaVA processors with ``do_pad``: the image is padded to a square (centred) before the resize."""
    tile_px: int | None = None
    """Side of the AnyRes tiles cut from the padded best-resolution canvas (processor side)."""

    @property
    def tokens_per_view(self) -> int:
        n = self.grid * self.grid + (1 if self.has_cls else 0)
        return n - 1 if self.select_strategy == "default" else n


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def _parse_anyres_max(value: str | None) -> int:
    m = re.fullmatch(r"anyres_max_(\d+)", str(value or ""))
    if not m:
        raise GeometryError(f"vision_aspect_ratio {value!r} is not supported: expected 'anyres_max_<N>'")
    return int(m.group(1))


def patch_info(family: str, config: Any, processor: Any = None) -> PatchInfo:
    """Read a `PatchInfo` from a model ``config`` and, when given, its ``processor`` or image processor.

    Without a processor the pixel side takes the defaults of the family's released processors: LLaVA resizes
    the shorter side to the tower's input and centre-crops; NeXT and OneVision squash the base view to a square.
    """
    if family not in _FAMILIES:
        raise GeometryError(f"unknown model family {family!r}; expected one of {', '.join(_FAMILIES)}")
    vc = config.vision_config
    tile, patch = int(vc.image_size), int(vc.patch_size)
    if tile % patch:
        raise GeometryError(f"vision image_size {tile} is not a multiple of patch_size {patch}")
    vision_type = str(getattr(vc, "model_type", ""))
    has_cls = "siglip" not in vision_type
    strategy = str(config.vision_feature_select_strategy)
    if strategy not in ("default", "full"):
        raise GeometryError(f"vision_feature_select_strategy {strategy!r}: expected 'default' or 'full'")
    pinpoints: tuple[tuple[int, int], ...] = ()
    max_patches = None
    if family != "llava":
        pinpoints = tuple((int(h), int(w)) for h, w in config.image_grid_pinpoints)
        if family == "llava_onevision":
            max_patches = _parse_anyres_max(getattr(config, "vision_aspect_ratio", "anyres_max_9"))
    info = PatchInfo(
        family=family,
        image_token_id=int(config.image_token_id),
        tile_size=tile,
        patch_size=patch,
        grid=tile // patch,
        has_cls=has_cls,
        select_strategy=strategy,
        grid_pinpoints=pinpoints,
        max_num_patches=max_patches,
    )
    if family != "llava" and info.tokens_per_view != info.grid**2:
        raise GeometryError(
            f"{family}: the vision tower gives {info.tokens_per_view} tokens per view with strategy {strategy!r} "
            f"({vision_type}), but AnyRes packing needs exactly grid^2 = {info.grid**2}"
        )
    return _with_pixels(info, processor)


def _with_pixels(info: PatchInfo, processor: Any) -> PatchInfo:
    # A processor, or an image processor given directly.
    ip = _get(processor, "image_processor") or (processor if _get(processor, "size") is not None else None)
    shortest = hw = crop = None
    pad = False
    if ip is None:
        if info.family == "llava":
            shortest, crop = info.tile_size, (info.tile_size, info.tile_size)
        else:
            hw = (info.tile_size, info.tile_size)
    else:
        size = _get(ip, "size")
        if _get(size, "shortest_edge"):
            shortest = int(_get(size, "shortest_edge"))
        elif _get(size, "height") and _get(size, "width"):
            hw = (int(_get(size, "height")), int(_get(size, "width")))
        else:
            raise GeometryError(f"image processor size {size!r}: expected shortest_edge or height and width")
        cs = _get(ip, "crop_size")
        if _get(ip, "do_center_crop") and cs is not None and _get(cs, "height"):
            crop = (int(_get(cs, "height")), int(_get(cs, "width")))
        pad = bool(_get(ip, "do_pad")) and info.family == "llava"
    # Tile side as the NeXT / OneVision image processors choose it.
    if info.family == "llava":
        tile_px = None
    elif ip is not None and _get(_get(ip, "crop_size"), "height"):
        tile_px = int(_get(_get(ip, "crop_size"), "height"))
    elif hw is not None:
        tile_px = hw[0]
    else:
        tile_px = shortest
    return dataclasses.replace(
        info,
        size_shortest_edge=shortest,
        size_hw=hw,
        crop_hw=crop,
        pad_base_to_square=pad,
        tile_px=tile_px,
    )


def _as_info(family: str, config: Any, processor_or_patch_info: Any) -> PatchInfo:
    if isinstance(processor_or_patch_info, PatchInfo):
        if processor_or_patch_info.family != family:
            raise GeometryError(f"PatchInfo is for {processor_or_patch_info.family!r}, not {family!r}")
        return processor_or_patch_info
    return patch_info(family, config, processor_or_patch_info)


# ----------------------------------------------------------------------------------------------------------------
# AnyRes arithmetic (same formulas as transformers 5's processors and modeling code)
# ----------------------------------------------------------------------------------------------------------------


def select_best_resolution(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The AnyRes resolution (height, width) that keeps most of the image and wastes least canvas."""
    oh, ow = int(image_hw[0]), int(image_hw[1])
    best: tuple[int, int] | None = None
    best_eff, best_waste = 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / ow, h / oh)
        dw, dh = int(ow * scale), int(oh * scale)
        eff = min(dw * dh, ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(h), int(w)), eff, waste
    if best is None:
        raise GeometryError(f"no AnyRes resolution fits image size {image_hw} among {list(pinpoints)}")
    return best


def anyres_grid_shape(info: PatchInfo, image_hw: Sequence[int]) -> tuple[int, int]:
    """Tiles (rows, columns) the model arranges an image's AnyRes crops in."""
    bh, bw = select_best_resolution(image_hw, info.grid_pinpoints)
    return bh // info.tile_size, bw // info.tile_size


def _unpad_window(full_h: int, full_w: int, image_hw: Sequence[int]) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) of the merged grid that ``unpad_image`` keeps."""
    oh, ow = int(image_hw[0]), int(image_hw[1])
    if ow / oh > full_w / full_h:
        scale = full_w / ow
        new_h = int(round(oh * scale, 7))
        pad = (full_h - new_h) // 2
        return pad, full_h - pad, 0, full_w
    scale = full_h / oh
    new_w = int(round(ow * scale, 7))
    pad = (full_w - new_w) // 2
    return 0, full_h, pad, full_w - pad


@dataclass(frozen=True)
class _Layout:
    view: np.ndarray
    row: np.ndarray
    col: np.ndarray

    def __len__(self) -> int:
        return int(self.view.shape[0])


def _base_cells(info: PatchInfo) -> tuple[list[int], list[int], list[int]]:
    g = info.grid
    views = [0] * (g * g)
    rows = [r for r in range(g) for _ in range(g)]
    cols = [c for _ in range(g) for c in range(g)]
    if info.has_cls:
        views, rows, cols = [VIEW_CLS, *views], [-1, *rows], [-1, *cols]
    if info.select_strategy == "default":
        views, rows, cols = views[1:], rows[1:], cols[1:]
    return views, rows, cols


def _shrink_index(n_out: int, n_in: int) -> np.ndarray:
    """Input cell under the centre of each output cell of a bilinear resize (align_corners=False)."""
    scale = n_in / n_out
    idx = np.floor((np.arange(n_out) + 0.5) * scale).astype(np.int64)
    return np.clip(idx, 0, n_in - 1)


@functools.lru_cache(maxsize=4096)
def _image_layout(info: PatchInfo, image_hw: tuple[int, int], patched: bool) -> _Layout:
    views, rows, cols = _base_cells(info)
    if info.family == "llava":
        return _Layout(*(np.asarray(a, dtype=np.int16) for a in (views, rows, cols)))
    g = info.grid
    if not patched:
        views, rows, cols = views + [VIEW_NEWLINE], rows + [g - 1], cols + [-1]
        return _Layout(*(np.asarray(a, dtype=np.int16) for a in (views, rows, cols)))
    n_rows, n_cols = anyres_grid_shape(info, image_hw)
    full_h, full_w = n_rows * g, n_cols * g
    r0, r1, c0, c1 = _unpad_window(full_h, full_w, image_hw)
    ys = np.arange(r0, r1)
    xs = np.arange(c0, c1)
    if info.max_num_patches is not None:
        cur_h, cur_w = r1 - r0, c1 - c0
        ratio = math.sqrt(cur_h * cur_w / (info.max_num_patches * g**2))
        if ratio > 1.1:
            ys = ys[_shrink_index(int(cur_h // ratio), cur_h)]
            xs = xs[_shrink_index(int(cur_w // ratio), cur_w)]
    # Each merged row: its cells, then one newline token.
    yy = np.repeat(ys, len(xs) + 1)
    xx = np.tile(np.append(xs, -1), len(ys))
    is_nl = xx < 0
    tile_view = 1 + (yy // g) * n_cols + (xx // g)
    m_view = np.where(is_nl, VIEW_NEWLINE, tile_view)
    m_row = np.where(is_nl, np.repeat(np.arange(len(ys)), len(xs) + 1), yy % g)
    m_col = np.where(is_nl, -1, xx % g)
    return _Layout(
        np.concatenate([np.asarray(views), m_view]).astype(np.int16),
        np.concatenate([np.asarray(rows), m_row]).astype(np.int16),
        np.concatenate([np.asarray(cols), m_col]).astype(np.int16),
    )


def image_token_count(
    family: str,
    config: Any,
    image_hw: Sequence[int],
    processor_or_patch_info: Any = None,
    *,
    patched: bool = True,
) -> int:
    """Number of image tokens one image of size ``image_hw`` (height, width) takes in the model's input."""
    info = _as_info(family, config, processor_or_patch_info)
    return len(_image_layout(info, (int(image_hw[0]), int(image_hw[1])), patched))


# ----------------------------------------------------------------------------------------------------------------
# Token geometry of a batch
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenGeometry:
    """Per-token labels, each shaped like ``input_ids`` (int16).

    ``view``: -1 text, 0 base view, i >= 1 AnyRes tile i (row-major over the tile grid), -2 image newline,
    -3 vision CLS. ``row``/``col``: patch cell within the view's ``grid x grid`` cells (-1 for text and CLS; a
    newline has the merged row it closes as ``row`` and -1 as ``col``). ``image_idx``: image number within its
    sequence (0 for the first), -1 for text.
    """

    view: np.ndarray
    row: np.ndarray
    col: np.ndarray
    image_idx: np.ndarray
    tile_grids: tuple[tuple[int, int], ...]
    """Per image of the batch (in order): AnyRes tile grid (rows, columns); (0, 0) when it has no tiles."""
    info: PatchInfo

    @property
    def is_image(self) -> np.ndarray:
        return self.view != VIEW_TEXT

    @property
    def is_patch(self) -> np.ndarray:
        """Tokens that stand for one patch cell of a view (not text, newline or CLS)."""
        return self.view >= 0


def _to_numpy_ids(input_ids: Any) -> np.ndarray:
    if isinstance(input_ids, torch.Tensor):
        arr = input_ids.detach().cpu().numpy()
    else:
        arr = np.asarray(input_ids)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise GeometryError(f"input_ids of shape {arr.shape}: expected (batch, seq) or (seq,)")
    return arr


def _image_sizes_list(image_sizes: Any) -> list[tuple[int, int]] | None:
    if image_sizes is None:
        return None
    if isinstance(image_sizes, torch.Tensor):
        image_sizes = image_sizes.detach().cpu().tolist()
    else:
        image_sizes = np.asarray(image_sizes).tolist()
    out = []
    for s in image_sizes:
        if len(s) != 2:
            raise GeometryError(f"image size {s}: expected (height, width)")
        out.append((int(s[0]), int(s[1])))
    return out


def token_geometry(
    family: str,
    config: Any,
    input_ids: Any,
    image_sizes: Any,
    processor_or_patch_info: Any = None,
    *,
    batch_num_images: Sequence[int] | Any = None,
) -> TokenGeometry:
    """Label every token of a processed batch with its view, patch row/column and image number.

    ``input_ids``: (batch, seq) or (seq,), any padding side. ``image_sizes``: (n_images, 2) original (height,
    width) of every image of the batch in order, as the processor returns it (may be None for LLaVA).
    ``processor_or_patch_info``: the processor (its image settings only matter to `patch_box`), a `PatchInfo`,
    or None. ``batch_num_images`` (OneVision): images per sample as the processor returns it; samples with more
    than one image get no AnyRes tiles. Image features are assigned to image tokens in order, as the model's
    ``masked_scatter`` does; a mismatch between tokens and images raises `GeometryError`.
    """
    info = _as_info(family, config, processor_or_patch_info)
    ids = _to_numpy_ids(input_ids)
    sizes = _image_sizes_list(image_sizes)
    if family != "llava" and sizes is None:
        raise GeometryError(f"{family}: image_sizes are needed to lay out AnyRes tiles")
    patched_flags: list[bool] | None = None
    if family == "llava_onevision" and batch_num_images is not None:
        counts = [int(n) for n in np.asarray(batch_num_images).reshape(-1).tolist()]
        patched_flags = [n == 1 for n in counts for _ in range(n)]

    shape = ids.shape
    view = np.full(shape, VIEW_TEXT, dtype=np.int16)
    row = np.full(shape, -1, dtype=np.int16)
    col = np.full(shape, -1, dtype=np.int16)
    image_idx = np.full(shape, -1, dtype=np.int16)
    grids: list[tuple[int, int]] = []

    k = 0  # global image counter, in the order the model scatters features
    for b in range(shape[0]):
        positions = np.flatnonzero(ids[b] == info.image_token_id)
        ptr = 0
        local = 0
        while ptr < len(positions):
            if sizes is not None and k >= len(sizes):
                raise GeometryError(
                    f"sequence {b} has {len(positions) - ptr} image tokens left over, but image_sizes lists only "
                    f"{len(sizes)} images"
                )
            hw = sizes[k] if sizes is not None else (info.tile_size, info.tile_size)
            if patched_flags is not None:
                if k >= len(patched_flags):
                    raise GeometryError(
                        f"batch_num_images accounts for {len(patched_flags)} images, but sequence {b} holds more"
                    )
                patched = patched_flags[k]
            else:
                patched = True
            layout = _image_layout(info, hw, patched)
            n = len(layout)
            if ptr + n > len(positions):
                hint = (
                    " (pass batch_num_images for multi-image OneVision samples)"
                    if family == "llava_onevision"
                    else ""
                )
                raise GeometryError(
                    f"sequence {b}: image {local} of size {hw} needs {n} image tokens, but only "
                    f"{len(positions) - ptr} remain{hint}"
                )
            pos = positions[ptr : ptr + n]
            view[b, pos], row[b, pos], col[b, pos] = layout.view, layout.row, layout.col
            image_idx[b, pos] = local
            if family != "llava" and patched:
                grids.append(anyres_grid_shape(info, hw))
            else:
                grids.append((0, 0))
            ptr += n
            local += 1
            k += 1
    if sizes is not None and k != len(sizes):
        raise GeometryError(f"image_sizes lists {len(sizes)} images, but input_ids hold image tokens for {k}")
    return TokenGeometry(view=view, row=row, col=col, image_idx=image_idx, tile_grids=tuple(grids), info=info)


# ----------------------------------------------------------------------------------------------------------------
# Pixel boxes
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Affine:
    """Per-axis map ``p' = s * p + t`` from original-image pixels to a processed view; (h, w) after it."""

    sy: float = 1.0
    ty: float = 0.0
    sx: float = 1.0
    tx: float = 0.0
    h: int = 0
    w: int = 0

    def then_scale(self, new_h: int, new_w: int) -> _Affine:
        fy, fx = new_h / self.h, new_w / self.w
        return _Affine(self.sy * fy, self.ty * fy, self.sx * fx, self.tx * fx, new_h, new_w)

    def then_shift(self, dy: float, dx: float, new_h: int, new_w: int) -> _Affine:
        return _Affine(self.sy, self.ty + dy, self.sx, self.tx + dx, new_h, new_w)

    def invert_box(self, y0: float, x0: float, y1: float, x1: float) -> tuple[float, float, float, float]:
        return (
            (x0 - self.tx) / self.sx,
            (y0 - self.ty) / self.sy,
            (x1 - self.tx) / self.sx,
            (y1 - self.ty) / self.sy,
        )


def _resize_per_size(a: _Affine, info: PatchInfo) -> _Affine:
    if info.size_shortest_edge:
        s = info.size_shortest_edge
        h, w = a.h, a.w
        if (h <= w and h == s) or (w <= h and w == s):
            return a
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = s, int(s * long / short)
        new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
        return a.then_scale(new_h, new_w)
    assert info.size_hw is not None
    return a.then_scale(*info.size_hw)


def _center_crop(a: _Affine, crop: tuple[int, int] | None) -> _Affine:
    if crop is None:
        return a

    def shift(orig: int, size: int) -> int:
        return -((orig - size) // 2) if orig >= size else math.ceil((size - orig) / 2)

    return a.then_shift(shift(a.h, crop[0]), shift(a.w, crop[1]), crop[0], crop[1])


def _pad_square(a: _Affine) -> _Affine:
    m = max(a.h, a.w)
    dy = (m - a.h) // 2 if a.w > a.h else 0
    dx = (m - a.w) // 2 if a.h > a.w else 0
    return a.then_shift(dy, dx, m, m)


def _patch_output_size(image_hw: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    oh, ow = image_hw
    th, tw = target
    scale_w, scale_h = tw / ow, th / oh
    if scale_w < scale_h:
        return min(math.ceil(oh * scale_w), th), tw
    return th, min(math.ceil(ow * scale_h), tw)


def _view_transform(info: PatchInfo, image_hw: tuple[int, int], view: int, multi_image: bool) -> _Affine:
    a = _Affine(h=image_hw[0], w=image_hw[1])
    if view == 0:
        if info.family == "llava":
            if info.pad_base_to_square:
                a = _pad_square(a)
        elif multi_image:
            a = _pad_square(a)
        else:
            side = info.size_hw if info.size_hw is not None else (info.size_shortest_edge,) * 2
            a = a.then_scale(int(side[0]), int(side[1]))
        return _center_crop(_resize_per_size(a, info), info.crop_hw)
    # AnyRes tile: resize into the best resolution keeping aspect, pad centred, cut tiles of tile_px.
    best = select_best_resolution(image_hw, info.grid_pinpoints)
    new_h, new_w = _patch_output_size(image_hw, best)
    a = a.then_scale(new_h, new_w)
    a = a.then_shift((best[0] - new_h) // 2, (best[1] - new_w) // 2, best[0], best[1])
    tile = int(info.tile_px or info.tile_size)
    n_cols = best[1] // info.tile_size
    ti, tj = divmod(view - 1, n_cols)
    a = a.then_shift(-ti * tile, -tj * tile, tile, tile)
    return _center_crop(_resize_per_size(a, info), info.crop_hw)


def patch_box(
    family: str,
    config: Any,
    image_size_hw: Sequence[int],
    view: int,
    row: int,
    col: int,
    processor_or_patch_info: Any = None,
    *,
    multi_image: bool = False,
) -> tuple[float, float, float, float]:
    """Box ``(x0, y0, x1, y1)`` in the original image's pixels of patch cell (row, col) of ``view``.

    The base view (0) undoes the processor's resize to the base square (LLaVA: shorter-side resize + centre
    crop, or padding to a square first when the processor pads); a tile (>= 1) undoes the resize into the
    AnyRes best resolution and its centred padding. The box is clipped to the image, so a cell lying wholly in
    padding gives an empty box. ``multi_image``: the image was one of several in a OneVision sample (padded to
    a square, no tiles).
    """
    info = _as_info(family, config, processor_or_patch_info)
    hw = (int(image_size_hw[0]), int(image_size_hw[1]))
    g = info.grid
    if not (0 <= row < g and 0 <= col < g):
        raise GeometryError(f"patch cell ({row}, {col}) is outside the {g}x{g} grid of a view")
    if view < 0:
        raise GeometryError(f"view {view} has no pixel box: only patch tokens (view >= 0) do")
    if view > 0:
        if family == "llava" or multi_image:
            raise GeometryError(f"view {view} is out of range: this image has only the base view (0)")
        n_rows, n_cols = anyres_grid_shape(info, hw)
        if view > n_rows * n_cols:
            raise GeometryError(
                f"view {view} is out of range: an image of size {hw} has {n_rows}x{n_cols} = {n_rows * n_cols} tiles"
            )
    a = _view_transform(info, hw, view, multi_image)
    ch, cw = a.h / g, a.w / g
    x0, y0, x1, y1 = a.invert_box(row * ch, col * cw, (row + 1) * ch, (col + 1) * cw)
    H, W = hw
    x0, x1 = min(max(x0, 0.0), W), min(max(x1, 0.0), W)
    y0, y1 = min(max(y0, 0.0), H), min(max(y1, 0.0), H)
    return (x0, y0, x1, y1)
