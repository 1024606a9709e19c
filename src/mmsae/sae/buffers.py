"""Large CPU buffers of the SAE kernels kept from one training step to the next.

Reads and writes no files. A CPU training step of the kernels needs a few buffers of the size of a weight or
more (``[m, d]``: 128 MiB at 32 768 x 1024 in float32): the encoder's pre-activation chunk, the two weight
gradients, AuxK's ``[n, dead]`` and ``[dead, n]`` products. Allocated afresh, each is a new memory mapping whose pages fault in
on first write (with transparent huge pages ~10 ms per 128 MiB; on a VM that hands freed memory back to its
host, ~150 ms), every step. Here they are kept instead (on a GPU the caching allocator already does this; these helpers then
return nothing):

* :func:`workspace` is a scratch tensor per name and thread, reused while the requested shape and dtype
  stay the same (the encoder's chunk buffer; its content never leaves the kernel).
* :func:`gradient_buffer` hands a kernel's backward the tensor that was the parameter's gradient in the last
  step, once that gradient has been cleared (``param.grad`` is None, as DeepSpeed's and torch's
  ``zero_grad`` leave it): the backward writes the new gradient into it and returns it, and autograd takes it
  as the new ``param.grad`` without a copy (nothing else refers to it). A hook after gradient accumulation
  keeps the gradient for the next step. A gradient that is still set (accumulation over several backward
  passes) is never handed out, and neither is one whose shape, dtype or device no longer match; a caller
  that keeps its own reference to a cleared gradient sees it overwritten by the next step's.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor

__all__ = ["gradient_buffer", "workspace"]

_local = threading.local()
_lock = threading.Lock()
_hooked: dict[int, weakref.ref[Tensor]] = {}
"""Parameters whose gradients are kept, by ``id`` (tensors compare by value, so no weak-keyed mapping)."""
_kept: dict[int, Tensor] = {}


def _forget(param_id: int) -> None:
    with _lock:
        _hooked.pop(param_id, None)
        _kept.pop(param_id, None)


def workspace(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised scratch tensor: on the CPU the same one for the same ``name``, shape and dtype in this
    thread (the last shape asked for is kept, one per name); elsewhere a fresh ``torch.empty``."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    spaces: dict[str, Tensor] = _local.__dict__.setdefault("spaces", {})
    space = spaces.get(name)
    if space is None or tuple(space.shape) != tuple(shape) or space.dtype != dtype:
        space = spaces[name] = torch.empty(shape, dtype=dtype, device=device)
    return space


def _keep_gradient(param: Tensor) -> None:
    grad = param.grad
    if grad is not None and grad.layout == torch.strided and grad.is_contiguous():
        with _lock:
            if id(param) in _hooked:
                _kept[id(param)] = grad


def gradient_buffer(param: Tensor) -> Tensor | None:
    """Last step's cleared gradient of the CPU leaf ``param``, to write this step's into; None: allocate one.

    The first call for a parameter registers the hook that keeps its gradients, so it returns None then.
    """
    if param.device.type != "cpu" or not param.is_leaf or not param.requires_grad:
        return None
    key = id(param)
    with _lock:
        known = _hooked.get(key)
        if known is None or known() is not param:
            _kept.pop(key, None)
            _hooked[key] = weakref.ref(param, lambda _, key=key: _forget(key))
            param.register_post_accumulate_grad_hook(_keep_gradient)
            return None
        kept = _kept.pop(key, None)
    if kept is None or param.grad is not None or kept.shape != param.shape or kept.dtype != param.dtype:
        return None
    return kept
