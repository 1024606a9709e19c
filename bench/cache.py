"""Caching benchmark: the cache stage's wall time over the forward pass cut at the hooked layer, side by side.

Reads nothing; writes a generated image set, model folders (config and processor: the models are built in
memory and handed to the stage in place of loading them) and the stage's shards into a temporary folder
(removed afterwards); returns the figures (``python -m bench`` writes them to ``cache.json``).

The cost that matters is the stage's work per cached byte against the model's compute per cached byte. A
7-8B LLaVA-NeXT hooked at its middle layer (llama3-llava-next-8b, layer 16 of 32) spends about 8.5 GFLOP per
cached token (the Llama layers up to the hook, the CLIP tower and the projector) on 16 kB (float32 shards):
~0.5 MFLOP per cached byte (:func:`flop_per_cached_byte`, in ``cache.json`` beside the benchmark models'). Two
models are timed:

* ``representative`` (the goal, at most 1.10x the truncated forward): a LLaVA-NeXT with the 8B's compute per
  cached byte within a few per cent. Width costs compute per token as the square and bytes per token
  linearly, so on two CPU cores it is narrow and deep: a Llama of hidden 256 (4 query heads over 1 key/value
  head, MLP 3.5x, as the 8B's ratios) hooked at layer :data:`DEEP_LAYER`, a 2-layer CLIP tower on 32 px
  views (16 tokens a view, 5 views an image). Only the layers up to the hook and one after exist: the
  stage's forward stops at the hook.
* ``small``: a 2.7 M-parameter LLaVA-NeXT (64 px views, Llama of hidden 256 hooked at layer 2 of 4) with
  ~200x less compute per byte: the per-token bookkeeping (geometry, copies, encoding, hashing, writing)
  shows, as it would on a GPU, which spends ~1 ns a byte where this CPU spends microseconds. No goal.

Per model, timed side by side in one run, interleaved over ``reps`` repetitions (the order rotates),
summarised by medians:

* ``forward_truncated``: the forward cut right after the hooked layer (``capture(..., stop_early=True)``)
  under ``torch.inference_mode`` over the batches the stage makes (same images in the same order, batch
  size, prompt and padding), decoded and preprocessed beforehand: the model compute the stage needs.
* ``stage``: ``mmsae.stages.cache.run`` end to end with tracking off, writing to a local folder, with the
  config's default ``num_workers``: opening the image set, decoding, preprocessing, the forward, token
  geometry, shard encoding, hashing and writing, progress records and sealing.
* ``stage_workers_0``: the same with decoding and preprocessing in the main process (``num_workers=0``).

``breakdown``: per stage variant, the median seconds of each part the stage measures itself
(:class:`mmsae.caching.StageTimes`: setup, waiting for images, forward, geometry, copies, waiting for the
writer, sealing on the main thread; concatenation, encoding, hashing, writing, the NaN/inf check and records
on the writer thread, which runs beside the main thread); ``stage_extra_seconds``, the stage's median less
the truncated forward's; ``writer_bytes_per_s``, the shard bytes over the writer threads' busy seconds, the commits' included (one
thread's rate).

``writer``: the rate a forward may produce bytes at before the writers hold it back (at 40-60 % of an H100's
bf16 peak the 8B produces roughly 0.4-0.6 GB/s of bfloat16 rows, twice that in float32). The stage's own
writer (:class:`mmsae.caching.SetWriter` over the stage's set writing and committing) writes
:data:`WRITER_SETS` shard sets of the 8B's width (4096) in bfloat16, :data:`WRITER_ROWS` rows each, to a local
folder and to S3 (SeaweedFS on loopback, sharing the two cores), with one writer thread and with the default
``cache.writers``, interleaved over :data:`WRITER_REPS` rounds after a warm-up: bytes per second of each
(medians) and their ratio.

The forward runs on one intra-op thread (:data:`TORCH_THREADS`, restored afterwards): the second core is left
to the decoding worker, as a host CPU is to an accelerator. With two threads on a 2-core machine that other
processes also use, a forward pass stalls whenever either thread is descheduled and timings swing by several
times, which would drown the ratio.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

GOAL = 1.10
"""The stage may take at most this many times the truncated forward's time (representative model)."""
TORCH_THREADS = 1
PROMPT = "<image>"
SEED = 0
DEEP_LAYER = 300
"""The representative model's hooked layer (the Llama has one more)."""
EIGHT_B_SEQUENCE = 2928
"""Tokens of a 672 x 672 image in llava-next-8b: 576 base-view tokens, 2 x 2 tiles of 576, 48 newlines."""
INDEX_BYTES = 8 + 4 + 2 + 2 + 2
"""Bytes of a cached row's index columns (image_idx int64, token_pos int32, view, row, col int16)."""
WRITER_WIDTH = 4096
WRITER_ROWS = 8192
"""Rows per set of the writer measurement (64 MiB of bfloat16 activations at the 8B's width)."""
WRITER_SETS = 6
WRITER_REPS = 3


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark model and its workload."""

    name: str
    text: dict[str, Any]
    vision: dict[str, Any]
    pinpoints: list[list[int]]
    layer: int
    images: int
    batch_size: int
    reps: int
    shard_rows: int


_VISION_SMALL = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=2,
                     projection_dim=64)
REPRESENTATIVE = Case(
    name="representative",
    text=dict(hidden_size=256, num_hidden_layers=DEEP_LAYER + 2, intermediate_size=896, num_attention_heads=4,
              num_key_value_heads=1, vocab_size=512, rope_theta=500000.0, max_position_embeddings=4096),
    vision=dict(_VISION_SMALL, patch_size=8, image_size=32),
    pinpoints=[[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]],
    layer=DEEP_LAYER, images=24, batch_size=8, reps=3, shard_rows=65536,
)
SMALL = Case(
    name="small",
    text=dict(hidden_size=256, num_hidden_layers=4, intermediate_size=512, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512, rope_theta=500000.0, max_position_embeddings=4096),
    vision=dict(_VISION_SMALL, patch_size=8, image_size=64),
    pinpoints=[[64, 128], [128, 64], [128, 128], [192, 64], [64, 192]],
    layer=2, images=96, batch_size=8, reps=5, shard_rows=4096,
)


# ------------------------------------------------------------------------------------------- compute


def flop_per_image_token(text: dict[str, Any], vision: dict[str, Any], layer: int, sequence: float) -> float:
    """Forward FLOP per image token of a LLaVA-NeXT cut after decoder layer ``layer``.

    Counts the matrix products (2 FLOP a multiply-add): per Llama layer up to the hook the q/k/v/o
    projections (grouped key/value heads), the gated MLP and causal attention over ``sequence`` tokens; the
    CLIP tower (every layer, non-causal attention, its class token included) per patch token; the projector.
    Norms, rotary embeddings and the patch embedding are left out (a few per cent).
    """
    d, inner = text["hidden_size"], text["intermediate_size"]
    kv = d * text["num_key_value_heads"] // text["num_attention_heads"]
    per_layer = 2 * (2 * d * d + 2 * d * kv) + 2 * 3 * d * inner + 2 * d * sequence
    dv, vinner = vision["hidden_size"], vision["intermediate_size"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    vision_tokens = patches + 1
    per_vision_layer = 2 * (4 * dv * dv + 2 * dv * vinner) + 4 * dv * vision_tokens
    tower = vision["num_hidden_layers"] * per_vision_layer * vision_tokens / patches
    projector = 2 * (dv * d + d * d)
    return (layer + 1) * per_layer + tower + projector


def flop_per_cached_byte(text: dict[str, Any], vision: dict[str, Any], layer: int, sequence: float,
                         dtype_bytes: int) -> float:
    """:func:`flop_per_image_token` over the bytes of a cached row (activations plus index columns)."""
    return flop_per_image_token(text, vision, layer, sequence) / (text["hidden_size"] * dtype_bytes + INDEX_BYTES)


def eight_b_compute(dtype_bytes: int) -> dict[str, Any]:
    """llama3-llava-next-8b hooked at its middle layer (the GPU profile's geometry): FLOP per token and byte."""
    from bench import gpu

    full = gpu.FULL
    return {
        "model": "llama3-llava-next-8b geometry (Llama-3-8B, CLIP ViT-L/14-336)", "layer": full.layer,
        "sequence_tokens": EIGHT_B_SEQUENCE,
        "flop_per_image_token": flop_per_image_token(full.text, full.vision, full.layer, EIGHT_B_SEQUENCE),
        "flop_per_cached_byte": flop_per_cached_byte(full.text, full.vision, full.layer, EIGHT_B_SEQUENCE,
                                                     dtype_bytes),
    }


# --------------------------------------------------------------------------------------------- inputs


def _jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A colour gradient with texture and noise: photo-like as far as JPEG decoding and resizing care."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, ((x + y) % 64) * 4], axis=-1)
    noisy = np.clip(base + rng.integers(-20, 21, size=base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_image_set(path: Path, n: int, seed: int = SEED) -> str:
    """``n`` JPEG images of 64-384 px per side, saved with ``datasets.save_to_disk``."""
    import datasets

    rng = np.random.default_rng(seed)
    cells = [
        {"bytes": _jpeg(rng, int(rng.integers(64, 385)), int(rng.integers(64, 385))), "path": None}
        for _ in range(n)
    ]
    ds = datasets.Dataset.from_dict({"image": cells}, features=datasets.Features({"image": datasets.Image()}))
    ds.save_to_disk(str(path))
    return str(path)


def prepare_batches(image_set: str, processor: Any, batch_size: int, prompt: str) -> list[dict[str, Any]]:
    """The stage's batches, decoded and preprocessed up front (image-set order, same padding)."""
    import datasets

    from mmsae.data.images import load_image_set

    ds = load_image_set(image_set).cast_column("image", datasets.Image(decode=False))
    images = [Image.open(io.BytesIO(cell["bytes"])).convert("RGB") for cell in ds["image"]]
    batches = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        batches.append(processor(images=chunk, text=[prompt] * len(chunk), padding=True, return_tensors="pt"))
    return batches


def forward_full(model: torch.nn.Module, batches: list[dict[str, Any]]) -> None:
    with torch.inference_mode():
        for inputs in batches:
            model(**inputs)


def forward_truncated(model: torch.nn.Module, batches: list[dict[str, Any]], hook: Any) -> None:
    from mmsae.models import capture

    with torch.inference_mode():
        for inputs in batches:
            with capture(model, [hook], stop_early=True) as acts:
                model(**inputs)
            if hook.name not in acts:
                raise RuntimeError(f"hook point {hook.name} did not run")


# ----------------------------------------------------------------------------------------------- runs


def run_stage(root: Path, tag: str, image_set: str, model: str, case: Case,
              **cache_kw: Any) -> tuple[float, dict[str, Any], dict[str, float]]:
    """Seconds the cache stage took (model loading excluded), its figures and its seconds per part; its
    output is removed after."""
    from mmsae.caching import StageTimes
    from mmsae.config import RunConfig
    from mmsae.stages import cache

    cfg = RunConfig()
    cfg.tracking.enabled = False
    cfg.run.workdir = str(root / f"work-{tag}")
    cfg.cache = cfg.cache.model_copy(update={
        "image_set": image_set, "model": model, "out": str(root / f"acts-{tag}"), "layers": [case.layer],
        "batch_size": case.batch_size, "shard_rows": case.shard_rows, "prompt": PROMPT, **cache_kw,
    })
    times = StageTimes()
    t0 = time.perf_counter()
    result = cache.run(cfg, times=times)
    wall = time.perf_counter() - t0
    shutil.rmtree(cfg.cache.out)
    shutil.rmtree(cfg.run.workdir, ignore_errors=True)
    return wall - times.seconds.get("load_model", 0.0), result.figures, dict(times.seconds)


def _seconds(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> dict[str, Any]:
    """Both models (about 4 minutes on 2 busy cores); the figures."""
    from mmsae.config import CacheConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
            cases = {case.name: measure(case, Path(tmp) / case.name) for case in (REPRESENTATIVE, SMALL)}
    finally:
        torch.set_num_threads(threads)
    rep = cases["representative"]
    writer = writer_throughput(CacheConfig().writers)
    dtype_bytes = torch.tensor([], dtype=getattr(torch, CacheConfig().dtype)).element_size()
    result = {
        "goal_stage_over_forward_truncated": GOAL,
        "stage_over_forward_truncated": rep["stage_over_forward_truncated"],
        "meets_goal": rep["stage_over_forward_truncated"] <= GOAL,
        "eight_b": eight_b_compute(dtype_bytes),
        "cases": cases,
        "writer": writer,
        "torch_threads": TORCH_THREADS,
        "stage_dtype": CacheConfig().dtype,
        "stage_num_workers": CacheConfig().num_workers,
    }
    for name, case in cases.items():
        log.info("%s model (%.3g FLOP per cached byte; the 8B's %.3g): stage / truncated forward %.3f, "
                 "without a worker %.3f; breakdown %s", name, case["flop_per_cached_byte"],
                 result["eight_b"]["flop_per_cached_byte"], case["stage_over_forward_truncated"],
                 case["stage_workers_0_over_forward_truncated"],
                 {k: round(v, 3) for k, v in case["breakdown"]["stage"].items()})
    for target in ("local", "s3"):
        rates = writer[target]["bytes_per_s"]
        log.info("shard writing to %s (%d sets of %d x %d bfloat16): %.0f MB/s with one writer, %.0f MB/s with %d "
                 "(%.2fx)", target, WRITER_SETS, WRITER_ROWS, WRITER_WIDTH, rates["1"] / 1e6,
                 rates[str(writer["writers"])] / 1e6, writer["writers"], writer[target]["speedup"])
    return result


def _shard_set(index: int, rows: int, width: int) -> Any:
    from mmsae.caching import SetBuffer

    gen = torch.Generator().manual_seed(SEED + index)
    buf = SetBuffer.empty(index * rows, ["layers.16"])
    buf.parts["layers.16"].append({
        "acts": torch.randn(rows, width, generator=gen).to(torch.bfloat16),
        "image_idx": torch.arange(rows) // 2340 + index * rows, "token_pos": torch.arange(rows, dtype=torch.int32),
        "view": torch.zeros(rows, dtype=torch.int16), "row": torch.zeros(rows, dtype=torch.int16),
        "col": torch.zeros(rows, dtype=torch.int16)})
    buf.rows = rows
    return buf


def _write_sets(out: str, sets: list[Any], writers: int) -> tuple[float, int]:
    """The stage's writer over ``sets`` into ``out`` (a folder or ``s3://`` URI): seconds and bytes."""
    import functools

    from mmsae.caching import SetWriter
    from mmsae.stages import cache as cache_stage

    writer = SetWriter(functools.partial(cache_stage._write_set_files, out, 0),
                       functools.partial(cache_stage._commit_set, out, 0), writers)
    t0 = time.perf_counter()
    try:
        for index, buf in enumerate(sets):
            writer.submit(index, buf, index + 1, {"next_shard": index + 1})
        written = writer.reap(in_flight=0)
    finally:
        writer.close()
    return time.perf_counter() - t0, written


def _writer_rates(base: str, sets: list[Any], writers: int) -> dict[str, Any]:
    """Bytes per second writing ``sets`` under ``base`` with one writer and with ``writers``, interleaved."""
    counts = sorted({1, writers})
    rates: dict[str, list[float]] = {str(c): [] for c in counts}
    _write_sets(f"{base}/warmup", sets[:2], writers)  # page cache, connections and thread start-up
    for rep in range(WRITER_REPS):
        for count in counts if rep % 2 == 0 else counts[::-1]:
            seconds, written = _write_sets(f"{base}/{count}-{rep}", sets, count)
            rates[str(count)].append(written / seconds)
    median = {name: statistics.median(r) for name, r in rates.items()}
    return {"bytes_per_s": median, "runs": rates, "speedup": median[str(writers)] / median["1"]}


@contextlib.contextmanager
def _s3_bucket(root: Path) -> Iterator[str]:
    """A SeaweedFS server on loopback with the AWS variables pointing at it (restored after): its bucket URI."""
    from mmsae.services.s3 import S3Server

    with S3Server(root, buckets=["bench"]) as server, mock.patch.dict(os.environ, server.env()):
        yield "s3://bench/shards"


def writer_throughput(writers: int, sets: int = WRITER_SETS, rows: int = WRITER_ROWS,
                      width: int = WRITER_WIDTH) -> dict[str, Any]:
    """The stage's shard writing with one writer and with ``writers``: to a local folder and to S3 on loopback."""
    shard_sets = [_shard_set(i, rows, width) for i in range(sets)]
    with tempfile.TemporaryDirectory(prefix="bench-writer-") as tmp:
        local = _writer_rates(str(Path(tmp) / "local"), shard_sets, writers)
        shutil.rmtree(Path(tmp) / "local")
        with _s3_bucket(Path(tmp) / "s3") as bucket:
            s3 = _writer_rates(bucket, shard_sets, writers)
    return {"writers": writers, "sets": sets, "rows": rows, "width": width, "dtype": "bfloat16",
            "local": local, "s3": s3}


def measure(case: Case, root: Path) -> dict[str, Any]:
    """The stage and the truncated forward on ``case``'s model, interleaved; ratios and breakdown."""
    from bench import gpu
    from mmsae.models import resolve_hookpoint

    t0 = time.perf_counter()
    root.mkdir(parents=True)
    (root / "model").mkdir()
    profile = dataclasses.replace(gpu.TINY, text=case.text, vision=case.vision, pinpoints=case.pinpoints,
                                  layer=case.layer)
    lmm = gpu.build_lmm(profile, torch.device("cpu"), torch.float32, root / "model")
    image_set = make_image_set(root / "images", case.images)
    hook = resolve_hookpoint(lmm.model, case.layer)
    batches = prepare_batches(image_set, lmm.processor, case.batch_size, PROMPT)
    image_tokens = sum(int((b["input_ids"] == lmm.config.image_token_id).sum()) for b in batches)
    sequence = statistics.mean(float(b["attention_mask"].sum(1).float().mean()) for b in batches)
    log.info("%s: built the model (%.0f M parameters) and %d images (%d image tokens) in %.1f s", case.name,
             sum(p.numel() for p in lmm.model.parameters()) / 1e6, case.images, image_tokens, time.perf_counter() - t0)
    model = str(root / "model")
    with gpu.prebuilt_model(lmm):
        forward_truncated(lmm.model, batches[:1], hook)  # warm-up: imports, allocator growth, lazy init
        run_stage(root, "warmup", image_set, model, case, max_images=case.batch_size)
        times, figures, parts = _interleaved(case, root, image_set, model,
                                             lambda: forward_truncated(lmm.model, batches, hook))
    for name, f in figures.items():
        if f["tokens"] != image_tokens or f["images"] != case.images:
            raise RuntimeError(f"{name} cached {f['images']} images / {f['tokens']} tokens, but the forward's "
                               f"batches hold {case.images} images / {image_tokens} image tokens: not the same work")
    median = {name: statistics.median(ts) for name, ts in times.items()}
    dtype_bytes = torch.tensor([], dtype=torch.float32).element_size()
    writer_s = statistics.median(sum(v for k, v in run.items() if k.startswith("writer_")) for run in parts["stage"])
    return {
        "stage_over_forward_truncated": median["stage"] / median["forward_truncated"],
        "stage_extra_seconds": median["stage"] - median["forward_truncated"],
        "writer_bytes_per_s": figures["stage"]["bytes_written"] / max(writer_s, 1e-9),
        "stage_workers_0_over_forward_truncated": median["stage_workers_0"] / median["forward_truncated"],
        "flop_per_image_token": flop_per_image_token(case.text, case.vision, case.layer, sequence),
        "flop_per_cached_byte": flop_per_cached_byte(case.text, case.vision, case.layer, sequence, dtype_bytes),
        "median_seconds": median, "seconds": times,
        "breakdown": {name: {part: statistics.median(run.get(part, 0.0) for run in runs)
                             for part in sorted({p for run in runs for p in run})}
                      for name, runs in parts.items()},
        "images_per_s": {name: case.images / s for name, s in median.items()},
        "tokens_per_s": {name: image_tokens / s for name, s in median.items()},
        "bytes_written": figures["stage"]["bytes_written"],
        "setup": {**dataclasses.asdict(case), "parameters": sum(p.numel() for p in lmm.model.parameters()),
                  "hookpoint": hook.name, "image_tokens": image_tokens, "mean_sequence_tokens": sequence,
                  "batches": len(batches), "shards": figures["stage"]["shards"]},
    }


def _interleaved(case: Case, root: Path, image_set: str, model: str, forward: Callable[[], Any],
                 ) -> tuple[dict[str, list[float]], dict[str, dict[str, Any]], dict[str, list[dict[str, float]]]]:
    """``case.reps`` rounds of the forward, the stage and the stage without a worker, the order rotating."""
    figures: dict[str, dict[str, Any]] = {}
    parts: dict[str, list[dict[str, float]]] = {"stage": [], "stage_workers_0": []}

    def stage(name: str, **kw: Any) -> Callable[[], float]:
        def go() -> float:
            seconds, figures[name], seconds_per_part = run_stage(root, name, image_set, model, case, **kw)
            parts[name].append(seconds_per_part)
            return seconds
        return go

    runs: dict[str, Callable[[], float]] = {
        "forward_truncated": lambda: _seconds(forward),
        "stage": stage("stage"),
        "stage_workers_0": stage("stage_workers_0", num_workers=0),
    }
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(case.reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            times[name].append(runs[name]())
            log.info("%s rep %d %s: %.2f s", case.name, rep, name, times[name][-1])
    return times, figures, parts
