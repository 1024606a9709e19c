"""Tiny random LLaVA-family models, processors and an offline tokenizer, built from configs in well under a second.

Reads nothing and downloads nothing. `build_tiny` returns an in-memory ``(model, processor)``; `save_tiny` writes
both with ``save_pretrained`` into a directory (config.json, model.safetensors, processor_config.json,
tokenizer files) that `mmsae.models.loading.load_lmm` reads back. They are test fixtures and the starting point
of the toy world's LMM.

Families and their vision towers follow the released checkpoints: LLaVA and LLaVA-NeXT use a CLIP tower
(CLS token dropped by the ``default`` feature strategy), LLaVA-OneVision a SigLIP tower (no CLS, ``full``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    SiglipVisionConfig,
)

from mmsae.models.loading import FAMILIES, LlavaOnevisionImageOnlyProcessor

logger = logging.getLogger(__name__)

__all__ = ["SPECIAL_TOKENS", "build_tiny", "default_pinpoints", "save_tiny", "tiny_tokenizer"]

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>")
"""Special tokens of the tiny tokenizer, in id order (``<pad>`` is 0, ``<image>`` is 4)."""

_DEFAULT_CORPUS: tuple[str, ...] = (
    "USER: <image>\nwhat is in this image? ASSISTANT: a small red square and a large blue circle.",
    "describe : a green striped square on the left and a yellow dotted square on the right",
    "a purple checkered object, an orange solid object and a white object on a dark background",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9",
)


def tiny_tokenizer(corpus: Iterable[str] | None = None, *, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer offline (a few milliseconds) with `SPECIAL_TOKENS`.

    Byte-level BPE encodes any text without unknown tokens, so prompts outside the corpus still work. The
    returned tokenizer knows ``image_token``/``image_token_id`` and ``video_token``, as the LLaVA processors expect.
    """
    texts = list(corpus) if corpus is not None else list(_DEFAULT_CORPUS)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )


def default_pinpoints(image_size: int) -> list[list[int]]:
    """AnyRes resolutions (height, width) of 1x1, 1x2, 2x1 and 2x2 tiles of ``image_size`` pixels."""
    s = image_size
    return [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]]


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")


@dataclass(frozen=True)
class _TinyParts:
    """What every family's builder shares: tokenizer, text config, vision tower settings, image geometry."""

    tokenizer: PreTrainedTokenizerFast
    text_config: LlamaConfig
    vision_kwargs: dict[str, Any]
    image_size: int
    patch_size: int
    pinpoints: list[list[int]]
    select_strategy: str | None
    feature_layer: int | None
    aspect_ratio: str

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids("<image>")

    @property
    def tokens_per_view(self) -> int:
        grid = self.image_size // self.patch_size
        return grid * grid


_Built = tuple[Any, type[PreTrainedModel], ProcessorMixin]
"""A family builder's result: model config, model class, processor."""


def build_tiny(
    family: str,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    grid_pinpoints: Sequence[Sequence[int]] | None = None,
    text_layers: int = 2,
    seed: int = 0,
    text_hidden: int = 64,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_feature_select_strategy: str | None = None,
    vision_feature_layer: int | None = None,
    vision_aspect_ratio: str = "anyres_max_9",
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Build a tiny random model of ``family`` ('llava' | 'llava_next' | 'llava_onevision') and its processor.

    ``image_size`` is the vision tower's input side (the base view and each AnyRes tile), ``patch_size`` its patch
    side; ``grid_pinpoints`` the AnyRes resolutions as (height, width) pairs (default: `default_pinpoints`).
    Weights are drawn from ``seed`` without touching the global torch random state. The model is in eval mode.
    ``vision_feature_select_strategy`` / ``vision_feature_layer`` default to the released checkpoints' values
    ('default', -2 for CLIP families; 'full', -1 for OneVision); ``vision_aspect_ratio`` applies to OneVision.
    """
    _check_family(family)
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    parts = _TinyParts(
        tokenizer=tok,
        text_config=_text_config(tok, text_hidden, text_layers),
        vision_kwargs=dict(
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            num_hidden_layers=vision_layers,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
        ),
        image_size=image_size,
        patch_size=patch_size,
        pinpoints=(
            [list(map(int, p)) for p in grid_pinpoints]
            if grid_pinpoints is not None
            else default_pinpoints(image_size)
        ),
        select_strategy=vision_feature_select_strategy,
        feature_layer=vision_feature_layer,
        aspect_ratio=vision_aspect_ratio,
    )
    builders = {"llava": _build_llava, "llava_next": _build_llava_next, "llava_onevision": _build_onevision}
    config, model_cls, processor = builders[family](parts)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.eval()
    logger.debug("built tiny %s: %d parameters", family, sum(p.numel() for p in model.parameters()))
    return model, processor


def _text_config(tok: PreTrainedTokenizerFast, hidden: int, layers: int) -> LlamaConfig:
    """The tiny Llama text model's config (4 attention heads over 2 key/value heads)."""
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


def _clip_config_kwargs(parts: _TinyParts, strategy: str) -> dict[str, Any]:
    """Config fields LLaVA and LLaVA-NeXT share: a CLIP tower, the text config, the image token."""
    return dict(
        vision_config=CLIPVisionConfig(**parts.vision_kwargs),
        text_config=parts.text_config,
        image_token_index=parts.image_token_id,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=-2 if parts.feature_layer is None else parts.feature_layer,
        image_seq_length=parts.tokens_per_view,
    )


def _build_llava(parts: _TinyParts) -> _Built:
    """LLaVA: a CLIP tower, one resized and centre-cropped view."""
    strategy = parts.select_strategy or "default"
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessorPil(
            size={"shortest_edge": parts.image_size},
            crop_size={"height": parts.image_size, "width": parts.image_size},
        ),
        tokenizer=parts.tokenizer,
        patch_size=parts.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
    )
    return LlavaConfig(**_clip_config_kwargs(parts, strategy)), LlavaForConditionalGeneration, processor


def _build_llava_next(parts: _TinyParts) -> _Built:
    """LLaVA-NeXT: a CLIP tower, a base view plus AnyRes tiles."""
    strategy = parts.select_strategy or "default"
    config = LlavaNextConfig(**_clip_config_kwargs(parts, strategy), image_grid_pinpoints=parts.pinpoints)
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": parts.image_size},
            crop_size={"height": parts.image_size, "width": parts.image_size},
            image_grid_pinpoints=parts.pinpoints,
        ),
        tokenizer=parts.tokenizer,
        patch_size=parts.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
    )
    return config, LlavaNextForConditionalGeneration, processor


def _build_onevision(parts: _TinyParts) -> _Built:
    """LLaVA-OneVision: a SigLIP tower (no CLS token), a base view plus AnyRes tiles, images only."""
    strategy = parts.select_strategy or "full"
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**parts.vision_kwargs, vision_use_head=False),
        text_config=parts.text_config,
        image_token_index=parts.image_token_id,
        video_token_index=parts.tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy=strategy,
        vision_feature_layer=-1 if parts.feature_layer is None else parts.feature_layer,
        image_grid_pinpoints=parts.pinpoints,
        vision_aspect_ratio=parts.aspect_ratio,
    )
    processor = LlavaOnevisionImageOnlyProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(
            size={"height": parts.image_size, "width": parts.image_size}, image_grid_pinpoints=parts.pinpoints
        ),
        tokenizer=parts.tokenizer,
        num_image_tokens=parts.tokens_per_view,
        vision_feature_select_strategy=strategy,
        vision_aspect_ratio=parts.aspect_ratio,
    )
    return config, LlavaOnevisionForConditionalGeneration, processor


def save_tiny(family: str, out_dir: str | Path, **kwargs: Any) -> Path:
    """Build a tiny model with `build_tiny` (``kwargs`` passed on) and write model + processor to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny(family, **kwargs)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    logger.info("wrote tiny %s model to %s", family, out)
    return out
