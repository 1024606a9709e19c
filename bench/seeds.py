"""Seed benchmark: the toy-world figures over several seeds, each with its mean and range.

Reads the demo profile (``src/mmsae/profiles/demo.yaml``); writes each seed's run (toy world, toy LMM,
shards, SAE, top examples) under a temporary folder, removed afterwards unless ``MMSAE_BENCH_SEEDS_KEEP``
names a folder to keep them in. Returns the figures (``python -m bench seeds`` writes them to ``seeds.json``).

For every seed, ``run.seed`` is set (so every section's seed follows it: the toy world's scenes, the toy
LMM's training, the SAE's initialisation and data order, the held-out split, mining's samples) and the
stages' ``run()`` functions run in turn with tracking off: toyworld -> cache -> train -> mine, on one layer
(`LAYER`, the toy LMM's last: the demo runs both of its layers, each with its own SAE). The toy LMM
is trained once per config and kept under ``$MMSAE_CACHE_DIR`` (default ``~/.cache/mmsae``), so a second
run of this benchmark reuses it.

Returned: ``per_seed`` (every numeric figure of every stage, as ``<stage>.<figure>``), ``figures`` (per
figure: mean, min, max and the values in seed order), ``headline`` (the same for the README's figures) and
``table`` (those as a markdown table).

Options, from the environment (``python -m bench`` passes no arguments) or from :func:`main`'s arguments:

* ``MMSAE_BENCH_SEEDS``: a count (``3``: seeds 0, 1, 2; the default) or a comma-separated list of seeds;
* ``MMSAE_BENCH_SEEDS_PROFILE``: ``demo`` (default) or ``quick`` (a small toy world, a short toy-LMM
  training and one epoch: a test of the harness, whose figures mean little);
* ``MMSAE_BENCH_SEEDS_KEEP``: a folder in which to keep each seed's artifacts (``<folder>/seed-<n>``).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_SEEDS = 3
PROFILES = ("demo", "quick")
LAYER = 1
"""The layer whose SAE every seed trains (the toy LMM's last)."""
QUICK_OVERRIDES = [
    "toyworld.n_train=600", "toyworld.n_heldout=100", "toylmm.steps=150",
    "train.epochs=1", "train.dead_tokens=10000", "train.eval_lm_images=16", "train.lr_warmup_steps=5",
]
"""The ``quick`` profile: the demo profile shrunk until a seed takes a minute or two."""
HEADLINE = (
    "toyworld.toy_lmm_pair_accuracy", "toyworld.toy_lmm_color_accuracy", "toyworld.toy_lmm_texture_accuracy",
    "train.heldout_fvu_image", "train.loss_recovered", "train.dead_pct", "train.heldout_never_fired_pct",
    "mine.dead_pct", "mine.gt_f1", "mine.gt_f1_always_fires", "mine.gt_f1_color", "mine.gt_f1_texture",
    "mine.gt_f1_features_distinct", "mine.gt_f1_iou", "mine.gt_f1_iou_color", "mine.gt_f1_iou_texture",
    "mine.gt_f1_on_patches_color", "mine.gt_f1_on_patches_texture", "mine.gt_topk_precision",
    "mine.gt_topk_precision_random", "mine.gt_iou", "mine.gt_iou_color", "mine.gt_iou_texture",
)
"""The figures the README quotes (those a run does not give are left out)."""


def main(seeds: Sequence[int] | None = None, profile: str | None = None, keep: str | None = None) -> dict[str, Any]:
    seeds = list(seeds) if seeds is not None else parse_seeds(os.environ.get("MMSAE_BENCH_SEEDS", ""))
    profile = profile or os.environ.get("MMSAE_BENCH_SEEDS_PROFILE", "demo")
    keep = keep or os.environ.get("MMSAE_BENCH_SEEDS_KEEP") or None
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {PROFILES}")
    per_seed: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-seeds-") as tmp:
        root = Path(keep) if keep else Path(tmp)
        for seed in seeds:
            started = time.perf_counter()
            per_seed[str(seed)] = run_seed(seed, profile, root / f"seed-{seed}")
            seconds[str(seed)] = time.perf_counter() - started
            log.info("seed %d done in %.0f s", seed, seconds[str(seed)])
    figures = aggregate([per_seed[str(s)] for s in seeds])
    headline = {name: figures[name] for name in HEADLINE if name in figures}
    table = markdown_table(headline, seeds)
    log.info("figures over seeds %s:\n%s", seeds, table)
    return {"seeds": seeds, "profile": profile, "per_seed": per_seed, "figures": figures, "headline": headline,
            "table": table, "seconds": seconds,
            "command": command_line(seeds, profile)}


def parse_seeds(text: str) -> list[int]:
    """``""`` -> the default count; ``"5"`` -> seeds 0..4; ``"0,3,7"`` -> those seeds."""
    text = text.strip()
    if not text:
        return list(range(DEFAULT_SEEDS))
    if "," in text:
        return [int(s) for s in text.split(",") if s.strip()]
    count = int(text)
    if count < 1:
        raise ValueError(f"MMSAE_BENCH_SEEDS={text!r}: give at least one seed")
    return list(range(count))


def command_line(seeds: Sequence[int], profile: str) -> str:
    env = []
    if list(seeds) != list(range(DEFAULT_SEEDS)):
        env.append(f"MMSAE_BENCH_SEEDS={','.join(str(s) for s in seeds)}")
    if profile != "demo":
        env.append(f"MMSAE_BENCH_SEEDS_PROFILE={profile}")
    return " ".join([*env, "python -m bench seeds"])


def seed_config(seed: int, profile: str, workdir: Path):
    """The demo profile's run config for one seed, tracking off, writing under ``workdir``."""
    from mmsae.config import load_config
    from mmsae.demo import DEMO_PROFILE

    overrides = [f"run.seed={seed}", f"run.workdir={workdir}", f"run.name=seeds-{seed}", "tracking.enabled=false",
                 f"cache.layers=[{LAYER}]"]
    if profile == "quick":
        overrides += QUICK_OVERRIDES
    return load_config(DEMO_PROFILE, overrides)


def run_seed(seed: int, profile: str, workdir: Path) -> dict[str, float]:
    """Run toyworld -> cache -> train -> mine for one seed; every numeric figure as ``<stage>.<figure>``."""
    from mmsae.stages import cache, mine, toyworld, train

    cfg = seed_config(seed, profile, workdir)
    log.info("seed %d: toy world, toy LMM, cache, train, mine under %s", seed, workdir)
    world = toyworld.run(cfg)
    shards = cache.run(cfg, image_set=world.uri, model=world.uris["lmm"])
    sae = train.run(cfg, shards=shards.uri)
    mined = mine.run(cfg, shards=shards.uri, sae=sae.uri)
    out: dict[str, float] = {}
    for stage, outputs in (("toyworld", world), ("cache", shards), ("train", sae), ("mine", mined)):
        out.update({f"{stage}.{name}": float(value) for name, value in outputs.figures.items()
                    if _is_number(value)})
    log.info("seed %d: %s", seed, {k: round(v, 4) for k, v in out.items() if k in HEADLINE})
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def aggregate(runs: Sequence[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Per figure every run gives: mean, min, max and the values in run order."""
    names = sorted(set.intersection(*(set(r) for r in runs))) if runs else []
    return {name: {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "values": values}
            for name in names if (values := [r[name] for r in runs])}


def markdown_table(figures: dict[str, dict[str, Any]], seeds: Sequence[int]) -> str:
    """The figures as a markdown table: one row per figure, a column per seed, then mean and range."""
    header = ["figure", *(f"seed {s}" for s in seeds), "mean", "range"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, f in figures.items():
        cells = [f"`{name}`", *(_fmt(v) for v in f["values"]), _fmt(f["mean"]),
                 f"{_fmt(f['min'])} - {_fmt(f['max'])}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float) -> str:
    if float(value).is_integer() and abs(value) >= 1:
        return str(int(value))
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"
