"""Loading the scorers' checkpoints (CLIP, GroundingDINO, SAM): ``save_pretrained`` folders, local or ``s3://``.

An ``s3://`` checkpoint is downloaded once into the download cache (``mmsae.storage.download_cached``, keyed by
its URI and fingerprint, as the LMMs are); nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mmsae import storage
from mmsae.scorers.base import ScoreError

log = logging.getLogger(__name__)

__all__ = ["load_pretrained", "local_model_dir"]


def local_model_dir(uri: str, setting: str) -> str:
    """A local folder holding the checkpoint at ``uri`` (downloaded first from ``s3://``)."""
    if uri.startswith("s3://"):
        from mmsae.models.loading import cache_dir_for

        try:
            remote = storage.fingerprint(uri)
        except FileNotFoundError as e:
            raise ScoreError(f"{setting} {uri} does not exist ({e})") from e
        return str(storage.download_cached(uri, cache_dir_for(uri, remote), is_dir=True))
    path = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser()
    if not (path / "config.json").is_file():
        raise ScoreError(f"{setting} {uri} is not a checkpoint folder (no config.json); expected a folder written "
                         "by save_pretrained, local or s3://")
    return str(path)


def load_pretrained(model_cls: Any, processor_cls: Any, uri: str, setting: str, device: torch.device
                    ) -> tuple[Any, Any]:
    """``(model in eval mode on device, processor)`` of the checkpoint at ``uri``; errors name ``setting``."""
    folder = local_model_dir(uri, setting)
    try:
        model = model_cls.from_pretrained(folder).to(device).eval()
        processor = processor_cls.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ScoreError(f"{setting} {uri} cannot be loaded as a {model_cls.__name__} with its "
                         f"{processor_cls.__name__} ({type(e).__name__}: {e})") from e
    log.info("loaded %s from %s on %s", model_cls.__name__, uri, device)
    return model, processor
