"""Stage steer: clamp each chosen feature while the LMM generates, and measure how its output moves.

Reads: a top-examples artifact (``steer.top_examples``; the mine stage's output), which names the SAE, its
hook point, the activation shards and through them the LMM, the image set, its split and the prompt; each
feature's max activation (the unit of ``steer.strengths``) and, on the toy world, ``ground_truth.json``;
an explanations artifact (``steer.explanations``) for the features to steer and their concepts; optionally
an attributions artifact (``steer.attributions``) whose top features are steered instead (``steer.source``). Writes a steering
artifact at ``steer.out``:

    manifest.json           kind "steering", format 1; extra: hookpoint, positions, strengths, strength_unit,
                            features, figures, output_key
    steering.jsonl          one row per (feature, strength, prompt): feature, strength, value (the clamp in
                            activation units), prompt, image_idx, baseline_output, steered_output,
                            concept_words, metrics {kl_first_token, concept_hit, baseline_hit, success,
                            changed, steered_perplexity, baseline_perplexity}
    random_baseline.jsonl   the same rows for the random features (feature = the random one, for_feature = the
                            steered feature whose concept and strengths it is measured with)
    dose_response.json      per feature, per strength: its rates and means, beside the random baseline's
    dose_response.png       success rate against strength per feature, and the random baseline

Metrics (`mmsae.steering.measure`). ``kl_first_token``: KL(steered || unsteered) of the first generated token's
distribution. ``concept_hit``: the steered output names one of the feature's concept words, as a whole word:
on the toy world the planted concept the mine stage matched to the feature (``ground_truth.json``, top-K match
or best detector), else the content words of its explanation (status ok); None without either.
``success``: a hit where the unsteered output names none of the words (None where it already does: such
prompts are left out of the success rate). ``steered_perplexity``: of the steered output under the unsteered
model, given the prompt (fluency); ``baseline_perplexity`` the same of the unsteered output.

Headline figures: per feature its best strength (highest success rate), averaged over features (success, KL,
perplexity, the random baseline's success there), the curve over strengths averaged over features
(``by_strength``), and on the toy world the same per planted concept whose match was steered (``by_concept``).

Features: ``steer.features`` when given, else (``steer.source``) those the explain stage explained with status ok
(on the toy world the planted concepts' matches first), or the top features of ``steer.attributions``; at most
``steer.max_features``. Prompts: every text of
``steer.prompts`` (default: the shards' prompt) with each of ``steer.images`` held-out images.

A sealed artifact made from the same key (the settings that shape it and the fingerprints of the top examples,
explanations, attributions, SAE, LMM and image set) is reused; another is refused unless ``run.overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from mmsae import examples, storage
from mmsae.config import RunConfig, SteerConfig
from mmsae.stages._base import (
    KEY_FIELD,
    OutputKey,
    StageContext,
    StageOutputs,
    resolve_uri,
    reusable_output,
    stage_context,
)
from mmsae.steering import (
    Clamp,
    Prompt,
    Steerer,
    SteerError,
    concept_words_of,
    dose_response,
    measure,
    words_of,
)

log = logging.getLogger(__name__)

STEP = "steer"
KIND = "steering"
FORMAT_VERSION = 1
RECORDS_FILE = "steering.jsonl"
RANDOM_FILE = "random_baseline.jsonl"
DOSE_FILE = "dose_response.json"
PLOT_FILE = "dose_response.png"
NOT_IN_KEY = ("top_examples", "explanations", "attributions", "out", "device", "batch_size")
"""Steer settings outside the output key: the inputs (covered by their fingerprints), the output, and the
settings that only place or pace the work (outputs do not depend on how prompts are batched)."""

__all__ = ["KIND", "RECORDS_FILE", "LmmInputs", "SteerError", "heldout_images", "heldout_split", "load_models",
           "open_lmm_inputs", "run"]


def run(cfg: RunConfig, top_examples: str | None = None, explanations: str | None = None,
        attributions: str | None = None, parent_run_id: str | None = None) -> StageOutputs:
    """Steer the chosen features; the URIs override the config's (the pipeline's inputs)."""
    workdir = cfg.run.workdir
    s = cfg.steer.model_copy(update={
        "top_examples": resolve_uri(top_examples, cfg.steer.top_examples, workdir, "mine"),
        "explanations": _optional(explanations or cfg.steer.explanations, workdir, "explain"),
        "attributions": storage.absolute(attributions or cfg.steer.attributions) if (
            attributions or cfg.steer.attributions) else "",
        "out": resolve_uri(None, cfg.steer.out, workdir, STEP),
    })
    with stage_context(cfg, STEP, {"steer": s.model_dump(mode="json")}, parent_run_id, output=s.out) as ctx:
        inputs = open_lmm_inputs(s.top_examples, "steer.top_examples")
        key = output_key(s, inputs)
        sealed = reusable_output(s.out, KIND, key, overwrite=ctx.overwrite, setting="steer.out")
        figures = dict(sealed.extra["figures"]) if sealed is not None else _steer(cfg, s, inputs, key, ctx)
        ctx.finish(figures)
    return StageOutputs(s.out, figures)


def output_key(s: SteerConfig, inputs: LmmInputs) -> OutputKey:
    """What steering results are made from: the settings that shape them and every input's fingerprint."""
    return OutputKey.of(s.model_dump(mode="json", exclude=set(NOT_IN_KEY)), _inputs_used(s, inputs))


def _inputs_used(s: SteerConfig, inputs: LmmInputs) -> dict[str, str]:
    """The inputs the results depend on (the attributions only when they choose the features)."""
    attributed = s.source == "attributed" and not s.features
    uris = {"top_examples": s.top_examples, "explanations": s.explanations,
            "attributions": s.attributions if attributed else "", **inputs.fingerprinted()}
    return {name: uri for name, uri in uris.items() if uri}


def _optional(uri: str, workdir: str, default: str) -> str:
    """An optional input: the URI given, else the workdir's default when an artifact is there, else ''."""
    if uri:
        return storage.absolute(uri)
    candidate = storage.absolute(storage.join(workdir, default))
    return candidate if storage.exists(storage.join(candidate, storage.MANIFEST_NAME)) else ""


# ---------------------------------------------------------------------------------------------------
# inputs (shared with the attribute stage)


@dataclass
class LmmInputs:
    """What a top-examples artifact names: the SAE and its hook point, the LMM, the image set and prompt."""

    top: examples.TopExamples
    sae_path: str
    hookpoint: str
    model: str
    image_set: str
    split: str | None
    prompt: str

    def fingerprinted(self) -> dict[str, str]:
        return {"sae": self.sae_path, "model": self.model, "image_set": self.image_set}


def open_lmm_inputs(uri: str, setting: str) -> LmmInputs:
    """The inputs named by the top examples at ``uri``; an error names what is missing."""
    from mmsae.activations import ActivationShards
    from mmsae.stages._base import model_prompt

    try:
        top = examples.TopExamples(uri)
    except (FileNotFoundError, storage.ManifestError) as e:
        raise SteerError(f"{setting} {uri} holds no top examples ({e}); run the mine stage first") from e
    shards_uri = str(top.manifest.inputs.get("shards", ""))
    try:
        shards = ActivationShards(shards_uri)
    except (FileNotFoundError, storage.ManifestError) as e:
        raise SteerError(f"the shards {shards_uri!r} named by the top examples at {uri} cannot be read ({e})") from e
    if not shards.model or not shards.image_set:
        raise SteerError(f"the shards at {shards_uri} name no LMM or no image set; both are needed to steer")
    sae_path = str(top.extra.get("sae_path") or top.manifest.inputs.get("sae", ""))
    return LmmInputs(top, sae_path, str(top.extra.get("hookpoint", "")), shards.model, shards.image_set,
                     shards.split, shards.prompt or model_prompt(shards.model))


def heldout_split(cfg: RunConfig, inputs: LmmInputs) -> tuple[Any, list[int]]:
    """The held-out images: ``(dataset, indices)`` of the image set's ``heldout`` split when it has one (all of
    it), else of the cached split, the images the train stage held out."""
    from mmsae.data.images import ImageSetError, load_image_set
    from mmsae.training.counting import heldout_images as held_mask

    try:
        ds = load_image_set(inputs.image_set, "heldout")
        return ds, list(range(len(ds)))
    except ImageSetError:
        ds = load_image_set(inputs.image_set, inputs.split)
        index = torch.arange(len(ds))
        return ds, index[held_mask(index, cfg.train.heldout_fraction, cfg.train.seed)].tolist()


def heldout_images(cfg: RunConfig, inputs: LmmInputs, count: int) -> list[tuple[int, Any]]:
    """The first ``count`` held-out images as ``(image_idx, RGB image)`` (see :func:`heldout_split`)."""
    ds, chosen = heldout_split(cfg, inputs)
    if not chosen:
        raise SteerError(f"the image set {inputs.image_set} has no held-out image (no `heldout` split, and "
                         f"train.heldout_fraction={cfg.train.heldout_fraction} holds none of its images out)")
    return [(i, ds[i]["image"].convert("RGB")) for i in chosen[:count]]


def load_models(inputs: LmmInputs, dtype: str, device: torch.device):
    """The LMM and the SAE (float32) on ``device``."""
    from mmsae.models import load_lmm
    from mmsae.sae.checkpoint import load_sae

    lmm = load_lmm(inputs.model, dtype=dtype, device=device)
    return lmm, load_sae(inputs.sae_path, device=device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------
# what to steer


def choose_features(s: SteerConfig, inputs: LmmInputs, explained: dict[int, str]) -> list[int]:
    """The features to steer (see the module docstring), at most ``steer.max_features``."""
    if s.features:
        chosen, source = list(dict.fromkeys(s.features)), "steer.features"
    elif s.source == "attributed":
        if not s.attributions:
            raise SteerError("steer.source=attributed needs the attribute stage's output: set steer.attributions")
        chosen, source = _attributed(s), f"the attributions at {s.attributions}"
    elif explained:
        planted = {c.get(k) for c in (inputs.top.ground_truth() or {}).get("concepts", [])
                   for k in ("f1_feature", "feature")}
        chosen = sorted(explained, key=lambda f: (f not in planted, f))  # planted concepts' matches first
        source = f"the explanations at {s.explanations}"
    else:
        raise SteerError("no features to steer: set steer.features, or steer.source=attributed, or run the explain "
                         f"stage (steer.explanations {s.explanations or '(none found)'} holds no explanation "
                         "with status ok)")
    mined = {r.feature for r in inputs.top.features()}
    unmined = [f for f in chosen if f not in mined]
    if unmined:
        raise SteerError(f"features {unmined[:8]} from {source} were not mined in {inputs.top.uri}: their max "
                         "activation and concepts are unknown")
    if len(chosen) > s.max_features:
        log.warning("steering the first %d of %d features from %s (steer.max_features)", s.max_features,
                    len(chosen), source)
    return chosen[: s.max_features]


def _attributed(s: SteerConfig) -> list[int]:
    from mmsae.stages.attribute import RECORDS_FILE as ATTRIBUTION_FILE

    manifest = storage.read_manifest(s.attributions, kind="attributions")
    text = storage.read_verified_bytes(s.attributions, ATTRIBUTION_FILE, manifest).decode()
    counts: dict[int, int] = {}
    for line in text.splitlines():
        if line.strip():
            for entry in json.loads(line)["top_features"][: s.attribution_top]:
                counts[int(entry["feature"])] = counts.get(int(entry["feature"]), 0) + 1
    return sorted(counts, key=lambda f: (-counts[f], f))


def read_explained(uri: str) -> dict[int, str]:
    """feature -> explanation of the features explained with status ok ({} without explanations)."""
    if not uri:
        return {}
    from mmsae.stages.explain import KIND as EXPLAIN_KIND
    from mmsae.stages.explain import RECORDS_FILE as EXPLAIN_FILE

    try:
        manifest = storage.read_manifest(uri, kind=EXPLAIN_KIND)
    except (FileNotFoundError, storage.ManifestError) as e:
        raise SteerError(f"steer.explanations {uri} holds no explanations ({e})") from e
    rows = [json.loads(x) for x in storage.read_verified_bytes(uri, EXPLAIN_FILE, manifest).decode().splitlines()
            if x.strip()]
    return {int(r["feature"]): str(r["explanation"]) for r in rows if r.get("status") == "ok" and r.get("explanation")}


def random_partners(features: Sequence[int], top: examples.TopExamples, seed: int) -> dict[int, int]:
    """One random feature per steered feature (seeded), among features that fire and are not steered."""
    chosen = set(features)
    pool = sorted(r.feature for r in top.features() if r.max_activation > 0 and r.feature not in chosen)
    if not pool:
        return {}
    rng = random.Random(seed)
    return {f: rng.choice(pool) for f in features}


# ---------------------------------------------------------------------------------------------------
# the work


@dataclass(frozen=True)
class _Job:
    """One generation: a clamp on one prompt, for a steered feature (its own, or its random partner's)."""

    feature: int
    strength: float
    value: float
    prompt: int
    for_feature: int
    random: bool


@dataclass
class _Results:
    rows: list[dict[str, Any]] = field(default_factory=list)
    random_rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _steer(cfg: RunConfig, s: SteerConfig, inputs: LmmInputs, key: OutputKey, ctx: StageContext) -> dict[str, Any]:
    """Steer, write the artifact (sealed last) and return its figures."""
    explained = read_explained(s.explanations)
    features = choose_features(s, inputs, explained)
    words = {f: concept_words_of(f, inputs.top.ground_truth(), explained.get(f)) for f in features}
    partners = random_partners(features, inputs.top, s.seed) if s.random_baseline else {}
    _check_strengths(s)
    images = heldout_images(cfg, inputs, s.images)
    texts = s.prompts or [inputs.prompt]
    prompts = [(idx, Prompt(text, img)) for text in texts for idx, img in images]
    lmm, sae = load_models(inputs, s.dtype, ctx.device(s.device))
    steerer = Steerer(lmm, sae, inputs.hookpoint, positions=s.positions)
    jobs = _jobs(s, inputs.top, features, partners, len(prompts))
    steerer.check([Clamp(j.feature, j.value) for j in jobs])  # every bad input before any generation
    results = _generate_all(s, steerer, prompts, jobs, words, ctx)
    summary = dose_response(results.rows, results.random_rows, s.strengths)
    figures = _figures(summary, results, len(features))
    planted = _by_concept(results, inputs.top.ground_truth(), s.strengths)
    if planted:
        figures["by_concept"] = planted
    _write(s, inputs, results, summary, figures, features, key, ctx)
    return figures


def _check_strengths(s: SteerConfig) -> None:
    import math

    bad = [x for x in s.strengths if not math.isfinite(x)]
    if bad or not s.strengths:
        raise SteerError(f"steer.strengths {s.strengths}: give one or more finite numbers")


def _jobs(s: SteerConfig, top: examples.TopExamples, features: Sequence[int], partners: dict[int, int],
          n_prompts: int) -> list[_Job]:
    """Every (feature or its random partner, strength, prompt) to generate."""
    def value(feature: int, strength: float) -> float:
        unit = top.feature(feature).max_activation if s.strength_unit == "max_activation" else 1.0
        return float(strength) * unit

    jobs = []
    for f in features:
        for who, is_random in [(f, False)] + ([(partners[f], True)] if f in partners else []):
            for strength in s.strengths:
                jobs += [_Job(who, float(strength), value(who, strength), p, f, is_random) for p in range(n_prompts)]
    return jobs


def _generate_all(s: SteerConfig, steerer: Steerer, prompts: list[tuple[int, Prompt]], jobs: list[_Job],
                  words: dict[int, list[str]], ctx: StageContext) -> _Results:
    """The unsteered outputs of every prompt, then every job in batches, measured against them."""
    results = _Results()
    start = time.perf_counter()
    baseline = {}
    for first in range(0, len(prompts), s.batch_size):
        part = prompts[first: first + s.batch_size]
        enc = steerer.encode([p for _, p in part])
        out = steerer.generate([p for _, p in part], [None] * len(part), s.max_new_tokens, enc=enc)
        nll = steerer.output_nll(enc, out.tokens)
        for i in range(len(part)):
            baseline[first + i] = (out.texts[i], out.first_logits[i], nll[i])
    done = 0
    with tqdm(total=len(jobs), desc="steer", unit="generation") as bar:
        for first in range(0, len(jobs), s.batch_size):
            batch = jobs[first: first + s.batch_size]
            batch_prompts = [prompts[j.prompt][1] for j in batch]
            enc = steerer.encode(batch_prompts)
            out = steerer.generate(batch_prompts, [Clamp(j.feature, j.value) for j in batch], s.max_new_tokens,
                                   enc=enc)
            nll = steerer.output_nll(enc, out.tokens)
            for i, job in enumerate(batch):
                base_text, base_logits, base_nll = baseline[job.prompt]
                metrics = measure(out.texts[i], out.first_logits[i], nll[i], base_text, base_logits, base_nll,
                                  words[job.for_feature])
                row = {"feature": job.feature, "strength": job.strength, "value": job.value,
                       "prompt": prompts[job.prompt][1].text, "image_idx": prompts[job.prompt][0],
                       "baseline_output": base_text, "steered_output": out.texts[i],
                       "concept_words": words[job.for_feature], "metrics": metrics}
                if job.random:
                    results.random_rows.append({**row, "for_feature": job.for_feature})
                else:
                    results.rows.append(row)
            done += len(batch)
            bar.update(len(batch))
            ctx.log_progress({"generations": done, "generations_per_s": done / (time.perf_counter() - start)},
                             step=done)
    results.seconds = time.perf_counter() - start
    return results


# ---------------------------------------------------------------------------------------------------
# the artifact


def _figures(summary: dict[str, Any], results: _Results, n_features: int) -> dict[str, Any]:
    """Headline figures: the best strength's success per feature (mean), its KL and fluency, the random
    baseline's, and the curve over strengths averaged over features."""
    per_feature = [v for v in summary["features"].values() if v["best"] is not None]
    def mean(values: list[float | None]) -> float | None:
        kept = [v for v in values if v is not None]
        return sum(kept) / len(kept) if kept else None

    n = len(results.rows) + len(results.random_rows)
    return {
        "features_steered": n_features,
        "features_with_concept": len(per_feature),
        "generations": n,
        "generations_per_s": n / results.seconds if results.seconds > 0 else 0.0,
        "success_best": mean([v["best"]["success_rate"] for v in per_feature]),
        "success_best_random": mean([v["best"]["random_success_rate"] for v in per_feature]),
        "features_success_over_half": mean([float((v["best"]["success_rate"] or 0) > 0.5) for v in per_feature]),
        "kl_at_best": mean([v["best"]["kl_mean"] for v in per_feature]),
        "perplexity_at_best": mean([v["best"]["perplexity"] for v in per_feature]),
        "baseline_perplexity": summary["baseline_perplexity"],
        "by_strength": summary["by_strength"],
    }


def _by_concept(results: _Results, truth: dict[str, Any] | None, strengths: Sequence[float]) -> dict[str, Any]:
    """Toy world: per planted concept whose match was steered (its best detector, else its top-K match), the
    success (the concept's own word newly named), KL and fluency at the best strength, beside the random
    baseline's success there."""
    out = {}
    steered = {r["feature"] for r in results.rows}
    for match in (truth or {}).get("concepts", []):
        feature = next((f for f in (match.get("f1_feature"), match.get("feature")) if f in steered), None)
        if feature is None:
            continue
        word = [str(match["concept"]).split(":", 1)[-1]]
        own = [_rejudged(r, word) for r in results.rows if r["feature"] == feature]
        other = [_rejudged(r, word) for r in results.random_rows if r["for_feature"] == feature]
        best = dose_response(own, other, strengths)["features"][str(feature)]["best"]
        if best is not None:
            out[str(match["concept"])] = {"feature": feature, "strength": best["strength"],
                                          "success": best["success_rate"], "random": best["random_success_rate"],
                                          "kl": best["kl_mean"], "perplexity": best["perplexity"]}
    return out


def _rejudged(row: dict[str, Any], words: list[str]) -> dict[str, Any]:
    """A row whose concept hit and success are judged on ``words`` alone."""
    hit = bool(words_of(row["steered_output"]) & set(words))
    before = bool(words_of(row["baseline_output"]) & set(words))
    metrics = {**row["metrics"], "concept_hit": hit, "baseline_hit": before, "success": None if before else hit}
    return {**row, "concept_words": words, "metrics": metrics}


def _write(s: SteerConfig, inputs: LmmInputs, results: _Results, summary: dict[str, Any], figures: dict[str, Any],
           features: list[int], key: OutputKey, ctx: StageContext) -> None:
    files = {
        RECORDS_FILE: "".join(storage.json_text(r) + "\n" for r in results.rows).encode(),
        RANDOM_FILE: "".join(storage.json_text(r) + "\n" for r in results.random_rows).encode(),
        DOSE_FILE: storage.json_text(summary, indent=1).encode(),
    }
    plot = _plot(summary, s.strength_unit)
    if plot is not None:
        files[PLOT_FILE] = plot
    for name, data in files.items():
        storage.write_bytes(storage.join(s.out, name), data)
    entries = {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for name, data in files.items()}
    storage.write_manifest(
        s.out, KIND, files=entries, config={"steer": s.model_dump(mode="json")},
        inputs=_inputs_used(s, inputs), format_version=FORMAT_VERSION,
        extra={"hookpoint": inputs.hookpoint, "positions": list(s.positions), "strengths": list(s.strengths),
               "strength_unit": s.strength_unit, "features": features, "figures": figures,
               KEY_FIELD: key.to_json()})
    if plot is not None:
        _log_plot(plot, ctx)
    log.info("steered %d features at %s: %s", len(features), s.out, {k: v for k, v in figures.items()
                                                                      if k != "by_strength"})


def _plot(summary: dict[str, Any], unit: str) -> bytes | None:
    """The dose-response curves as PNG bytes (None when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no dose-response plot")
        return None
    import io

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for feature, entry in summary["features"].items():
        xs = [float(x) for x in entry["strengths"]]
        ys = [entry["strengths"][x]["success_rate"] for x in entry["strengths"]]
        if any(y is not None for y in ys):
            ax.plot(xs, [y if y is not None else float("nan") for y in ys], marker="o", alpha=0.6, label=f"f{feature}")
    curve = summary["by_strength"]
    xs = [float(x.lstrip("x")) for x in curve]
    ax.plot(xs, [curve[x]["random_success_rate"] or 0.0 for x in curve], "k--", label="random feature")
    ax.set_xlabel(f"strength ({'x max activation' if unit == 'max_activation' else 'activation units'})")
    ax.set_ylabel("success rate (concept newly named)")
    ax.set_ylim(-0.02, 1.02)
    if len(summary["features"]) <= 12:
        ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _log_plot(plot: bytes, ctx: StageContext) -> None:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="mmsae-steer-") as tmp:
        local = Path(tmp) / PLOT_FILE
        local.write_bytes(plot)
        ctx.tracker.log_artifact(local, STEP)
