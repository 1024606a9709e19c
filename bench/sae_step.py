"""One TopK SAE training step on this CPU against the machine's dense matmul throughput, side by side.

Writes ``<out_dir>/sae_step.json`` and prints the figures. Reads nothing.

At d = 1024, num_latents = 32 768, k = 64 and a batch of 4096 tokens it measures, in one run:

(a) the dense fp32 matmul throughput at the encoder's shape (``torch.mm`` ``[n, d] @ [d, m]`` into a
    preallocated result, FLOP/s),
    which gives the *dense-encoder limit*: tokens/s = FLOP/s / (2·d·m) — a step can be no faster than its
    encoder product;
(b) a full training step of :class:`mmsae.sae.TopKSAE` (forward with FVU, backward through the sparse
    kernels, decoder-gradient projection, fused Adam step, decoder renormalisation): tokens/s and the
    fraction of the dense-encoder limit;
(c) the same step done naively (dense ``[n, m]`` top-k scatter, dense decode, plain autograd).

The machine is shared, so every step is timed right after a matmul of the same shape and each ratio is
taken within such a pair; the reported fraction is the median over pairs (wall-clock, and also in process
CPU time, which is less disturbed by other processes). Large CPU allocations are backed by transparent huge
pages (``THP_MEM_ALLOC_ENABLE=1``, set here if torch is not imported yet): without it every fresh 128 MiB
gradient costs ~0.1 s of page faults.
"""

from __future__ import annotations

import os
import sys

_THP_PRESET = os.environ.get("THP_MEM_ALLOC_ENABLE")
_TORCH_WAS_IMPORTED = "torch" in sys.modules
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from mmsae.sae import SaeConfig, TopKSAE  # noqa: E402
from mmsae.sae.kernels import dense_decode_reference, dense_topk_encode_reference  # noqa: E402

logger = logging.getLogger(__name__)

D_IN = 1024
NUM_LATENTS = 32768
K = 64
BATCH = 4096
FAST_PAIRS = 3
NAIVE_PAIRS = 1


class NaiveTopKSAE(nn.Module):
    """The same SAE with dense autograd: top-k scattered into ``[n, m]``, dense decode, dense gradients."""

    def __init__(self, sae: TopKSAE) -> None:
        super().__init__()
        self.k = sae.cfg.k
        self.encoder = nn.Linear(sae.d_in, sae.num_latents)
        self.W_dec = nn.Parameter(sae.W_dec.detach().clone())
        self.b_dec = nn.Parameter(sae.b_dec.detach().clone())
        with torch.no_grad():
            self.encoder.weight.copy_(sae.encoder.weight)
            self.encoder.bias.copy_(sae.encoder.bias)

    def forward(self, x: Tensor) -> Tensor:
        acts, idx = dense_topk_encode_reference(x, self.b_dec, self.encoder.weight, self.encoder.bias, self.k)
        out = dense_decode_reference(acts, idx, self.W_dec, self.b_dec)
        return (out - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def _fast_step(sae: TopKSAE, opt: torch.optim.Optimizer, x: Tensor) -> None:
    out = sae(x)
    loss, _, _ = sae.training_step_losses(out)
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sae.set_decoder_norm_to_unit_norm()


@torch.no_grad()
def _renorm(W: Tensor) -> None:
    W.div_(torch.linalg.vector_norm(W, dim=1, keepdim=True) + torch.finfo(W.dtype).eps)


def _naive_step(model: NaiveTopKSAE, opt: torch.optim.Optimizer, x: Tensor) -> None:
    loss = model(x)
    loss.backward()
    with torch.no_grad():
        W, g = model.W_dec, model.W_dec.grad
        assert g is not None
        g -= (g * W).sum(1, keepdim=True) * W
    opt.step()
    opt.zero_grad(set_to_none=True)
    _renorm(model.W_dec)


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def _pairs(mm: Callable[[], Any], step: Callable[[], Any], count: int) -> list[dict[str, float]]:
    out = []
    for i in range(count):
        mm_wall, mm_cpu = _timed(mm)
        st_wall, st_cpu = _timed(step)
        out.append({"mm_wall_s": mm_wall, "mm_cpu_s": mm_cpu, "step_wall_s": st_wall, "step_cpu_s": st_cpu})
        logger.info("pair %d: matmul %.2f s, step %.2f s (wall)", i, mm_wall, st_wall)
    return out


def _summarise(pairs: list[dict[str, float]], n: int, flop_per_token: float) -> dict[str, float]:
    mm_flops = [n * flop_per_token / p["mm_wall_s"] for p in pairs]
    return {
        "tokens_per_s": statistics.median(n / p["step_wall_s"] for p in pairs),
        "matmul_flop_per_s": statistics.median(mm_flops),
        "fraction_of_dense_encoder_limit": statistics.median(
            p["mm_wall_s"] / p["step_wall_s"] for p in pairs
        ),
        "fraction_of_dense_encoder_limit_cpu_time": statistics.median(
            p["mm_cpu_s"] / p["step_cpu_s"] for p in pairs
        ),
    }


def main(out_dir: str | Path = "bench-output") -> dict[str, Any]:
    """Run the benchmark (about 1–2 minutes on 2 busy cores), write ``sae_step.json``, return the figures."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    n, d, m, k = BATCH, D_IN, NUM_LATENTS, K
    flop_per_token = 2.0 * d * m  # the encoder product
    x = torch.randn(n, d)
    sae = TopKSAE(SaeConfig(d_in=d, num_latents=m, k=k))
    sae.init_b_dec(x[:1024], method="mean")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    w_t = sae.encoder.weight.detach().t()
    mm_out = torch.empty(n, m)  # preallocated: the baseline pays no page faults for its 512 MiB result

    def mm() -> Tensor:
        return torch.mm(x, w_t, out=mm_out)

    logger.info("warm-up: fast step")
    _fast_step(sae, opt, x)
    fast = _pairs(mm, lambda: _fast_step(sae, opt, x), FAST_PAIRS)

    naive = NaiveTopKSAE(sae)
    naive_opt = torch.optim.Adam(naive.parameters(), lr=1e-4, fused=True)
    logger.info("naive steps (dense autograd)")
    slow = _pairs(mm, lambda: _naive_step(naive, naive_opt, x), NAIVE_PAIRS)

    fast_s = _summarise(fast, n, flop_per_token)
    naive_s = _summarise(slow, n, flop_per_token)
    all_mm = [2.0 * n * d * m / p["mm_wall_s"] for p in fast + slow]
    matmul_flops = statistics.median(all_mm)
    result: dict[str, Any] = {
        "shape": {"d_in": d, "num_latents": m, "k": k, "batch_tokens": n},
        "torch_threads": torch.get_num_threads(),
        "thp_alloc": (_THP_PRESET or ("1" if not _TORCH_WAS_IMPORTED else "0")) == "1",
        "matmul_flop_per_s": matmul_flops,
        "dense_encoder_limit_tokens_per_s": matmul_flops / flop_per_token,
        "fast": fast_s,
        "naive": naive_s,
        "fast_over_naive_speedup": fast_s["tokens_per_s"] / naive_s["tokens_per_s"],
        "goal_fraction": 0.6,
        "pairs": {"fast": fast, "naive": slow},
    }
    (out_dir / "sae_step.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(
        f"sae_step  d={d} m={m} k={k} batch={n} threads={result['torch_threads']} thp={result['thp_alloc']}\n"
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


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(sys.argv[1] if len(sys.argv) > 1 else "bench-output")
