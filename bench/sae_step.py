"""One TopK SAE training step on this CPU against the machine's dense matmul throughput, side by side.

Logs the figures and returns them (``python -m bench`` writes them to ``sae_step.json``). Reads nothing.

At d = 1024, num_latents = 32 768, k = 64 and a batch of 4096 tokens it measures, in one run:

(a) the dense fp32 matmul throughput at the encoder's shape (``torch.mm`` ``[n, d] @ [d, m]`` into a
    preallocated result, FLOP/s),
    which gives the *dense-encoder limit*: tokens/s = FLOP/s / (2·d·m) — a step can be no faster than its
    encoder product;
(b) a full training step of :class:`mmsae.sae.TopKSAE` (forward with FVU and AuxK, backward through the
    sparse kernels, decoder-gradient projection, fused Adam step, decoder renormalisation): tokens/s and the
    fraction of the dense-encoder limit. A seeded 5 % of the latents (:data:`bench._timing.DEAD_FRACTION`)
    are passed as dead, with the train stage's default ``auxk_alpha`` and ``k_aux`` (``d / 2``): with no
    dead latent the AuxK path (the dead latents' pre-activations and top ``k_aux``, the decode of the
    residual and both backwards) is skipped and the step is cheaper than a trained SAE's; ``sae_step.json`` records the share
    and ``k_aux`` under ``auxk``;
(c) the same step done naively (dense ``[n, m]`` top-k scatter, dense decode, plain autograd; no AuxK term,
    so the speedup over it is if anything understated), after one untimed warm-up step as (b) gets.

The machine is shared, so every step is timed right after a matmul of the same shape and each ratio is
taken within such a pair; the reported fraction is the median over pairs (wall-clock, and also in process
CPU time, which is less disturbed by other processes). Large CPU allocations are backed by transparent huge
pages (``THP_MEM_ALLOC_ENABLE=1``, see :mod:`bench._timing`, which also holds the timing and the naive
implementation shared with :mod:`bench.train`): without it every fresh 128 MiB gradient costs ~0.1 s of
page faults.
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

import torch
from torch import Tensor

from bench import _timing as timing  # sets the huge-page switch before large allocations
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


def _fast_step(sae: TopKSAE, opt: torch.optim.Optimizer, x: Tensor, dead_mask: Tensor) -> Tensor:
    """One training step with AuxK over ``dead_mask`` (``k_aux`` the default ``d / 2``); the AuxK loss."""
    out = sae(x, dead_mask=dead_mask)
    loss, _, _ = sae.training_step_losses(out, auxk_alpha=AUXK_ALPHA)
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sae.set_decoder_norm_to_unit_norm()
    return out.auxk_loss.detach()


def main() -> dict[str, Any]:
    """Run the benchmark (about 1–2 minutes on 2 busy cores) and return the figures."""
    torch.manual_seed(0)
    n, d, m, k = BATCH, D_IN, NUM_LATENTS, K
    flop_per_token = 2.0 * d * m  # the encoder product
    x = torch.randn(n, d)
    sae = TopKSAE(SaeConfig(d_in=d, num_latents=m, k=k))
    sae.init_b_dec(x[:1024], method="mean")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    dead = timing.dead_latent_mask(m, seed=0)
    num_dead = int(dead.sum())
    k_aux = min(d // 2, num_dead)  # as TopKSAE.forward with k_aux left at its default
    mm = timing.matmul_baseline(x, sae.encoder.weight)
    logger.info("warm-up: fast step (AuxK over %d of %d latents dead, k_aux %d)", num_dead, m, k_aux)
    _fast_step(sae, opt, x, dead)
    last_auxk: list[Tensor] = []
    fast = timing.pairs(mm, lambda: last_auxk.append(_fast_step(sae, opt, x, dead)), FAST_PAIRS, "fast")

    naive = timing.NaiveTopKSAE(sae)
    naive_opt = torch.optim.Adam(naive.parameters(), lr=1e-4, fused=True)
    logger.info("naive steps (dense autograd): %d warm-up, %d timed", NAIVE_WARMUP_STEPS, NAIVE_PAIRS)
    for _ in range(NAIVE_WARMUP_STEPS):
        timing.naive_step(naive, naive_opt, x)
    slow = timing.pairs(mm, lambda: timing.naive_step(naive, naive_opt, x), NAIVE_PAIRS, "naive")

    fast_s = timing.summarise(fast, n, flop_per_token)
    naive_s = timing.summarise(slow, n, flop_per_token)
    all_mm = [2.0 * n * d * m / p["mm_wall_s"] for p in fast + slow]
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
        "naive": naive_s,
        "fast_over_naive_speedup": fast_s["tokens_per_s"] / naive_s["tokens_per_s"],
        "goal_fraction": 0.6,
        "pairs": {"fast": fast, "naive": slow},
    }
    logger.info(
        "\n"
        f"sae_step  d={d} m={m} k={k} batch={n} threads={result['torch_threads']} thp={result['thp_alloc']}\n"
        f"  AuxK in the timed step ({timing.DEAD_FRACTION:.0%} of latents dead, k_aux={k_aux})\n"
        f"  dense matmul           {matmul_flops / 1e9:8.1f} GFLOP/s  "
        f"-> encoder limit {result['dense_encoder_limit_tokens_per_s']:8.0f} tok/s\n"
        f"  fast step              {fast_s['tokens_per_s']:8.0f} tok/s  "
        f"{fast_s['fraction_of_dense_encoder_limit']:.0%} of limit "
        f"(CPU time: {fast_s['fraction_of_dense_encoder_limit_cpu_time']:.0%})\n"
        f"  naive dense step       {naive_s['tokens_per_s']:8.0f} tok/s  "
        f"{naive_s['fraction_of_dense_encoder_limit']:.0%} of limit "
        f"(CPU time: {naive_s['fraction_of_dense_encoder_limit_cpu_time']:.0%})\n"
        f"  fast / naive           {result['fast_over_naive_speedup']:8.1f}x"
    )
    return result
