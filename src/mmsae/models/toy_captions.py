"""Captioned images of the toy world, and the toy LMM's captions of them: greedy captioning and scoring.

`world_examples` reads a split of the toy world (generated in memory, or an image set written by
``mmsae.data.toyworld.build``) as `Example` records; `evaluate` captions their images with `PROMPT` and scores
the captions against the ground-truth objects with `score_captions`.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from mmsae.config import ToyWorldConfig
from mmsae.data import toyworld
from mmsae.models.toy_model import PROMPT, ToyLMMError

__all__ = [
    "Example",
    "caption_images",
    "evaluate",
    "examples_from_dataset",
    "examples_from_scenes",
    "normalize_caption",
    "parse_caption",
    "score_captions",
    "world_examples",
]


@dataclass
class Example:
    """One captioned image of the toy world (image, caption, objects as dicts ordered left to right)."""

    image: Image.Image
    caption: str
    objects: list[dict[str, Any]]


def examples_from_scenes(scenes: Sequence[toyworld.Scene]) -> list[Example]:
    """Examples of generated toy-world scenes."""
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


def world_examples(
    world_cfg: ToyWorldConfig, world_dir: str | os.PathLike[str] | None, split: str
) -> list[Example]:
    """The examples of a split (``train`` or ``heldout``): read from the image set ``world_dir``, or generated
    from ``world_cfg`` in memory when it is None."""
    if world_dir is None:
        n = world_cfg.n_train if split == "train" else world_cfg.n_heldout
        return examples_from_scenes(toyworld.generate(world_cfg, split, n))
    from mmsae.data.images import load_image_set

    return examples_from_dataset(load_image_set(world_dir, split=split))


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
