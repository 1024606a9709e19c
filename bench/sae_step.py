"""One TopK SAE training step on this CPU against the machine's dense matmul throughput, side by side.

Logs the figures and returns them (``python -m bench`` writes them to ``sae_step.json``). Reads nothing.

At d = 1024, num_latents = 32 768, k = 64 and a batch of 4096 tokens it measures, in one run:

(a) the dense fp32 matmul throughput at the encoder's shape (``torch.mm`` ``[n, d] @ [d, m]`` into a
    preallocated result, FLOP/s),
    which gives the *dense-encoder limit*: tokens/s = FLOP/s / (2·d·m) — a step can be no faster than its
    encoder product;
(b) a full training step of :class:`mmsae.sae.TopKSAE` (forward with FVU and AuxK, backward through the
    sparse kernels, decoder-gradient projection, fused Adam step, decoder renormalisation): tokens/s and the
    fraction of the dense-encoder limit (goal 0.70). A seeded 5 % of the latents
    (:data:`bench._timing.DEAD_FRACTION`) are passed as dead, with the train stage's default ``auxk_alpha``
    and ``k_aux`` (``d / 2``), so the AuxK path runs (the dead latents' columns of the encoder product and
    their top ``k_aux``, the decode of the residual over the dead rows and both backwards) as in a trained
    SAE; ``sae_step.json`` records the share and ``k_aux`` under ``auxk``. The same step with no dead latent
    (``fast_bare``, goal 0.80) is timed alternately with it. Two more steps of each kind run under
    ``torch.profiler``: ``breakdown`` gives each piece (encoder product, top-k, AuxK top-k, decodes, the
    backward's pieces, the optimizer, the rest) in seconds and in units of the baseline product, whose sum is
    1 over the fraction;
(c) the same step done naively (dense ``[n, m]`` top-k scatter, dense decode, plain autograd; no AuxK term,
    so the speedup over it is if anything understated), after one untimed warm-up step as (b) gets.

The machine is shared, so every step is timed right after a matmul of the same shape and each ratio is
taken within such a pair; the reported fraction is the median over pairs (wall-clock, and also in process
CPU time, which is less disturbed by other processes). :mod:`bench._timing` holds the timing and the naive
implementation shared with :mod:`bench.train`.
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

import torch
from torch import Tensor
from torch.profiler import record_function

from bench import _timing as timing
from mmsae.config import TrainConfig
from mmsae.sae import SaeConfig, TopKSAE

logger = logging.getLogger(__name__)

D_IN = 1024
NUM_LATENTS = 32768
K = 64
BATCH = 4096
FAST_PAIRS = 3
NAIVE_PAIRS = 1
NAIVE_WARMUP_STEPS = 1
AUXK_ALPHA = TrainConfig.model_fields["auxk_alpha"].default
"""The train stage's default AuxK weight."""
GOAL_FRACTION = 0.70
"""The step with AuxK, as a fraction of the dense-encoder limit."""
GOAL_FRACTION_BARE = 0.80
"""The step without dead latents."""
PROFILED_STEPS = 2
"""Steps of each kind run under the profiler, after the timed ones, for the breakdown."""


def _fast_step(sae: TopKSAE, opt: torch.optim.Optimizer, x: Tensor, dead_mask: Tensor) -> Tensor:
    """One training step with AuxK over ``dead_mask`` (``k_aux`` the default ``d / 2``; none when no latent is
    dead); the AuxK loss."""
    with record_function("step.forward_other"):
        out = sae(x, dead_mask=dead_mask)
        loss, _, _ = sae.training_step_losses(out, auxk_alpha=AUXK_ALPHA)
    with record_function("step.backward_other"):
        loss.backward()
    with record_function("step.optimizer"):
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
    return out.auxk_loss.detach()


def main() -> dict[str, Any]:
    """Run the benchmark (about 2–3 minutes on 2 busy cores) and return the figures."""
    torch.manual_seed(0)
    n, d, m, k = BATCH, D_IN, NUM_LATENTS, K
    flop_per_token = 2.0 * d * m  # the encoder product
    x = torch.randn(n, d)
    sae = TopKSAE(SaeConfig(d_in=d, num_latents=m, k=k))
    sae.init_b_dec(x[:1024], method="mean")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    masks = {"fast": timing.dead_latent_mask(m, seed=0), "fast_bare": torch.zeros(m, dtype=torch.bool)}
    num_dead = int(masks["fast"].sum())
    k_aux = min(d // 2, num_dead)  # as TopKSAE.forward with k_aux left at its default
    mm = timing.matmul_baseline(x, sae.encoder.weight)
    logger.info("warm-up: fast steps (AuxK over %d of %d latents dead, k_aux %d; and none dead)", num_dead, m, k_aux)
    for mask in masks.values():
        _fast_step(sae, opt, x, mask)
    last_auxk: list[Tensor] = []
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in masks}
    for i in range(FAST_PAIRS):  # the kinds alternate, each right after its own baseline
        for name, mask in masks.items():
            rows[name] += timing.pairs(mm, lambda mask=mask: last_auxk.append(_fast_step(sae, opt, x, mask)), 1,
                                       f"{name} {i}")
    baseline_s = statistics.median(r["mm_wall_s"] for r in rows["fast"] + rows["fast_bare"])
    breakdown = {
        name: timing.breakdown([timing.profiled_parts(lambda mask=mask: _fast_step(sae, opt, x, mask),
                                                      torch.device("cpu")) for _ in range(PROFILED_STEPS)],
                               baseline_s)
        for name, mask in masks.items()
    }

    naive = timing.NaiveTopKSAE(sae)
    naive_opt = torch.optim.Adam(naive.parameters(), lr=1e-4, fused=True)
    logger.info("naive steps (dense autograd): %d warm-up, %d timed", NAIVE_WARMUP_STEPS, NAIVE_PAIRS)
    for _ in range(NAIVE_WARMUP_STEPS):
        timing.naive_step(naive, naive_opt, x)
    slow = timing.pairs(mm, lambda: timing.naive_step(naive, naive_opt, x), NAIVE_PAIRS, "naive")

    fast_s = timing.summarise(rows["fast"], n, flop_per_token)
    bare_s = timing.summarise(rows["fast_bare"], n, flop_per_token)
    naive_s = timing.summarise(slow, n, flop_per_token)
    all_mm = [2.0 * n * d * m / p["mm_wall_s"] for p in rows["fast"] + rows["fast_bare"] + slow]
    matmul_flops = statistics.median(all_mm)
    result: dict[str, Any] = {
        "shape": {"d_in": d, "num_latents": m, "k": k, "batch_tokens": n},
        "auxk": {"dead_fraction": timing.DEAD_FRACTION, "dead_latents": num_dead, "k_aux": k_aux,
                 "auxk_alpha": AUXK_ALPHA, "last_auxk_loss": float(last_auxk[-1]), "in_timed_step": k_aux > 0},
        "naive_warmup_steps": NAIVE_WARMUP_STEPS,
        "torch_threads": torch.get_num_threads(),
        "thp_alloc": timing.thp_alloc_active(),
        "matmul_flop_per_s": matmul_flops,
        "dense_encoder_limit_tokens_per_s": matmul_flops / flop_per_token,
        "fast": fast_s,
        "fast_bare": bare_s,
        "breakdown": {"fast": breakdown["fast"], "fast_bare": breakdown["fast_bare"]},
        "naive": naive_s,
        "fast_over_naive_speedup": fast_s["tokens_per_s"] / naive_s["tokens_per_s"],
        "goal_fraction": GOAL_FRACTION,
        "goal_fraction_bare": GOAL_FRACTION_BARE,
        "pairs": {"fast": rows["fast"], "fast_bare": rows["fast_bare"], "naive": slow},
    }
    logger.info(
        "\n"
        f"sae_step  d={d} m={m} k={k} batch={n} threads={result['torch_threads']} thp={result['thp_alloc']}\n"
        f"  dense matmul           {matmul_flops / 1e9:8.1f} GFLOP/s  "
        f"-> encoder limit {result['dense_encoder_limit_tokens_per_s']:8.0f} tok/s\n"
        f"  fast step (AuxK: {timing.DEAD_FRACTION:.0%} dead, k_aux={k_aux}) {fast_s['tokens_per_s']:8.0f} tok/s  "
        f"{fast_s['fraction_of_dense_encoder_limit']:.3f} of limit "
        f"(CPU time: {fast_s['fraction_of_dense_encoder_limit_cpu_time']:.3f}; goal {GOAL_FRACTION})\n"
        f"  fast step (bare)       {bare_s['tokens_per_s']:8.0f} tok/s  "
        f"{bare_s['fraction_of_dense_encoder_limit']:.3f} of limit "
        f"(CPU time: {bare_s['fraction_of_dense_encoder_limit_cpu_time']:.3f}; goal {GOAL_FRACTION_BARE})\n"
        f"  naive dense step       {naive_s['tokens_per_s']:8.0f} tok/s  "
        f"{naive_s['fraction_of_dense_encoder_limit']:.3f} of limit\n"
        f"  fast / naive           {result['fast_over_naive_speedup']:8.1f}x\n"
        + "\n".join(f"  breakdown {kind}: " + ", ".join(f"{name} {p['of_limit']:.3f}" for name, p in parts.items())
                    for kind, parts in breakdown.items())
    )
    return result
