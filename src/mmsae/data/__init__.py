"""Image sets: loading them (`load_image_set`) and the generated toy world (`mmsae.data.toyworld`)."""

from mmsae.data.images import ImageSetError, load_image_set

__all__ = ["ImageSetError", "load_image_set"]
