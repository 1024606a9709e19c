"""Load a LLaVA-family model and its processor from a local directory or an ``s3://`` prefix.

Reads a directory written by ``save_pretrained`` (config.json, weights, processor_config.json or
preprocessor_config.json, tokenizer files); for ``s3://`` URIs it first downloads the prefix with
`mmsae.storage.download_cached` into a cache folder keyed by the URI and by a fingerprint of the remote
content (`mmsae.storage.fingerprint`: its manifest, else every object's key, size and ETag) under
$MMSAE_CACHE_DIR (default ~/.cache/mmsae), and reuses it while the remote model is unchanged. Writes
nothing else.

Image processors are the ``...ImageProcessorPil`` classes (no torchvision needed), and LLaVA-OneVision uses
`LlavaOnevisionImageOnlyProcessor`, a processor without the video processor that the stock class insists on.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FAMILIES",
    "LlavaOnevisionImageOnlyProcessor",
    "LoadedLMM",
    "ModelFormatError",
    "cache_dir_for",
    "detect_family",
    "load_lmm",
    "load_processor",
]

FAMILIES: tuple[str, ...] = ("llava", "llava_next", "llava_onevision")
"""Model families mmsae understands, by their transformers ``model_type``."""

_ARCHITECTURES: dict[str, str] = {
    "LlavaForConditionalGeneration": "llava",
    "LlavaModel": "llava",
    "LlavaNextForConditionalGeneration": "llava_next",
    "LlavaNextModel": "llava_next",
    "LlavaOnevisionForConditionalGeneration": "llava_onevision",
    "LlavaOnevisionModel": "llava_onevision",
}

_MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
}

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


class ModelFormatError(ValueError):
    """A model directory that is not a LLaVA / LLaVA-NeXT / LLaVA-OneVision checkpoint mmsae can load."""


class LlavaOnevisionImageOnlyProcessor(LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor` without a video processor.

    The stock class requires a video processor, which needs torchvision; images alone need none. Load a saved
    one with ``LlavaOnevisionImageOnlyProcessor.from_pretrained(path)`` (``AutoProcessor`` would silently
    return only the tokenizer).
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        num_image_tokens: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        video_token: str = "<video>",
        vision_aspect_ratio: str = "anyres_max_9",
        **kwargs: Any,
    ) -> None:
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.video_token = getattr(tokenizer, "video_token", None) or video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.vision_aspect_ratio = vision_aspect_ratio
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


_PROCESSOR_CLASSES: dict[str, tuple[type[ProcessorMixin], type]] = {
    "llava": (LlavaProcessor, LlavaImageProcessorPil),
    "llava_next": (LlavaNextProcessor, LlavaNextImageProcessorPil),
    "llava_onevision": (LlavaOnevisionImageOnlyProcessor, LlavaOnevisionImageProcessorPil),
}


@dataclass
class LoadedLMM:
    """A loaded model (eval mode) with its processor, family and where its files lie."""

    model: PreTrainedModel
    processor: ProcessorMixin
    family: str
    """'llava' | 'llava_next' | 'llava_onevision'."""
    config: PretrainedConfig
    path: Path
    """Local directory the files were read from (the download cache for s3:// URIs)."""


def _read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise ModelFormatError(f"model directory {path} does not exist or is not a directory")
    if not cfg_file.is_file():
        present = sorted(p.name for p in path.iterdir())[:10]
        raise ModelFormatError(
            f"no config.json in {path}: expected a directory written by save_pretrained "
            f"(config.json, model.safetensors, processor and tokenizer files); found {present or 'nothing'}"
        )
    try:
        data = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{cfg_file} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelFormatError(f"{cfg_file} holds a {type(data).__name__}, expected a JSON object")
    return data


def detect_family(path: str | Path) -> str:
    """Family of the checkpoint in ``path`` from its config.json ``model_type`` (else its ``architectures``)."""
    path = Path(path)
    data = _read_config(path)
    model_type = data.get("model_type")
    architectures = data.get("architectures") or []
    if model_type in FAMILIES:
        return str(model_type)
    for arch in architectures:
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    raise ModelFormatError(
        f"model_type {model_type!r} (architectures {list(architectures)}) in {path / 'config.json'}; "
        f"expected one of {', '.join(FAMILIES)}"
    )


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() == "auto":
        return "auto"
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {', '.join(_DTYPES)}") from None


def load_processor(path: str | Path, family: str | None = None) -> ProcessorMixin:
    """Load the processor saved beside a model, with the torchvision-free image processor of its family."""
    path = Path(path)
    family = family or detect_family(path)
    if not any((path / f).is_file() for f in _PROCESSOR_FILES):
        raise ModelFormatError(
            f"no processor config in {path}: expected {' or '.join(_PROCESSOR_FILES)} written by "
            f"processor.save_pretrained"
        )
    processor_cls, image_processor_cls = _PROCESSOR_CLASSES[family]
    image_processor = image_processor_cls.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor_dict, _ = processor_cls.get_processor_dict(path)
    return processor_cls.from_args_and_dict([image_processor, tokenizer], processor_dict)


def cache_dir_for(uri: str, fingerprint: str | None = None) -> Path:
    """Local folder an ``s3://`` URI is downloaded to: $MMSAE_CACHE_DIR (default ~/.cache/mmsae)/models/<key>.

    The key is the URI's last part and a hash of the URI, and, given a ``fingerprint`` of the remote content
    (`mmsae.storage.fingerprint`), a hash of that too: a model rewritten at the same URI gets a new folder.
    """
    from mmsae import storage

    return storage.cache_dir("models", uri, fingerprint, default_stem="model")


def _fetch_s3(uri: str) -> Path:
    from mmsae import storage

    remote = storage.fingerprint(uri)
    target = cache_dir_for(uri, remote)
    return storage.download_cached(uri, target, is_dir=True)


def _resolve_local(uri: str | Path) -> Path:
    text = str(uri)
    if text.startswith("s3://"):
        return _fetch_s3(text)
    if text.startswith("file://"):
        return Path(text[len("file://") :])
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):
        raise ModelFormatError(
            f"unsupported model URI {text!r}: expected a local directory, file:// or s3://"
        )
    return Path(text).expanduser()


def load_lmm(
    uri: str | Path, *, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> LoadedLMM:
    """Load model + processor from a local directory or an ``s3://`` prefix; the model is put in eval mode.

    ``dtype``: 'float32' | 'bfloat16' | 'float16' | 'auto' (the checkpoint's own) or a torch dtype.
    Raises `ModelFormatError` for a directory that is not a checkpoint of one of `FAMILIES`.
    """
    path = _resolve_local(uri)
    try:
        family = detect_family(path)
    except ModelFormatError as e:
        if str(uri).startswith("s3://"):
            raise ModelFormatError(f"{e} (downloaded from {uri})") from e
        raise
    torch_dtype = _torch_dtype(dtype)
    processor = load_processor(path, family)
    model = _MODEL_CLASSES[family].from_pretrained(path, dtype=torch_dtype)
    model.to(device)
    model.eval()
    logger.info("loaded %s model from %s (%s, %s)", family, uri, model.dtype, device)
    return LoadedLMM(model=model, processor=processor, family=family, config=model.config, path=path)
