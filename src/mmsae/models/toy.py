"""The toy LMM: a tiny LLaVA-NeXT trained from scratch on the CPU to caption the toy world.

This module is the toy LMM's public face and its cache. The parts live beside it: `mmsae.models.toy_model`
builds the model, its tokenizer and processor and saves/loads them; `mmsae.models.toy_training` trains it
with teacher forcing on the toy world's training captions; `mmsae.models.toy_captions` captions held-out
images greedily and scores the captions. Every public name of those modules is importable from here.

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
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmsae import storage
from mmsae.config import ToyLMMConfig, ToyWorldConfig
from mmsae.models.toy_captions import (
    Example,
    caption_images,
    evaluate,
    examples_from_dataset,
    examples_from_scenes,
    normalize_caption,
    parse_caption,
    score_captions,
)
from mmsae.models.toy_model import (
    CODE_VERSION,
    INFO_FILE,
    METRICS_FILE,
    PROMPT,
    ToyLMMError,
    build_processor,
    build_tokenizer,
    build_toy_lmm,
    check_config,
    load_toy_lmm,
    save_toy_lmm,
)
from mmsae.models.toy_training import (
    LOSS_WINDOW,
    THREADS_ENV,
    Encoded,
    collate,
    encode_examples,
    lr_factor,
    train_toy_lmm,
)

log = logging.getLogger(__name__)

__all__ = [
    "CODE_VERSION",
    "INFO_FILE",
    "LOSS_WINDOW",
    "METRICS_FILE",
    "PROMPT",
    "THREADS_ENV",
    "Encoded",
    "Example",
    "ToyLMMError",
    "build_processor",
    "build_tokenizer",
    "build_toy_lmm",
    "cache_key",
    "cache_root",
    "caption_images",
    "check_config",
    "collate",
    "encode_examples",
    "evaluate",
    "examples_from_dataset",
    "examples_from_scenes",
    "get_or_train",
    "load_toy_lmm",
    "lr_factor",
    "normalize_caption",
    "parse_caption",
    "save_toy_lmm",
    "score_captions",
    "train_toy_lmm",
]


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else the download cache's root (`mmsae.storage.cache_root`)."""
    return Path(cache_dir) if cache_dir is not None else storage.cache_root()


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
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if absent) for the block."""
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
