"""Tests of the toy LMM (mmsae.models.toy): a short training run on a tiny config, its cache, save/reload,
batched captioning and the caption scorer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmsae.config import ToyLMMConfig, ToyWorldConfig
from mmsae.data import toyworld
from mmsae.models import toy

TINY_WORLD = ToyWorldConfig(n_train=160, n_heldout=12, max_size=96, seed=11)
TINY_LMM = ToyLMMConfig(
    base_size=32,
    patch_size=16,
    vision_hidden=32,
    vision_layers=1,
    vision_heads=2,
    text_hidden=32,
    text_layers=1,
    text_heads=2,
    steps=60,
    batch_size=16,
    lr=3e-3,
    eval_batch_size=6,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and one thread does not stall when other processes hold the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """The tiny toy LMM trained once for this module: (cache_dir, model_dir, metrics)."""
    cache = tmp_path_factory.mktemp("cache")
    path, metrics = toy.get_or_train(TINY_LMM, TINY_WORLD, cache_dir=cache)
    return cache, path, metrics


def _objects(*spec: tuple[str, str, str]) -> list[dict[str, str]]:
    return [{"size": s, "color": c, "texture": t, "shape": "square"} for s, c, t in spec]


def test_short_training_lowers_the_loss_and_reports_metrics(trained):
    _, path, metrics = trained
    assert metrics["cached"] is False
    assert metrics["steps"] == TINY_LMM.steps
    assert metrics["final_loss"] < 0.6 * metrics["first_loss"]
    assert len(metrics["loss_curve"]) == TINY_LMM.steps // toy.LOSS_WINDOW
    assert metrics["loss_curve"][-1] < metrics["loss_curve"][0]
    for key in ("pair_accuracy", "color_accuracy", "texture_accuracy", "exact_caption"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["n_images"] == TINY_WORLD.n_heldout
    stored = json.loads((path / toy.METRICS_FILE).read_text())
    assert stored["final_loss"] == metrics["final_loss"] and "cached" not in stored
    info = json.loads((path / toy.INFO_FILE).read_text())
    assert info["prompt"] == toy.PROMPT and info["toylmm"]["steps"] == 60


def test_saved_model_reloads_with_auto_classes_and_reproduces_its_metrics(trained):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, path, metrics = trained
    model, processor = toy.load_toy_lmm(path)
    auto_model = AutoModelForImageTextToText.from_pretrained(str(path)).eval()
    auto_processor = AutoProcessor.from_pretrained(str(path))
    assert type(auto_model).__name__ == "LlavaNextForConditionalGeneration"
    assert type(auto_processor).__name__ == "LlavaNextProcessor"

    scenes = toyworld.generate(TINY_WORLD, "heldout", 3)
    enc = processor(images=[s.pil() for s in scenes[:1]], text=[toy.PROMPT], return_tensors="pt")
    enc2 = auto_processor(images=[s.pil() for s in scenes[:1]], text=[toy.PROMPT], return_tensors="pt")
    assert torch.equal(enc["input_ids"], enc2["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, auto_model(**enc2).logits)

    # the reloaded weights are the trained ones: re-scoring the held-out split gives the recorded metrics
    heldout = toy.examples_from_scenes(toyworld.generate(TINY_WORLD, "heldout", TINY_WORLD.n_heldout))
    again = toy.evaluate(model, processor, heldout, TINY_LMM.eval_batch_size)
    for key in ("pair_accuracy", "color_accuracy", "texture_accuracy", "count_accuracy", "exact_caption"):
        assert again[key] == metrics[key]
    assert again["samples"] == metrics["samples"]


def test_save_and_reload_give_identical_logits_for_changed_weights(tmp_path):
    model, processor = toy.build_toy_lmm(TINY_LMM)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():  # weights no initialiser would reproduce
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    toy.save_toy_lmm(model, processor, tmp_path / "m", info={"note": "test"})
    reloaded, reproc = toy.load_toy_lmm(tmp_path / "m")
    scene = toyworld.generate(TINY_WORLD, "train", 1)[0]
    enc = reproc(images=[scene.pil()], text=[toy.PROMPT], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, reloaded(**enc).logits)
    assert json.loads((tmp_path / "m" / toy.INFO_FILE).read_text())["note"] == "test"


def test_second_call_uses_the_cache_and_does_not_train(trained, monkeypatch):
    cache, path, metrics = trained
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def must_not_train(*args, **kwargs):
        raise AssertionError("the cached toy LMM was trained again")

    monkeypatch.setattr(toy, "train_toy_lmm", must_not_train)
    again_path, again = toy.get_or_train(TINY_LMM, TINY_WORLD, cache_dir=cache)
    assert again_path == path
    assert again["cached"] is True
    assert {k: v for k, v in again.items() if k != "cached"} == {
        k: v for k, v in metrics.items() if k != "cached"
    }
    assert weights.stat().st_mtime_ns == mtime


def test_cache_dir_defaults_to_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MMSAE_CACHE_DIR", str(tmp_path))
    assert toy.cache_root() == tmp_path
    monkeypatch.delenv("MMSAE_CACHE_DIR")
    assert toy.cache_root() == toy.Path.home() / ".cache" / "mmsae"


def test_interrupted_training_leaves_no_cache_entry(tmp_path, monkeypatch):
    def crash(lmm_cfg, world_cfg, world_dir, out_dir):
        (toy.Path(out_dir) / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed")

    monkeypatch.setattr(toy, "train_toy_lmm", crash)
    with pytest.raises(RuntimeError, match="killed"):
        toy.get_or_train(TINY_LMM, TINY_WORLD, cache_dir=tmp_path)
    root = tmp_path / "toy-lmm"
    key = toy.cache_key(TINY_LMM, TINY_WORLD)
    assert sorted(p.name for p in root.iterdir()) == [f"{key}.lock"]


def test_cache_key_follows_both_configs():
    key = toy.cache_key(TINY_LMM, TINY_WORLD)
    assert key == toy.cache_key(TINY_LMM.model_copy(), TINY_WORLD.model_copy())
    assert key != toy.cache_key(TINY_LMM.model_copy(update={"seed": 1}), TINY_WORLD)
    assert key != toy.cache_key(TINY_LMM, TINY_WORLD.model_copy(update={"n_train": 161}))


def test_training_is_deterministic_for_a_seed(tmp_path):
    world = ToyWorldConfig(n_train=16, n_heldout=2, seed=2)
    cfg = TINY_LMM.model_copy(update={"steps": 3, "batch_size": 8})
    a = toy.train_toy_lmm(cfg, world, None, tmp_path / "a")
    b = toy.train_toy_lmm(cfg, world, None, tmp_path / "b")
    toy.train_toy_lmm(cfg.model_copy(update={"seed": 1}), world, None, tmp_path / "c")
    wa, wb, wc = (load_file(str(tmp_path / d / "model.safetensors")) for d in "abc")
    assert a["final_loss"] == b["final_loss"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_training_runs_on_the_configured_threads_and_restores_them(tmp_path, monkeypatch):
    world = ToyWorldConfig(n_train=8, n_heldout=2)
    cfg = TINY_LMM.model_copy(update={"steps": 1, "batch_size": 4})
    monkeypatch.setenv(toy.THREADS_ENV, "2")
    assert toy.train_toy_lmm(cfg, world, None, tmp_path / "a")["torch_threads"] == 2
    assert torch.get_num_threads() == 1  # the module's setting is back
    monkeypatch.setenv(toy.THREADS_ENV, "many")
    with pytest.raises(toy.ToyLMMError, match="MMSAE_TOY_THREADS='many': expected a positive number"):
        toy.train_toy_lmm(cfg, world, None, tmp_path / "b")


def test_training_reads_a_built_image_set_with_several_shapes(tmp_path):
    world = ToyWorldConfig(n_train=16, n_heldout=3, seed=4, shapes=["square", "circle", "triangle"])
    toyworld.build(world, tmp_path / "world")
    cfg = TINY_LMM.model_copy(update={"steps": 2, "batch_size": 8})
    from_disk = toy.train_toy_lmm(cfg, world, tmp_path / "world", tmp_path / "a")
    in_memory = toy.train_toy_lmm(cfg, world, None, tmp_path / "b")
    assert from_disk["first_loss"] == in_memory["first_loss"]
    assert from_disk["n_images"] == 3 and 0.0 <= from_disk["shape_accuracy"] <= 1.0


def test_encoded_batches_equal_the_processor_output_and_label_only_the_caption():
    model, processor = toy.build_toy_lmm(TINY_LMM)
    examples = toy.examples_from_scenes(toyworld.generate(TINY_WORLD, "train", 6))
    data = toy.encode_examples(processor, examples)
    batch = toy.collate(data, list(range(6)), processor.tokenizer.pad_token_id)
    texts = [f"{toy.PROMPT} {ex.caption} </s>" for ex in examples]
    ref = processor(images=[ex.image for ex in examples], text=texts, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])
    assert torch.equal(batch["image_sizes"], ref["image_sizes"])
    assert torch.allclose(batch["pixel_values"], ref["pixel_values"], atol=1e-5)
    tok = processor.tokenizer
    for row, ex in zip(batch["labels"], examples, strict=True):
        scored = row[row != -100].tolist()
        assert tok.convert_ids_to_tokens(scored) == ex.caption.replace(",", " ,").split() + ["</s>"]
    assert model(**batch).loss.isfinite()


def test_batched_captions_with_left_padding_match_one_by_one(trained):
    _, path, _ = trained
    model, processor = toy.load_toy_lmm(path)
    by_length: dict[int, list] = {}
    for scene in toyworld.generate(TINY_WORLD, "heldout", 40):
        n = len(processor(images=[scene.pil()], text=[toy.PROMPT])["input_ids"][0])
        by_length.setdefault(n, []).append(scene.pil())
    assert len(by_length) > 1  # image sizes differ, so do their numbers of image tokens
    images = [im for group in by_length.values() for im in group[:2]][:6]
    batched = toy.caption_images(model, processor, images, batch_size=6)
    single = [toy.caption_images(model, processor, [im], batch_size=1)[0] for im in images]
    assert batched == single
    assert processor.tokenizer.padding_side == "right"


def test_parser_scores_a_known_caption():
    truth = _objects(("large", "red", "striped"), ("small", "blue", "dotted"))
    caption = "a large red striped square and a small blue dotted square"
    perfect = toy.score_captions([caption], [truth], [caption])
    assert perfect["pair_accuracy"] == perfect["exact_caption"] == perfect["count_accuracy"] == 1.0
    assert perfect["full_accuracy"] == perfect["size_accuracy"] == 1.0

    swapped = "a large red dotted square and a small blue striped square"
    s = toy.score_captions([swapped], [truth], [caption])
    assert s["pair_accuracy"] == 0.0
    assert s["color_accuracy"] == s["texture_accuracy"] == 1.0
    assert s["exact_caption"] == 0.0

    # order does not matter for the multiset scores; a missing object halves recall
    reordered = "a small blue dotted square , a large red striped square"
    assert toy.score_captions([reordered], [truth], [caption])["pair_accuracy"] == 1.0
    half = toy.score_captions(["a small blue dotted square"], [truth], [caption])
    assert half["pair_accuracy"] == 0.5 and half["count_accuracy"] == 0.0 and half["pair_precision"] == 1.0

    assert toy.parse_caption("a large red striped square, a small cyan grid circle and a") == [
        {"size": "large", "color": "red", "texture": "striped", "shape": "square"},
        {"size": "small", "color": "cyan", "texture": "grid", "shape": "circle"},
    ]
    assert toy.normalize_caption("a x, a y") == toy.normalize_caption("a x , a y")


def test_tokenizer_and_chat_template_render_the_prompt():
    processor = toy.build_processor(TINY_LMM)
    tok = processor.tokenizer
    assert tok.unk_token_id not in tok(" ".join(toyworld.vocabulary()))["input_ids"]
    assert tok.decode(tok("a large red striped square , a small blue dotted square")["input_ids"]) == (
        "a large red striped square, a small blue dotted square"
    )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == toy.PROMPT
    assert tok.convert_tokens_to_ids("<image>") == tok.image_token_id


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = ToyLMMConfig(steps=100, warmup_frac=0.1, min_lr_frac=0.05)
    factors = [toy.lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False))
    assert factors[-1] == pytest.approx(0.05, abs=0.01)


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"base_size": 48, "patch_size": 20}, "must divide toylmm.base_size"),
        ({"grid_pinpoints": [[64, 70]]}, "not a \\[height, width\\] pair of multiples of 64"),
        ({"vision_hidden": 30, "vision_heads": 4}, "vision_heads"),
    ],
)
def test_config_whose_parts_do_not_fit_is_rejected(update, message):
    with pytest.raises(toy.ToyLMMError, match=message):
        toy.build_toy_lmm(ToyLMMConfig(**update))


def test_default_image_token_count_stays_small():
    """Every image of a 64..96 px world costs a bounded number of image tokens (AnyRes base + tiles)."""
    processor = toy.build_processor(ToyLMMConfig())
    world = ToyWorldConfig(max_size=96)
    counts = set()
    for w, h in [(world.min_size, world.min_size), (world.min_size, world.max_size), (world.max_size, 77)]:
        im = Image.new("RGB", (w, h))
        ids = processor(images=[im], text=[toy.PROMPT])["input_ids"][0]
        counts.add(sum(i == processor.tokenizer.image_token_id for i in ids))
    assert max(counts) <= 80 and len(counts) > 1


def test_cached_rows_of_the_toy_world_point_at_the_pixels_the_processor_gave_their_patch(trained, tmp_path):
    # Independent of the geometry code: the processor's own pixel tensor of each cached (view, row, col)
    # must show what the original image shows inside that cell's box (patch_box), on toy images of varied
    # sizes (AnyRes tiles with unpadding). Compared by mean colour, the images being flat-coloured shapes.

    from mmsae import activations
    from mmsae.config import RunConfig
    from mmsae.data.images import load_image_set
    from mmsae.models import load_lmm, patch_box
    from mmsae.stages import cache
    from mmsae.stages._base import model_prompt

    _, model, _ = trained
    world = tmp_path / "world"
    toyworld.build(ToyWorldConfig(n_train=30, n_heldout=1, min_size=64, max_size=96, seed=5), world)
    cfg = RunConfig()
    cfg.tracking.enabled = False
    cfg.run.workdir = str(tmp_path / "work")
    cfg.cache = cfg.cache.model_copy(update={"image_set": str(world), "model": str(model), "split": "train",
                                             "out": str(tmp_path / "acts"), "layers": [0], "num_workers": 0})
    cache.run(cfg)
    shards = activations.ActivationShards(str(tmp_path / "acts"))
    rows = {k: torch.cat([s[k] for s in shards.iter_shards()]) for k in ("image_idx", "view", "row", "col")}
    lmm = load_lmm(model)
    ip = lmm.processor.image_processor
    mean, std = torch.tensor(ip.image_mean).view(3, 1, 1), torch.tensor(ip.image_std).view(3, 1, 1)
    ds = load_image_set(str(world), "train")
    patch = lmm.config.vision_config.patch_size
    diffs, sizes, views = [], set(), set()
    for i in range(len(ds)):
        image = ds[i]["image"].convert("RGB")
        sizes.add(image.size)
        enc = lmm.processor(images=image, text=model_prompt(str(model)), return_tensors="pt")
        pixels = enc["pixel_values"][0] * std + mean  # [views, 3, H, W] in [0, 1]
        original = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
        background = original.flatten(1).median(1).values  # the shapes cover less than half of an image
        mine = (rows["image_idx"] == i) & (rows["view"] >= 0)
        assert int(mine.sum()) > 0
        for v, r, c in zip(*(rows[k][mine].tolist() for k in ("view", "row", "col")), strict=True):
            views.add(v)
            x0, y0, x1, y1 = patch_box(lmm.family, lmm.config, (image.height, image.width), v, r, c, ip)
            box = original[:, round(y0):round(y1), round(x0):round(x1)]
            if box.shape[1] < 2 or box.shape[2] < 2:
                continue  # a sliver of a cell (the processor's padding): nothing to compare
            if float((box.mean((1, 2)) - background).abs().max()) < 0.1:
                continue  # background only: any misplaced background cell would match as well
            cell = pixels[v, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
            diffs.append(float((cell.mean((1, 2)) - box.mean((1, 2))).abs().max()))
    assert len(sizes) > 1 and max(views) >= 1  # varied sizes, and tiles as well as the base view
    diffs = np.asarray(diffs)
    assert len(diffs) >= 20
    assert np.median(diffs) < 0.03 and np.quantile(diffs, 0.9) < 0.1, (np.median(diffs), np.quantile(diffs, 0.9))
