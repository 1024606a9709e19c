"""The toy LMM: a tiny LLaVA-NeXT trained from scratch on the CPU to caption the toy world.

The model is built from configs (a CLIP vision tower and a Llama text model, all weights random), with a
word-level tokenizer made from the toy world's vocabulary, and trained with teacher forcing on the toy world's
training captions: the prompt is ``<s><image> describe :`` and only the caption tokens and ``</s>`` are scored.
Training is step-based (AdamW, linear warm-up, cosine decay, gradient clipping at 1.0), so its result depends on
the seed and the configs, never on how fast the machine is.

Reads the toy world (generated in memory, or an image set written by ``mmsae.data.toyworld.build``).
Writes a model directory: ``save_pretrained`` of the model and of its ``LlavaNextProcessor`` (so
``AutoModelForImageTextToText``/``AutoProcessor`` or ``LlavaNextForConditionalGeneration.from_pretrained`` load it),
``toy_lmm.json`` (prompt, configs, code version) and ``metrics.json`` (held-out caption accuracy, loss curve).
`get_or_train` keeps one such directory per (configs, code version) under ``$MMSAE_CACHE_DIR/toy-lmm/``
(default ``~/.cache/mmsae/toy-lmm/``), written atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from mmsae.config import ToyLMMConfig, ToyWorldConfig
from mmsae.data import toyworld

log = logging.getLogger(__name__)

CODE_VERSION = "3"
"""Part of the cache key: bump it whenever a change here changes the trained model."""

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
"""Special tokens of the toy tokenizer, in id order."""
PROMPT_WORDS: tuple[str, ...] = ("describe", ":")
PROMPT = "<s><image> describe :"
"""The captioning prompt; the caption follows it, then ``</s>``."""
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% elif message['role'] == 'assistant' %} : {{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }} </s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} :{% endif %}"
)
"""Chat template that renders ``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text":
"describe"}]}]`` with a generation prompt as `PROMPT`."""
INFO_FILE = "toy_lmm.json"
METRICS_FILE = "metrics.json"
LOSS_WINDOW = 25
"""Steps per point of the recorded loss curve (mean loss over the window)."""
THREADS_ENV = "MMSAE_TOY_THREADS"
"""Environment variable with the number of torch threads for training and evaluating the toy LMM (default 1:
a 1 M-parameter model gains little from more, one thread never stalls when other processes hold the CPU, and
one thread gives the same floating-point results on every machine)."""

__all__ = [
    "CODE_VERSION",
    "PROMPT",
    "ToyLMMError",
    "build_processor",
    "build_tokenizer",
    "build_toy_lmm",
    "cache_key",
    "evaluate",
    "get_or_train",
    "load_toy_lmm",
    "parse_caption",
    "save_toy_lmm",
    "score_captions",
    "train_toy_lmm",
]


class ToyLMMError(ValueError):
    """A toy-LMM config that cannot be built (e.g. a patch size that does not divide the base size)."""


# ----------------------------------------------------------------------------------------------------------
# building


def pinpoints(cfg: ToyLMMConfig) -> list[list[int]]:
    """The AnyRes resolutions ([height, width]) of a config."""
    b = cfg.base_size
    pts = (
        cfg.grid_pinpoints
        if cfg.grid_pinpoints is not None
        else [[b, b], [b, 2 * b], [2 * b, b], [2 * b, 2 * b]]
    )
    for p in pts:
        if len(p) != 2 or p[0] % b or p[1] % b or min(p) <= 0:
            raise ToyLMMError(f"toylmm.grid_pinpoints: {p} is not a [height, width] pair of multiples of {b}")
    return [list(p) for p in pts]


def check_config(cfg: ToyLMMConfig) -> None:
    """Raise ToyLMMError for configs whose parts cannot fit together."""
    if cfg.base_size % cfg.patch_size:
        raise ToyLMMError(
            f"toylmm.patch_size ({cfg.patch_size}) must divide toylmm.base_size ({cfg.base_size})"
        )
    if cfg.vision_hidden % cfg.vision_heads:
        raise ToyLMMError(
            f"toylmm.vision_heads ({cfg.vision_heads}) must divide vision_hidden ({cfg.vision_hidden})"
        )
    if cfg.text_hidden % cfg.text_heads or (cfg.text_hidden // cfg.text_heads) % 2:
        raise ToyLMMError(
            f"toylmm.text_heads ({cfg.text_heads}) must divide text_hidden ({cfg.text_hidden}) into even head sizes"
        )
    pinpoints(cfg)


def build_tokenizer():
    """A word-level tokenizer over the toy world's words, the prompt words and `SPECIAL_TOKENS`.

    Built with ``tokenizers`` from a fixed word list (same ids every time), wrapped as a fast tokenizer that
    knows ``image_token``. It adds no BOS by itself: `PROMPT` starts with ``<s>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIAL_TOKENS) + list(PROMPT_WORDS) + toyworld.vocabulary()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right",
    )


def build_processor(cfg: ToyLMMConfig, tokenizer=None):
    """The ``LlavaNextProcessor`` (PIL image processor, no torchvision) of a config."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    check_config(cfg)
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    b = cfg.base_size
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": b},
        crop_size={"height": b, "width": b},
        image_grid_pinpoints=pinpoints(cfg),
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_toy_lmm(cfg: ToyLMMConfig):
    """A randomly initialised ``(LlavaNextForConditionalGeneration, LlavaNextProcessor)`` for a config.

    The initialisation depends only on ``cfg.seed``. ``vision_feature_layer`` is -1: with a tower this shallow,
    the usual -2 would leave the last vision layer without gradient.
    """
    from transformers import (
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    processor = build_processor(cfg)
    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=2 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.base_size,
        patch_size=cfg.patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.text_hidden,
        intermediate_size=4 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=max(1, cfg.text_heads // 2),
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints(cfg),
        image_seq_length=(cfg.base_size // cfg.patch_size) ** 2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    model = LlavaNextForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=40,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return model, processor


def load_toy_lmm(path: str | os.PathLike[str]):
    """``(model, processor)`` of a saved toy LMM directory, model in eval mode."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    model = LlavaNextForConditionalGeneration.from_pretrained(str(path))
    processor = LlavaNextProcessor.from_pretrained(str(path))
    model.eval()
    return model, processor


# ----------------------------------------------------------------------------------------------------------
# data


@dataclass
class Example:
    """One captioned image of the toy world (image, caption, objects as dicts ordered left to right)."""

    image: Image.Image
    caption: str
    objects: list[dict[str, Any]]


def examples_from_scenes(scenes: Sequence[toyworld.Scene]) -> list[Example]:
    return [Example(s.pil(), s.caption, [o.to_dict() for o in s.objects]) for s in scenes]


def examples_from_dataset(ds) -> list[Example]:
    """Examples from a toy-world image set (columns ``image``, ``caption``, ``objects``)."""
    missing = [c for c in ("image", "caption", "objects") if c not in ds.column_names]
    if missing:
        raise ToyLMMError(
            f"image set lacks the columns {missing} the toy LMM trains on; got {ds.column_names}"
        )
    rows = ds.select_columns(["image", "caption", "objects"])  # skip decoding the masks
    return [Example(r["image"].convert("RGB"), r["caption"], list(r["objects"])) for r in rows]


@dataclass
class Encoded:
    """Training examples run through the processor once: pixels kept as uint8, normalised per batch."""

    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]
    pixels: list[torch.Tensor]
    """Per example (crops, 3, base, base) uint8, resized and padded but not yet rescaled or normalised."""
    image_sizes: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    rescale: float


def encode_examples(processor, examples: Sequence[Example], chunk: int = 256) -> Encoded:
    """Run images and ``PROMPT + caption + </s>`` through the processor; label only the caption and ``</s>``.

    The image processor is asked not to rescale or normalise, so pixels stay uint8 (a quarter of the memory);
    `collate` applies the processor's own rescale factor, mean and std, which gives the processor's output.
    """
    ip = processor.image_processor
    tok = processor.tokenizer
    colon = tok.convert_tokens_to_ids(":")
    ids_all: list[torch.Tensor] = []
    labels_all: list[torch.Tensor] = []
    pixels_all: list[torch.Tensor] = []
    sizes: list[list[int]] = []
    for start in tqdm(range(0, len(examples), chunk), desc="encode", unit="chunk", leave=False):
        part = examples[start : start + chunk]
        texts = [f"{PROMPT} {ex.caption} {tok.eos_token}" for ex in part]
        enc = processor(
            images=[ex.image for ex in part],
            text=texts,
            padding=False,
            do_rescale=False,
            do_normalize=False,
            do_pad=False,
        )
        for ids, pix, size in zip(enc["input_ids"], enc["pixel_values"], enc["image_sizes"], strict=True):
            ids_t = torch.tensor(ids, dtype=torch.long)
            lab = ids_t.clone()
            cut = int((ids_t == colon).nonzero()[0, 0]) + 1
            lab[:cut] = -100
            ids_all.append(ids_t)
            labels_all.append(lab)
            arr = np.asarray(pix)
            pixels_all.append(torch.from_numpy(np.clip(np.round(arr), 0, 255).astype(np.uint8)))
            sizes.append([int(size[0]), int(size[1])])
    return Encoded(
        input_ids=ids_all,
        labels=labels_all,
        pixels=pixels_all,
        image_sizes=torch.tensor(sizes, dtype=torch.long),
        mean=torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1),
        std=torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1),
        rescale=float(ip.rescale_factor),
    )


def collate(data: Encoded, idx: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded training batch (input_ids, attention_mask, labels, pixel_values, image_sizes)."""
    n = len(idx)
    seq = max(len(data.input_ids[i]) for i in idx)
    crops = max(data.pixels[i].shape[0] for i in idx)
    first = data.pixels[idx[0]]
    input_ids = torch.full((n, seq), pad_id, dtype=torch.long)
    labels = torch.full((n, seq), -100, dtype=torch.long)
    attention = torch.zeros((n, seq), dtype=torch.long)
    pixel_values = torch.zeros((n, crops, *first.shape[1:]), dtype=torch.float32)
    for row, i in enumerate(idx):
        k = len(data.input_ids[i])
        input_ids[row, :k] = data.input_ids[i]
        labels[row, :k] = data.labels[i]
        attention[row, :k] = 1
        pix = data.pixels[i]
        pixel_values[row, : pix.shape[0]] = (pix.float() * data.rescale - data.mean) / data.std
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "pixel_values": pixel_values,
        "image_sizes": data.image_sizes[list(idx)],
    }


def _batches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """``steps`` batches of indices: epochs of seeded permutations, a batch never spanning two epochs."""
    gen = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, n)
    made = 0
    while made < steps:
        perm = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start : start + batch_size]
            made += 1
            if made == steps:
                return


def lr_factor(step: int, cfg: ToyLMMConfig) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based): linear warm-up, then cosine decay."""
    warm = int(round(cfg.warmup_frac * cfg.steps))
    if step < warm:
        return (step + 1) / warm
    span = max(1, cfg.steps - warm)
    progress = min(1.0, (step - warm) / span)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------
# evaluation

_WORD = re.compile(r"\w+|[^\w\s]")


def normalize_caption(text: str) -> str:
    """A caption as space-separated words and punctuation ("a x, a y" -> "a x , a y")."""
    return " ".join(_WORD.findall(text.lower()))


def parse_caption(text: str) -> list[dict[str, str | None]]:
    """Objects named by a caption, in order: dicts with ``size``, ``color``, ``texture``, ``shape`` (None if absent).

    Object phrases are separated by "and" or ","; a phrase that names no known attribute is dropped.
    """
    kinds = {
        "size": set(toyworld.SIZES),
        "color": set(toyworld.COLORS),
        "texture": set(toyworld.TEXTURES),
        "shape": set(toyworld.SHAPES),
    }
    objects: list[dict[str, str | None]] = []
    phrase: list[str] = []
    for word in [*_WORD.findall(text.lower()), "and"]:
        if word in ("and", ","):
            obj: dict[str, str | None] = {
                k: next((w for w in phrase if w in names), None) for k, names in kinds.items()
            }
            if any(v is not None for v in obj.values()):
                objects.append(obj)
            phrase = []
        else:
            phrase.append(word)
    return objects


def _recall(pred: list[tuple], truth: list[tuple]) -> int:
    return sum((Counter(pred) & Counter(truth)).values())


def score_captions(
    predictions: Sequence[str], truths: Sequence[Sequence[dict[str, Any]]], true_captions: Sequence[str]
) -> dict[str, float]:
    """Caption accuracy over images: multiset recall of attributes over ground-truth objects.

    ``pair_accuracy`` counts (colour, texture) pairs; ``color``/``texture``/``size``/``shape_accuracy`` single
    attributes; ``full_accuracy`` (size, colour, texture, shape); ``pair_precision`` is the matched share of
    predicted pairs; ``count_accuracy`` the share of images with the right number of objects;
    ``exact_caption`` the share of captions equal word for word.
    """
    if not (len(predictions) == len(truths) == len(true_captions)):
        raise ToyLMMError(
            f"score_captions: {len(predictions)} predictions, {len(truths)} object lists and "
            f"{len(true_captions)} captions; expected equal lengths"
        )
    keys = {
        "pair": ("color", "texture"),
        "color": ("color",),
        "texture": ("texture",),
        "size": ("size",),
        "shape": ("shape",),
        "full": ("size", "color", "texture", "shape"),
    }
    hits = dict.fromkeys(keys, 0)
    n_true = 0
    n_pred_pairs = 0
    exact = 0
    count_ok = 0
    for pred_text, objs, cap in zip(predictions, truths, true_captions, strict=True):
        parsed = parse_caption(pred_text)
        n_true += len(objs)
        n_pred_pairs += len(parsed)
        count_ok += int(len(parsed) == len(objs))
        exact += int(normalize_caption(pred_text) == normalize_caption(cap))
        for name, fields in keys.items():
            p = [tuple(o[f] for f in fields) for o in parsed]
            t = [tuple(o[f] for f in fields) for o in objs]
            hits[name] += _recall(p, t)
    n_img = max(1, len(predictions))
    out = {f"{name}_accuracy": hits[name] / max(1, n_true) for name in keys}
    out["pair_precision"] = hits["pair"] / max(1, n_pred_pairs)
    out["count_accuracy"] = count_ok / n_img
    out["exact_caption"] = exact / n_img
    out["n_images"] = float(len(predictions))
    out["n_objects"] = float(n_true)
    return out


@torch.no_grad()
def caption_images(
    model, processor, images: Sequence[Image.Image], batch_size: int = 100, max_new_tokens: int | None = None
) -> list[str]:
    """Greedy captions of images, in batches; prompts are left-padded (their image token counts differ)."""
    tok = processor.tokenizer
    if max_new_tokens is None:
        max_new_tokens = int(model.generation_config.max_new_tokens or 40)
    was_training = model.training
    model.eval()
    old_side = tok.padding_side
    tok.padding_side = "left"
    out: list[str] = []
    try:
        for start in tqdm(range(0, len(images), batch_size), desc="caption", unit="batch", leave=False):
            part = list(images[start : start + batch_size])
            enc = processor(images=part, text=[PROMPT] * len(part), padding=True, return_tensors="pt")
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            out.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
    finally:
        tok.padding_side = old_side
        model.train(was_training)
    return out


def evaluate(model, processor, examples: Sequence[Example], batch_size: int = 100) -> dict[str, float]:
    """Caption the examples' images greedily and score them with `score_captions`."""
    most = max((len(ex.objects) for ex in examples), default=1)
    preds = caption_images(
        model, processor, [ex.image for ex in examples], batch_size, max_new_tokens=7 * most + 2
    )
    metrics = score_captions(preds, [ex.objects for ex in examples], [ex.caption for ex in examples])
    metrics["samples"] = [  # type: ignore[assignment]
        {"truth": ex.caption, "predicted": p} for ex, p in zip(examples[:10], preds[:10], strict=False)
    ]
    return metrics


# ----------------------------------------------------------------------------------------------------------
# training


def _world_examples(
    world_cfg: ToyWorldConfig, world_dir: str | os.PathLike[str] | None, split: str
) -> list[Example]:
    if world_dir is None:
        n = world_cfg.n_train if split == "train" else world_cfg.n_heldout
        return examples_from_scenes(toyworld.generate(world_cfg, split, n))
    from mmsae.data.images import load_image_set

    return examples_from_dataset(load_image_set(world_dir, split=split))


def train_toy_lmm(
    lmm_cfg: ToyLMMConfig,
    world_cfg: ToyWorldConfig,
    world_dir: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
) -> dict[str, Any]:
    """Train the toy LMM on the toy world's training captions, save it to ``out_dir`` and return its metrics.

    ``world_dir`` is an image set written by ``toyworld.build`` (splits ``train`` and ``heldout``); None generates
    the world from ``world_cfg`` in memory. Metrics (also written to ``out_dir/metrics.json``): held-out caption
    accuracies from `score_captions`, ``loss_curve`` (mean loss per `LOSS_WINDOW` steps), ``final_loss``,
    ``steps``, ``train_seconds``, ``eval_seconds``, ``params``. Runs on `THREADS_ENV` torch threads (default 1).
    """
    check_config(lmm_cfg)
    with _torch_threads():
        return _train(lmm_cfg, world_cfg, world_dir, out_dir)


def _train(
    lmm_cfg: ToyLMMConfig,
    world_cfg: ToyWorldConfig,
    world_dir: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
) -> dict[str, Any]:
    out = Path(out_dir)
    t_start = time.perf_counter()
    train = _world_examples(world_cfg, world_dir, "train")
    heldout = _world_examples(world_cfg, world_dir, "heldout")
    model, processor = build_toy_lmm(lmm_cfg)
    tok = processor.tokenizer
    data = encode_examples(processor, train)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "toy LMM: %d parameters, %d training images, %d held-out, %d steps of %d",
        n_params,
        len(train),
        len(heldout),
        lmm_cfg.steps,
        lmm_cfg.batch_size,
    )

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name or "embed" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": lmm_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lmm_cfg.lr,
        betas=(0.9, 0.98),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, lmm_cfg))
    torch.manual_seed(lmm_cfg.seed)
    model.train()
    losses: list[float] = []
    curve: list[float] = []
    t_train = time.perf_counter()
    c_train = time.process_time()
    bar = tqdm(total=lmm_cfg.steps, desc="toy LMM", unit="step", mininterval=2.0)
    for step, idx in enumerate(_batches(len(train), lmm_cfg.batch_size, lmm_cfg.steps, lmm_cfg.seed)):
        batch = collate(data, idx, tok.pad_token_id)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(f"toy LMM training diverged at step {step}: loss {value}")
        losses.append(value)
        if len(losses) % LOSS_WINDOW == 0:
            curve.append(float(np.mean(losses[-LOSS_WINDOW:])))
        if (step + 1) % 100 == 0 or step + 1 == lmm_cfg.steps:
            log.info("step %d/%d loss %.4f lr %.2e", step + 1, lmm_cfg.steps, value, sched.get_last_lr()[0])
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}", refresh=False)
    bar.close()
    train_seconds = time.perf_counter() - t_train
    train_cpu_seconds = time.process_time() - c_train

    t_eval = time.perf_counter()
    metrics: dict[str, Any] = evaluate(model, processor, heldout, lmm_cfg.eval_batch_size)
    eval_seconds = time.perf_counter() - t_eval
    metrics.update(
        {
            "loss_curve": curve,
            "first_loss": float(np.mean(losses[: min(LOSS_WINDOW, len(losses))])),
            "final_loss": float(np.mean(losses[-min(LOSS_WINDOW, len(losses)) :])),
            "steps": len(losses),
            "train_seconds": round(train_seconds, 2),
            "eval_seconds": round(eval_seconds, 2),
            "total_seconds": round(time.perf_counter() - t_start, 2),
            "seconds_per_step": round(train_seconds / max(1, len(losses)), 4),
            "train_cpu_seconds": round(train_cpu_seconds, 2),
            "params": n_params,
            "torch_threads": torch.get_num_threads(),
        }
    )
    log.info(
        "toy LMM held-out: pair %.3f colour %.3f texture %.3f exact %.3f (%d steps, %.0f s)",
        metrics["pair_accuracy"],
        metrics["color_accuracy"],
        metrics["texture_accuracy"],
        metrics["exact_caption"],
        len(losses),
        train_seconds,
    )

    info = {
        "toylmm": lmm_cfg.model_dump(mode="json"),
        "toyworld": world_cfg.model_dump(mode="json"),
        "world_dir": None if world_dir is None else str(world_dir),
    }
    save_toy_lmm(model, processor, out, info=info, metrics=metrics)
    return metrics


def save_toy_lmm(
    model,
    processor,
    out_dir: str | os.PathLike[str],
    info: dict[str, Any],
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write model and processor with ``save_pretrained``, `INFO_FILE` (``info`` plus prompt and code version)
    and, when given, `METRICS_FILE`; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    (out / INFO_FILE).write_text(
        json.dumps({"prompt": PROMPT, "code_version": CODE_VERSION, **info}, indent=2)
    )
    if metrics is not None:
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return out


# ----------------------------------------------------------------------------------------------------------
# cache


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$MMSAE_CACHE_DIR``, else ``~/.cache/mmsae``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("MMSAE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "mmsae"


def cache_key(lmm_cfg: ToyLMMConfig, world_cfg: ToyWorldConfig) -> str:
    """Hash of both configs and `CODE_VERSION`: the name of the cached model's directory."""
    blob = json.dumps(
        {
            "code": CODE_VERSION,
            "toylmm": lmm_cfg.model_dump(mode="json"),
            "toyworld": world_cfg.model_dump(mode="json"),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _torch_threads() -> Iterator[int]:
    raw = os.environ.get(THREADS_ENV, "1")
    try:
        n = int(raw)
    except ValueError:
        raise ToyLMMError(f"${THREADS_ENV}={raw!r}: expected a positive number of threads") from None
    if n < 1:
        raise ToyLMMError(f"${THREADS_ENV}={raw!r}: expected a positive number of threads")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def get_or_train(
    lmm_cfg: ToyLMMConfig, world_cfg: ToyWorldConfig, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[Path, dict[str, Any]]:
    """The cached toy LMM for these configs, trained first if absent: ``(model_dir, metrics)``.

    The model is trained into a temporary directory beside the cache entry and renamed into place at the end,
    so an interrupted run leaves no half-written entry; a lock file keeps concurrent callers from training
    twice. ``metrics["cached"]`` says whether this call reused an existing entry.
    """
    root = cache_root(cache_dir) / "toy-lmm"
    key = cache_key(lmm_cfg, world_cfg)
    final = root / key
    with _locked(root / f"{key}.lock"):
        if (final / METRICS_FILE).is_file():
            metrics = json.loads((final / METRICS_FILE).read_text())
            metrics["cached"] = True
            log.info(
                "toy LMM %s found in the cache (pair accuracy %.3f)", final, metrics.get("pair_accuracy", -1)
            )
            return final, metrics
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            metrics = train_toy_lmm(lmm_cfg, world_cfg, None, tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    metrics["cached"] = False
    return final, metrics
