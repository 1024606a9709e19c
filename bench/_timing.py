"""Timing helpers shared by the step benchmarks (``sae_step``, ``train``). Reads and writes no files.

* :func:`thp_alloc_active` says whether the process's large CPU blocks are backed by transparent huge pages
  (torch asks for them with ``THP_MEM_ALLOC_ENABLE=1`` set before its first allocation; the kernel's THP mode
  ``always`` gives them anyway). The benchmarks leave the variable as the stages do.
* :func:`timed` measures one call in wall-clock and process CPU time (and waits for the GPU when asked).
  :class:`Parts` times named parts inside a step, so a step can report its own breakdown.
* :func:`pairs` runs a baseline (a dense matmul) and a step alternately, so each ratio is taken between
  neighbours in time on a machine that other work shares; :func:`summarise` turns the pairs into
  tokens/s, matmul FLOP/s and the fraction of the dense-encoder limit (medians over pairs).
* :func:`matmul_baseline` is the baseline itself: ``[n, d] @ [d, m]`` into a preallocated result.
* :func:`dead_latent_mask` picks a seeded :data:`DEAD_FRACTION` of the latents as dead, so a timed step runs
  the AuxK path (the dead latents' pre-activations, their top ``k_aux``, the decode of the residual and
  the backward of all of it) as a training step does once some latents have stopped firing; with no dead
  latent that work is skipped.
* :class:`NaiveTopKSAE` and :func:`naive_step` are the naive dense implementation the fast paths are
  compared with: top-k scattered into a dense ``[n, m]`` matrix, a dense decode and plain autograd.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from mmsae.sae import TopKSAE
from mmsae.sae.kernels import dense_decode_reference, dense_topk_encode_reference

logger = logging.getLogger(__name__)

Sync = Callable[[], None] | None


class Timing(NamedTuple):
    wall_s: float
    cpu_s: float


def _anon_huge_kib() -> int | None:
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return None


def thp_alloc_active() -> bool | None:
    """Whether a fresh 32 MiB CPU tensor of this process is backed by huge pages (None: cannot tell)."""
    before = _anon_huge_kib()
    if before is None:
        return None
    probe = torch.ones(2**23)
    after = _anon_huge_kib()
    del probe
    return after is not None and after > before


def cuda_sync(device: torch.device) -> Sync:
    """A function that waits for ``device`` when it is a GPU, else None (nothing to wait for)."""
    if device.type != "cuda":
        return None
    return lambda: torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], sync: Sync = None) -> tuple[Timing, Any]:
    """Run ``fn`` once; its wall-clock and process CPU seconds, and its result."""
    if sync:
        sync()
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    if sync:
        sync()
    return Timing(time.perf_counter() - w0, time.process_time() - c0), result


class Parts:
    """Named parts of one step: ``with parts("forward"): ...``; :attr:`times` maps each to a :class:`Timing`."""

    def __init__(self, sync: Sync = None) -> None:
        self.sync = sync
        self.times: dict[str, Timing] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.sync:
            self.sync()
        w0, c0 = time.perf_counter(), time.process_time()
        yield
        if self.sync:
            self.sync()
        prev = self.times.get(name, Timing(0.0, 0.0))
        self.times[name] = Timing(prev.wall_s + time.perf_counter() - w0, prev.cpu_s + time.process_time() - c0)


def pairs(
    baseline: Callable[[], Any], step: Callable[[], Any], count: int, label: str = "step", sync: Sync = None
) -> list[dict[str, float]]:
    """``count`` rounds of baseline then step, each timed (seconds as ``mm_*``, ``step_*``).

    A step that returns ``{part: Timing}`` (e.g. :attr:`Parts.times`) adds ``part_<part>_wall_s``/``_cpu_s``.
    """
    out = []
    for i in range(count):
        mm, _ = timed(baseline, sync)
        st, parts = timed(step, sync)
        row = {"mm_wall_s": mm.wall_s, "mm_cpu_s": mm.cpu_s, "step_wall_s": st.wall_s, "step_cpu_s": st.cpu_s}
        if isinstance(parts, Mapping):
            for name, t in parts.items():
                row[f"part_{name}_wall_s"], row[f"part_{name}_cpu_s"] = t.wall_s, t.cpu_s
        out.append(row)
        logger.info("%s pair %d: matmul %.3f s, step %.3f s (wall)", label, i, mm.wall_s, st.wall_s)
    return out


def summarise(
    rows: list[dict[str, float]], tokens: int, flop_per_token: float, mm_flop: float | None = None
) -> dict[str, Any]:
    """Medians over pairs: step tokens/s, matmul FLOP/s, step time as a fraction of the dense-encoder limit.

    ``mm_flop`` is the baseline's FLOP count (default ``tokens * flop_per_token``: one encoder-shaped product
    over the same tokens). The fraction is ``(tokens / step time) / (matmul FLOP/s / flop_per_token)`` per pair,
    in wall-clock time and in process CPU time (less disturbed by other processes, meaningless on a GPU).
    Parts a step reported get their median seconds and their share of the step.
    """
    mm_flop = tokens * flop_per_token if mm_flop is None else mm_flop
    limit_tokens = [mm_flop / p["mm_wall_s"] / flop_per_token for p in rows]
    limit_tokens_cpu = [mm_flop / max(p["mm_cpu_s"], 1e-9) / flop_per_token for p in rows]
    res: dict[str, Any] = {
        "tokens_per_s": statistics.median(tokens / p["step_wall_s"] for p in rows),
        "matmul_flop_per_s": statistics.median(mm_flop / p["mm_wall_s"] for p in rows),
        "fraction_of_dense_encoder_limit": statistics.median(
            tokens / p["step_wall_s"] / lim for p, lim in zip(rows, limit_tokens, strict=True)
        ),
        "fraction_of_dense_encoder_limit_cpu_time": statistics.median(
            tokens / max(p["step_cpu_s"], 1e-9) / lim for p, lim in zip(rows, limit_tokens_cpu, strict=True)
        ),
        "step_wall_s": statistics.median(p["step_wall_s"] for p in rows),
    }
    names = [key[len("part_") : -len("_wall_s")] for key in rows[0] if key.startswith("part_") and key.endswith("_wall_s")]
    if names:
        res["parts"] = {
            name: {
                "wall_s": statistics.median(p[f"part_{name}_wall_s"] for p in rows),
                "cpu_s": statistics.median(p[f"part_{name}_cpu_s"] for p in rows),
                "share_of_step_wall": statistics.median(p[f"part_{name}_wall_s"] / p["step_wall_s"] for p in rows),
            }
            for name in names
        }
    return res


STEP_LABEL_PREFIX = "sae."
"""The kernels' ``record_function`` labels (:mod:`mmsae.sae.kernels`) start with this; a step benchmark adds its
own labels under :data:`BENCH_LABEL_PREFIX`."""
BENCH_LABEL_PREFIX = "step."


def _is_label(name: str) -> bool:
    return name.startswith((STEP_LABEL_PREFIX, BENCH_LABEL_PREFIX))


def _event_seconds(event: Any, device: bool) -> float:
    return (event.device_time_total if device else event.time_range.elapsed_us()) / 1e6


def _labelled_below(event: Any, device: bool) -> float:
    """Seconds of the nearest labelled events under ``event`` (labels nest: the sort inside a backward)."""
    return sum(_event_seconds(c, device) if _is_label(c.name) else _labelled_below(c, device)
               for c in event.cpu_children)


def profiled_parts(step: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """One call of ``step`` under ``torch.profiler``: seconds per label, each less the labels nested in it.

    A part is named after its label without the prefix, dots as underscores (``sae.encode.topk`` ->
    ``encode_topk``; a step's own ``step.forward_other`` -> ``forward_other``: the forward outside every
    kernel label). On the CPU a part is wall-clock time on the calling thread (the backward runs there too); on a
    GPU it is the device time of the kernels launched under the label, and ``unlabelled`` is the device time of
    the kernels under none (autograd runs a GPU backward on its own thread, outside the step's labels: the loss
    backward and DeepSpeed's gradient hooks land there).
    """
    from torch.profiler import ProfilerActivity, profile

    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    sync = cuda_sync(device)
    with profile(activities=activities) as prof:
        step()
        if sync:
            sync()
    parts: dict[str, float] = {}
    for event in prof.events():
        if not _is_label(event.name) or event.device_type != torch.autograd.DeviceType.CPU:
            continue  # (on a GPU the annotation also appears as a device-side event)
        seconds = _event_seconds(event, on_device) - _labelled_below(event, on_device)
        name = event.name.removeprefix(STEP_LABEL_PREFIX).removeprefix(BENCH_LABEL_PREFIX).replace(".", "_")
        parts[name] = parts.get(name, 0.0) + seconds
    if on_device:
        parts["unlabelled"] = max(0.0, _device_busy_seconds(prof.events()) - sum(parts.values()))
    return parts


def _device_busy_seconds(events: Any) -> float:
    """Seconds of every kernel, copy and fill the profiled step ran on the GPU (its annotations left out)."""
    return sum(e.time_range.elapsed_us() for e in events
               if e.device_type == torch.autograd.DeviceType.CUDA and not _is_label(e.name)) / 1e6


def breakdown(rows: list[dict[str, float]], baseline_s: float) -> dict[str, dict[str, float]]:
    """Median seconds per part over profiled steps, their share of the profiled step and, as ``of_limit``,
    their seconds over the baseline product's: the step's fraction of the dense-encoder limit is 1 over the
    sum of ``of_limit``."""
    names = sorted({name for row in rows for name in row}, key=lambda n: -statistics.median(
        row.get(n, 0.0) for row in rows))
    totals = [sum(row.values()) for row in rows]
    return {
        name: {
            "wall_s": statistics.median(row.get(name, 0.0) for row in rows),
            "share_of_step": statistics.median(row.get(name, 0.0) / max(t, 1e-12) for row, t in zip(rows, totals,
                                                                                                  strict=True)),
            "of_limit": statistics.median(row.get(name, 0.0) for row in rows) / baseline_s,
        }
        for name in names
    }


def matmul_baseline(x: Tensor, weight: Tensor, reps: int = 1) -> Callable[[], Tensor]:
    """``reps`` products ``x @ weight.T`` (``[n, d] @ [d, m]``) into one preallocated ``[n, m]`` result.

    Preallocated so the baseline pays no page faults for its result; the caller counts ``reps`` products.
    """
    w_t = weight.detach().t()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)

    def run() -> Tensor:
        for _ in range(reps):
            torch.mm(x, w_t, out=out)
        return out

    return run


DEAD_FRACTION = 0.05
"""Share of latents the step benchmarks count as dead (their AuxK path then runs, as in a real run)."""


def dead_latent_mask(
    num_latents: int, fraction: float = DEAD_FRACTION, seed: int = 0, device: torch.device | str = "cpu"
) -> Tensor:
    """``[num_latents]`` bool, True for ``round(fraction * num_latents)`` latents (at least one), seeded.

    Chosen on the CPU with its own generator, so the same latents are dead on every device.
    """
    count = max(1, round(fraction * num_latents))
    chosen = torch.randperm(num_latents, generator=torch.Generator().manual_seed(seed))[:count]
    mask = torch.zeros(num_latents, dtype=torch.bool)
    mask[chosen] = True
    return mask.to(device)


# ---------------------------------------------------------------------------------------------- naive


class NaiveTopKSAE(nn.Module):
    """The same SAE with dense autograd: top-k scattered into ``[n, m]``, dense decode, dense gradients.

    With ``normalize_in_forward`` the decoder rows are divided by their norms inside the forward pass, by
    plain autograd (as the trainer's SAE does); otherwise :func:`naive_step` projects the decoder gradient
    and renormalises the rows after the optimiser step.
    """

    def __init__(self, sae: TopKSAE, normalize_in_forward: bool = False) -> None:
        super().__init__()
        self.k = sae.cfg.k
        self.normalize_in_forward = normalize_in_forward
        self.encoder = nn.Linear(sae.d_in, sae.num_latents, device=sae.device, dtype=sae.dtype)
        self.W_dec = nn.Parameter(sae.W_dec.detach().clone())
        self.b_dec = nn.Parameter(sae.b_dec.detach().clone())
        with torch.no_grad():
            self.encoder.weight.copy_(sae.encoder.weight)
            self.encoder.bias.copy_(sae.encoder.bias)

    def forward(self, x: Tensor) -> Tensor:
        """The FVU of reconstructing ``x`` ``[n, d]``."""
        w_dec = self.W_dec
        if self.normalize_in_forward:
            w_dec = w_dec / (torch.linalg.vector_norm(w_dec, dim=1, keepdim=True) + torch.finfo(w_dec.dtype).eps)
        acts, idx = dense_topk_encode_reference(x, self.b_dec, self.encoder.weight, self.encoder.bias, self.k)
        out = dense_decode_reference(acts, idx, w_dec, self.b_dec)
        return (out.float() - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def naive_step(
    model: NaiveTopKSAE, opt: torch.optim.Optimizer, x: Tensor, autocast_dtype: torch.dtype | None = None
) -> None:
    """One optimiser step of ``model`` on ``x`` (under autocast to ``autocast_dtype`` when given)."""
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss = model(x)
    loss.backward()
    if not model.normalize_in_forward:
        with torch.no_grad():
            w, g = model.W_dec, model.W_dec.grad
            assert g is not None
            g -= (g * w).sum(1, keepdim=True) * w
    opt.step()
    opt.zero_grad(set_to_none=True)
    if not model.normalize_in_forward:
        with torch.no_grad():
            w = model.W_dec
            w.div_(torch.linalg.vector_norm(w, dim=1, keepdim=True) + torch.finfo(w.dtype).eps)
