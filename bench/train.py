"""The train stage's real training step against the machine's dense matmul throughput, side by side.

Logs the figures and returns them (``python -m bench`` writes them to ``train.json``). Reads nothing (the
activations are generated).

The step is the one :mod:`mmsae.stages.train` runs: :class:`~mmsae.training.engine.SaeBundle`
(decoder rows normalised in the forward pass) in the DeepSpeed engine of
:func:`~mmsae.training.engine.build_engine` (one rank set up in-process by
:func:`~mmsae.training.engine.process_group`, torch's fused Adam, the LR schedule), with the stage's default
:class:`~mmsae.config.TrainConfig` apart from the shape. Per step it times what the stage's loop does:
the batch variance and dead-latent mask, ``engine(batch, ...)`` (under bf16 autocast on a GPU),
``engine.backward``, ``engine.step`` and the dead-latent counters, reported as the parts ``forward``,
``backward`` and ``step``.

With one rank the stage's engine uses ZeRO stage 0 and no gradient all-reduce, whatever the config says
(``zero_stage_used`` in ``train.json``); :func:`measure` takes ``zero_stage`` to time another stage on one
rank (the GPU profile times ZeRO-2). Measured here on the CPU at the CPU shape below, ZeRO-2 on one rank
added ~0.95 s of CPU time to a 5 s step (every gradient copied into its flat buffers during backward, the
fp32 partition copied back after the update) and stage 0's all-reduce of a one-member group ~0.65 s (all
gradients flattened into one buffer and copied back).

Two kinds of step alternate, each right after its own baseline: ``train`` with AuxK running (goal 0.70 of
the dense-encoder limit) and ``train_bare`` without dead latents (goal 0.80). The stage's counters start at
0, and a latent is dead only after ``train.dead_tokens`` (10 M) tokens without firing, so a benchmark
starting from zeros would never run the AuxK path (the dead latents' columns of the encoder product and their
top ``k_aux``, the decode of the residual over the dead rows and both backwards) and would time a cheaper
step than a trained SAE's. The counters are therefore pre-aged: a seeded 5 % of the latents
(:data:`bench._timing.DEAD_FRACTION`) have a tokens-since-fired count above ``train.dead_tokens``, the others
0, and they are set back to that state at the start of every step (a copy of ``m`` integers; with random
data the dead latents would otherwise fire and revive within a step or two). ``train.json`` records the
share, ``k_aux`` and the last step's AuxK loss under ``auxk``. After the timed pairs :data:`PROFILED_STEPS`
steps of each kind run under ``torch.profiler``: ``breakdown`` gives each piece (the kernels' labels:
encoder product, top-k, AuxK top-k, decodes, the backward's pieces, the sort of the pattern; the optimizer;
the rest of forward and backward) in seconds, as a share of the step and in units of the baseline product
(their sum is 1 over the step's fraction of the limit).

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
import statistics
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from torch.profiler import record_function

from bench import _timing as timing
from mmsae.config import TrainConfig
from mmsae.training import engine as training_engine

logger = logging.getLogger(__name__)

GOAL_FRACTION = 0.70
"""CPU: the step's tokens/s (with AuxK) as a fraction of the dense-encoder limit."""
GOAL_FRACTION_BARE = 0.80
"""CPU: the same for the step without dead latents (no AuxK)."""
PROFILED_STEPS = 2
"""Steps of each kind run under the profiler, after the timed ones, for the breakdown."""
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


def measure(setup: Setup, device: torch.device, precision: str = "auto",
            zero_stage: int | None = None) -> dict[str, Any]:
    """Time the stage's training step inside the stage's one-rank process group; see :func:`_measure`.

    ``zero_stage``: the engine's ZeRO stage (:func:`~mmsae.training.engine.build_engine`); None: the stage's
    choice for one rank (0).
    """
    t = TrainConfig(num_latents=setup.num_latents, k=setup.k, batch_size=setup.batch_tokens,
                    device=str(device), precision=precision)
    with training_engine.process_group(t):
        return _measure(setup, device, t, zero_stage)


class _Step:
    """The stage loop's training step on cycled batches, with the dead-latent counters reset every step."""

    def __init__(self, engine: Any, variant: training_engine.Variant, t: TrainConfig, batches: list[Tensor],
                 aged: Tensor, autocast: bool, sync: timing.Sync) -> None:
        self.engine, self.variant, self.t, self.batches = engine, variant, t, batches
        self.aged, self.dead = aged, aged.clone()
        self.autocast, self.sync = autocast, sync
        self.calls = 0
        self.last_auxk: Tensor | None = None
        self.last_loss: Tensor | None = None

    def __call__(self) -> dict[str, timing.Timing]:
        engine, t, key = self.engine, self.t, self.variant.key
        x = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        n = x.shape[0]
        device = x.device
        self.dead.copy_(self.aged)  # the same dead share every step (the update below revives the fired)
        parts = timing.Parts(self.sync)
        with parts("forward"), record_function("step.forward_other"):
            variance = training_engine.global_variance(x, 1)  # as the stage's loop
            dead_mask = {key: self.dead > t.dead_tokens}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss, outs = engine({HOOKPOINT: x}, dead_mask, {HOOKPOINT: variance}, t, 1)
            self.last_auxk = outs[key][1]["auxk"].detach()
            self.last_loss = loss.detach()
        with parts("backward"), record_function("step.backward_other"):
            engine.backward(loss)
        with parts("step"), record_function("step.optimizer"):
            engine.step()
            with torch.no_grad():
                fired = engine.module.saes[key].fired_latents(outs[key][0])
                self.dead.add_(n)
                self.dead[fired] = 0
        return parts.times


def _measure(setup: Setup, device: torch.device, t: TrainConfig, zero_stage: int | None) -> dict[str, Any]:
    """Time the stage's training step (with AuxK and bare), the baseline and the naive step for ``setup``.

    ``t.precision`` is the stage's ``train.precision`` (``auto``: bf16 autocast on a GPU, fp32 on the CPU).
    Returns the figures :func:`main` writes; nothing is written here.
    """
    n, d, m, k = setup.batch_tokens, setup.d_in, setup.num_latents, setup.k
    autocast = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")  # as the Trainer
    batches = residual_like(n, d, BATCHES, device)
    variant = training_engine.Variant("", HOOKPOINT, m, k, t.lr or training_engine.default_lr(m))
    torch.manual_seed(t.seed)
    bundle = training_engine.SaeBundle([variant], d, t).to(device)
    sae = bundle.saes[variant.key]
    logger.info("b_dec from the first batch (%s)", t.b_dec_init)
    sae.init_b_dec(batches[0], method=t.b_dec_init)
    with training_engine.released(training_engine.build_engine(bundle, t, 1, total_steps=100_000,
                                                               zero_stage=zero_stage)) as engine:
        return _time_steps(setup, device, t, engine, sae, variant, batches, autocast)


def _time_steps(setup: Setup, device: torch.device, t: TrainConfig, engine: Any, sae: Any,
                variant: training_engine.Variant, batches: list[Tensor], autocast: bool) -> dict[str, Any]:
    """The timed pairs, the profiled steps and the naive step for an engine built by :func:`_measure`."""
    n, d, m = setup.batch_tokens, setup.d_in, setup.num_latents
    sync = timing.cuda_sync(device)
    # pre-aged counters: a seeded DEAD_FRACTION of the latents past dead_tokens, so the step runs AuxK
    dead_latents = timing.dead_latent_mask(m, seed=SEED, device=device)
    num_dead = int(dead_latents.sum())
    k_aux = min(t.k_aux or d // 2, num_dead) if t.auxk_alpha > 0 else 0  # as TopKSAE.forward
    if k_aux == 0:
        logger.warning("auxk_alpha = 0: the timed step runs no AuxK")
    steps = {
        "auxk": _Step(engine, variant, t, batches, dead_latents.to(torch.int64) * (t.dead_tokens + 1), autocast,
                      sync),
        "bare": _Step(engine, variant, t, batches, torch.zeros(m, dtype=torch.int64, device=device), autocast, sync),
    }

    if autocast:
        mm = timing.matmul_baseline(batches[0].to(torch.bfloat16), sae.encoder.weight.to(torch.bfloat16),
                                    setup.matmul_reps)
    else:
        mm = timing.matmul_baseline(batches[0], sae.encoder.weight, setup.matmul_reps)
    flop_per_token = 2.0 * d * m
    mm_flop = setup.matmul_reps * n * flop_per_token

    logger.info("warm-up: %d training steps of each kind", setup.warmup_steps)
    for _ in range(setup.warmup_steps):
        for step in steps.values():
            timing.timed(step, sync)
    timing.timed(mm, sync)
    rows = {name: [] for name in steps}
    for i in range(setup.pairs):  # the kinds alternate, each right after its own baseline
        for name, step in steps.items():
            rows[name] += timing.pairs(mm, step, 1, f"train {name} {i}", sync)
    summaries = {name: timing.summarise(r, n, flop_per_token, mm_flop) for name, r in rows.items()}
    baseline_s = statistics.median(r["mm_wall_s"] for r in rows["auxk"] + rows["bare"]) / setup.matmul_reps
    parts = {name: timing.breakdown([timing.profiled_parts(step, device) for _ in range(PROFILED_STEPS)],
                                    baseline_s) for name, step in steps.items()}
    last_auxk = steps["auxk"].last_auxk
    auxk = {
        "dead_fraction": timing.DEAD_FRACTION,
        "dead_latents": num_dead,
        "dead_tokens": t.dead_tokens,
        "k_aux": k_aux,
        "auxk_alpha": t.auxk_alpha,
        "last_auxk_loss": float(last_auxk) if last_auxk is not None else None,
        "losses_finite": all(s.last_loss is not None and bool(torch.isfinite(s.last_loss)) for s in steps.values()),
        "in_timed_step": k_aux > 0,
    }
    logger.info("timed step includes AuxK: %s (%d of %d latents dead, k_aux %d, last AuxK loss %.4g)",
                auxk["in_timed_step"], num_dead, m, k_aux, auxk["last_auxk_loss"])
    naive_rows, naive_s = _naive(setup, sae, variant.lr, batches[0], mm, autocast, sync, flop_per_token, mm_flop)
    return _figures(device, setup, _engine_info(engine, t, autocast), auxk, summaries, parts, naive_s,
                    {"train": rows["auxk"], "train_bare": rows["bare"], "naive": naive_rows}, flop_per_token)


def _engine_info(engine: Any, t: TrainConfig, autocast: bool) -> dict[str, Any]:
    return {
        "zero_stage_configured": t.zero_stage,
        "zero_stage_used": int(engine.zero_optimization_stage()),
        "gradient_allreduce": bool(engine.enable_backward_allreduce),
        "optimizer": type(engine.optimizer).__name__,
        "autocast_bf16": autocast,
    }


def _figures(device: torch.device, setup: Setup, engine_info: dict[str, Any], auxk: dict[str, Any],
             summaries: dict[str, dict[str, Any]], parts: dict[str, Any], naive_s: dict[str, Any],
             pairs: dict[str, list[dict[str, float]]], flop_per_token: float) -> dict[str, Any]:
    """What ``train.json`` holds."""
    autocast = engine_info["autocast_bf16"]
    trained = summaries["auxk"]
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
        "train_bare": summaries["bare"],
        "breakdown": parts,
        "naive": naive_s,
        "train_over_naive_speedup": trained["tokens_per_s"] / naive_s["tokens_per_s"],
        "goal_fraction": GOAL_FRACTION,
        "goal_fraction_bare": GOAL_FRACTION_BARE,
        "meets_goals": trained["fraction_of_dense_encoder_limit"] >= GOAL_FRACTION
        and summaries["bare"]["fraction_of_dense_encoder_limit"] >= GOAL_FRACTION_BARE,
        "pairs": pairs,
    }
    if device.type == "cuda":
        result["gpu"] = gpu_figures(result["device"], trained["tokens_per_s"], flop_per_token, matmul)
    return result


def _naive(setup: Setup, sae: Any, lr: float, x: Tensor, mm: Any, autocast: bool, sync: timing.Sync,
           flop_per_token: float, mm_flop: float) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """The naive dense step's pairs and summary (over ``setup.naive_batch_tokens`` tokens of ``x``)."""
    naive_n = setup.naive_batch_tokens
    naive = timing.NaiveTopKSAE(sae, normalize_in_forward=True)
    naive_opt = torch.optim.Adam(naive.parameters(), lr=lr, betas=(0.9, 0.999), eps=6.25e-10, fused=True)
    x_naive = x[:naive_n]
    cast = torch.bfloat16 if autocast else None
    logger.info("naive dense steps over %d tokens", naive_n)
    for _ in range(setup.naive_warmup_steps):
        timing.timed(lambda: timing.naive_step(naive, naive_opt, x_naive, cast), sync)
    rows = timing.pairs(mm, lambda: timing.naive_step(naive, naive_opt, x_naive, cast), setup.naive_pairs, "naive",
                        sync)
    return rows, timing.summarise(rows, naive_n, flop_per_token, mm_flop)


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
    s, tr, bare, nv = r["setup"], r["train"], r["train_bare"], r["naive"]
    lines = [
        f"train  d={s['d_in']} m={s['num_latents']} k={s['k']} batch={s['batch_tokens']} device={r['device']} "
        f"threads={r['torch_threads']} thp={r['thp_alloc']} engine={r['engine']}",
        f"  AuxK in the timed step: {r['auxk']['in_timed_step']} ({r['auxk']['dead_fraction']:.0%} of latents "
        f"dead, k_aux={r['auxk']['k_aux']})",
        f"  dense matmul ({r['matmul_dtype']})  {r['matmul_flop_per_s'] / 1e9:10.1f} GFLOP/s  "
        f"-> encoder limit {r['dense_encoder_limit_tokens_per_s']:10.0f} tok/s",
        f"  training step (AuxK)   {tr['tokens_per_s']:10.0f} tok/s  "
        f"{tr['fraction_of_dense_encoder_limit']:.3f} of limit (CPU time: "
        f"{tr['fraction_of_dense_encoder_limit_cpu_time']:.3f}; goal {r['goal_fraction']:.2f})",
        f"  training step (bare)   {bare['tokens_per_s']:10.0f} tok/s  "
        f"{bare['fraction_of_dense_encoder_limit']:.3f} of limit (CPU time: "
        f"{bare['fraction_of_dense_encoder_limit_cpu_time']:.3f}; goal {r['goal_fraction_bare']:.2f})",
    ]
    for kind, parts in r["breakdown"].items():
        lines.append(f"  profiled {kind} step, in units of the baseline product (sum = 1 / fraction):")
        for name, p in parts.items():
            lines.append(f"    {name:<22} {p['wall_s']:8.3f} s  {p['of_limit']:6.3f}  {p['share_of_step']:6.1%}")
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
