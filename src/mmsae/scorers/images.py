"""The images scorers look at: the image set's images by ``image_idx``, as the mine stage recorded them."""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from PIL import Image

from mmsae.scorers.base import ScoreError

__all__ = ["ImageSource"]


class ImageSource:
    """Images of an image set (a ``datasets.Dataset`` with an ``image`` column) as RGB, each checked against the
    ``(width, height)`` that ``size_of`` gives (the top examples' record), and as PNG bytes (what detection
    shows). Recent images are kept: they recur across features and pairs."""

    def __init__(self, image_set: Any, size_of: Callable[[int], tuple[int, int]], uri: str = "") -> None:
        column = image_set.select_columns(["image"])
        self.size_of = size_of

        @lru_cache(maxsize=256)
        def image(image_idx: int) -> Image.Image:
            if not 0 <= image_idx < len(column):
                raise ScoreError(f"image {image_idx} is not in the image set {uri} ({len(column)} images): it is "
                                 "not the image set the top examples were mined from")
            picture = column[image_idx]["image"].convert("RGB")
            if picture.size != tuple(size_of(image_idx)):
                raise ScoreError(f"image {image_idx} of the image set {uri} is {picture.size} (width, height), but "
                                 f"the top examples recorded {tuple(size_of(image_idx))}: it is not the image set "
                                 "they were mined from")
            return picture

        self._image = image

    def image(self, image_idx: int) -> Image.Image:
        return self._image(int(image_idx))

    def png(self, image_idx: int) -> bytes:
        buffer = io.BytesIO()
        self.image(image_idx).save(buffer, format="PNG")
        return buffer.getvalue()
