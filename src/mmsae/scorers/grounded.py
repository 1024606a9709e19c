"""The IoU scorer's open-vocabulary segmentation: GroundingDINO finds boxes of what the explanation names, SAM
turns them into masks (the paper's recipe).

The explanation itself is the text prompt, lower-cased and ending with "." as GroundingDINO expects (the
paper first shortens it with an LLM "label refiner"; here it is used as written). Boxes whose score reaches
``box_threshold`` (on a text token reaching ``text_threshold``) prompt SAM all at once; each box's three
multimask outputs are averaged and cut at 0 (SAM's logits), and the boxes' masks are joined. No box: an
empty mask. Both run at the image's own resolution (their processors resize and the masks are mapped back).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmsae.scorers.iou import Segmenter
from mmsae.scorers.models import load_pretrained

log = logging.getLogger(__name__)

__all__ = ["GroundedSegmenter", "grounding_prompt"]


def grounding_prompt(explanation: str) -> str:
    """GroundingDINO's text prompt: lower case, one space between words, ending with one "."."""
    text = " ".join((explanation or "").lower().split()).rstrip(". ")
    return f"{text}."


class GroundedSegmenter(Segmenter):
    """GroundingDINO + SAM from two checkpoints (``save_pretrained`` folders, local or s3://)."""

    backend = "grounding_dino+sam"

    def __init__(self, grounding_model: str, sam_model: str, image_of: Callable[[int], Image.Image],
                 device: torch.device, box_threshold: float = 0.3, text_threshold: float = 0.25,
                 batch_size: int = 8) -> None:
        from transformers import (
            GroundingDinoForObjectDetection,
            GroundingDinoProcessor,
            SamModel,
            SamProcessor,
        )

        self.grounding_uri, self.sam_uri = grounding_model, sam_model
        self.detector, self.detector_processor = load_pretrained(
            GroundingDinoForObjectDetection, GroundingDinoProcessor, grounding_model, "score.grounding_model", device)
        self.sam, self.sam_processor = load_pretrained(SamModel, SamProcessor, sam_model, "score.sam_model", device)
        self.image_of, self.device = image_of, device
        self.box_threshold, self.text_threshold, self.batch_size = box_threshold, text_threshold, batch_size

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "grounding_model": self.grounding_uri, "sam_model": self.sam_uri,
                "box_threshold": self.box_threshold, "text_threshold": self.text_threshold}

    def label(self, explanation: str) -> dict[str, Any]:
        return {"prompt": grounding_prompt(explanation)}

    @torch.inference_mode()
    def segment(self, explanation: str, images: Sequence[int]) -> list[np.ndarray]:
        prompt = grounding_prompt(explanation)
        out: list[np.ndarray] = []
        for begin in range(0, len(images), self.batch_size):
            pictures = [self.image_of(i) for i in images[begin:begin + self.batch_size]]
            for picture, boxes in zip(pictures, self._boxes(prompt, pictures), strict=True):
                out.append(self._mask(picture, boxes))
        return out

    def _boxes(self, prompt: str, pictures: list[Image.Image]) -> list[torch.Tensor]:
        """Per image, the boxes (x0, y0, x1, y1 in its pixels) GroundingDINO finds for ``prompt``."""
        max_length = int(getattr(self.detector.config, "max_text_len", 256))
        enc = self.detector_processor(images=pictures, text=[prompt] * len(pictures), return_tensors="pt",
                                      padding=True, truncation=True, max_length=max_length).to(self.device)
        found = self.detector(**enc)
        results = self.detector_processor.post_process_grounded_object_detection(
            found, enc["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
            target_sizes=[(p.height, p.width) for p in pictures])
        return [r["boxes"].float().cpu() for r in results]

    def _mask(self, picture: Image.Image, boxes: torch.Tensor) -> np.ndarray:
        """SAM's masks of every box, joined (an empty mask without boxes)."""
        if boxes.numel() == 0:
            return np.zeros((picture.height, picture.width), dtype=bool)
        enc = self.sam_processor(images=picture, input_boxes=[boxes.tolist()], return_tensors="pt")
        predicted = self.sam(pixel_values=enc["pixel_values"].to(self.device),
                             input_boxes=enc["input_boxes"].to(self.device), multimask_output=True)
        logits = self.sam_processor.image_processor.post_process_masks(
            predicted.pred_masks.float().cpu(), enc["original_sizes"], enc["reshaped_input_sizes"], binarize=False)[0]
        return (logits.mean(dim=1) > 0).any(dim=0).numpy()

    def close(self) -> None:
        del self.detector, self.sam
