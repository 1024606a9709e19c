"""Training of the toy LMM: it learns to caption the toy world's training images from scratch on the CPU.

The captions are encoded once (`encode_examples`) and trained with teacher forcing: the prompt is
``<s><image> describe :`` and only the caption tokens and ``</s>`` are scored. Training is step-based (AdamW,
linear warm-up, cosine decay, gradient clipping at 1.0), so its result depends on the seed and the configs,
never on how fast the machine is. `train_toy_lmm` then scores greedy captions of the held-out images and saves
the model with `save_toy_lmm`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mmsae.config import ToyLMMConfig, ToyWorldConfig
from mmsae.models.toy_captions import Example, evaluate, world_examples
from mmsae.models.toy_model import PROMPT, ToyLMMError, build_toy_lmm, check_config, save_toy_lmm
from mmsae.training.engine import lr_multiplier

log = logging.getLogger(__name__)

LOSS_WINDOW = 25
"""Steps per point of the recorded loss curve (mean loss over the window)."""
THREADS_ENV = "MMSAE_TOY_THREADS"
"""Environment variable with the number of torch threads for training and evaluating the toy LMM (default 1:
a 1 M-parameter model gains little from more, one thread never stalls when other processes hold the CPU, and
one thread gives the same floating-point results on every machine)."""

__all__ = [
    "LOSS_WINDOW",
    "THREADS_ENV",
    "Encoded",
    "collate",
    "encode_examples",
    "lr_factor",
    "train_toy_lmm",
]


@dataclass
class Encoded:
    """Training examples run through the processor once: pixels kept as uint8, normalised per batch."""

    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]
    pixels: list[torch.Tensor]
    """Per example (crops, 3, base, base) uint8, resized and padded but not yet rescaled or normalised."""
    image_sizes: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    rescale: float


def encode_examples(processor, examples: Sequence[Example], chunk: int = 256) -> Encoded:
    """Run images and ``PROMPT + caption + </s>`` through the processor; label only the caption and ``</s>``.

    The image processor is asked not to rescale or normalise, so pixels stay uint8 (a quarter of the memory);
    `collate` applies the processor's own rescale factor, mean and std, which gives the processor's output.
    """
    ip = processor.image_processor
    tok = processor.tokenizer
    colon = tok.convert_tokens_to_ids(":")
    ids_all: list[torch.Tensor] = []
    labels_all: list[torch.Tensor] = []
    pixels_all: list[torch.Tensor] = []
    sizes: list[list[int]] = []
    for start in tqdm(range(0, len(examples), chunk), desc="encode", unit="chunk", leave=False):
        part = examples[start : start + chunk]
        texts = [f"{PROMPT} {ex.caption} {tok.eos_token}" for ex in part]
        enc = processor(
            images=[ex.image for ex in part],
            text=texts,
            padding=False,
            do_rescale=False,
            do_normalize=False,
            do_pad=False,
        )
        for ids, pix, size in zip(enc["input_ids"], enc["pixel_values"], enc["image_sizes"], strict=True):
            ids_t = torch.tensor(ids, dtype=torch.long)
            lab = ids_t.clone()
            cut = int((ids_t == colon).nonzero()[0, 0]) + 1
            lab[:cut] = -100
            ids_all.append(ids_t)
            labels_all.append(lab)
            arr = np.asarray(pix)
            pixels_all.append(torch.from_numpy(np.clip(np.round(arr), 0, 255).astype(np.uint8)))
            sizes.append([int(size[0]), int(size[1])])
    return Encoded(
        input_ids=ids_all,
        labels=labels_all,
        pixels=pixels_all,
        image_sizes=torch.tensor(sizes, dtype=torch.long),
        mean=torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1),
        std=torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1),
        rescale=float(ip.rescale_factor),
    )


def collate(data: Encoded, idx: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded training batch (input_ids, attention_mask, labels, pixel_values, image_sizes)."""
    n = len(idx)
    seq = max(len(data.input_ids[i]) for i in idx)
    crops = max(data.pixels[i].shape[0] for i in idx)
    first = data.pixels[idx[0]]
    input_ids = torch.full((n, seq), pad_id, dtype=torch.long)
    labels = torch.full((n, seq), -100, dtype=torch.long)
    attention = torch.zeros((n, seq), dtype=torch.long)
    pixel_values = torch.zeros((n, crops, *first.shape[1:]), dtype=torch.float32)
    for row, i in enumerate(idx):
        k = len(data.input_ids[i])
        input_ids[row, :k] = data.input_ids[i]
        labels[row, :k] = data.labels[i]
        attention[row, :k] = 1
        pix = data.pixels[i]
        pixel_values[row, : pix.shape[0]] = (pix.float() * data.rescale - data.mean) / data.std
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "pixel_values": pixel_values,
        "image_sizes": data.image_sizes[list(idx)],
    }


def _batches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """``steps`` batches of indices: epochs of seeded permutations, a batch never spanning two epochs."""
    gen = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, n)
    made = 0
    while made < steps:
        perm = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start : start + batch_size]
            made += 1
            if made == steps:
                return


def lr_factor(step: int, cfg: ToyLMMConfig) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based): linear warm-up over ``warmup_frac`` of
    the steps, then cosine decay to ``min_lr_frac`` (the train stage's schedule)."""
    warmup = int(round(cfg.warmup_frac * cfg.steps))
    return lr_multiplier(step, cfg.steps, warmup, "cosine", cfg.min_lr_frac)


@contextlib.contextmanager
def _torch_threads() -> Iterator[int]:
    """Run the block on `THREADS_ENV` torch threads (default 1), then restore the previous number."""
    raw = os.environ.get(THREADS_ENV, "1")
    try:
        n = int(raw)
    except ValueError:
        raise ToyLMMError(f"${THREADS_ENV}={raw!r}: expected a positive number of threads") from None
    if n < 1:
        raise ToyLMMError(f"${THREADS_ENV}={raw!r}: expected a positive number of threads")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def train_toy_lmm(
    lmm_cfg: ToyLMMConfig,
    world_cfg: ToyWorldConfig,
    world_dir: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
) -> dict[str, Any]:
    """Train the toy LMM on the toy world's training captions, save it to ``out_dir`` and return its metrics.

    ``world_dir`` is an image set written by ``toyworld.build`` (splits ``train`` and ``heldout``); None generates
    the world from ``world_cfg`` in memory. Metrics (also written to ``out_dir/metrics.json``): held-out caption
    accuracies from `score_captions`, ``loss_curve`` (mean loss per `LOSS_WINDOW` steps), ``final_loss``,
    ``steps``, ``train_seconds``, ``eval_seconds``, ``params``. Runs on `THREADS_ENV` torch threads (default 1).
    """
    check_config(lmm_cfg)
    with _torch_threads():
        return _train(lmm_cfg, world_cfg, world_dir, out_dir)


def _train(
    lmm_cfg: ToyLMMConfig,
    world_cfg: ToyWorldConfig,
    world_dir: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
) -> dict[str, Any]:
    t_start = time.perf_counter()
    train = world_examples(world_cfg, world_dir, "train")
    heldout = world_examples(world_cfg, world_dir, "heldout")
    model, processor = build_toy_lmm(lmm_cfg)
    data = encode_examples(processor, train)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "toy LMM: %d parameters, %d training images, %d held-out, %d steps of %d",
        n_params,
        len(train),
        len(heldout),
        lmm_cfg.steps,
        lmm_cfg.batch_size,
    )

    t_train = time.perf_counter()
    c_train = time.process_time()
    losses = _fit(model, data, processor.tokenizer.pad_token_id, lmm_cfg)
    train_seconds = time.perf_counter() - t_train
    train_cpu_seconds = time.process_time() - c_train

    t_eval = time.perf_counter()
    metrics: dict[str, Any] = evaluate(model, processor, heldout, lmm_cfg.eval_batch_size)
    eval_seconds = time.perf_counter() - t_eval
    metrics.update(_loss_figures(losses))
    metrics.update(
        {
            "train_seconds": round(train_seconds, 2),
            "eval_seconds": round(eval_seconds, 2),
            "total_seconds": round(time.perf_counter() - t_start, 2),
            "seconds_per_step": round(train_seconds / max(1, len(losses)), 4),
            "train_cpu_seconds": round(train_cpu_seconds, 2),
            "params": n_params,
            "torch_threads": torch.get_num_threads(),
        }
    )
    log.info(
        "toy LMM held-out: pair %.3f colour %.3f texture %.3f exact %.3f (%d steps, %.0f s)",
        metrics["pair_accuracy"],
        metrics["color_accuracy"],
        metrics["texture_accuracy"],
        metrics["exact_caption"],
        len(losses),
        train_seconds,
    )

    info = {
        "toylmm": lmm_cfg.model_dump(mode="json"),
        "toyworld": world_cfg.model_dump(mode="json"),
        "world_dir": None if world_dir is None else str(world_dir),
    }
    save_toy_lmm(model, processor, Path(out_dir), info=info, metrics=metrics)
    return metrics


def _optimizer_and_schedule(
    model, cfg: ToyLMMConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no weight decay on biases, norms and embeddings) and its warm-up + cosine schedule."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "norm" in name or "embed" in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    return optimizer, schedule


def _fit(model, data: Encoded, pad_id: int, cfg: ToyLMMConfig) -> list[float]:
    """Train ``model`` in place for ``cfg.steps`` steps on seeded batches of ``data``; the loss of every step."""
    optimizer, schedule = _optimizer_and_schedule(model, cfg)
    torch.manual_seed(cfg.seed)
    model.train()
    losses: list[float] = []
    bar = tqdm(total=cfg.steps, desc="toy LMM", unit="step", mininterval=2.0)
    for step, idx in enumerate(_batches(len(data.input_ids), cfg.batch_size, cfg.steps, cfg.seed)):
        batch = collate(data, idx, pad_id)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(f"toy LMM training diverged at step {step}: loss {value}")
        losses.append(value)
        if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
            log.info("step %d/%d loss %.4f lr %.2e", step + 1, cfg.steps, value, schedule.get_last_lr()[0])
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}", refresh=False)
    bar.close()
    return losses


def _loss_figures(losses: list[float]) -> dict[str, Any]:
    """``loss_curve`` (mean loss per full window of `LOSS_WINDOW` steps), ``first_loss``, ``final_loss``
    (mean over the first and last window) and ``steps``."""
    window = min(LOSS_WINDOW, len(losses))
    return {
        "loss_curve": [
            float(np.mean(losses[end - LOSS_WINDOW : end]))
            for end in range(LOSS_WINDOW, len(losses) + 1, LOSS_WINDOW)
        ],
        "first_loss": float(np.mean(losses[:window])),
        "final_loss": float(np.mean(losses[-window:])),
        "steps": len(losses),
    }
