"""Attribution benchmark: model passes per example whatever the SAE's width, and on the toy world how the
first-order estimates compare with true ablation and whether the top feature stands for the answer's concept.

Reads the toy LMM from its cache (trained first when absent, minutes); writes a toy-world run (layer 0, as
``bench.steer``) and the attribute stage's output into a temporary folder, removed afterwards. Returns the
figures (``python -m bench`` writes them to ``attribute.json``).

Passes (``passes``): a tiny LLaVA-NeXT's batch of `BATCH` examples attributed through SAEs of `WIDTHS` latents;
the model's forward calls (a pre-hook on the model) and the backward passes reaching its LM head (a backward
hook) are counted, per example. Goal: at most `MAX_PASSES` per example at every width; beside it, the passes
the per-feature method (two forwards and a backward per feature) would take.

Toy world (``toy_world``): the attribute stage's automatic examples (`EXAMPLES` held-out captions cut before
their first colour word; the answer against the colour the toy LMM ranks highest among those its caption does not
name), attributed at image tokens (what the SAE was trained on). For the first `ABLATED` of them every active
feature is also ablated for real (one forward each): the Spearman correlation of the estimates with the true
effects, how often the top feature by estimate is the top one by ablation, and for each of the two whether its
top images mostly hold the answer's colour (``top_is_concept_estimate`` / ``_ablation``: the estimate's share is
bounded by what ablation itself finds, a property of the model and the SAE). Then the stage's figures: ``top_is_matched`` (the top feature is the mine stage's match for the answer's
colour), ``top_is_concept`` (its top images mostly hold that colour), each beside a random active feature's.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

BATCH = 4
WIDTHS = (64, 1024, 16384, 131072)
MAX_PASSES = 3
EXAMPLES = 64
ABLATED = 32
PROMPT = "USER: <image>\nwhat is in this image? ASSISTANT:"


def main() -> dict[str, Any]:
    torch.set_num_threads(2)
    figures: dict[str, Any] = {"passes": passes()}
    with tempfile.TemporaryDirectory(prefix="mmsae-bench-attribute-") as tmp:
        figures["toy_world"] = toy_world(str(Path(tmp) / "work"))
    return figures


class _Counter:
    """Forward calls of a model and backward passes through its LM head."""

    def __init__(self, model: torch.nn.Module):
        self.forward = self.backward = 0
        self.handles = [model.register_forward_pre_hook(self._forward),
                        model.lm_head.register_full_backward_hook(self._backward)]

    def _forward(self, *_: Any) -> None:
        self.forward += 1

    def _backward(self, *_: Any) -> None:
        self.backward += 1

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def passes() -> dict[str, Any]:
    """Passes per example and seconds per batch at each SAE width (tiny model, random SAEs)."""
    import numpy as np
    from PIL import Image

    from mmsae.attribution import attribute
    from mmsae.models.loading import LoadedLMM
    from mmsae.models.tiny import build_tiny
    from mmsae.sae.model import SaeConfig, TopKSAE
    from mmsae.steering import Prompt, Steerer

    model, processor = build_tiny("llava_next", seed=0)
    lmm = LoadedLMM(model, processor, "llava_next", model.config, Path("tiny"))
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 255, (32 + 16 * (i % 2), 32, 3), dtype=np.uint8)) for i in range(BATCH)]
    out: dict[str, Any] = {}
    for width in WIDTHS:
        sae = TopKSAE(SaeConfig(d_in=model.config.text_config.hidden_size, num_latents=width, k=16))
        steerer = Steerer(lmm, sae, "layers.0", positions=("image",))
        enc = steerer.encode([Prompt(PROMPT, img) for img in images])
        counter = _Counter(model)
        start = time.perf_counter()
        try:
            attribute(lmm, sae, "layers.0", enc, [5] * BATCH, [6] * BATCH)
        finally:
            counter.close()
        seconds = time.perf_counter() - start
        out[f"w{width}"] = {"forward": counter.forward, "backward": counter.backward,
                            "passes_per_example": (counter.forward + counter.backward) / BATCH,
                            "seconds_per_batch": seconds, "per_feature_method_passes_per_example": 3 * width}
    worst = max(v["passes_per_example"] for v in out.values())
    return {**out, "max_passes_per_example": worst, "goal": MAX_PASSES, "met": worst <= MAX_PASSES}


def toy_world(workdir: str) -> dict[str, Any]:
    """Rank correlation with true ablation, and the attribute stage's concept figures, on the toy world."""
    from bench.steer import load_toy, toy_world_run
    from mmsae.attribution import ablation_effects, attribute, rank_correlation
    from mmsae.config import load_config
    from mmsae.data.images import load_image_set
    from mmsae.demo import DEMO_PROFILE
    from mmsae.stages import attribute as stage

    run = toy_world_run(workdir)
    cfg = load_config(DEMO_PROFILE, [f"run.workdir={workdir}", "tracking.enabled=false", "cache.layers=[0]",
                                     f"attribute.images={EXAMPLES}", "attribute.heatmaps=0"])
    out = stage.run(cfg, top_examples=run["top_examples"])
    lmm, sae, hookpoint, top, heldout = load_toy(run)
    rows = [json.loads(x) for x in (Path(out.uri) / stage.RECORDS_FILE).read_text().splitlines()]
    from mmsae.steering import Prompt, Steerer

    steerer = Steerer(lmm, sae, hookpoint, positions=("image",))
    image_concepts = load_image_set(run["image_set"], top.extra.get("split", "train"))["concepts"]
    correlations, same_top, concept_estimate, concept_ablation = [], [], [], []
    for r in rows[:ABLATED]:
        enc = steerer.encode([Prompt(r["prompt"], heldout[r["image_idx"]]["image"].convert("RGB"))])
        where = steerer.position_masks(enc)["image"]
        [result] = attribute(lmm, sae, hookpoint, enc, [r["answer_id"]], [r["baseline_id"]], where=where)
        features = result.active_features()
        true = ablation_effects(lmm, sae, hookpoint, enc, [r["answer_id"]], [r["baseline_id"]], features,
                                where=where)[:, 0]
        estimates = result.feature_totals(sae.num_latents)[features]
        correlations.append(rank_correlation(estimates.tolist(), true.tolist()))
        by_estimate, by_ablation = features[int(estimates.argmax())], features[int(true.argmax())]
        same_top.append(float(by_estimate == by_ablation))
        concept = f"color:{r['answer']}"
        for chosen, shares in ((by_estimate, concept_estimate), (by_ablation, concept_ablation)):
            shares.append(float(stage.concept_share(top, image_concepts, chosen, concept) >= stage.CONCEPT_PRECISION))
    return {"stage": out.figures, "rank_correlation_mean": statistics.mean(correlations),
            "rank_correlation_min": min(correlations), "rank_correlation_median": statistics.median(correlations),
            "ablated_examples": len(correlations), "same_top_feature_as_ablation": statistics.mean(same_top),
            "top_is_concept_estimate": statistics.mean(concept_estimate),
            "top_is_concept_ablation": statistics.mean(concept_ablation)}
