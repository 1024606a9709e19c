"""Tests of the toy world generator (mmsae.data.toyworld) and of image-set loading (mmsae.data.images)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from mmsae import storage
from mmsae.config import ToyWorldConfig
from mmsae.data import toyworld
from mmsae.data.images import ImageSetError, load_image_set


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _nearest_colour(rgb: np.ndarray, names: list[str]) -> str:
    return min(names, key=lambda n: float(np.abs(np.array(toyworld.COLORS[n]) - rgb.astype(float)).sum()))


def test_same_seed_gives_byte_identical_images_and_masks():
    cfg = ToyWorldConfig(seed=7)
    a = toyworld.generate(cfg, "train", 30)
    b = toyworld.generate(cfg, "train", 30)
    for x, y in zip(a, b, strict=True):
        assert _png(x.image) == _png(y.image)
        assert x.caption == y.caption and x.concepts == y.concepts
        assert all(np.array_equal(m, n) for m, n in zip(x.masks, y.masks, strict=True))
    other = toyworld.generate(ToyWorldConfig(seed=8), "train", 30)
    assert sum(_png(x.image) != _png(y.image) for x, y in zip(a, other, strict=True)) >= 25


def test_scene_depends_only_on_its_index_not_on_the_count():
    cfg = ToyWorldConfig()
    few = toyworld.generate(cfg, "train", 4)
    many = toyworld.generate(cfg, "train", 4, start=2)
    assert np.array_equal(few[2].image, many[0].image)
    assert np.array_equal(few[3].image, many[1].image)
    assert few[3].id == many[1].id


def test_train_and_heldout_come_from_disjoint_streams():
    cfg = ToyWorldConfig()
    train = {_png(s.image) for s in toyworld.generate(cfg, "train", 50)}
    heldout = {_png(s.image) for s in toyworld.generate(cfg, "heldout", 50)}
    assert not train & heldout
    with pytest.raises(toyworld.ToyWorldError, match="unknown split 'test'"):
        toyworld.generate(cfg, "test", 1)


def test_masks_are_the_union_of_the_objects_pixels_with_that_concept():
    # squares only: an object's pixels are exactly its box, so the truth is known independently
    cfg = ToyWorldConfig(max_objects=3, seed=1)
    for scene in toyworld.generate(cfg, "train", 60):
        boxes = {}
        for o in scene.objects:
            box = np.zeros((scene.height, scene.width), dtype=bool)
            box[o.y0 : o.y1, o.x0 : o.x1] = True
            assert o.area == box.sum()
            boxes[o] = box
        expected_concepts = set()
        for o in scene.objects:
            expected_concepts |= {f"color:{o.color}", f"texture:{o.texture}", f"size:{o.size}"}
        assert set(scene.concepts) == expected_concepts
        assert len(scene.masks) == len(scene.concepts)
        for concept, mask in zip(scene.concepts, scene.masks, strict=True):
            kind, name = concept.split(":")
            union = np.zeros_like(mask)
            for o, box in boxes.items():
                if getattr(o, kind) == name:
                    union |= box
            assert mask.dtype == bool and mask.shape == (scene.height, scene.width)
            assert np.array_equal(mask, union), (scene.id, concept)
        # outside every object the image is plain background
        anywhere = np.zeros((scene.height, scene.width), dtype=bool)
        for box in boxes.values():
            anywhere |= box
        background = scene.image[~anywhere]
        assert (background == background[0]).all()


def test_shape_concepts_appear_only_when_the_world_has_several_shapes():
    single = toyworld.generate(ToyWorldConfig(), "train", 20)
    assert not any(c.startswith("shape:") for s in single for c in s.concepts)
    cfg = ToyWorldConfig(shapes=["circle", "triangle", "cross"], seed=2)
    scenes = toyworld.generate(cfg, "train", 40)
    for scene in scenes:
        shapes = {o.shape for o in scene.objects}
        assert {c for c in scene.concepts if c.startswith("shape:")} == {f"shape:{s}" for s in shapes}
        for shape in shapes:
            # non-square shapes fill only part of their box; the mask holds exactly their pixels
            area = sum(o.area for o in scene.objects if o.shape == shape)
            assert scene.mask(f"shape:{shape}").sum() == area
            assert area < sum((o.x1 - o.x0) * (o.y1 - o.y0) for o in scene.objects if o.shape == shape)
    assert {o.shape for s in scenes for o in s.objects} == {"circle", "triangle", "cross"}


def test_caption_names_the_objects_from_left_to_right():
    cfg = ToyWorldConfig(max_objects=3, seed=4)
    scenes = toyworld.generate(cfg, "train", 80)
    assert any(len(s.objects) == 3 for s in scenes)
    for scene in scenes:
        xs = [o.cx for o in scene.objects]
        assert xs == sorted(xs)
        assert min((b - a for a, b in zip(xs, xs[1:], strict=False)), default=99) >= toyworld.MIN_DX
        words = scene.caption.replace(",", " ,").split()
        phrases = " ".join(words).replace(" , ", " and ").split(" and ")
        assert len(phrases) == len(scene.objects)
        for phrase, obj in zip(phrases, scene.objects, strict=True):
            article, size, colour, texture, shape = phrase.split()
            assert (article, size, colour, texture, shape) == (
                "a",
                obj.size,
                obj.color,
                obj.texture,
                obj.shape,
            )
            # the colour word matches the pixels actually drawn in that object's box
            region = scene.image[obj.y0 : obj.y1, obj.x0 : obj.x1].reshape(-1, 3)
            brightest = region[region.astype(int).sum(1).argmax()]
            assert _nearest_colour(brightest, cfg.colors) == colour


def test_image_sizes_stay_within_bounds_and_vary():
    cfg = ToyWorldConfig(min_size=64, max_size=80, size_step=1, long_side_max=False)
    scenes = toyworld.generate(cfg, "heldout", 200)
    widths = [s.width for s in scenes]
    heights = [s.height for s in scenes]
    assert min(widths) >= 64 and max(widths) <= 80 and min(heights) >= 64 and max(heights) <= 80
    assert len(set(zip(widths, heights, strict=True))) > 50
    assert all(s.image.shape == (s.height, s.width, 3) and s.image.dtype == np.uint8 for s in scenes)
    assert all(1 <= len(s.objects) <= cfg.max_objects for s in scenes)


def test_sizes_keep_the_long_side_and_step_the_short_one():
    cfg = ToyWorldConfig(max_size=96)
    sizes = {(s.width, s.height) for s in toyworld.generate(cfg, "train", 300)}
    assert all(max(w, h) == cfg.max_size for w, h in sizes)
    allowed = set(range(cfg.min_size, cfg.max_size + 1, cfg.size_step))
    assert all(w in allowed and h in allowed for w, h in sizes)
    assert {min(w, h) for w, h in sizes} == allowed  # every aspect ratio shows up
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)


def test_texture_patterns_lie_on_the_image_pixel_grid():
    cfg = ToyWorldConfig(textures=["striped", "checkered"], seed=6)
    seen = set()
    for scene in toyworld.generate(cfg, "train", 40):
        for o in scene.objects:
            region = scene.image[o.y0 : o.y1, o.x0 : o.x1].astype(int).sum(-1)
            bright = region > (region.max() + region.min()) / 2
            ys, xs = np.mgrid[o.y0 : o.y1, o.x0 : o.x1]  # image coordinates, not box coordinates
            if o.texture == "striped":
                expected = (ys % 4) < 2
            else:
                expected = ((ys // 2 + xs // 2) % 2) == 0
            assert np.array_equal(bright, expected), (scene.id, o)
            seen.add((o.texture, o.x0 % 4, o.y0 % 4))
    assert len(seen) > 8  # boxes start at every phase, the pattern does not follow them


def test_size_classes_stay_apart_after_rescaling_to_a_common_size():
    lo_large, hi_small = toyworld.SIZES["large"][0], toyworld.SIZES["small"][1]
    cfg = ToyWorldConfig()
    assert lo_large / hi_small > cfg.max_size / cfg.min_size


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("colors", ["red", "teal"], r"toyworld.colors: unknown \['teal'\]"),
        ("textures", ["wavy"], r"toyworld.textures: unknown \['wavy'\]"),
        ("shapes", [], "toyworld.shapes is empty"),
        ("min_size", 40, "toyworld.min_size"),
    ],
)
def test_config_naming_what_cannot_be_drawn_is_rejected(field, value, message):
    cfg = ToyWorldConfig(**{field: value})
    with pytest.raises(toyworld.ToyWorldError, match=message):
        toyworld.generate(cfg, "train", 1)


def test_build_round_trips_through_save_to_disk_and_load_image_set(tmp_path):
    cfg = ToyWorldConfig(n_train=12, n_heldout=5, seed=3)
    out = tmp_path / "world"
    info = toyworld.build(cfg, out)
    assert info["splits"] == {"train": 12, "heldout": 5}
    assert info["bytes"] > 0 and info["files"] >= 4
    manifest = storage.verify_artifact(str(out), kind="image_set")
    assert manifest.config["seed"] == 3 and manifest.extra["splits"] == {"train": 12, "heldout": 5}
    assert not [p for p in tmp_path.iterdir() if p.name != "world"]  # no temporary folder left behind

    train = load_image_set(out, split="train")
    assert len(train) == 12
    assert set(train.column_names) == {
        "id", "image", "caption", "concepts", "masks", "objects", "width", "height"
    }  # fmt: skip
    scenes = toyworld.generate(cfg, "train", 12)
    for row, scene in zip(train, scenes, strict=True):
        assert row["id"] == scene.id and row["caption"] == scene.caption
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), scene.image)
        assert (row["width"], row["height"]) == row["image"].size == (scene.width, scene.height)
        assert row["concepts"] == scene.concepts
        for img, mask in zip(row["masks"], scene.masks, strict=True):
            assert img.mode in ("1", "L")
            assert np.array_equal(np.asarray(img).astype(bool), mask)
        assert [o["color"] for o in row["objects"]] == [o.color for o in scene.objects]
        assert [o["x0"] for o in row["objects"]] == [o.x0 for o in scene.objects]
    heldout = load_image_set(f"file://{out}", split="heldout")
    assert len(heldout) == 5 and heldout[0]["id"].startswith("heldout-")
    assert load_image_set(out)[0]["id"].startswith("train-")  # `train` when no split is named
    with pytest.raises(ImageSetError, match="has no split 'test'"):
        load_image_set(out, split="test")


def test_rebuilding_replaces_the_old_image_set(tmp_path):
    out = tmp_path / "world"
    toyworld.build(ToyWorldConfig(n_train=6, n_heldout=2), out)
    toyworld.build(ToyWorldConfig(n_train=3, n_heldout=2, seed=5), out)
    assert len(load_image_set(out, split="train")) == 3
    assert json.loads((out / "manifest.json").read_text())["config"]["seed"] == 5
    storage.verify_artifact(str(out), kind="image_set")


def test_image_set_without_image_column_is_rejected(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "noimg"))
    with pytest.raises(ImageSetError, match=r"has no `image` column \(columns: \['text'\]\)"):
        load_image_set(tmp_path / "noimg")
    Dataset.from_dict({"image": [1, 2]}).to_parquet(str(tmp_path / "ints.parquet"))
    with pytest.raises(ImageSetError, match="column `image`"):
        load_image_set(tmp_path / "ints.parquet")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ImageSetError, match="no .parquet files and no images"):
        load_image_set(tmp_path / "empty")
    with pytest.raises(ImageSetError, match="does not exist"):
        load_image_set(tmp_path / "missing")


def test_folder_of_images_and_parquet_file_load_as_image_sets(tmp_path):
    scenes = toyworld.generate(ToyWorldConfig(), "train", 3)
    folder = tmp_path / "pics"
    (folder / "sub").mkdir(parents=True)
    for i, s in enumerate(scenes):
        s.pil().save(folder / ("sub" if i == 2 else "") / f"img{i}.png")
    ds = load_image_set(folder)
    assert ds["id"] == ["img0", "img1", "sub/img2"]
    assert np.array_equal(np.asarray(ds[2]["image"].convert("RGB")), scenes[2].image)

    toyworld.to_dataset(scenes).to_parquet(str(tmp_path / "world.parquet"))
    ds = load_image_set(tmp_path / "world.parquet")
    assert ds["caption"] == [s.caption for s in scenes]
    assert np.array_equal(np.asarray(ds[1]["image"].convert("RGB")), scenes[1].image)


def _memory_mapped(ds) -> bool:
    """True when the dataset's table is memory-mapped Arrow files on disk, not a table held in memory."""
    from datasets.table import MemoryMappedTable

    return isinstance(ds.data, MemoryMappedTable) and bool(ds.cache_files)


def test_image_sets_are_memory_mapped_not_held_in_memory(tmp_path):
    scenes = toyworld.generate(ToyWorldConfig(), "train", 3)
    toyworld.to_dataset(scenes).to_parquet(str(tmp_path / "world.parquet"))
    ds = load_image_set(tmp_path / "world.parquet")
    assert _memory_mapped(ds)
    (tmp_path / "parts").mkdir()
    toyworld.to_dataset(scenes).to_parquet(str(tmp_path / "parts" / "a.parquet"))
    assert _memory_mapped(load_image_set(tmp_path / "parts"))
    toyworld.build(ToyWorldConfig(n_train=3, n_heldout=1), tmp_path / "saved")
    assert _memory_mapped(load_image_set(tmp_path / "saved", split="train"))


@pytest.mark.services
def test_build_to_s3_and_load_back(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("MMSAE_CACHE_DIR", str(tmp_path / "cache"))
    cfg = ToyWorldConfig(n_train=4, n_heldout=2)
    uri = f"{s3_env}/toyworld"
    info = toyworld.build(cfg, uri)
    assert info["uri"] == uri
    storage.verify_artifact(uri, kind="image_set")
    ds = load_image_set(uri, split="train")
    scenes = toyworld.generate(cfg, "train", 4)
    assert ds["caption"] == [s.caption for s in scenes]
    assert np.array_equal(np.asarray(ds[0]["image"].convert("RGB")), scenes[0].image)
    # read from a local copy in the download cache, memory-mapped
    assert _memory_mapped(ds)
    assert all(f["filename"].startswith(str(tmp_path / "cache")) for f in ds.cache_files)

    # rebuilt in place with other settings: the new images are loaded, not the cached copy of the old ones
    other = ToyWorldConfig(n_train=3, n_heldout=2, seed=5)
    toyworld.build(other, uri)
    again = load_image_set(uri, split="train")
    assert again["caption"] == [s.caption for s in toyworld.generate(other, "train", 3)]


@pytest.mark.services
def test_parquet_and_image_folder_on_s3_load_from_local_disk(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("MMSAE_CACHE_DIR", str(tmp_path / "cache"))
    scenes = toyworld.generate(ToyWorldConfig(), "train", 3)
    toyworld.to_dataset(scenes).to_parquet(str(tmp_path / "world.parquet"))
    storage.upload_file(tmp_path / "world.parquet", f"{s3_env}/world.parquet")
    ds = load_image_set(f"{s3_env}/world.parquet")
    assert _memory_mapped(ds)
    assert ds["caption"] == [s.caption for s in scenes]

    for i, s in enumerate(scenes):
        storage.write_bytes(f"{s3_env}/pics/img{i}.png", _png(s.image))
    pics = load_image_set(f"{s3_env}/pics")
    assert pics["id"] == ["img0", "img1", "img2"]
    # the table holds paths into the local copy, not the images' bytes
    from datasets import Image as HFImage

    cells = pics.cast_column("image", HFImage(decode=False))["image"]
    assert all(c["bytes"] is None and c["path"].startswith(str(tmp_path / "cache")) for c in cells)
    assert np.array_equal(np.asarray(pics[2]["image"].convert("RGB")), scenes[2].image)
