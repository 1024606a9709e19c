"""Mining benchmark: the mine stage's streaming miner against the bare SAE encode, and its memory as images double.

Reads nothing; writes generated activation shards and a random SAE into a temporary folder (removed
afterwards); returns the figures (``python -m bench`` writes them to ``mine.json``).

Throughput, timed side by side in one run, interleaved over `REPS` repetitions (the order alternates),
summarised by medians; both read the same shards from disk (checksums, decoding, image-token filter) and
encode in the same batches of whole images:

* ``encode``: ``sae.encode`` on every image token, nothing kept;
* ``mine``: the same plus what the mine stage does with the codes (:class:`mmsae.mining.Miner`):
  frequencies, per-feature top-K by max score, quantile pool, negatives, token maps, then ``finish``.
  The goal is ``encode_seconds / mine_seconds >= 0.8`` on wall-clock medians; the same ratio of CPU
  seconds is reported beside it, as it moves less when other processes share the machine.

Memory: the miner alone runs in a child process over `N_IMAGES` and over twice as many images (the first
set's shards plus as many again), and the child reports its own peak resident set size: ``VmHWM`` of
``/proc/self/status``, read when mining is done (and once before it starts, after the imports and the SAE
load, as ``start_rss_mib``). Not ``ru_maxrss`` from ``os.wait4``: on Linux the child's maximum starts at the
parent's high-water mark (the forked copy's RSS is folded in at exec), so with this process holding the
throughput runs' memory both children would report the parent's peak and the figure could not move. Both
children import the same modules and hold one shard at a time, so any difference is the mining state; the
goal is a flat peak (``rss_ratio`` near 1).

The data: `D`-wide activations of `TOKENS_PER_IMAGE` image tokens per image (a base view and three
tiles of 4x4 cells, with image-newline tokens), stored in float16 as the cache stage can; an SAE of
`LATENTS` latents with k = `K`. The SAE encode is the bulk of the work, as it is for a real LMM and SAE.

Artifact sizes (``pages``): generated photographs of `PHOTO_SIZES` (100 to 1400 pixels a side) as an
image set, cached through a tiny LLaVA-NeXT, mined with a random SAE of `PHOTO_LATENTS` latents (heat maps
of the top `PHOTO_TOP_K` images of every feature, at the default ``mine.heatmap_max_side``), then rendered
by the report stage with every feature in detail: ``heatmap_bytes_per_feature`` (the overlay and masked
PNGs of a feature that fires) and ``dashboard_bytes_per_detailed_feature`` (the page's bytes over its
detailed features), beside ``full_size_png_bytes_per_image``, the bytes of one photograph as a PNG at its
own size (what each heat map took before heat maps were bounded).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

GOAL = 0.8
"""Mining throughput must be at least this share of the bare encode's."""
REPS = 5
N_IMAGES = 1500
IMAGES_PER_SHARD = 250
D = 256
LATENTS = 4096
K = 32
TOP_K = 10
BATCH_ROWS = 8192
TORCH_THREADS = 1
GRID = 4
VIEWS = 4
TOKENS_PER_IMAGE = VIEWS * GRID * GRID + 2 * GRID  # base + 3 tiles, plus a newline per merged tile row
SEED = 0
PHOTO_SIZES = ((1400, 1050), (1000, 872), (872, 1000), (1280, 320), (320, 1280), (800, 800), (640, 480),
               (480, 640), (400, 300), (240, 320), (160, 120), (100, 140))
"""(width, height) of the generated photographs."""
PHOTO_LATENTS = 32
PHOTO_TOP_K = 5


def _layout() -> dict[str, torch.Tensor]:
    view, row, col = [], [], []
    for r in range(GRID):
        for c in range(GRID):
            view.append(0), row.append(r), col.append(c)
    for r in range(2 * GRID):  # tiles 1..3 in a 2x2 grid (the fourth is padding), newline per merged row
        for tc in range(2):
            t = 1 + (r // GRID) * 2 + tc
            if t > VIEWS - 1:
                continue
            for c in range(GRID):
                view.append(t), row.append(r % GRID), col.append(c)
        view.append(-2), row.append(r), col.append(-1)
    return {"view": torch.tensor(view), "row": torch.tensor(row), "col": torch.tensor(col)}


def make_shards(uri: Path, first: int, n_images: int, link_from: Path | None = None) -> str:
    """Shards of images ``[first, first + n_images)``; with ``link_from``, its shards come first (hard links)."""
    from mmsae import activations as A
    from mmsae import storage

    lay = _layout()
    assert len(lay["view"]) == TOKENS_PER_IMAGE
    refs, files, sizes = [], [], []
    if link_from is not None:
        prev = storage.read_manifest(str(link_from), kind=A.KIND)
        for ref in prev.extra["shards"]["layers.1"]:
            (uri / "layers.1").mkdir(parents=True, exist_ok=True)
            os.link(link_from / ref["name"], uri / ref["name"])
            refs.append(ref)
            files.append(ref["name"])
        sizes = json.loads((link_from / "images.json").read_text())["images"]
    start = len(refs)
    g = torch.Generator().manual_seed(SEED + first)
    # activations with structure: a few shared directions per image plus noise, so features are selective
    basis = torch.randn(64, D, generator=torch.Generator().manual_seed(SEED))
    for s, lo in enumerate(range(first, first + n_images, IMAGES_PER_SHARD), start=start):
        hi = min(lo + IMAGES_PER_SHARD, first + n_images)
        n_img = hi - lo
        weights = torch.rand(n_img, 64, generator=g) * (torch.rand(n_img, 64, generator=g) < 0.1)
        acts = (weights @ basis)[:, None, :] + 0.5 * torch.randn(n_img, TOKENS_PER_IMAGE, D, generator=g)
        cols = {
            "acts": acts.reshape(-1, D).to(torch.float16),
            "image_idx": torch.arange(lo, hi).repeat_interleave(TOKENS_PER_IMAGE),
            "token_pos": torch.arange(1, 1 + TOKENS_PER_IMAGE).repeat(n_img),
            **{c: v.repeat(n_img) for c, v in lay.items()},
        }
        name = f"layers.1/{A.shard_name(0, s)}"
        storage.write_bytes(str(uri / name), A.encode_shard(cols, {"hookpoint": "layers.1"}))
        files.append(name)
        refs.append({"name": name, "rows": n_img * TOKENS_PER_IMAGE, "first_image": lo, "end_image": hi})
        sizes += [[i, 336, 336] for i in range(lo, hi)]
    (uri / "images.json").write_text(json.dumps({"images": sizes, "skipped": []}))
    files.append("images.json")
    storage.write_manifest(str(uri), A.KIND, files=files, extra={
        "hookpoints": ["layers.1"], "d": D, "dtype": "float16", "shards": {"layers.1": refs},
        "family": "llava_next"})
    return str(uri)


def make_sae(path: Path) -> str:
    from mmsae.sae.checkpoint import save_sae
    from mmsae.sae.model import SaeConfig, TopKSAE

    torch.manual_seed(SEED)
    save_sae(TopKSAE(SaeConfig(d_in=D, num_latents=LATENTS, k=K)), str(path))
    return str(path)


def _stream(shards_uri: str):
    from mmsae import activations as A

    for cols in A.ActivationShards(shards_uri).iter_shards():
        keep = A.token_mask(cols, "image")
        yield {c: v[keep] for c, v in cols.items()}


def mine_settings(**changes: Any):
    """The mine settings of the benchmark: the config's defaults with ``TOP_K``, ``BATCH_ROWS`` and ``SEED``."""
    from mmsae.config import MineConfig

    return MineConfig(**{"top_k": TOP_K, "batch_rows": BATCH_ROWS, "seed": SEED, **changes})


def encode_only(shards_uri: str, sae) -> int:
    from mmsae.mining import Miner

    # only for its batching of whole images
    batcher = Miner.from_config(mine_settings(top_k=1, n_quantiles=0, n_random=0), LATENTS)
    rows = 0
    with torch.inference_mode():
        for cols in _stream(shards_uri):
            for sl in batcher.batches(cols, BATCH_ROWS):
                out = sae.encode(cols["acts"][sl].to(sae.dtype))
                rows += int(out.top_acts.shape[0])
    return rows


def mine_all(shards_uri: str, sae) -> Any:
    from mmsae.mining import Miner

    miner = Miner.from_config(mine_settings(n_quantiles=5, quantile_examples=1, quantile_pool=2, n_random=5), LATENTS)

    def encode(x: torch.Tensor):
        out = sae.encode(x.to(sae.dtype))
        return out.top_acts, out.top_indices

    with torch.inference_mode():
        for cols in _stream(shards_uri):
            miner.add_shard(cols, encode, BATCH_ROWS)
    result = miner.finish()
    return result


def _seconds(fn) -> tuple[float, float]:
    """Wall-clock and CPU seconds of ``fn()`` (CPU time is steadier on a machine that others share)."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _proc_status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (e.g. ``VmHWM``, the peak resident set size) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _child(shards_uri: str, sae_path: str, out: str) -> None:
    """Run in a child process: mine ``shards_uri``; write the state's peak bytes and this process's peak RSS.

    ``vm_hwm_kib`` is this process's own high-water mark (``VmHWM``), read after ``finish``; unlike the
    parent's ``ru_maxrss`` for it, it does not start at the parent's peak. ``start_hwm_kib`` is the same mark
    after the imports and the SAE load, before any mining.
    """
    from mmsae.sae.checkpoint import load_sae

    torch.set_num_threads(TORCH_THREADS)
    sae = load_sae(sae_path)
    start = _proc_status_kib("VmHWM")
    result = mine_all(shards_uri, sae)
    Path(out).write_text(json.dumps({"peak_state_bytes": result.peak_state_bytes, "images": result.images,
                                     "map_rows": int(result.maps["feature"].numel()),
                                     "start_hwm_kib": start, "vm_hwm_kib": _proc_status_kib("VmHWM")}))


def peak_rss(shards_uri: str, sae_path: str, root: Path) -> dict[str, Any]:
    """Mine ``shards_uri`` in a fresh child process; its own peak RSS (``VmHWM``, MiB) and mining state."""
    out = root / f"child-{Path(shards_uri).name}.json"
    code = f"from bench.mine import _child; _child({shards_uri!r}, {sae_path!r}, {str(out)!r})"
    env = {**os.environ, "OMP_NUM_THREADS": str(TORCH_THREADS)}
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace")
        raise RuntimeError(f"mining child failed on {shards_uri} (exit {proc.returncode}): {err[-2000:]}")
    info = json.loads(out.read_text())
    return {"peak_rss_mib": info["vm_hwm_kib"] / 1024, "start_rss_mib": info["start_hwm_kib"] / 1024, **info}


def main() -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-mine-") as tmp:
            result = _measure(Path(tmp))
            result["pages"] = page_sizes(Path(tmp) / "pages")
    finally:
        torch.set_num_threads(threads)
    mem = result["memory"]
    log.info("mine / encode throughput %.3f (goal >= %.2f; CPU time %.3f); child peak RSS (VmHWM) %.0f MiB at "
             "%d images, %.0f MiB at %d (ratio %.3f; %.0f / %.0f MiB before mining); mining state ratio %.3f",
             result["mine_over_encode_throughput"], GOAL, result["mine_over_encode_throughput_cpu"],
             mem["n"]["peak_rss_mib"], N_IMAGES, mem["2n"]["peak_rss_mib"], 2 * N_IMAGES, mem["rss_ratio"],
             mem["n"]["start_rss_mib"], mem["2n"]["start_rss_mib"], mem["state_ratio"])
    pages = result["pages"]
    log.info("heat maps: %.0f KiB per feature (%.0f KiB per PNG; a photograph as a full-size PNG: %.0f KiB); "
             "dashboard: %.0f KiB per detailed feature", pages["heatmap_bytes_per_feature"] / 1024,
             pages["heatmap_bytes_per_png"] / 1024, pages["full_size_png_bytes_per_image"] / 1024,
             pages["dashboard_bytes_per_detailed_feature"] / 1024)
    return result


def _measure(root: Path) -> dict[str, Any]:
    from mmsae.sae.checkpoint import load_sae

    t0 = time.perf_counter()
    small = make_shards(root / "acts-n", 0, N_IMAGES)
    large = make_shards(root / "acts-2n", N_IMAGES, N_IMAGES, link_from=root / "acts-n")
    sae_path = make_sae(root / "sae" / "layers.1")
    sae = load_sae(sae_path)
    log.info("made %d + %d images of shards and the SAE in %.1f s", N_IMAGES, N_IMAGES, time.perf_counter() - t0)

    tokens = encode_only(small, sae)  # warm-up: allocator growth, lazy initialisation
    runs = {"encode": lambda: encode_only(small, sae), "mine": lambda: mine_all(small, sae)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for rep in range(REPS):
        for name in names[rep % 2:] + names[: rep % 2]:
            wall, used = _seconds(runs[name])
            times[name].append(wall)
            cpu[name].append(used)
            log.info("rep %d %s: %.2f s (%.2f s CPU)", rep, name, wall, used)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    median_cpu = {name: statistics.median(ts) for name, ts in cpu.items()}
    ratio = median["encode"] / median["mine"]

    mem_n = peak_rss(small, sae_path, root)
    mem_2n = peak_rss(large, sae_path, root)
    rss_ratio = mem_2n["peak_rss_mib"] / mem_n["peak_rss_mib"]
    return {
        "mine_over_encode_throughput": ratio,
        "goal_mine_over_encode_throughput": GOAL,
        "meets_goal": ratio >= GOAL,
        "mine_over_encode_throughput_cpu": median_cpu["encode"] / median_cpu["mine"],
        "median_seconds": median,
        "median_cpu_seconds": median_cpu,
        "seconds": times,
        "cpu_seconds": cpu,
        "tokens_per_s": {name: tokens / s for name, s in median.items()},
        "memory": {"n": mem_n, "2n": mem_2n, "rss_ratio": rss_ratio,
                   "state_ratio": mem_2n["peak_state_bytes"] / mem_n["peak_state_bytes"]},
        "setup": {"images": N_IMAGES, "tokens_per_image": TOKENS_PER_IMAGE, "tokens": tokens, "d": D,
                  "latents": LATENTS, "k": K, "top_k": TOP_K, "batch_rows": BATCH_ROWS, "reps": REPS,
                  "torch_threads": TORCH_THREADS, "shard_dtype": "float16",
                  "images_per_shard": IMAGES_PER_SHARD},
    }


# ---------------------------------------------------------------------------------------------------
# artifact sizes on photographs


def photo(width: int, height: int, seed: int):
    """A photograph-like image: smooth colour fields, blurred shapes and sensor noise."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((width, height),
                                                                                   Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(max(width, height) // 16 + 1, max(width, height) // 5 + 2))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(2))
    noisy = np.asarray(img, np.float32) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def page_sizes(root: Path) -> dict[str, Any]:
    """Heat-map bytes per feature and dashboard bytes per detailed feature on generated photographs."""
    from mmsae import storage
    from mmsae.config import MineConfig, RunConfig
    from mmsae.heatmaps import png_bytes
    from mmsae.models import save_tiny
    from mmsae.sae.checkpoint import save_sae
    from mmsae.sae.model import SaeConfig, TopKSAE
    from mmsae.stages import cache, mine, report

    t0 = time.perf_counter()
    photos = root / "photos"
    photos.mkdir(parents=True)
    full_png = []
    for n, (width, height) in enumerate(PHOTO_SIZES):
        img = photo(width, height, SEED + n)
        img.save(photos / f"photo-{n:02d}.jpg", quality=90)
        full_png.append(len(png_bytes(img)))
    cfg = RunConfig()
    cfg.tracking.enabled = False
    cfg.run.workdir = str(root / "work")
    model = str(save_tiny("llava_next", root / "lmm", text_layers=1))
    cfg.cache = cfg.cache.model_copy(update={"image_set": str(photos), "model": model, "layers": [0],
                                             "num_workers": 0})
    cache.run(cfg)
    torch.manual_seed(SEED)
    save_sae(TopKSAE(SaeConfig(d_in=64, num_latents=PHOTO_LATENTS, k=4)), str(root / "work" / "train" / "layers.0"))
    cfg.mine = MineConfig(top_k=PHOTO_TOP_K, seed=SEED)
    mined = mine.run(cfg)
    manifest = storage.read_manifest(mined.uri)
    heatmaps = [e.bytes for name, e in manifest.files.items() if name.startswith("heatmaps/")]
    with_maps = len({name.split("/")[1] for name in manifest.files if name.startswith("heatmaps/")})
    cfg.report.max_detail_features = PHOTO_LATENTS
    page = report.run(cfg)
    return {
        "photos": len(PHOTO_SIZES), "photo_sizes": [list(s) for s in PHOTO_SIZES], "features": PHOTO_LATENTS,
        "features_with_heatmaps": with_maps, "top_k": PHOTO_TOP_K, "heatmap_max_side": cfg.mine.heatmap_max_side,
        "heatmap_pngs": len(heatmaps), "heatmap_bytes_per_png": sum(heatmaps) / max(1, len(heatmaps)),
        "heatmap_bytes_per_feature": sum(heatmaps) / max(1, with_maps),
        "full_size_png_bytes_per_image": sum(full_png) / len(full_png),
        "dashboard_bytes": page.figures["report_bytes"], "features_detailed": page.figures["features_detailed"],
        "dashboard_bytes_per_detailed_feature": page.figures["bytes_per_detailed_feature"],
        "image_width": cfg.report.image_width, "images_per_feature": cfg.report.images_per_feature,
        "seconds": time.perf_counter() - t0,
    }
