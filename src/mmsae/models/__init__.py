"""Models: load an LMM + processor, hook points on its language model, and image-token geometry.

Submodules: `loading` (load_lmm, detect_family), `hooks` (resolve_hookpoint, capture), `geometry`
(token_geometry, patch_box), `tiny` (build_tiny, save_tiny). Names are imported lazily, so importing this
package does not import transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LoadedLMM": "loading",
    "ModelFormatError": "loading",
    "detect_family": "loading",
    "load_lmm": "loading",
    "FAMILIES": "loading",
    "HookPoint": "hooks",
    "HookPointError": "hooks",
    "capture": "hooks",
    "resolve_hookpoint": "hooks",
    "run_and_capture": "hooks",
    "GeometryError": "geometry",
    "PatchInfo": "geometry",
    "TokenGeometry": "geometry",
    "patch_box": "geometry",
    "patch_info": "geometry",
    "token_geometry": "geometry",
    "build_tiny": "tiny",
    "save_tiny": "tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
