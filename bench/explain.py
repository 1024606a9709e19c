"""Explanation benchmark: the explain stage's throughput against a server of fixed latency, over the ideal.

Reads nothing; writes a generated top-examples artifact, the response cache and the explanations into a
temporary folder (removed afterwards); returns the figures (``python -m bench`` writes them to
``explain.json``).

The server is `mmsae.explainers.loopback` in a process of its own, answering every request after exactly
`LATENCY_S` seconds, so a client that keeps `CONCURRENCY` requests in flight can explain at most
``CONCURRENCY / LATENCY_S`` features per second. ``mmsae.stages.explain.run`` (OpenAI backend, tracking
off) explains `N_FEATURES` features of `IMAGES` masked images each, at `SIDE` pixels on the long side as
the mine stage renders them for real images (so they are sent without re-encoding), from a cold cache;
the whole stage is timed, reading the artifact, checksums, base64, the cache's writes and sealing included.

* ``ratio``: ``features_per_s / (CONCURRENCY / LATENCY_S)``; the goal is ``>= 0.9`` (`GOAL`). The first
  request is sent alone (a wrong endpoint or model is then one error), which costs one latency of the run.
* ``cpu_ms_per_request``: this process's CPU time (the server's is not in it) over the requests made.
* ``resize_cpu_ms_per_image``: what a toy-world image costs when it must be scaled up to `SIDE` and
  re-encoded first (``explain.image_long_side`` above the rendered size), measured alone.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmsae import storage

log = logging.getLogger(__name__)

GOAL = 0.9
LATENCY_S = 1.0
"""A vision LMM's time for one explanation: ~4k tokens of five images to prefill, a few dozen to generate."""
CONCURRENCY = 32
N_FEATURES = 960
IMAGES = 5
SIDE = 384
MODEL = "bench-explainer"
RESIZE_IMAGES = 50


def main() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mmsae-bench-explain-") as tmp:
        top = _top_examples(Path(tmp) / "mine")
        command = [sys.executable, "-m", "mmsae.explainers.loopback", "--latency", str(LATENCY_S),
                   "--model", MODEL]
        server = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            url = server.stdout.readline().strip()
            if not url.startswith("http://"):
                raise RuntimeError(f"the loopback server did not start (it printed {url!r})")
            figures = _explain(tmp, top, url)
        finally:
            server.stdin.close()
            server.wait(30)
    figures["resize_cpu_ms_per_image"] = _resize_cost()
    return figures


def _explain(tmp: str, top: str, url: str) -> dict[str, Any]:
    from mmsae.config import ExplainConfig, RunConfig
    from mmsae.stages import explain

    cfg = RunConfig()
    cfg.run.workdir = tmp
    cfg.tracking.enabled = False
    cfg.explain = ExplainConfig(backend="openai", endpoint=url, model=MODEL, top_examples=top,
                                concurrency=CONCURRENCY, max_images=IMAGES, image_long_side=SIDE)
    cpu, wall = time.process_time(), time.perf_counter()
    out = explain.run(cfg)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    ideal = CONCURRENCY / LATENCY_S
    figures = {
        "features": N_FEATURES, "images_per_feature": IMAGES, "concurrency": CONCURRENCY,
        "latency_s": LATENCY_S,
        "ok": out.figures["ok"], "requests": out.figures["requests"],
        "features_per_s": out.figures["features_per_s"], "ideal_features_per_s": ideal,
        "ratio": out.figures["features_per_s"] / ideal, "stage_wall_s": wall,
        "cpu_ms_per_request": 1000 * cpu / max(1, out.figures["requests"]), "goal": GOAL,
    }
    figures["meets_goal"] = figures["ratio"] >= GOAL
    log.info("explain: %.1f features/s of an ideal %.1f (ratio %.3f), %.2f ms CPU per request",
             figures["features_per_s"], ideal, figures["ratio"], figures["cpu_ms_per_request"])
    return figures


def _top_examples(uri: Path) -> str:
    """A top-examples artifact: every feature with `IMAGES` distinct masked images of `SIDE` pixels, drawn as
    the mine stage draws a photograph's (about 200 kB each): smooth content with sensor noise, darkened by
    88% outside a highlighted region."""
    rng = np.random.default_rng(0)
    photo = _photo(rng)
    lines, names = [], []
    for feature in range(N_FEATURES):
        top = []
        for rank in range(IMAGES):
            keep = np.full((SIDE, SIDE), 0.12, dtype=np.float32)
            y, x = rng.integers(0, SIDE - 96, size=2)
            keep[y:y + 96, x:x + 96] = 1.0
            shift = rng.integers(0, SIDE, size=2)
            image = (np.roll(photo, tuple(shift), axis=(0, 1)) * keep[..., None]).astype(np.uint8)
            name = f"heatmaps/f{feature:06d}/masked-{rank:02d}-{feature * IMAGES + rank}.png"
            storage.write_bytes(str(uri / name), _png(image))
            names.append(name)
            top.append({"image_idx": feature * IMAGES + rank, "score": float(IMAGES - rank)})
        lines.append(storage.json_text({"feature": feature, "frequency": 0.01, "image_frequency": 0.1,
                                        "max_activation": 5.0, "mean_activation": 1.0, "top": top,
                                        "quantiles": [], "negatives": []}))
    storage.write_text(str(uri / "features.jsonl"), "\n".join(lines) + "\n")
    storage.write_manifest(str(uri), "top_examples", files=[*names, "features.jsonl"], format_version=2,
                           extra={"hookpoint": "layers.1", "features": list(range(N_FEATURES)),
                                  "selected": list(range(N_FEATURES))})
    return str(uri)


def _photo(rng: np.random.Generator) -> np.ndarray:
    coarse = rng.integers(0, 256, size=(SIDE // 8, SIDE // 8, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse, "RGB").resize((SIDE, SIDE), Image.Resampling.BICUBIC))
    return np.clip(smooth.astype(np.float32) + rng.normal(0, 6, size=smooth.shape), 0, 255)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _resize_cost() -> float:
    """CPU milliseconds to scale a 64 px toy-world image up to `SIDE` and re-encode it."""
    from mmsae.explainers.openai_client import resized_png

    rng = np.random.default_rng(1)
    images = [_png(rng.integers(0, 256, size=(64, 64, 3)).astype(np.uint8)) for _ in range(RESIZE_IMAGES)]
    cpu = time.process_time()
    for png in images:
        resized_png(png, SIDE)
    return 1000 * (time.process_time() - cpu) / RESIZE_IMAGES
