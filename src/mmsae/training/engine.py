"""What DeepSpeed trains: every SAE of a run in one module, its engine, the process group and the LR schedule.

W ranks take the same steps as one rank with the same global batch: the losses are normalised by the global
batch's variance (:func:`global_variance`, an all-reduce of sums) and each rank's loss is scaled by the world
size to undo DeepSpeed's gradient averaging.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmsae.config import TrainConfig

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""The variables a launcher sets; an in-process one-rank group sets them for its block only."""


@dataclass(frozen=True)
class Variant:
    """One SAE of a run: its sweep name ('' without a sweep), hook point, width, k and peak learning rate."""

    name: str
    hookpoint: str
    num_latents: int
    k: int
    lr: float

    @property
    def key(self) -> str:
        """Name inside the DeepSpeed module (no dots allowed)."""
        return f"{self.name}__{self.hookpoint}".replace(".", "_")

    @property
    def path(self) -> str:
        """Folder of this SAE under ``train.out`` (and under ``train.init_from``)."""
        return variant_path(self.name, self.hookpoint)


def variant_path(name: str, hookpoint: str) -> str:
    """``<name>/<hookpoint>``, or the hook point alone without a sweep name."""
    return f"{name}/{hookpoint}" if name else hookpoint


# ---------------------------------------------------------------------------------------------------
# processes


def uses_cuda(t: TrainConfig) -> bool:
    return torch.cuda.is_available() and t.device != "cpu"


@contextlib.contextmanager
def process_group(t: TrainConfig) -> Iterator[tuple[int, int, int]]:
    """Join the launcher's process group through DeepSpeed, or make a one-rank group in-process.

    Yields ``(rank, world, local_rank)``. A one-rank group made here lives only as long as the block:
    it rests on an in-memory store (no port is bound), and the launcher variables DeepSpeed reads
    are set for the block only, so the process (a test run, a notebook, a KFP driver that spawns
    more stages) is left as it was found.
    """
    import deepspeed

    if not uses_cuda(t) and not t.cpu_shm_comm:
        # The shared-memory collective op is a C++ extension compiled on first use; gloo does the same
        # job without it. Marking it incompatible makes DeepSpeed skip the build.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if uses_cuda(t) else "gloo"
    if "RANK" in os.environ or torch.distributed.is_initialized():  # a launcher (or the caller) owns it
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        yield (torch.distributed.get_rank(), torch.distributed.get_world_size(),
               int(os.environ.get("LOCAL_RANK", "0")))
        return
    saved = {name: os.environ.get(name) for name in LAUNCHER_ENV}
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"})
    try:
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        yield 0, 1, 0
    finally:
        if torch.distributed.is_initialized():
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached subgroups
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ---------------------------------------------------------------------------------------------------
# learning rate


def default_lr(num_latents: int) -> float:
    """The inverse-square-root scaling of Gao et al.: 2e-4 at 16k latents."""
    return 2e-4 / math.sqrt(num_latents / 2**14)


def lr_multiplier(step: int, total: int, warmup: int, decay: str, final: float) -> float:
    """Linear warm-up over ``warmup`` steps, then ``decay`` ('cosine', 'linear' or 'none') down to ``final``
    at step ``total``, as a multiple of the peak learning rate, for optimiser step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "none" or total <= warmup:
        return 1.0
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * frac)) if decay == "cosine" else 1.0 - frac
    return final + (1.0 - final) * shape


def lr_schedule(t: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """The multiple of the peak learning rate for optimiser step ``step`` (0-based) of a run of
    ``total_steps``: warm-up, then ``train.lr_decay`` down to ``train.lr_final_fraction`` at the last step."""
    warmup = warmup_steps(t, total_steps)
    last = total_steps - 1
    return lambda step: lr_multiplier(step, last, warmup, t.lr_decay, t.lr_final_fraction)


def warmup_steps(t: TrainConfig, total: int) -> int:
    """``train.lr_warmup_steps``, capped at a tenth of the run (at least one step)."""
    return min(t.lr_warmup_steps, max(1, total // 10))


# ---------------------------------------------------------------------------------------------------
# the module DeepSpeed trains


@torch.no_grad()
def global_variance(x: torch.Tensor, world: int) -> torch.Tensor:
    """Σ‖x − mean‖² over the global batch, of which every rank holds a slice ``x`` (a constant: no gradient)."""
    x = x.float()
    flat = x.reshape(-1)
    # Σ‖x − mean‖² = Σx² − ‖Σx‖²/count; Σx² as a dot product (no squared copy of the batch), in float32 even
    # under autocast
    with torch.autocast(x.device.type, enabled=False):
        squares = torch.dot(flat, flat)
    stats = torch.cat([x.sum(0), squares.reshape(1), torch.tensor([x.shape[0]], dtype=torch.float32, device=x.device)])
    if world > 1:
        torch.distributed.all_reduce(stats)
    d = x.shape[1]
    sums, squares, count = stats[:d], stats[d], stats[d + 1]
    return squares - (sums * sums).sum() / count


class SaeBundle(nn.Module):
    """All SAEs of a run in one module; ``forward`` returns the summed loss of one global step."""

    def __init__(self, variants: list[Variant], dims: dict[str, int] | int, t: TrainConfig):
        from mmsae.sae.model import SaeConfig, TopKSAE

        super().__init__()
        self.variants = variants
        self.saes = nn.ModuleDict()
        for v in variants:
            d = dims if isinstance(dims, int) else dims[v.hookpoint]
            sae_cfg = SaeConfig(d_in=d, num_latents=v.num_latents, k=v.k, multi_topk=t.multi_topk,
                                expansion_factor=max(1, v.num_latents // d))
            self.saes[v.key] = TopKSAE(sae_cfg)
        # ZeRO keeps a master copy of the weights that in-place rescaling would not reach, so decoder rows
        # are normalised in the forward pass (which also removes the gradient along each row)
        for sae in self.saes.values():
            sae.normalize_in_forward = True

    def forward(self, batch: dict[str, torch.Tensor], dead: dict[str, torch.Tensor], variance: dict[str, torch.Tensor],
                t: TrainConfig, world: int):
        """``(loss, {variant key: (output, losses, metrics)})`` for this rank's slice of the global batch."""
        total = None
        outs = {}
        for v in self.variants:
            sae = self.saes[v.key]
            out = sae(batch[v.hookpoint], dead_mask=dead[v.key] if t.auxk_alpha > 0 else None, k_aux=t.k_aux,
                      total_variance=variance[v.hookpoint], variance_of=lambda z: global_variance(z, world))
            loss, losses, metrics = sae.training_step_losses(out, auxk_alpha=t.auxk_alpha)
            outs[v.key] = (out, losses, metrics)
            # DeepSpeed averages gradients over ranks; each rank holds a slice of the global sums
            total = loss * world if total is None else total + loss * world
        return total, outs


@contextlib.contextmanager
def released(engine: Any) -> Iterator[Any]:
    """``engine`` for the block; then its optimizer state, gradient buffers and hooks are released
    (``engine.destroy()``), which garbage collection alone does not do. The module keeps its weights."""
    try:
        yield engine
    finally:
        engine.destroy()


def build_engine(bundle: SaeBundle, t: TrainConfig, world: int, total_steps: int, *,
                 zero_stage: int | None = None):
    """The DeepSpeed engine that trains ``bundle`` over ``world`` ranks (one Adam group per SAE).

    ``zero_stage`` None (the stage's choice): ``t.zero_stage`` over several ranks; with one rank stage 0,
    whatever ``t.zero_stage`` says, and the engine's gradient all-reduce switched off: there is nothing to
    partition or reduce, and both would only copy every gradient (``python -m bench train`` measures the
    step). An explicit ``zero_stage`` (0-2) is used as given, one rank included (the GPU profile's ZeRO-2 on
    one GPU).
    """
    import deepspeed

    if zero_stage is not None and zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage must be 0, 1 or 2 (or None for the stage's choice), got {zero_stage}")
    stage = zero_stage if zero_stage is not None else (t.zero_stage if world > 1 else 0)
    groups = [{"params": list(bundle.saes[v.key].parameters()), "lr": v.lr} for v in bundle.variants]
    # torch's fused Adam (CPU and CUDA): no DeepSpeed op to compile
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999), eps=6.25e-10, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(t, total_steps))
    ds_config = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.batch_size // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": t.grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=bundle, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    if world == 1 and stage == 0:
        engine.enable_backward_allreduce = False  # what DeepSpeed itself sets when it has no process group
    return engine
