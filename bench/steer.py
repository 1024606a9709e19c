"""Steering benchmark on the toy world: steered generation throughput, and whether steering a planted concept's
feature makes the toy LMM name it.

Reads the toy LMM from its cache (``mmsae.models.toy.get_or_train``: trained first when absent, minutes);
writes a toy-world run into a temporary folder (removed afterwards): the toy world, activation shards of the toy
LMM's text layer 0 (the demo profile caches layer 1, its last, where an image-token clamp cannot reach the
caption), a TopK SAE trained on them and its mined top examples, with the demo profile's settings and tracking
off. Returns the figures (``python -m bench`` writes them to ``steer.json``).

Throughput (``throughput``): greedy generation of `BATCH` held-out images with the toy LMM's prompt,
`NEW_TOKENS` tokens each (no early stop), with a clamp on every element at every position (image, prompt and
every generated token: the SAE encodes each clamped position) against the unsteered model on the same batch,
in `REPS` pairs run back to back (the order alternates); the ratio is the median over pairs of unsteered over
steered wall-clock time (neighbours in time, on a machine other work may share), goal >= `GOAL`.

Toy-world figures (``concepts``): for each planted colour and texture concept, its feature (the mine stage's
``ground_truth.json``: the best detector, ``f1_feature``, and separately the top-K match, ``feature``) is
clamped at `STRENGTHS` times its max activation on `IMAGES` held-out images that do not hold the concept; a
success is a caption naming the concept's word (a whole word) where the unsteered caption does not. Per concept:
the success rate at each strength, the best strength, the KL of the first token and the fluency (perplexity of
the steered caption under the unsteered model) there, and the same for `RANDOM_FEATURES` random features (seeded,
among those that fire; their rows pooled) at the same strengths. Two clamp placements: image tokens only (both
matches), and every position (the detector).
"""

from __future__ import annotations

import logging
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

GOAL = 0.8
BATCH = 64
NEW_TOKENS = 16
REPS = 9
IMAGES = 32
STRENGTHS = (2.0, 4.0, 8.0, 16.0)
RANDOM_FEATURES = 2
"""Random features per concept (their rows pooled into its random baseline)."""
PLACEMENTS = {"image": ("image",), "all": ("image", "prompt", "generated")}
MATCHES = {"image": ("f1_feature", "feature"), "all": ("f1_feature",)}
"""Which ground-truth matches each placement steers (the detector is the mine stage's headline match)."""
KINDS = ("color", "texture")
SEED = 0
LAYER = 0


def toy_world_run(workdir: str) -> dict[str, str]:
    """The toy world, layer-0 shards, SAE and top examples under ``workdir`` (demo profile, tracking off)."""
    from mmsae.config import load_config
    from mmsae.demo import DEMO_PROFILE
    from mmsae.stages import cache, mine, toyworld, train

    cfg = load_config(DEMO_PROFILE, [f"run.workdir={workdir}", "tracking.enabled=false", f"cache.layers=[{LAYER}]"])
    world = toyworld.run(cfg)
    shards = cache.run(cfg, image_set=world.uri, model=world.uris["lmm"])
    sae = train.run(cfg, shards=shards.uri)
    top = mine.run(cfg, shards=shards.uri, sae=sae.uri)
    return {"image_set": world.uri, "lmm": world.uris["lmm"], "top_examples": top.uri, "workdir": workdir}


def load_toy(run: dict[str, str]):
    """(lmm, sae, hookpoint, top examples, held-out split) of a :func:`toy_world_run`."""
    from mmsae.data.images import load_image_set
    from mmsae.examples import TopExamples
    from mmsae.models import load_lmm
    from mmsae.sae.checkpoint import load_sae

    top = TopExamples(run["top_examples"])
    lmm = load_lmm(run["lmm"])
    sae = load_sae(top.extra["sae_path"], dtype=torch.float32)
    return lmm, sae, top.extra["hookpoint"], top, load_image_set(run["image_set"], "heldout")


def main() -> dict[str, Any]:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="mmsae-bench-steer-") as tmp:
        run = toy_world_run(str(Path(tmp) / "work"))
        lmm, sae, hookpoint, top, heldout = load_toy(run)
        figures = {"hookpoint": hookpoint, "throughput": throughput(lmm, sae, hookpoint, heldout)}
        figures["concepts"] = {name: concept_figures(lmm, sae, hookpoint, top, heldout, positions, MATCHES[name])
                               for name, positions in PLACEMENTS.items()}
    return figures


# ---------------------------------------------------------------------------------------------------
# throughput


def throughput(lmm, sae, hookpoint: str, heldout) -> dict[str, Any]:
    from mmsae.models.toy import PROMPT
    from mmsae.steering import Clamp, Prompt, Steerer

    steerer = Steerer(lmm, sae, hookpoint)
    prompts = [Prompt(PROMPT, heldout[i]["image"].convert("RGB")) for i in range(BATCH)]
    enc = steerer.encode(prompts)
    clamps = [Clamp(f % sae.num_latents, 20.0) for f in range(BATCH)]
    tok = lmm.processor.tokenizer
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    def plain() -> None:
        with torch.no_grad():
            lmm.model.generate(**enc, **kwargs)

    def steered() -> None:
        with torch.no_grad(), steerer.clamping(clamps, enc):
            lmm.model.generate(**enc, **kwargs)

    plain(), steered()  # warm-up
    pairs: list[tuple[float, float]] = []
    for rep in range(REPS):
        took = {}
        for name, fn in ((("unsteered", plain), ("steered", steered)) if rep % 2 == 0 else
                         (("steered", steered), ("unsteered", plain))):
            start = time.perf_counter()
            fn()
            took[name] = time.perf_counter() - start
        pairs.append((took["unsteered"], took["steered"]))
    ratio = statistics.median(u / s for u, s in pairs)
    tokens = BATCH * NEW_TOKENS
    return {"batch": BATCH, "new_tokens": NEW_TOKENS,
            "unsteered_tokens_per_s": tokens / statistics.median(u for u, _ in pairs),
            "steered_tokens_per_s": tokens / statistics.median(s for _, s in pairs),
            "ratio": ratio, "goal": GOAL, "met": ratio >= GOAL}


# ---------------------------------------------------------------------------------------------------
# does steering a concept's feature make the caption name it?


def concept_figures(lmm, sae, hookpoint: str, top, heldout, positions: tuple[str, ...],
                    matches: tuple[str, ...] = ("f1_feature", "feature")) -> dict[str, Any]:
    """Per planted concept and match (detector, top-K), the dose-response of its feature and of a random one."""
    from mmsae.steering import Steerer

    steerer = Steerer(lmm, sae, hookpoint, positions=positions)
    truth = [c for c in top.ground_truth()["concepts"] if c["kind"] in KINDS]
    alive = sorted(r.feature for r in top.features() if r.max_activation > 0)
    rng = random.Random(SEED)
    out: dict[str, Any] = {}
    for match in matches:
        per_concept = {}
        for concept in truth:
            feature = concept[match]
            if feature is None:
                continue
            partners = rng.sample([f for f in alive if f != feature], RANDOM_FEATURES)
            per_concept[concept["concept"]] = _one_concept(steerer, top, heldout, concept["concept"], feature, partners)
        out[match] = {"concepts": per_concept, **_summary(per_concept)}
    return out


def _one_concept(steerer, top, heldout, concept: str, feature: int, partners: list[int]) -> dict[str, Any]:
    from mmsae.models.toy import PROMPT
    from mmsae.steering import Clamp, Prompt, dose_response, measure

    word = concept.split(":", 1)[1]
    without = [i for i in range(len(heldout)) if concept not in heldout[i]["concepts"]][:IMAGES]
    prompts = [Prompt(PROMPT, heldout[i]["image"].convert("RGB")) for i in without]
    enc = steerer.encode(prompts)
    base = steerer.generate(prompts, [None] * len(prompts), NEW_TOKENS, enc=enc)
    base_nll = steerer.output_nll(enc, base.tokens)
    rows: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for who, is_random in [(feature, False)] + [(p, True) for p in partners]:
        unit = top.feature(who).max_activation
        for strength in STRENGTHS:
            got = steerer.generate(prompts, [Clamp(who, strength * unit)] * len(prompts), NEW_TOKENS, enc=enc)
            nll = steerer.output_nll(enc, got.tokens)
            for n in range(len(prompts)):
                metrics = measure(got.texts[n], got.first_logits[n], nll[n], base.texts[n], base.first_logits[n],
                                  base_nll[n], [word])
                rows[is_random].append({"feature": who, "for_feature": feature, "strength": strength,
                                        "concept_words": [word], "metrics": metrics, "steered": got.texts[n]})
    summary = dose_response(rows[False], rows[True], STRENGTHS)["features"][str(feature)]
    curve = summary["strengths"]
    best = summary["best"]
    return {"feature": feature, "random_features": partners, "images": len(prompts),
            "success": {s: curve[s]["success_rate"] for s in curve},
            "random_success": {s: curve[s]["random_success_rate"] for s in curve},
            "best_strength": best["strength"] if best else None,
            "success_at_best": best["success_rate"] if best else None,
            "random_success_at_best": best["random_success_rate"] if best else None,
            "random_success_max": max((curve[s]["random_success_rate"] or 0.0) for s in curve),
            "kl_at_best": best["kl_mean"] if best else None, "perplexity_at_best": best["perplexity"] if best else None,
            "baseline_perplexity": statistics.median(
                [r["metrics"]["baseline_perplexity"] for r in rows[False] if r["metrics"]["baseline_perplexity"]]),
            "example": next((r["steered"] for r in rows[False] if r["metrics"]["success"]
                             and r["strength"] == (best or {}).get("strength")), None)}


def _summary(per_concept: dict[str, dict[str, Any]]) -> dict[str, Any]:
    values = [v for v in per_concept.values() if v["success_at_best"] is not None]

    def mean(key: str) -> float | None:
        kept = [v[key] for v in values if v[key] is not None]
        return sum(kept) / len(kept) if kept else None

    return {"concepts_over_half": sum(v["success_at_best"] > 0.5 for v in values), "concepts_measured": len(values),
            "success_at_best_mean": mean("success_at_best"), "random_success_at_best_mean": mean("random_success_at_best"),
            "random_success_max_mean": mean("random_success_max"), "kl_at_best_mean": mean("kl_at_best"),
            "perplexity_at_best_median": statistics.median([v["perplexity_at_best"] for v in values])
            if values else None}
