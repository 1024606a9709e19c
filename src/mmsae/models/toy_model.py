"""The toy LMM's definition: its tokenizer, processor and randomly initialised model, and its saved form.

The model is a tiny LLaVA-NeXT built from a `ToyLMMConfig` (a CLIP vision tower and a Llama text model), with
a word-level tokenizer made from the toy world's vocabulary and a chat template that renders `PROMPT`.
`save_toy_lmm` writes a model directory (``save_pretrained`` of model and processor, `INFO_FILE`, optionally
`METRICS_FILE`) that `load_toy_lmm` (or ``AutoModelForImageTextToText``/``AutoProcessor``) reads back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mmsae.config import ToyLMMConfig
from mmsae.data import toyworld

CODE_VERSION = "3"
"""Part of the toy LMM's cache key: bump it whenever a change to how it is built or trained changes the model."""

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

__all__ = [
    "CODE_VERSION",
    "INFO_FILE",
    "METRICS_FILE",
    "PROMPT",
    "ToyLMMError",
    "build_processor",
    "build_tokenizer",
    "build_toy_lmm",
    "check_config",
    "load_toy_lmm",
    "pinpoints",
    "save_toy_lmm",
]


class ToyLMMError(ValueError):
    """A toy-LMM config that cannot be built (e.g. a patch size that does not divide the base size)."""


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

