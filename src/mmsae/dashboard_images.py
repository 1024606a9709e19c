"""Heat-map thumbnails for the dashboard: sized to what the page shows, in the smaller of JPEG and PNG.

A heat map is shown in a box of ``report.image_width`` CSS pixels (its long side) and embedded with at most
:data:`PIXEL_RATIO` times as many pixels, so it is sharp on HiDPI screens and when enlarged to that size on
click; a smaller image is embedded as it is and scaled up on the page without smoothing. The embedded bytes
are the smaller of a JPEG and a PNG: the stored PNG when the image needs no resizing, else a PNG of the
resized image (compressed hard only when a quick one comes near the JPEG). Photographs come out as JPEG,
flat images (the toy world) as PNG.
"""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from mmsae.heatmaps import fit_size

log = logging.getLogger(__name__)

PIXEL_RATIO = 2
"""Embedded pixels per CSS pixel, at most (the enlarged view shows the image at this many times its size)."""
JPEG_QUALITY = 80
PNG_WORTH_TRYING = 4
"""The smallest PNG is sought only when a quickly compressed one is within this factor of the JPEG."""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8"


@dataclass(frozen=True)
class Thumbnail:
    src: str
    """A ``data:`` URI."""
    width: int
    """Display size in CSS pixels."""
    height: int
    upscaled: bool
    """The embedded image has fewer pixels than its display size (drawn without smoothing)."""


def thumbnail(data: bytes | None, display: int, what: str) -> Thumbnail | None:
    """The thumbnail of a heat map's bytes for a ``display``-pixel box; None (warned) when not an image."""
    if data is None:
        return None
    if not data.startswith((PNG_MAGIC, JPEG_MAGIC)):
        log.warning("%s is neither PNG nor JPEG; left out", what)
        return None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        log.warning("%s cannot be decoded (%s); left out", what, e)
        return None
    shown = _box(image.size, display)
    size = fit_size(image.size, PIXEL_RATIO * display)
    candidates = [data] if size == image.size else []
    if not candidates:
        image = image.convert("RGB").resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    jpeg = _encode(image, "JPEG")
    if not candidates:
        # a quick PNG first: a photograph's is many times its JPEG, and the slow, smallest PNG cannot win
        quick = _encode(image, "PNG", compress_level=1)
        candidates.append(_encode(image, "PNG") if len(quick) < PNG_WORTH_TRYING * len(jpeg) else quick)
    best = min([*candidates, jpeg], key=len)  # the stored bytes first: kept on a tie
    mime = "image/png" if best.startswith(PNG_MAGIC) else "image/jpeg"
    return Thumbnail(f"data:{mime};base64,{base64.b64encode(best).decode('ascii')}", shown[0], shown[1],
                     upscaled=size[0] < shown[0])


def _box(size: tuple[int, int], display: int) -> tuple[int, int]:
    """``size`` scaled (up or down) so that its long side is ``display``."""
    width, height = size
    scale = display / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _encode(image: Image.Image, fmt: str, compress_level: int | None = None) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    elif compress_level is None:
        image.save(buf, format="PNG", optimize=True)
    else:
        image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
