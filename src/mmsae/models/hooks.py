"""Hook points on the language model of a LLaVA-family model, and capture of their outputs.

Reads nothing from disk and writes nothing. A hook point is named the way EleutherAI sparsify names them,
relative to the language model (``layers.3``, ``layers.3.mlp``, ``norm``); full module names of the multimodal
model (``model.language_model.layers.3``) and of a causal LM (``model.layers.3``) resolve to the same point.
`capture` records module outputs with forward hooks and can stop the forward pass right after the deepest
hooked decoder layer, which saves the rest of the model's compute when only activations are wanted.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "HookPoint",
    "HookPointError",
    "capture",
    "canonical_hookpoint",
    "decoder_layers",
    "language_model",
    "resolve_hookpoint",
    "run_and_capture",
]

# Prefixes under which the language model's modules appear in the names users write, most specific first.
_LM_PREFIXES = ("model.language_model.", "language_model.", "model.", "")


class HookPointError(ValueError):
    """A hook point that names no module of the model, or a decoder layer index out of range."""


@dataclass(frozen=True)
class HookPoint:
    """A module to hook: ``name`` is canonical (relative to the language model, e.g. ``layers.3``)."""

    name: str
    module: nn.Module
    index: int | None
    """Decoder layer the module is or lies in (``layers.3.mlp`` -> 3); None for modules outside the layers."""


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack (e.g. ``LlamaModel``) of a LLaVA-family model, a causal LM, or that stack itself."""
    inner = getattr(model, "model", None)
    for cand in (getattr(inner, "language_model", None), getattr(model, "language_model", None)):
        if isinstance(cand, nn.Module) and hasattr(cand, "layers"):
            return cand
    if isinstance(inner, nn.Module) and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner
    if isinstance(getattr(model, "layers", None), nn.ModuleList):
        return model
    raise HookPointError(
        f"{type(model).__name__} has no language model with decoder layers "
        f"(looked for model.language_model.layers, language_model.layers, model.layers, layers)"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers."""
    return language_model(model).layers


def _layer_index(name: str) -> int | None:
    m = re.match(r"^layers\.(\d+)(\.|$)", name)
    return int(m.group(1)) if m else None


def _resolve_index(model: nn.Module, index: int) -> HookPoint:
    layers = decoder_layers(model)
    n = len(layers)
    i = index + n if index < 0 else index
    if not 0 <= i < n:
        raise HookPointError(
            f"layer {index} is out of range: the language model has {n} decoder layers "
            f"(0..{n - 1}, or -{n}..-1 from the end)"
        )
    return HookPoint(name=f"layers.{i}", module=layers[i], index=i)


def resolve_hookpoint(model: nn.Module, layer: int | str | HookPoint) -> HookPoint:
    """Resolve a decoder layer index or a module name to a `HookPoint`.

    ``layer``: an int indexes ``model.model.language_model.layers`` (negative counts from the end); a string is a
    module name relative to the language model (``layers.3``, ``layers.3.mlp``, ``norm``), or a full name
    (``model.language_model.layers.3``, ``language_model.layers.3``, ``model.layers.3``), or any other module of
    the model (e.g. ``model.multi_modal_projector``), or a bare integer (``"3"``).
    """
    if isinstance(layer, HookPoint):
        return layer
    if isinstance(layer, bool) or not isinstance(layer, (int, str)):
        raise HookPointError(f"hook point {layer!r}: expected a layer index (int) or a module name (str)")
    if isinstance(layer, int):
        return _resolve_index(model, layer)
    text = layer.strip()
    if re.fullmatch(r"-?\d+", text):
        return _resolve_index(model, int(text))
    lm = language_model(model)
    lm_modules = dict(lm.named_modules())
    for prefix in _LM_PREFIXES:
        if prefix and not text.startswith(prefix):
            continue
        rel = text[len(prefix) :]
        if rel and rel in lm_modules:
            return HookPoint(name=rel, module=lm_modules[rel], index=_layer_index(rel))
        m = re.fullmatch(r"layers\.(\d+)(\..*)?", rel)
        if m and int(m.group(1)) >= len(lm.layers):
            _resolve_index(model, int(m.group(1)))  # raises the out-of-range error
    all_modules = dict(model.named_modules())
    if text and text in all_modules:
        return HookPoint(name=text, module=all_modules[text], index=None)
    candidates = [n for n in lm_modules if n] + [n for n in all_modules if n]
    near = difflib.get_close_matches(text, candidates, n=5, cutoff=0.6)
    hint = f"; did you mean: {', '.join(near)}?" if near else ""
    raise HookPointError(
        f"unknown hook point {layer!r}: no module of that name in the model or its language model "
        f"(decoder layers are layers.0..layers.{len(lm.layers) - 1}){hint}"
    )


def canonical_hookpoint(model: nn.Module, layer: int | str) -> str:
    """Canonical name of a hook point, e.g. ``layers.3`` for ``3``, ``-1`` (4 layers) -> ``layers.3``."""
    return resolve_hookpoint(model, layer).name


class _StopForward(Exception):
    """Raised from a hook to end the forward pass once every hooked output is recorded."""


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"cannot take a tensor from a module output of type {type(output).__name__}")


@contextlib.contextmanager
def capture(
    model: nn.Module,
    hookpoints: Iterable[int | str | HookPoint] | int | str | HookPoint,
    *,
    stop_early: bool = False,
    detach: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of ``hookpoints`` during forward passes inside the ``with`` block.

    Yields a dict filled as the model runs, keyed by canonical hook point name (``layers.3``), holding each
    module's output tensor (the first element of a tuple output) of the latest call. With ``stop_early`` the
    forward pass is cut right after the deepest hooked decoder layer and the ``with`` block ends there quietly:
    put the model call last in the block, or use `run_and_capture`. Stopping early needs every hook point
    to lie in a decoder layer; otherwise the whole forward runs.
    """
    if isinstance(hookpoints, (int, str, HookPoint)):
        hookpoints = [hookpoints]
    points = [resolve_hookpoint(model, h) for h in hookpoints]
    if not points:
        raise HookPointError("capture() needs at least one hook point")
    acts: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            t = _first_tensor(output)
            acts[name] = t.detach() if detach else t

        return hook

    for p in points:
        handles.append(p.module.register_forward_hook(make_hook(p.name)))
    stop_module: nn.Module | None = None
    if stop_early:
        if all(p.index is not None for p in points):
            deepest = max(p.index for p in points if p.index is not None)
            stop_module = decoder_layers(model)[deepest]
        else:
            logger.debug("not stopping early: a hook point lies outside the decoder layers")
    if stop_module is not None:
        names = {p.name for p in points}

        def stop_hook(_module: nn.Module, _args: Any, _output: Any) -> None:
            if names.issubset(acts):
                raise _StopForward

        # Registered after the capture hooks, so it fires after the layer's own output was recorded.
        handles.append(stop_module.register_forward_hook(stop_hook))
    try:
        yield acts
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


def run_and_capture(
    model: nn.Module,
    inputs: Mapping[str, Any],
    hookpoints: Iterable[int | str | HookPoint] | int | str | HookPoint,
    *,
    stop_early: bool = True,
) -> dict[str, torch.Tensor]:
    """Run ``model(**inputs)`` without gradients and return the captured outputs of ``hookpoints``."""
    with torch.no_grad(), capture(model, hookpoints, stop_early=stop_early) as acts:
        model(**inputs)
    missing = [resolve_hookpoint(model, h).name for h in _as_list(hookpoints)]
    missing = [n for n in missing if n not in acts]
    if missing:
        raise RuntimeError(f"hook points {missing} did not run during the forward pass")
    return acts


def _as_list(hookpoints: Any) -> list[Any]:
    return [hookpoints] if isinstance(hookpoints, (int, str, HookPoint)) else list(hookpoints)
