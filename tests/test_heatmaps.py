"""Heat maps: every view placed on the original image, bilinear and graded renderings, PNG sizes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mmsae.heatmaps import (
    HeatmapError,
    activation_map,
    fit_size,
    load_patch_info,
    png_bytes,
    render_masked,
    render_overlay,
    view_affine,
)
from mmsae.models.geometry import anyres_grid_shape, patch_box, patch_info
from mmsae.models.tiny import build_tiny, save_tiny


@pytest.fixture(scope="module")
def info():
    model, processor = build_tiny("llava_next")  # 32 px views, patch 8: 4x4 cells per view
    return patch_info("llava_next", model.config, processor)


def one_cell(view: int, row: int, col: int, act: float = 2.0) -> dict[str, np.ndarray]:
    return {"view": np.array([view]), "row": np.array([row]), "col": np.array([col]), "act": np.array([act])}


def _inside(box, y: int, x: int) -> bool:
    x0, y0, x1, y1 = box
    return x0 <= x + 0.5 <= x1 and y0 <= y + 0.5 <= y1


@pytest.mark.parametrize("hw", [(64, 32), (40, 48), (100, 30)])
def test_view_affine_reproduces_every_cells_box(info, hw):
    n_rows, n_cols = anyres_grid_shape(info, hw)
    for view in range(n_rows * n_cols + 1):
        ox, sx, oy, sy = view_affine(info, hw, view)
        for r in range(4):
            for c in range(4):
                x0, y0, x1, y1 = patch_box("llava_next", None, hw, view, r, c, info)
                clip = lambda v, hi: min(max(v, 0.0), hi)  # noqa: E731
                assert x0 == pytest.approx(clip(ox + c * sx, hw[1]), abs=1e-6)
                assert x1 == pytest.approx(clip(ox + (c + 1) * sx, hw[1]), abs=1e-6)
                assert y0 == pytest.approx(clip(oy + r * sy, hw[0]), abs=1e-6)
                assert y1 == pytest.approx(clip(oy + (r + 1) * sy, hw[0]), abs=1e-6)


def test_single_cell_of_the_base_view_lands_on_its_region(info):
    hw = (64, 32)  # height, width
    heat = activation_map(one_cell(0, 1, 2), hw, info)
    assert heat.shape == hw
    box = patch_box("llava_next", None, hw, 0, 1, 2, info)  # x 16..24, y 16..32
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert _inside(box, y, x)
    assert heat.max() == pytest.approx(2.0, rel=0.1)
    ys, xs = np.nonzero(heat > 0)
    cy, cx = np.average(ys + 0.5, weights=heat[ys, xs]), np.average(xs + 0.5, weights=heat[ys, xs])
    assert _inside(box, cy - 0.5, cx - 0.5)
    # bilinear: nothing beyond the neighbouring cells' centres, graded in between
    assert heat[:8].max() == 0 and heat[40:].max() == 0 and heat[:, :12].max() == 0
    assert len(np.unique(np.round(heat[heat > 0], 4))) > 10


def test_single_cell_of_a_tile_lands_on_the_tiles_subregion(info):
    hw = (64, 32)  # two tiles stacked: tile 1 covers y 0..32, tile 2 y 32..64
    heat = activation_map(one_cell(2, 0, 0), hw, info)
    box = patch_box("llava_next", None, hw, 2, 0, 0, info)  # x 0..8, y 32..40
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert _inside(box, y, x)
    assert heat[:32].max() == 0  # tile 1's region is untouched
    # the tile's cells are 8 px tall, the base view's 16: a tile cell is finer than a base cell
    base = activation_map(one_cell(0, 2, 0), hw, info)
    assert (heat > 0).sum() < (base > 0).sum()


def test_views_combine_by_their_maximum_and_newline_tokens_are_left_out(info):
    hw = (64, 32)
    both = {k: np.concatenate([one_cell(0, 1, 2, 1.0)[k], one_cell(2, 0, 0, 3.0)[k], one_cell(-2, 0, -1, 9.0)[k]])
            for k in ("view", "row", "col", "act")}
    heat = activation_map(both, hw, info)
    np.testing.assert_allclose(heat, np.maximum(activation_map(one_cell(0, 1, 2, 1.0), hw, info),
                                                activation_map(one_cell(2, 0, 0, 3.0), hw, info)))
    assert heat.max() <= 3.0 + 1e-6
    with pytest.raises(HeatmapError, match="column 'act'"):
        activation_map({"view": [0], "row": [0], "col": [0]}, hw, info)
    with pytest.raises(HeatmapError, match="outside the 4x4 grid"):
        activation_map(one_cell(0, 4, 0), hw, info)


def test_masked_rendering_is_graded_not_binary():
    image = Image.new("RGB", (40, 30), (200, 100, 50))
    heat = np.tile(np.linspace(0, 1, 40, dtype=np.float32), (30, 1))
    out = np.asarray(render_masked(image, heat), dtype=np.float32)[..., 0]
    row = out[0]
    assert row[0] == pytest.approx(200 * 0.12, abs=1)  # inactive: 88% towards black
    assert row[-1] == pytest.approx(200, abs=1)  # at the map's maximum: untouched
    assert np.all(np.diff(row) >= 0) and len(np.unique(row)) > 20  # graded
    # a given scale: half the maximum is half way
    half = np.asarray(render_masked(image, np.full((30, 40), 0.5, np.float32), vmax=1.0))[0, 0, 0]
    assert half == pytest.approx(200 * (1 - 0.88 * 0.5), abs=1)


def test_overlay_opacity_grows_with_the_activation():
    image = Image.new("RGB", (40, 30), (30, 200, 30))
    heat = np.zeros((30, 40), np.float32)
    heat[:, 20:] = np.linspace(0.1, 2.0, 20, dtype=np.float32)
    out = np.asarray(render_overlay(image, heat, vmax=2.0), dtype=np.float32)
    assert np.array_equal(out[:, :20], np.asarray(image, dtype=np.float32)[:, :20])  # inactive: the image itself
    dist = np.abs(out[0, 20:] - np.array([30, 200, 30])).sum(1)
    assert dist[-1] > dist[0] and dist[-1] > 100


def test_png_sizes_equal_the_images(info):
    for w, h in [(32, 64), (48, 40), (30, 100)]:
        image = Image.new("RGB", (w, h), (10, 20, 30))
        heat = activation_map(one_cell(0, 0, 0), (h, w), info)
        for render in (render_overlay, render_masked):
            assert Image.open(io.BytesIO(png_bytes(render(image, heat)))).size == (w, h)
    with pytest.raises(HeatmapError, match="does not match"):
        render_masked(Image.new("RGB", (10, 10)), np.zeros((11, 10), np.float32))


def test_geometry_is_read_from_the_models_small_files(tmp_path, info):
    path = save_tiny("llava_next", tmp_path / "m")
    (path / "model.safetensors").unlink()  # weights are not needed
    assert load_patch_info(str(path)) == info
    with pytest.raises(HeatmapError, match="no config.json"):
        load_patch_info(str(tmp_path / "nothing"))


def test_fit_size_bounds_the_long_side_and_keeps_the_aspect_ratio():
    assert fit_size((1000, 872), 384) == (384, 335)
    assert fit_size((200, 1400), 384) == (55, 384)
    assert fit_size((300, 200), 384) == (300, 200)  # small images keep their size
    assert fit_size((5000, 3), 384) == (384, 1)
    assert fit_size((1000, 872), None) == (1000, 872)


def test_a_map_sampled_on_a_smaller_grid_keeps_the_original_geometry(info):
    # a 4x smaller grid over a 128x96 image: each output pixel's centre lies between two full-size pixel
    # centres, so it is their mean where the bilinear map is linear, and the cell lands on the same region
    h, w = 96, 128
    tokens = {"view": np.array([0, 1, 2]), "row": np.array([1, 2, 0]), "col": np.array([2, 1, 3]),
              "act": np.array([3.0, 1.0, 2.0])}
    full = activation_map(tokens, (h, w), info)
    small = activation_map(tokens, (h, w), info, size=(h // 4, w // 4))
    assert small.shape == (h // 4, w // 4)
    between = full[1::4, :][: h // 4] * 0.25 + full[2::4, :][: h // 4] * 0.25
    between = between[:, 1::4] + between[:, 2::4]
    close = np.abs(small - between) <= 0.05 * full.max()
    assert close.mean() > 0.97, close.mean()
    # the strongest region is where it is at full size
    peak, small_peak = np.unravel_index(full.argmax(), full.shape), np.unravel_index(small.argmax(), small.shape)
    assert all(abs(a // 4 - b) <= 1 for a, b in zip(peak, small_peak, strict=True)), (peak, small_peak)
