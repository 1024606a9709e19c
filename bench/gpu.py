"""The GPU profile: the train step, the cache stage and mining at the seed's shapes, in one run on one GPU.

``python -m bench gpu`` (or ``bench/gpu.sh``) returns the figures, which the harness writes to ``gpu.json``.
Reads nothing; writes a generated image set, a model folder holding only the config and the processor, and
the cache stage's shards into a temporary folder (removed afterwards).

Parts, each reported with its own seconds:

* ``peak``: the device's dense matmul rate, ``[n, n] @ [n, n]`` (bf16 on a GPU, fp32 on the CPU), the median of
  a few products: the rate every other figure is read against.
* ``train``: the train stage's step through DeepSpeed (:func:`bench.train.measure`: the stage's
  :class:`~mmsae.training.engine.SaeBundle` in :func:`~mmsae.training.engine.build_engine`, bf16 autocast on a
  GPU, 5 % of latents dead so AuxK runs) at d = 4096, 131 072 latents, k = 128 and 32 768 tokens a batch,
  with ZeRO-2 on the one GPU (``Profile.train_zero_stage``; the stage itself would run stage 0 on one rank):
  tokens/s against the goal of 300 000 per GPU, and the step's encoder FLOP rate as a fraction of the
  encoder-shaped bf16 product and of ``peak``; the step without dead latents beside it, and the profiler's
  breakdown of both (``engine.zero_stage_used`` says which stage ran).
* ``cache``: :func:`mmsae.stages.cache.run` end to end (tracking off, bf16 model and shards, decoding in
  worker processes) on a LLaVA-NeXT of the 8B model's geometry built from its config with random weights
  (Llama-3-8B text, CLIP ViT-L/14-336 vision, llava-next's AnyRes pinpoints), hooked at the middle layer, over
  generated images of varied sizes; beside it the forward pass cut at that layer over the same batches,
  already preprocessed and on the device. The model is built once in memory and handed to the stage in
  place of loading it (its folder holds the config and processor, which the stage fingerprints). The last
  stage run's seconds per part (:class:`mmsae.caching.StageTimes`) and one writer thread's bytes per second
  come with it (the stage runs ``writers`` of them): on a GPU the writers (encoding, hashing, writing with
  fsync) may hold the forward back.
* ``mine``: the cache stage's shards streamed through a random SAE of the train shape on the device, once
  encode-only and once into the mine stage's :class:`~mmsae.mining.Miner` (default ``MineConfig``), and once
  only read (on a GPU reading and checking the shards may outlast encoding them, so the ratio is also given
  over the seconds beyond reading).

Each part's peak device memory is recorded (``peak_memory_bytes``); between parts the garbage and the
allocator's cached blocks are released.

Tiny shapes (``MMSAE_BENCH_GPU_TINY=1``, ``main(tiny=True)``, or any machine without CUDA) run the same code
in seconds on the CPU, so the profile is exercised by the tests.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench import _timing as timing
from bench import cache as bench_cache
from bench import train as bench_train

log = logging.getLogger(__name__)

TINY_ENV = "MMSAE_BENCH_GPU_TINY"
"""Set to 1 to run the tiny shapes (on any device)."""
PARTIAL_ENV = "MMSAE_BENCH_GPU_PARTIAL"
"""A file the figures so far are written to after each part (``bench/gpu.sh`` sets it)."""
SHM_PER_WORKER = 256 * 2**20
"""Shared memory a decoding worker needs for its batches in flight (~110 MB at the full profile's batch of 8);
with less free in ``/dev/shm`` (a container's default is 64 MB) the cache part decodes in the main process."""
GOAL_TOKENS_PER_S = bench_train.GOAL_TOKENS_PER_S_PER_GPU
PROMPT = "<image>"
SEED = 0
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
"""(height, width) AnyRes resolutions of llava-next's 336 px checkpoints."""


@dataclass(frozen=True)
class Profile:
    """One set of shapes for every part."""

    name: str
    train: bench_train.Setup
    text: dict[str, Any]
    """LlamaConfig fields."""
    vision: dict[str, Any]
    """CLIPVisionConfig fields."""
    pinpoints: list[list[int]]
    layer: int
    """Hooked decoder layer (the middle one)."""
    images: int
    image_sides: tuple[int, int]
    """Smallest and largest generated side in pixels."""
    batch_size: int
    num_workers: int
    writers: int
    """The cache stage's shard-writer threads (``cache.writers``)."""
    shard_rows: int
    reps: int
    """Interleaved repetitions of the stage / forward and of encode / mine."""
    peak_side: int
    notes: dict[str, str] = field(default_factory=dict)
    train_zero_stage: int | None = 2
    """The train part's ZeRO stage on its one rank (None: the stage's own choice, 0)."""


FULL = Profile(
    name="full",
    train=bench_train.GPU,
    text=dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
              num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    vision=dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=4096, num_attention_heads=16,
                patch_size=14, image_size=336, projection_dim=768),
    pinpoints=LLAVA_NEXT_PINPOINTS, layer=16, images=256, image_sides=(200, 1400), batch_size=8,
    num_workers=6, writers=4, shard_rows=65536, reps=2, peak_side=8192,
)
TINY = Profile(
    name="tiny",
    train=bench_train.Setup(d_in=64, num_latents=1024, k=8, batch_tokens=256, naive_batch_tokens=128,
                            warmup_steps=1, pairs=2, naive_pairs=1, naive_warmup_steps=1, matmul_reps=1),
    text=dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512, rope_theta=500000.0, max_position_embeddings=4096),
    vision=dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=2,
                patch_size=8, image_size=32, projection_dim=32),
    pinpoints=[[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]], layer=2, images=10, image_sides=(20, 120),
    batch_size=4, num_workers=0, writers=2, shard_rows=256, reps=1, peak_side=256,
)


def choose_profile(tiny: bool | None, device: torch.device) -> Profile:
    """Tiny when asked (argument, else ``$MMSAE_BENCH_GPU_TINY``) or when there is no GPU, else the full shapes."""
    if tiny is None:
        tiny = os.environ.get(TINY_ENV, "") not in ("", "0")
    if not tiny and device.type != "cuda":
        log.warning("no GPU: running the tiny shapes (the full ones need a GPU)")
        tiny = True
    return TINY if tiny else FULL


def main(tiny: bool | None = None, device: str | None = None) -> dict[str, Any]:
    """Run every part; the figures (``python -m bench gpu`` writes them to ``gpu.json``).

    A part that raises is logged and listed under ``failed`` (with its error), and the others still run, so
    one run on a lent device brings back every figure it could take; ``mine`` needs ``cache``'s shards.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    profile = choose_profile(tiny, dev)
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    result: dict[str, Any] = {"profile": profile.name, "device": _device_name(dev),
                              "torch": torch.__version__, "cuda": torch.version.cuda, "failed": {},
                              "peak_memory_bytes": {}}

    def part(name: str, fn) -> Any:
        start = time.perf_counter()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001 - reported in the figures; the other parts still run
            log.exception("gpu profile: %s failed", name)
            result["failed"][name] = f"{type(e).__name__}: {e}"[:2000]
            return None
        finally:
            seconds[name] = time.perf_counter() - start
            if dev.type == "cuda":
                result["peak_memory_bytes"][name] = torch.cuda.max_memory_allocated(dev)
            _free_device_memory(dev)
            _write_partial(result)
        log.info("gpu profile: %s done in %.1f s", name, seconds[name])
        return result[name]

    peak = part("peak", lambda: peak_matmul(dev, profile.peak_side))
    part("train", lambda: train_part(profile, dev, peak["flop_per_s"] if peak else float("nan")))
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        cached = part("cache", lambda: cache_part(profile, dev, Path(tmp)))
        if cached is not None:
            part("mine", lambda: mine_part(profile, dev, cached.pop("shards_uri")))
    result["seconds"] = {**seconds, "total": time.perf_counter() - t0}
    result["setup"] = {k: v for k, v in asdict(profile).items() if k != "notes"}
    log.info("%s", summary(result))
    return result


def _free_device_memory(device: torch.device) -> None:
    """Drop what a finished part left for the garbage collector, and the allocator's cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _write_partial(result: dict[str, Any]) -> None:
    """The figures so far to ``$MMSAE_BENCH_GPU_PARTIAL`` (when set): a run cut short keeps its finished parts."""
    path = os.environ.get(PARTIAL_ENV)
    if path:
        Path(path).write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")


def summary(result: dict[str, Any]) -> str:
    """One line of the headline figures (the parts that ran)."""
    lines = [f"gpu profile ({result['profile']} on {result['device']}), {result['seconds']['total']:.0f} s:"]
    if "train" in result:
        train = result["train"]
        lines.append(f"train {train['tokens_per_s']:.0f} tokens/s (goal {GOAL_TOKENS_PER_S}), "
                     f"{train['fraction_of_measured_peak']:.2f} of the measured matmul peak;")
    if "cache" in result:
        cache = result["cache"]
        lines.append(f"cache stage {cache['stage_over_forward_truncated']:.3f} x the truncated forward, "
                     f"{cache['images_per_s']['stage']:.1f} images/s;")
    if "mine" in result:
        lines.append(f"mine / encode {result['mine']['mine_over_encode_throughput']:.3f};")
    if result["failed"]:
        lines.append(f"failed: {sorted(result['failed'])}")
    return " ".join(lines)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ------------------------------------------------------------------------------------------------ peak


def peak_matmul(device: torch.device, side: int, reps: int = 5) -> dict[str, Any]:
    """The median rate of ``reps`` timed square products (after one untimed), in FLOP/s."""
    dtype = _dtype(device)
    gen = torch.Generator(device=device).manual_seed(SEED)
    a = torch.randn(side, side, device=device, dtype=dtype, generator=gen)
    b = torch.randn(side, side, device=device, dtype=dtype, generator=gen)
    out = torch.empty(side, side, device=device, dtype=dtype)
    sync = timing.cuda_sync(device)
    run = lambda: torch.mm(a, b, out=out)  # noqa: E731
    timing.timed(run, sync)
    rates = [2.0 * side**3 / timing.timed(run, sync)[0].wall_s for _ in range(reps)]
    return {"flop_per_s": statistics.median(rates), "side": side, "dtype": str(dtype).removeprefix("torch.")}


# ----------------------------------------------------------------------------------------------- train


def train_part(profile: Profile, device: torch.device, peak_flop_per_s: float) -> dict[str, Any]:
    """:func:`bench.train.measure` at the profile's shape, with its rate against the measured peak."""
    setup = profile.train
    measured = bench_train.measure(setup, device, zero_stage=profile.train_zero_stage)
    tokens_per_s = measured["train"]["tokens_per_s"]
    encoder_flop_per_s = tokens_per_s * 2.0 * setup.d_in * setup.num_latents
    return {
        "tokens_per_s": tokens_per_s,
        "goal_tokens_per_s": GOAL_TOKENS_PER_S,
        "meets_goal": tokens_per_s >= GOAL_TOKENS_PER_S,
        "fraction_of_measured_peak": encoder_flop_per_s / peak_flop_per_s,
        "fraction_of_encoder_shaped_matmul": measured["train"]["fraction_of_dense_encoder_limit"],
        "parts": measured["train"].get("parts", {}),
        "bare_tokens_per_s": measured["train_bare"]["tokens_per_s"],
        "bare_fraction_of_encoder_shaped_matmul": measured["train_bare"]["fraction_of_dense_encoder_limit"],
        "breakdown": measured["breakdown"],
        "engine": measured["engine"],
        "auxk": measured["auxk"],
        "naive_tokens_per_s": measured["naive"]["tokens_per_s"],
        "encoder_shaped_matmul_flop_per_s": measured["matmul_flop_per_s"],
        "notes": "fractions count the encoder's 2*d*m FLOP per token only (the step's floor)",
    }


# ----------------------------------------------------------------------------------------------- cache


def build_lmm(profile: Profile, device: torch.device, dtype: torch.dtype, folder: Path):
    """A LLaVA-NeXT of the profile's geometry with random weights on ``device``, as a ``LoadedLMM``.

    ``folder`` receives its config and processor (no weights): what the stage fingerprints as the model.
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    from mmsae.models.loading import LoadedLMM
    from mmsae.models.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    image_size, patch = profile.vision["image_size"], profile.vision["patch_size"]
    text = LlamaConfig(**profile.text, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**profile.vision), text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-2, image_seq_length=(image_size // patch) ** 2, image_grid_pinpoints=profile.pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=profile.pinpoints),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(SEED)
        model = LlavaNextForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval()
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    return LoadedLMM(model=model, processor=processor, family="llava_next", config=config, path=folder)


@contextlib.contextmanager
def prebuilt_model(lmm) -> Iterator[None]:
    """The stage's ``load_lmm`` returns ``lmm`` while the block runs (the stage looks it up at call time)."""
    from mmsae.models import loading

    original = loading.load_lmm
    loading.load_lmm = lambda *args, **kwargs: lmm
    try:
        yield
    finally:
        loading.load_lmm = original


def make_images(path: Path, count: int, sides: tuple[int, int], seed: int = SEED) -> str:
    """``count`` JPEGs of random sizes and aspect ratios (smooth colour fields plus noise), as an HF dataset."""
    import datasets

    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(count):
        width, height = (int(v) for v in rng.integers(sides[0], sides[1] + 1, size=2))
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.int16)
        noisy = np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
        cells.append({"bytes": buf.getvalue(), "path": None})
    ds = datasets.Dataset.from_dict({"image": cells}, features=datasets.Features({"image": datasets.Image()}))
    ds.save_to_disk(str(path))
    return str(path)


def decoding_workers(wanted: int, shm: str = "/dev/shm") -> int:
    """``wanted`` decoding workers, or 0 when ``shm`` has too little room for their batches (logged)."""
    if wanted == 0:
        return 0
    try:
        free = shutil.disk_usage(shm).free
    except OSError:
        free = 0
    if free < wanted * SHM_PER_WORKER:
        log.warning("%s has %.0f MB free, %d decoding workers need ~%.0f MB: decoding in the main process", shm,
                    free / 1e6, wanted, wanted * SHM_PER_WORKER / 1e6)
        return 0
    return wanted


def _run_stage(profile: Profile, device: torch.device, image_set: str, model_dir: Path, out: Path,
               **changes: Any) -> tuple[float, dict[str, Any]]:
    """Seconds of one cache stage run writing to ``out`` (kept), and its figures."""
    from mmsae.caching import StageTimes
    from mmsae.config import RunConfig
    from mmsae.stages import cache

    cfg = RunConfig()
    cfg.tracking.enabled = False
    cfg.run.workdir = str(out.parent / f"work-{out.name}")
    model_dtype = "bfloat16" if device.type == "cuda" else "float32"
    cfg.cache = cfg.cache.model_copy(update={
        "image_set": image_set, "model": str(model_dir), "out": str(out), "layers": [profile.layer],
        "batch_size": profile.batch_size, "shard_rows": profile.shard_rows, "prompt": PROMPT,
        "dtype": "bfloat16", "model_dtype": model_dtype, "device": str(device),
        "num_workers": decoding_workers(profile.num_workers), "writers": profile.writers,
        **changes,
    })
    sync = timing.cuda_sync(device)
    times = StageTimes()
    elapsed, result = timing.timed(lambda: cache.run(cfg, times=times), sync)
    shutil.rmtree(cfg.run.workdir, ignore_errors=True)
    return elapsed.wall_s, {**result.figures, "seconds_per_part": dict(times.seconds)}


def cache_part(profile: Profile, device: torch.device, root: Path) -> dict[str, Any]:
    """The cache stage over the forward cut at the hooked layer, interleaved ``profile.reps`` times.

    The last stage output is kept for :func:`mine_part` (``shards_uri``).
    """
    from mmsae.models import resolve_hookpoint

    t0 = time.perf_counter()
    (root / "model").mkdir()
    lmm = build_lmm(profile, device, _dtype(device), root / "model")
    image_set = make_images(root / "images", profile.images, profile.image_sides)
    hook = resolve_hookpoint(lmm.model, profile.layer)
    batches = [_on_device(b, device, _dtype(device))
               for b in bench_cache.prepare_batches(image_set, lmm.processor, profile.batch_size, PROMPT)]
    image_tokens = sum(int((b["input_ids"] == lmm.config.image_token_id).sum()) for b in batches)
    build_s = time.perf_counter() - t0
    log.info("built the model (%.2f G parameters) and %d images (%d image tokens) in %.1f s",
             sum(p.numel() for p in lmm.model.parameters()) / 1e9, profile.images, image_tokens, build_s)
    out = root / "acts"
    with prebuilt_model(lmm):
        times, figures = _time_stage_and_forward(profile, device, root, image_set, out,
                                                 lambda: bench_cache.forward_truncated(lmm.model, batches, hook))
    if figures["tokens"] != image_tokens or figures["images"] != profile.images:
        raise RuntimeError(f"the stage cached {figures['images']} images / {figures['tokens']} tokens, the "
                           f"forward ran {profile.images} / {image_tokens}: not the same work")
    median = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "stage_over_forward_truncated": median["stage"] / median["forward_truncated"],
        "median_seconds": median, "seconds": times,
        "images_per_s": {name: profile.images / s for name, s in median.items()},
        "tokens_per_s": {name: image_tokens / s for name, s in median.items()},
        "images": profile.images, "image_tokens": image_tokens, "hookpoint": hook.name,
        "bytes_written": figures["bytes_written"], "shards": figures["shards"], "build_seconds": build_s,
        "last_stage_seconds_per_part": figures["seconds_per_part"],
        "writer_bytes_per_s": figures["bytes_written"] / max(1e-9, sum(
            v for k, v in figures["seconds_per_part"].items() if k.startswith("writer_"))),
        "notes": "stage seconds include decoding, preprocessing, the forward, geometry, shard writing and "
                 "sealing (model loading excluded: the model is built in memory); the forward runs on batches "
                 "already preprocessed and on the device",
        "shards_uri": str(out),
    }


def _time_stage_and_forward(profile: Profile, device: torch.device, root: Path, image_set: str, out: Path,
                            forward) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Seconds of the stage and of ``forward`` (order alternating), after a warm-up of each; the last
    stage's figures. The stage's last output stays at ``out``."""
    sync = timing.cuda_sync(device)
    _run_stage(profile, device, image_set, root / "model", root / "warmup", max_images=profile.batch_size)
    shutil.rmtree(root / "warmup")
    timing.timed(forward, sync)
    times: dict[str, list[float]] = {"stage": [], "forward_truncated": []}
    figures: dict[str, Any] = {}
    for rep in range(profile.reps):
        for name in (("stage", "forward_truncated") if rep % 2 == 0 else ("forward_truncated", "stage")):
            if name == "stage":
                if out.exists():
                    shutil.rmtree(out)
                wall, figures = _run_stage(profile, device, image_set, root / "model", out)
            else:
                wall = timing.timed(forward, sync)[0].wall_s
            times[name].append(wall)
            log.info("rep %d %s: %.2f s", rep, name, wall)
    return times, figures


def _on_device(inputs: Any, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    moved = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
    moved["pixel_values"] = moved["pixel_values"].to(dtype)
    return moved


# ------------------------------------------------------------------------------------------------ mine


def mine_part(profile: Profile, device: torch.device, shards_uri: str) -> dict[str, Any]:
    """Encode-only against the mine stage's miner over the cached shards, ``profile.reps`` interleaved runs."""
    from mmsae.sae.model import SaeConfig, TopKSAE

    setup = profile.train
    torch.manual_seed(SEED)
    sae = TopKSAE(SaeConfig(d_in=setup.d_in, num_latents=setup.num_latents, k=setup.k), device=device,
                  dtype=_dtype(device))
    sync = timing.cuda_sync(device)
    tokens = _encode_only(shards_uri, sae)  # warm-up
    runs = {"read": lambda: _read_only(shards_uri), "encode": lambda: _encode_only(shards_uri, sae),
            "mine": lambda: _mine(shards_uri, sae)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(max(2, profile.reps)):
        for name in (list(runs) if rep % 2 == 0 else list(runs)[::-1]):
            times[name].append(timing.timed(runs[name], sync)[0].wall_s)
            log.info("rep %d %s: %.2f s", rep, name, times[name][-1])
    median = {name: statistics.median(ts) for name, ts in times.items()}
    beyond_reading = {name: max(median[name] - median["read"], 1e-9) for name in ("encode", "mine")}
    return {
        "mine_over_encode_throughput": median["encode"] / median["mine"],
        # on a GPU reading and checking the shards can take longer than encoding them: the ratio without it
        "mine_over_encode_beyond_reading": beyond_reading["encode"] / beyond_reading["mine"],
        "median_seconds": median, "seconds": times, "tokens": tokens,
        "tokens_per_s": {name: tokens / s for name, s in median.items()},
        "sae": {"d_in": setup.d_in, "num_latents": setup.num_latents, "k": setup.k},
    }


def _mine_settings():
    from mmsae.config import MineConfig

    return MineConfig(seed=SEED)


def _image_rows(shards_uri: str) -> Iterator[dict[str, torch.Tensor]]:
    from mmsae import activations

    for cols in activations.ActivationShards(shards_uri).iter_shards():
        keep = activations.token_mask(cols, "image")
        yield {c: v[keep] for c, v in cols.items()}


def _read_only(shards_uri: str) -> int:
    """Read the shards' image rows as the other two runs do, and nothing else: their rows."""
    return sum(int(cols["acts"].shape[0]) for cols in _image_rows(shards_uri))


def _encode_only(shards_uri: str, sae) -> int:
    from mmsae.mining import Miner

    settings = _mine_settings()
    batcher = Miner.from_config(settings, sae.num_latents, sae.device)  # only for its batches of whole images
    rows = 0
    with torch.inference_mode():
        for cols in _image_rows(shards_uri):
            for sl in batcher.batches(cols, settings.batch_rows):
                out = sae.encode(cols["acts"][sl].to(sae.device, sae.dtype))
                rows += int(out.top_acts.shape[0])
    return rows


def _mine(shards_uri: str, sae) -> Any:
    from mmsae.mining import Miner

    settings = _mine_settings()
    miner = Miner.from_config(settings, sae.num_latents, sae.device)

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = sae.encode(x.to(sae.device, sae.dtype))
        return out.top_acts, out.top_indices

    with torch.inference_mode():
        for cols in _image_rows(shards_uri):
            miner.add_shard(cols, encode, settings.batch_rows)
    return miner.finish()
