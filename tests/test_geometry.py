"""Image-token geometry checked against the real model forward of tiny random LLaVA-family models.

The model's own packing decides which projector feature lands on which image token; the tests hook the
multimodal projector (one feature per vision patch of each crop, all distinct with random weights) and the
language model's input embeddings, and check that every image token carries exactly the feature of the
(view, row, col) that `token_geometry` names.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from mmsae.models.geometry import (
    VIEW_CLS,
    VIEW_NEWLINE,
    VIEW_TEXT,
    GeometryError,
    image_token_count,
    patch_box,
    patch_info,
    token_geometry,
)
from mmsae.models.tiny import build_tiny

torch.set_num_threads(1)

_MODELS: dict[tuple, tuple] = {}


def tiny(family: str, **kw):
    key = (family, tuple(sorted((k, str(v)) for k, v in kw.items())))
    if key not in _MODELS:
        _MODELS[key] = build_tiny(family, **kw)
    return _MODELS[key]


def make_images(sizes_per_seq, seed=0):
    rng = np.random.RandomState(seed)
    return [
        [Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in seq]
        for seq in sizes_per_seq
    ]


def process(family, processor, sizes_per_seq, padding_side="right"):
    images = make_images(sizes_per_seq)
    # Text lengths differ between samples, so padding is needed even for equal image token counts.
    texts = [
        "USER: " + " and ".join("<image>" for _ in seq) + "\nwhat" + " is it" * i
        for i, seq in enumerate(sizes_per_seq)
    ]
    processor.tokenizer.padding_side = padding_side
    imgs = images if family == "llava_onevision" else [im for seq in images for im in seq]
    return processor(images=imgs, text=texts, return_tensors="pt", padding=True)


def forward_capture(model, inputs, projector_override=None):
    """Run the model; return (projector output per crop, language-model input embeddings)."""
    cap: dict[str, torch.Tensor] = {}

    def on_proj(_m, _a, out):
        if projector_override is not None:
            out = projector_override(out)
        cap["proj"] = out
        return out

    def on_lm(_m, _args, kwargs):
        cap["emb"] = kwargs["inputs_embeds"]

    h1 = model.model.multi_modal_projector.register_forward_hook(on_proj)
    h2 = model.model.language_model.register_forward_pre_hook(on_lm, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h1.remove()
        h2.remove()
    return cap["proj"], cap["emb"]


def crops_per_image(family, config, image_sizes, batch_num_images):
    """Crops the model feeds its vision tower per image, from transformers' own helper."""
    if family == "llava":
        return None
    sizes = image_sizes.tolist()
    patched = [True] * len(sizes)
    if batch_num_images is not None:
        patched = [n == 1 for n in batch_num_images.tolist() for _ in range(n)]
    return [
        image_size_to_num_patches(s, config.image_grid_pinpoints, config.vision_config.image_size) if p else 1
        for s, p in zip(sizes, patched, strict=True)
    ]


def global_image_index(geo):
    """Image number within the whole batch for every token (-1 for text)."""
    per_seq = [int(r.max()) + 1 if (r >= 0).any() else 0 for r in geo.image_idx]
    offsets = np.cumsum([0, *per_seq[:-1]])
    return np.where(geo.image_idx >= 0, geo.image_idx + offsets[:, None], -1)


def check_against_model(family, model, processor, inputs):
    config = model.config
    geo = token_geometry(
        family,
        config,
        inputs["input_ids"],
        inputs.get("image_sizes"),
        processor,
        batch_num_images=inputs.get("batch_num_images"),
    )
    proj, emb = forward_capture(model, inputs)
    g = config.vision_config.image_size // config.vision_config.patch_size
    # With random weights every projector feature is unique, so equality below pins one (crop, cell).
    flat = proj.reshape(-1, proj.shape[-1])
    assert torch.unique(flat, dim=0).shape[0] == flat.shape[0]

    ids = inputs["input_ids"].numpy()
    is_img = ids == config.image_token_id
    np.testing.assert_array_equal(geo.view != VIEW_TEXT, is_img)
    assert (
        (geo.row[~is_img] == -1).all()
        and (geo.col[~is_img] == -1).all()
        and (geo.image_idx[~is_img] == -1).all()
    )

    n_crops = crops_per_image(family, config, inputs.get("image_sizes"), inputs.get("batch_num_images"))
    crop_offset = np.cumsum([0, *n_crops]) if n_crops is not None else np.arange(proj.shape[0] + 1)
    kidx = global_image_index(geo)
    assert kidx.max() + 1 == len(crop_offset) - 1, "every image of the batch is placed"
    has_cls = proj.shape[1] == g * g + 1
    newline = getattr(model.model, "image_newline", None)
    used = set()
    for b, t in zip(*np.nonzero(is_img), strict=True):
        v, r, c, k = int(geo.view[b, t]), int(geo.row[b, t]), int(geo.col[b, t]), int(kidx[b, t])
        got = emb[b, t]
        if v == VIEW_NEWLINE:
            assert c == -1 and r >= 0
            torch.testing.assert_close(got, newline, rtol=0, atol=0)
            continue
        if v == VIEW_CLS:
            expected, key = proj[crop_offset[k], 0], (k, 0, -1)
        else:
            assert 0 <= r < g and 0 <= c < g, (v, r, c)
            assert v < crop_offset[k + 1] - crop_offset[k], "tile index within the image's crops"
            expected = proj[crop_offset[k] + v, r * g + c + (1 if has_cls else 0)]
            key = (k, v, r * g + c)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert key not in used, f"two tokens claim the same patch {key}"
        used.add(key)
    return geo


CASES = [
    ("llava", [[(40, 48)], [(30, 30), (50, 20)]], {}),
    ("llava", [[(40, 48)], [(64, 32)]], {"vision_feature_select_strategy": "full"}),  # CLS kept
    ("llava_next", [[(40, 48)], [(30, 90)]], {}),  # square-ish and wide (rows unpadded)
    ("llava_next", [[(90, 30), (64, 64)], [(37, 61)]], {}),  # tall (columns unpadded), two images in a sample
    ("llava_next", [[(50, 70)], [(120, 20)]], {"image_size": 24, "patch_size": 6}),
    ("llava_onevision", [[(40, 48)], [(90, 30)]], {}),
    # A multi-image sample: its images get the base view plus one newline each.
    ("llava_onevision", [[(40, 48), (20, 20)], [(61, 37)]], {}),
]


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize(("family", "sizes", "kw"), CASES)
def test_every_image_token_carries_the_projector_feature_the_geometry_names(family, sizes, kw, padding_side):
    model, processor = tiny(family, **kw)
    inputs = process(family, processor, sizes, padding_side)
    assert inputs["attention_mask"].eq(0).any(), "the batch is padded"
    geo = check_against_model(family, model, processor, inputs)
    n_images = sum(len(s) for s in sizes)
    assert len(geo.tile_grids) == n_images
    for b, seq in enumerate(sizes):
        assert int(geo.image_idx[b].max()) == len(seq) - 1
    if kw.get("vision_feature_select_strategy") == "full":
        assert (geo.view == VIEW_CLS).sum() == n_images


def test_unpadding_drops_padding_rows_of_wide_and_columns_of_tall_images():
    model, processor = tiny("llava_next")
    inputs = process("llava_next", processor, [[(30, 90)], [(90, 30)]])
    geo = check_against_model("llava_next", model, processor, inputs)
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    for b, (h, w) in enumerate([(30, 90), (90, 30)]):
        n_rows, n_cols = get_anyres_image_grid_shape([h, w], model.config.image_grid_pinpoints, 32)
        tiles = geo.view[b] >= 1
        merged_rows = (geo.view[b] == VIEW_NEWLINE).sum()
        merged_cols = tiles.sum() // merged_rows
        if w > h:
            assert merged_cols == n_cols * g and merged_rows < n_rows * g
        else:
            assert merged_rows == n_rows * g and merged_cols < n_cols * g


def _coordinate_features(model, image_sizes, batch_num_images=None):
    """Projector override whose features encode (image, base row/col or merged-grid Y/X) linearly."""
    cfg = model.config
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    n_crops = crops_per_image("llava_onevision", cfg, image_sizes, batch_num_images)

    def override(out):
        feats = torch.zeros_like(out)
        crop = 0
        for k, (size, n) in enumerate(zip(image_sizes.tolist(), n_crops, strict=True)):
            _, n_cols = get_anyres_image_grid_shape(
                size, cfg.image_grid_pinpoints, cfg.vision_config.image_size
            )
            for c in range(n):
                for cell in range(g * g):
                    r, col = divmod(cell, g)
                    f = feats[crop + c, cell]
                    f[5] = k + 1
                    if c == 0:
                        f[0], f[3], f[4] = 1.0, r, col
                    else:
                        ti, tj = divmod(c - 1, n_cols)
                        f[1], f[2] = ti * g + r, tj * g + col
            crop += n
        return feats

    return override


@pytest.mark.parametrize(
    ("sizes", "kw"),
    [
        ([[(64, 64)], [(60, 40)]], {"vision_aspect_ratio": "anyres_max_2"}),
        (
            [[(128, 128)], [(100, 128)]],
            {"grid_pinpoints": [[32 * i, 32 * j] for i in range(1, 5) for j in range(1, 5)]},
        ),
    ],
)
def test_onevision_anyres_max_downsampling_maps_each_cell_to_the_tile_cell_under_its_centre(sizes, kw):
    model, processor = tiny("llava_onevision", **kw)
    inputs = process("llava_onevision", processor, sizes)
    cfg = model.config
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    geo = token_geometry(
        "llava_onevision",
        cfg,
        inputs["input_ids"],
        inputs["image_sizes"],
        processor,
        batch_num_images=inputs["batch_num_images"],
    )
    _, emb = forward_capture(model, inputs, _coordinate_features(model, inputs["image_sizes"]))
    kidx = global_image_index(geo)
    shrunk = 0
    for k, (h, w) in enumerate(inputs["image_sizes"].tolist()):
        n_rows, n_cols = get_anyres_image_grid_shape(
            [h, w], cfg.image_grid_pinpoints, cfg.vision_config.image_size
        )
        sel = kidx == k
        # Token count equals the processor's own count for this image.
        expected = processor._get_num_multimodal_tokens(image_sizes=[[h, w]])["num_image_tokens"][0]
        assert sel.sum() == expected
        tiles = sel & (geo.view >= 1)
        n_merged_rows = int((sel & (geo.view == VIEW_NEWLINE)).sum())
        if (
            tiles.sum() < n_rows * n_cols * g * g
            and n_merged_rows < n_rows * g
            and tiles.sum() // n_merged_rows < n_cols * g
        ):
            shrunk += 1
        e = emb[torch.from_numpy(tiles)]
        v, r, c = (torch.from_numpy(a[tiles].astype(np.int64)) for a in (geo.view, geo.row, geo.col))
        ti, tj = torch.div(v - 1, n_cols, rounding_mode="floor"), (v - 1) % n_cols
        assert (ti < n_rows).all()
        Y, X = (ti * g + r).float(), (tj * g + c).float()
        # Bilinear interpolation of linear coordinates gives the sampled source position; the named cell is the
        # one containing it (distance at most half a cell).
        assert (e[:, 1] - Y).abs().max() <= 0.5 + 1e-4
        assert (e[:, 2] - X).abs().max() <= 0.5 + 1e-4
        torch.testing.assert_close(e[:, 5], torch.full_like(e[:, 5], k + 1))
        base = sel & (geo.view == 0)
        eb = emb[torch.from_numpy(base)]
        torch.testing.assert_close(eb[:, 3], torch.from_numpy(geo.row[base].astype(np.float32)))
        torch.testing.assert_close(eb[:, 4], torch.from_numpy(geo.col[base].astype(np.float32)))
    assert shrunk >= 1, "at least one image was downsampled"


@pytest.mark.parametrize(
    ("family", "kw"),
    [
        ("llava_next", {}),
        ("llava_onevision", {"grid_pinpoints": [[32 * i, 32 * j] for i in range(1, 5) for j in range(1, 5)]}),
        ("llava_onevision", {"vision_aspect_ratio": "anyres_max_1"}),
    ],
)
def test_token_counts_match_the_processor_for_many_image_sizes(family, kw):
    model, processor = tiny(family, **kw)
    rng = np.random.RandomState(1)
    sizes = [(int(h), int(w)) for h, w in rng.randint(8, 300, size=(150, 2))] + [
        (32, 32),
        (64, 32),
        (17, 300),
    ]
    expected = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    got = [image_token_count(family, model.config, s, processor) for s in sizes]
    assert got == expected


def test_mismatched_tokens_and_images_raise_a_geometry_error():
    model, processor = tiny("llava_next")
    inputs = process("llava_next", processor, [[(40, 48)], [(30, 90)]])
    ids = inputs["input_ids"].clone()
    first = int(np.flatnonzero(ids[0].numpy() == model.config.image_token_id)[0])
    ids[0, first] = processor.tokenizer.pad_token_id
    with pytest.raises(GeometryError, match="image tokens"):
        token_geometry("llava_next", model.config, ids, inputs["image_sizes"], processor)
    extra = torch.cat([inputs["image_sizes"], inputs["image_sizes"][:1]])
    with pytest.raises(GeometryError, match="image_sizes lists 3 images"):
        token_geometry("llava_next", model.config, inputs["input_ids"], extra, processor)


# ------------------------------------------------------------------------------------------------ patch_box


def test_patch_box_of_llava_base_view_of_square_and_wide_images():
    model, processor = tiny("llava")
    cfg = model.config
    # 64x64 -> 32x32, 4x4 cells of 8 px -> 16 px in the original.
    assert patch_box("llava", cfg, (64, 64), 0, 1, 2, processor) == pytest.approx((32, 16, 48, 32))
    # 40x80 (h, w): shorter side 40 -> 32 (x0.8), 64 wide, centre crop drops 16 px = 20 original px left.
    assert patch_box("llava", cfg, (40, 80), 0, 0, 0, processor) == pytest.approx((20, 0, 30, 10))
    assert patch_box("llava", cfg, (40, 80), 0, 3, 3, processor) == pytest.approx((50, 30, 60, 40))


def test_patch_box_of_a_tile_of_a_two_by_one_grid():
    model, processor = tiny("llava_next")
    cfg = model.config
    # 64x32 (h, w) fits the (64, 32) pinpoint exactly: two tiles stacked, no resize, no padding.
    assert patch_info("llava_next", cfg, processor).tile_px == 32
    assert patch_box("llava_next", cfg, (64, 32), 2, 0, 0, processor) == pytest.approx((0, 32, 8, 40))
    assert patch_box("llava_next", cfg, (64, 32), 1, 3, 1, processor) == pytest.approx((8, 24, 16, 32))
    # Base view squashes the whole image to the base square.
    assert patch_box("llava_next", cfg, (64, 32), 0, 0, 0, processor) == pytest.approx((0, 0, 8, 16))


def test_patch_box_of_padding_cells_is_empty_and_neighbours_start_at_the_image_edge():
    model, processor = tiny("llava_next")
    cfg = model.config
    # 32x48 -> best (32, 64), resized to 32x48, pasted 8 px from the left.
    x0, y0, x1, y1 = patch_box("llava_next", cfg, (32, 48), 1, 0, 0, processor)
    assert x0 == x1 == 0
    assert patch_box("llava_next", cfg, (32, 48), 1, 0, 1, processor) == pytest.approx((0, 0, 8, 8))
    x0, _, x1, _ = patch_box("llava_next", cfg, (32, 48), 2, 0, 3, processor)
    assert x0 == x1 == 48


def test_patch_box_of_a_multi_image_onevision_view_undoes_the_square_padding():
    model, processor = tiny("llava_onevision")
    cfg = model.config
    # 20x40 padded to 40x40 (10 px above), resized to 32: one cell is 10 px.
    x0, y0, x1, y1 = patch_box("llava_onevision", cfg, (20, 40), 0, 0, 0, processor, multi_image=True)
    assert y0 == y1 == 0
    assert patch_box("llava_onevision", cfg, (20, 40), 0, 1, 0, processor, multi_image=True) == pytest.approx(
        (0, 0, 10, 10)
    )


@pytest.mark.parametrize(
    ("family", "size"),
    [
        ("llava", (70, 150)),
        ("llava_next", (70, 150)),
        ("llava_next", (150, 45)),
        ("llava_onevision", (90, 200)),
    ],
)
def test_patch_box_contains_the_pixels_the_processor_puts_in_that_cell(family, size):
    """Process an image whose pixels hold their own coordinates; each cell's centre pixel must fall in its box."""
    model, processor = tiny(family)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx, yy, np.full_like(xx, 255)], -1).astype(np.uint8)
    out = processor.image_processor(
        [Image.fromarray(arr)], do_rescale=False, do_normalize=False, return_tensors="np", resample=0
    )
    pv = out["pixel_values"][0]
    crops = pv if pv.ndim == 4 else pv[None]
    info = patch_info(family, model.config, processor)
    g, cell = info.grid, info.tile_size // info.grid
    n_views = (
        1 if family == "llava" else image_size_to_num_patches([h, w], model.config.image_grid_pinpoints, 32)
    )
    checked = 0
    for v in range(n_views):
        for r in range(g):
            for c in range(g):
                py, px = r * cell + cell // 2, c * cell + cell // 2
                red, green, blue = crops[v, :, py, px]
                x0, y0, x1, y1 = patch_box(family, model.config, size, v, r, c, processor)
                if blue < 128:  # processor padding
                    continue
                assert x0 - 1 <= red <= x1 + 1 and y0 - 1 <= green <= y1 + 1, (
                    v,
                    r,
                    c,
                    red,
                    green,
                    (x0, y0, x1, y1),
                )
                checked += 1
    assert checked >= n_views * g * g // 2


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
def test_patch_boxes_without_a_processor_follow_the_family_defaults(family):
    model, processor = tiny(family)
    cfg, size = model.config, (45, 100)
    n_views = 1 if family == "llava" else image_size_to_num_patches(list(size), cfg.image_grid_pinpoints, 32)
    for v in range(n_views):
        for r, c in [(0, 0), (1, 3), (3, 2)]:
            expected = patch_box(family, cfg, size, v, r, c, processor)
            assert patch_box(family, cfg, size, v, r, c) == pytest.approx(expected)
            assert patch_box(family, cfg, size, v, r, c, processor.image_processor) == pytest.approx(expected)
    with pytest.raises(GeometryError, match="out of range"):
        patch_box(family, cfg, size, n_views, 0, 0)
    with pytest.raises(GeometryError, match="outside the 4x4 grid"):
        patch_box(family, cfg, size, 0, 4, 0)
