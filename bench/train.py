"""The train stage's real training step against the machine's dense matmul throughput, side by side.

Logs the figures and returns them (``python -m bench`` writes them to ``train.json``). Reads nothing (the
activations are generated).

The step is the one :mod:`mmsae.stages.train` runs: :class:`~mmsae.training.engine.SaeBundle`
(decoder rows normalised in the forward pass) in the DeepSpeed engine of
:func:`~mmsae.training.engine.build_engine` (the config's ZeRO stage, one rank set up in-process by
:func:`~mmsae.training.engine.process_group`, torch's fused Adam, the LR schedule), with the stage's default
:class:`~mmsae.config.TrainConfig` apart from the shape. Per step it times what the stage's loop does:
the batch variance and dead-latent mask, ``engine(batch, ...)`` (under bf16 autocast on a GPU),
``engine.backward``, ``engine.step`` and the dead-latent counters, reported as the parts ``forward``,
``backward`` and ``step``.

With one rank the stage's engine uses ZeRO stage 0 and no gradient all-reduce, whatever the config says
(``zero_stage_used`` in ``train.json``). Measured here on the CPU at the CPU shape below, ZeRO-2 on one rank
added ~0.95 s of CPU time to a 5 s step (every gradient copied into its flat buffers during backward, the fp32
partition copied back after the update) and stage 0's all-reduce of a one-member group ~0.65 s (all gradients
flattened into one buffer and copied back): together the difference between ~55 % and ~63 % of the
dense-encoder limit.

The timed step includes AuxK. The stage's counters start at 0, and a latent is dead only after
``train.dead_tokens`` (10 M) tokens without firing, so a benchmark starting from zeros would never run the
AuxK path (the dead latents' pre-activations and top ``k_aux``, the decode of the residual and both
backwards) and would time a cheaper step than a trained SAE's. The counters are therefore pre-aged: a seeded
5 % of the latents (:data:`bench._timing.DEAD_FRACTION`) have a tokens-since-fired count above
``train.dead_tokens``, the others 0, and they are set back to that state at the start of every step (a copy
of ``m`` integers; with random data the dead latents would otherwise fire and revive within a step or two).
``train.json`` records the share, ``k_aux`` and the last step's AuxK loss under ``auxk``.

* On the CPU: d = 1024, 32 768 latents, k = 64, fp32, global batches of 4096 tokens (the stage's default
  batch size; Adam's update over the 64 M parameters is then ~2 % of a step).
* On a GPU (when CUDA is available): d = 4096, 131 072 latents, k = 128, bf16 autocast, batches of 32 768
  tokens (Adam over 1.07 G fp32 parameters then weighs about as much as a fifth of the encoder product), and
  tokens/s per GPU against the goal of 300 000 and the fraction of bf16 peak: the peak measured by the
  baseline below, and the nominal 989 TFLOP/s when the device is an H100 (SXM).

Each step is timed right after the baseline, a dense matmul of the encoder's shape (``[n, d] @ [d, m]``
into a preallocated result; fp32 on the CPU, bf16 on a GPU), and each ratio is taken within such a pair
(medians over pairs; on the CPU also in process CPU time, less disturbed by the other work on a shared
machine). The *dense-encoder limit* is the baseline's FLOP/s over ``2·d·m`` FLOP per token: no step can
beat its encoder product. The same pairs are then timed for a naive dense implementation at the same shape
(top-k scattered into ``[n, m]``, dense decode, plain autograd through the normalisation, the same fused Adam;
on a GPU over a smaller batch, reported per token), without DeepSpeed, after one untimed warm-up step as
the stage's step gets. The naive step has no AuxK term, so the speedup over it is if anything understated.

Activations are random but shaped like a residual stream: a large mean offset, a 64-dimensional subspace
with a decaying spectrum and isotropic noise, so the encoder's pre-activations spread as they do on real
data and top-k sees distinct winners; ``BATCHES`` different batches are cycled.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from bench import _timing as timing  # sets the huge-page switch before large allocations
from mmsae.config import TrainConfig
from mmsae.training import engine as training_engine

logger = logging.getLogger(__name__)

GOAL_FRACTION = 0.6
"""CPU: the step's tokens/s as a fraction of the dense-encoder limit."""
GOAL_TOKENS_PER_S_PER_GPU = 300_000
NOMINAL_BF16_FLOP_PER_S = {"H100": 989e12}
"""Dense bf16 peak by device-name marker (H100 SXM)."""
HOOKPOINT = "layers.16"
BATCHES = 2
SEED = 0


@dataclass(frozen=True)
class Setup:
    """One configuration of the benchmark."""

    d_in: int
    num_latents: int
    k: int
    batch_tokens: int
    naive_batch_tokens: int
    warmup_steps: int
    pairs: int
    naive_pairs: int
    naive_warmup_steps: int
    """Untimed naive steps first (1: both sides timed warm, Adam's state and the allocator's blocks exist)."""
    matmul_reps: int
    """Baseline products per timing (a GPU product is a few milliseconds)."""


CPU = Setup(d_in=1024, num_latents=32768, k=64, batch_tokens=4096, naive_batch_tokens=4096,
            warmup_steps=1, pairs=3, naive_pairs=1, naive_warmup_steps=1, matmul_reps=1)
GPU = Setup(d_in=4096, num_latents=131072, k=128, batch_tokens=32768, naive_batch_tokens=4096,
            warmup_steps=3, pairs=10, naive_pairs=3, naive_warmup_steps=1, matmul_reps=5)


def residual_like(n: int, d: int, count: int, device: torch.device, seed: int = SEED) -> list[Tensor]:
    """``count`` batches ``[n, d]`` float32: mean offset + 64-dim subspace (decaying spectrum) + noise."""
    g = torch.Generator(device=device).manual_seed(seed)
    rank = min(64, d)
    offset = torch.randn(d, generator=g, device=device) * 2.0
    basis = torch.linalg.qr(torch.randn(d, rank, generator=g, device=device))[0].t()  # [rank, d] orthonormal
    spectrum = 8.0 / torch.arange(1, rank + 1, device=device, dtype=torch.float32).sqrt()
    return [
        (torch.randn(n, rank, generator=g, device=device) * spectrum) @ basis
        + 0.5 * torch.randn(n, d, generator=g, device=device)
        + offset
        for _ in range(count)
    ]


def measure(setup: Setup, device: torch.device, precision: str = "auto") -> dict[str, Any]:
    """Time the stage's training step inside the stage's one-rank process group; see :func:`_measure`."""
    t = TrainConfig(num_latents=setup.num_latents, k=setup.k, batch_size=setup.batch_tokens,
                    device=str(device), precision=precision)
    with training_engine.process_group(t):
        return _measure(setup, device, t)


def _measure(setup: Setup, device: torch.device, t: TrainConfig) -> dict[str, Any]:
    """Time the stage's training step, the baseline and the naive step for ``setup`` on ``device``.

    ``t.precision`` is the stage's ``train.precision`` (``auto``: bf16 autocast on a GPU, fp32 on the CPU).
    Returns the figures :func:`main` writes; nothing is written here.
    """
    n, d, m, k = setup.batch_tokens, setup.d_in, setup.num_latents, setup.k
    autocast = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")  # as the Trainer
    world = 1
    sync = timing.cuda_sync(device)

    batches = residual_like(n, d, BATCHES, device)
    variant = training_engine.Variant("", HOOKPOINT, m, k, t.lr or training_engine.default_lr(m))
    torch.manual_seed(t.seed)
    bundle = training_engine.SaeBundle([variant], d, t).to(device)
    sae = bundle.saes[variant.key]
    logger.info("b_dec from the first batch (%s)", t.b_dec_init)
    sae.init_b_dec(batches[0], method=t.b_dec_init)
    engine = training_engine.build_engine(bundle, t, world, total_steps=100_000)
    # pre-aged counters: a seeded DEAD_FRACTION of the latents past dead_tokens, so the step runs AuxK
    dead_latents = timing.dead_latent_mask(m, seed=SEED, device=device)
    aged = dead_latents.to(torch.int64) * (t.dead_tokens + 1)
    dead = aged.clone()
    num_dead = int(dead_latents.sum())
    k_aux = min(t.k_aux or d // 2, num_dead) if t.auxk_alpha > 0 else 0  # as TopKSAE.forward
    if k_aux == 0:
        logger.warning("auxk_alpha = 0: the timed step runs no AuxK")
    state: dict[str, Any] = {"i": 0, "auxk": None}

    def train_step() -> dict[str, timing.Timing]:
        x = batches[state["i"] % BATCHES]
        state["i"] += 1
        dead.copy_(aged)  # the same dead share every step (the update below revives the latents that fire)
        parts = timing.Parts(sync)
        with parts("forward"):
            with torch.no_grad():
                xf = x.float()
                variance = (xf.pow(2).sum(0) - xf.sum(0).pow(2) / n).sum()
            dead_mask = {variant.key: dead > t.dead_tokens}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss, outs = engine({HOOKPOINT: x}, dead_mask, {HOOKPOINT: variance}, t, world)
            state["auxk"] = outs[variant.key][1]["auxk"].detach()
        with parts("backward"):
            engine.backward(loss)
        with parts("step"):
            engine.step()
            with torch.no_grad():
                fired = sae.fired_latents(outs[variant.key][0])
                dead.add_(n)
                dead[fired] = 0
        return parts.times

    if autocast:
        mm = timing.matmul_baseline(batches[0].to(torch.bfloat16), sae.encoder.weight.to(torch.bfloat16),
                                    setup.matmul_reps)
    else:
        mm = timing.matmul_baseline(batches[0], sae.encoder.weight, setup.matmul_reps)
    flop_per_token = 2.0 * d * m
    mm_flop = setup.matmul_reps * n * flop_per_token

    logger.info("warm-up: %d training steps", setup.warmup_steps)
    for _ in range(setup.warmup_steps):
        timing.timed(train_step, sync)
    timing.timed(mm, sync)
    rows = timing.pairs(mm, train_step, setup.pairs, "train", sync)
    trained = timing.summarise(rows, n, flop_per_token, mm_flop)
    auxk = {
        "dead_fraction": timing.DEAD_FRACTION,
        "dead_latents": num_dead,
        "dead_tokens": t.dead_tokens,
        "k_aux": k_aux,
        "auxk_alpha": t.auxk_alpha,
        "last_auxk_loss": float(state["auxk"]),
        "in_timed_step": k_aux > 0,
    }
    logger.info("timed step includes AuxK: %s (%d of %d latents dead, k_aux %d, last AuxK loss %.4g)",
                auxk["in_timed_step"], num_dead, m, k_aux, auxk["last_auxk_loss"])
    engine_info = {
        "zero_stage_configured": t.zero_stage,
        "zero_stage_used": int(engine.zero_optimization_stage()),
        "gradient_allreduce": bool(engine.enable_backward_allreduce),
        "optimizer": type(engine.optimizer).__name__,
        "autocast_bf16": autocast,
    }

    naive_n = setup.naive_batch_tokens
    naive = timing.NaiveTopKSAE(sae, normalize_in_forward=True)
    naive_opt = torch.optim.Adam(naive.parameters(), lr=variant.lr, betas=(0.9, 0.999), eps=6.25e-10, fused=True)
    x_naive = batches[0][:naive_n]
    cast = torch.bfloat16 if autocast else None
    logger.info("naive dense steps over %d tokens", naive_n)
    for _ in range(setup.naive_warmup_steps):
        timing.timed(lambda: timing.naive_step(naive, naive_opt, x_naive, cast), sync)
    naive_rows = timing.pairs(mm, lambda: timing.naive_step(naive, naive_opt, x_naive, cast),
                              setup.naive_pairs, "naive", sync)
    naive_s = timing.summarise(naive_rows, naive_n, flop_per_token, mm_flop)

    matmul = trained["matmul_flop_per_s"]
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "setup": asdict(setup),
        "torch_threads": torch.get_num_threads(),
        "thp_alloc": timing.thp_alloc_active() if device.type == "cpu" else None,
        "engine": engine_info,
        "auxk": auxk,
        "matmul_dtype": "bfloat16" if autocast else "float32",
        "matmul_flop_per_s": matmul,
        "dense_encoder_limit_tokens_per_s": matmul / flop_per_token,
        "train": trained,
        "naive": naive_s,
        "train_over_naive_speedup": trained["tokens_per_s"] / naive_s["tokens_per_s"],
        "goal_fraction": GOAL_FRACTION,
        "pairs": {"train": rows, "naive": naive_rows},
    }
    if device.type == "cuda":
        result["gpu"] = gpu_figures(result["device"], trained["tokens_per_s"], flop_per_token, matmul)
    return result


def gpu_figures(name: str, tokens_per_s: float, flop_per_token: float, matmul_flop_per_s: float) -> dict[str, Any]:
    """Per-GPU tokens/s against the goal, and the step's FLOP rate as a fraction of bf16 peak.

    The measured peak is the baseline's bf16 matmul rate; the nominal one is added for devices named in
    :data:`NOMINAL_BF16_FLOP_PER_S` (not for PCIe cards, whose peak is lower).
    """
    gpu: dict[str, Any] = {
        "tokens_per_s_per_gpu": tokens_per_s,
        "goal_tokens_per_s_per_gpu": GOAL_TOKENS_PER_S_PER_GPU,
        "fraction_of_measured_bf16_peak": tokens_per_s * flop_per_token / matmul_flop_per_s,
        "measured_bf16_matmul_flop_per_s": matmul_flop_per_s,
    }
    for marker, peak in NOMINAL_BF16_FLOP_PER_S.items():
        if marker in name and "PCIE" not in name.upper():
            gpu["nominal_bf16_flop_per_s"] = peak
            gpu["fraction_of_nominal_bf16_peak"] = tokens_per_s * flop_per_token / peak
            gpu["matmul_fraction_of_nominal_bf16_peak"] = matmul_flop_per_s / peak
    return gpu


def _report(r: dict[str, Any]) -> str:
    s, tr, nv = r["setup"], r["train"], r["naive"]
    lines = [
        f"train  d={s['d_in']} m={s['num_latents']} k={s['k']} batch={s['batch_tokens']} device={r['device']} "
        f"threads={r['torch_threads']} thp={r['thp_alloc']} engine={r['engine']}",
        f"  AuxK in the timed step: {r['auxk']['in_timed_step']} ({r['auxk']['dead_fraction']:.0%} of latents "
        f"dead, k_aux={r['auxk']['k_aux']})",
        f"  dense matmul ({r['matmul_dtype']})  {r['matmul_flop_per_s'] / 1e9:10.1f} GFLOP/s  "
        f"-> encoder limit {r['dense_encoder_limit_tokens_per_s']:10.0f} tok/s",
        f"  training step          {tr['tokens_per_s']:10.0f} tok/s  "
        f"{tr['fraction_of_dense_encoder_limit']:.0%} of limit (CPU time: "
        f"{tr['fraction_of_dense_encoder_limit_cpu_time']:.0%}; goal {r['goal_fraction']:.0%})",
    ]
    for name, p in tr.get("parts", {}).items():
        lines.append(f"    {name:<9} {p['wall_s']:8.3f} s wall  {p['cpu_s']:8.3f} s CPU  "
                     f"{p['share_of_step_wall']:.0%} of the step")
    lines += [
        f"  naive dense step       {nv['tokens_per_s']:10.0f} tok/s  {nv['fraction_of_dense_encoder_limit']:.0%} "
        f"of limit (over {s['naive_batch_tokens']} tokens)",
        f"  step / naive           {r['train_over_naive_speedup']:10.1f}x",
    ]
    if "gpu" in r:
        g = r["gpu"]
        lines.append(f"  per GPU                {g['tokens_per_s_per_gpu']:10.0f} tok/s (goal "
                     f"{g['goal_tokens_per_s_per_gpu']}), {g['fraction_of_measured_bf16_peak']:.0%} of measured bf16 peak"
                     + (f", {g['fraction_of_nominal_bf16_peak']:.0%} of nominal" if "fraction_of_nominal_bf16_peak" in g
                        else ""))
    return "\n".join(lines)


def main(device: str | None = None) -> dict[str, Any]:
    """Run the benchmark (2-3 minutes on 2 busy cores) and return the figures.

    ``device``: ``cpu`` or ``cuda[:N]``; default a GPU when CUDA is available (its configuration), else the CPU.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    result = measure(GPU if dev.type == "cuda" else CPU, dev)
    logger.info("\n%s", _report(result))
    return result
