"""The CLIP-score scorer: how well the explanation's text matches a subject's top images, whole images.

CLIP score as torchmetrics and the paper compute it: ``100 * max(cos(text, image), 0)`` between CLIP's
projected embeddings, averaged over the subject's first ``images`` top images (the original images, not the
heat maps). The text is truncated to CLIP's context. Embeddings are computed once per image and per text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmsae.scorers.base import Pair, PairResult, PairScore, Scorer, Skipped
from mmsae.scorers.models import load_pretrained

log = logging.getLogger(__name__)

__all__ = ["ClipScorer", "clip_score"]


def clip_score(text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """``100 * max(cos, 0)`` of each text row with each image row: ``[texts, images]``."""
    text = torch.nn.functional.normalize(text_embeds.float(), dim=-1)
    image = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
    return 100.0 * (text @ image.T).clamp(min=0)


def _pooled(output: Any) -> torch.Tensor:
    """The projected embeddings, whether ``get_*_features`` returns them or an output holding them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScorer(Scorer):
    """CLIP score of the explanation against the subject's top images, from one CLIP checkpoint."""

    name = "clip"

    def __init__(self, clip_model: str, image_of: Callable[[int], Image.Image], device: torch.device,
                 images: int = 5, batch_size: int = 8) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.uri = clip_model
        self.model, self.processor = load_pretrained(CLIPModel, CLIPProcessor, clip_model, "score.clip_model", device)
        self.image_of, self.device, self.images, self.batch_size = image_of, device, images, batch_size
        self._image_embeds: dict[int, torch.Tensor] = {}
        self._text_embeds: dict[str, torch.Tensor] = {}

    def describe(self) -> dict[str, Any]:
        return {"model": self.uri, "images": self.images, "formula": "100 * max(cos, 0), mean over images"}

    def score(self, pairs: Sequence[Pair]) -> list[PairResult]:
        self._embed_images(sorted({i for p in pairs for i in p.subject.top[: self.images]}))
        self._embed_texts(sorted({p.explanation for p in pairs}))
        return [self._one(pair) for pair in pairs]

    def _one(self, pair: Pair) -> PairResult:
        images = list(pair.subject.top[: self.images])
        if not images:
            return Skipped("no top images")
        scores = clip_score(self._text_embeds[pair.explanation][None],
                            torch.stack([self._image_embeds[i] for i in images]))[0].tolist()
        return PairScore(float(np.mean(scores)), {"images": images, "scores": scores})

    @torch.inference_mode()
    def _embed_images(self, images: list[int]) -> None:
        todo = [i for i in images if i not in self._image_embeds]
        for begin in range(0, len(todo), self.batch_size):
            part = todo[begin:begin + self.batch_size]
            enc = self.processor(images=[self.image_of(i) for i in part], return_tensors="pt")
            embeds = _pooled(self.model.get_image_features(pixel_values=enc["pixel_values"].to(self.device)))
            self._image_embeds.update(zip(part, embeds.float().cpu(), strict=True))

    @torch.inference_mode()
    def _embed_texts(self, texts: list[str]) -> None:
        todo = [t for t in texts if t not in self._text_embeds]
        max_length = int(self.model.config.text_config.max_position_embeddings)
        for begin in range(0, len(todo), self.batch_size):
            part = todo[begin:begin + self.batch_size]
            enc = self.processor(text=part, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            embeds = _pooled(self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                                          attention_mask=enc["attention_mask"].to(self.device)))
            self._text_embeds.update(zip(part, embeds.float().cpu(), strict=True))

    def close(self) -> None:
        del self.model
