"""Stage attribute: the SAE features behind an answer token, every feature at every position at once.

Reads: a top-examples artifact (``attribute.top_examples``; the mine stage's output), which names the SAE, its
hook point, the tokens it was mined on, and through the activation shards the LMM, the image set and the
prompt; on the toy world its ``ground_truth.json``. Writes an attributions artifact at ``attribute.out``:

    manifest.json        kind "attributions", format 1; extra: hookpoint, positions, figures, output_key
    attributions.jsonl   one row per example: example, image_idx, prompt, answer, baseline (tokens as text),
                         metric (logit(answer) - logit(baseline) at the last position), features_total and
                         error_total (the attributions summed over features and positions, and the error node's),
                         top_features [{feature, attribution, image_share}] (highest first; image_share: the
                         share of its positive attribution on image tokens)
    maps.safetensors     per example i: ``i.input_ids``, ``i.view``, ``i.row``, ``i.col`` [positions] (the token
                         geometry, `mmsae.models.geometry`), ``i.features`` [top] and ``i.maps`` [top, positions]
                         (each top feature's attribution per position), ``i.total`` and ``i.error`` [positions]
                         (all features' and the error node's)
    heatmaps/e{example:04d}-f{feature:06d}.png, heatmaps/e{example:04d}-total.png
                         the positive image-token attribution of the first ``attribute.heatmaps`` top features (and
                         of all features) over the image, as the mine stage's heat maps

The attribution is `mmsae.attribution.attribute`: the SAE spliced in with its error term, one forward and one
backward pass per batch of examples whatever the number of features. Features are attributed at the kind of
tokens the SAE was mined on (the top examples' ``tokens``: image, text or all).

Examples: ``attribute.examples`` (image, prompt, answer and baseline tokens), else automatic ones: held-out
images captioned by the LMM with the shards' prompt, each cut before the first token of
``attribute.answer_words`` its caption names; that token is the answer, the baseline is the answer word the LMM
ranks highest there among those its caption does not name (a concept it does not see, rather than the other
object's).

On the toy world the figures say whether the top attributed feature (of the examples where some feature's
attribution is positive: ``concept_examples``) stands for the answer's planted concept:
``top_is_matched`` (it is the mine stage's match for that concept: top-K match or best detector) and
``top_is_concept`` (its top images mostly, at least `CONCEPT_PRECISION`, hold the concept), each beside the
same share for a feature drawn at random among those active on the example (``_random``).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from mmsae import storage
from mmsae.attribution import Attribution, AttributionError, attribute, single_token
from mmsae.config import AttributeConfig, RunConfig
from mmsae.stages._base import (
    KEY_FIELD,
    OutputKey,
    StageContext,
    StageOutputs,
    resolve_uri,
    reusable_output,
    stage_context,
)
from mmsae.stages.steer import LmmInputs, heldout_split, load_models, open_lmm_inputs
from mmsae.steering import Prompt, Steerer, inert_positions

log = logging.getLogger(__name__)

STEP = "attribute"
KIND = "attributions"
FORMAT_VERSION = 1
RECORDS_FILE = "attributions.jsonl"
MAPS_FILE = "maps.safetensors"
NOT_IN_KEY = ("top_examples", "out", "device", "batch_size")
CONCEPT_PRECISION = 0.8
"""Toy world: a feature stands for a concept when at least this share of its top images hold it."""
DEFAULT_ANSWER_WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "white")
"""The toy world's colours: the automatic examples' answers when attribute.answer_words is empty."""

__all__ = ["KIND", "MAPS_FILE", "RECORDS_FILE", "AttributionError", "concept_share", "run"]


def run(cfg: RunConfig, top_examples: str | None = None, parent_run_id: str | None = None) -> StageOutputs:
    """Attribute the examples' answers; ``top_examples`` overrides the config's URI (the pipeline's input)."""
    workdir = cfg.run.workdir
    a = cfg.attribute.model_copy(update={
        "top_examples": resolve_uri(top_examples, cfg.attribute.top_examples, workdir, "mine"),
        "out": resolve_uri(None, cfg.attribute.out, workdir, STEP),
    })
    with stage_context(cfg, STEP, {"attribute": a.model_dump(mode="json")}, parent_run_id, output=a.out) as ctx:
        inputs = open_lmm_inputs(a.top_examples, "attribute.top_examples")
        key = OutputKey.of(a.model_dump(mode="json", exclude=set(NOT_IN_KEY)),
                           {"top_examples": a.top_examples, **inputs.fingerprinted()})
        sealed = reusable_output(a.out, KIND, key, overwrite=ctx.overwrite, setting="attribute.out")
        figures = dict(sealed.extra["figures"]) if sealed is not None else _attribute(cfg, a, inputs, key, ctx)
        ctx.finish(figures)
    return StageOutputs(a.out, figures)


# ---------------------------------------------------------------------------------------------------
# examples


@dataclass
class _Example:
    image_idx: int
    prompt: Prompt
    answer: int
    baseline: int | None
    candidates: list[int]


def _examples(cfg: RunConfig, a: AttributeConfig, inputs: LmmInputs, steerer: Steerer) -> list[_Example]:
    """The configured examples, else the automatic ones (see the module docstring)."""
    tokenizer = steerer.lmm.processor.tokenizer
    ds, held = heldout_split(cfg, inputs)
    if a.examples:
        out = []
        for e in a.examples:
            if e.image_idx >= len(ds):
                raise AttributionError(f"attribute.examples: image_idx {e.image_idx} is beyond the {len(ds)} images "
                                       f"of {inputs.image_set}")
            out.append(_Example(e.image_idx, Prompt(e.prompt, ds[e.image_idx]["image"].convert("RGB")),
                                single_token(tokenizer, e.answer), single_token(tokenizer, e.baseline), []))
        return out
    words = list(a.answer_words or DEFAULT_ANSWER_WORDS)
    word_ids = [single_token(tokenizer, w) for w in words]
    chosen = [(i, ds[i]["image"].convert("RGB")) for i in held[: a.images]]
    out = []
    for first in range(0, len(chosen), a.batch_size):
        part = chosen[first: first + a.batch_size]
        captions = steerer.generate([Prompt(inputs.prompt, img) for _, img in part], [None] * len(part),
                                    a.max_new_tokens)
        for (idx, img), tokens in zip(part, captions.tokens, strict=True):
            example = _cut(steerer, inputs.prompt, img, idx, tokens, word_ids)
            if example is not None:
                out.append(example)
    log.info("%d of %d captions name one of %s", len(out), len(chosen), words)
    return out


def _cut(steerer: Steerer, prompt: str, image: Any, image_idx: int, tokens: list[int],
         word_ids: list[int]) -> _Example | None:
    """The example of one caption: the prompt and caption up to its first answer word (None: it names none, or
    its text does not encode back to the same tokens)."""
    at = next((n for n, t in enumerate(tokens) if t in word_ids), None)
    if at is None:
        return None
    tokenizer = steerer.lmm.processor.tokenizer
    text = f"{prompt} {tokenizer.decode(tokens[:at])}" if at else prompt
    ids = steerer.encode([Prompt(text, image)])["input_ids"][0].tolist()
    if at and ids[-at:] != tokens[:at]:
        log.warning("image %d: the caption's first %d tokens do not encode back to themselves; skipped", image_idx, at)
        return None
    return _Example(image_idx, Prompt(text, image), tokens[at], None, [w for w in word_ids if w not in tokens])


# ---------------------------------------------------------------------------------------------------
# the work


def _attribute(cfg: RunConfig, a: AttributeConfig, inputs: LmmInputs, key: OutputKey,
               ctx: StageContext) -> dict[str, Any]:
    lmm, sae = load_models(inputs, a.dtype, ctx.device(a.device))
    tokens_kind = str(inputs.top.extra.get("tokens", "image"))
    steerer = Steerer(lmm, sae, inputs.hookpoint, positions=("image",) if tokens_kind == "image" else ("prompt",))
    if inert_positions(steerer.point.index, steerer.n_layers, ("image",)) and tokens_kind != "text":
        log.warning("hook point %s is the last decoder layer's: nothing after it reads image tokens, so their "
                    "attributions are 0; attribute at an earlier layer", steerer.point.name)
    examples = _examples(cfg, a, inputs, steerer)
    if not examples:
        raise AttributionError("no example to attribute: give attribute.examples, or caption images whose captions "
                               f"name one of attribute.answer_words {a.answer_words or list(DEFAULT_ANSWER_WORDS)}")
    rows, maps, images = [], {}, {}
    tokenizer = lmm.processor.tokenizer
    for first in tqdm(range(0, len(examples), a.batch_size), desc="attribute", unit="batch"):
        part = examples[first: first + a.batch_size]
        enc = steerer.encode([e.prompt for e in part])
        masks = steerer.position_masks(enc)
        where = {"image": masks["image"], "text": masks["prompt"]}.get(tokens_kind, masks["image"] | masks["prompt"])
        results = attribute(lmm, sae, inputs.hookpoint, enc, [e.answer for e in part], [e.baseline for e in part],
                            candidates=sorted({c for e in part for c in e.candidates}), where=where)
        geometry = _geometry(steerer, enc)
        for n, (e, result) in enumerate(zip(part, results, strict=True)):
            i = first + n
            real = enc["attention_mask"][n].bool().cpu()
            layout = {k: v[n][real] for k, v in geometry.items()}
            rows.append(_row(i, e, result, a.top_features, sae.num_latents, layout["view"], tokenizer))
            input_ids = enc["input_ids"][n].cpu()[real]
            maps.update(_maps(i, result, rows[-1]["top_features"], input_ids, layout))
            images[i] = (e.prompt.image, layout)
        ctx.log_progress({"examples": len(rows)}, step=len(rows))
    figures = _figures(rows, inputs, a.seed)
    _write(a, inputs, rows, maps, images, figures, key, tokens_kind)
    return figures


def _geometry(steerer: Steerer, enc: dict[str, Any]) -> dict[str, torch.Tensor]:
    from mmsae.models.geometry import token_geometry

    lmm = steerer.lmm
    g = token_geometry(lmm.family, lmm.config, enc["input_ids"].cpu(), enc.get("image_sizes"), lmm.processor,
                       batch_num_images=enc.get("batch_num_images"))
    return {"view": torch.as_tensor(g.view), "row": torch.as_tensor(g.row), "col": torch.as_tensor(g.col)}


def _row(i: int, e: _Example, result: Attribution, top: int, num_latents: int, view: torch.Tensor,
         tokenizer: Any) -> dict[str, Any]:
    """One line of attributions.jsonl."""
    on_image = (view >= 0) | (view < -1)  # patches, newlines and CLS: every image token
    entries = []
    for feature, value in result.top_features(top, num_latents):
        positive = result.feature_map(feature).clamp_min(0)
        total = float(positive.sum())
        entries.append({"feature": feature, "attribution": value,
                        "image_share": float(positive[on_image].sum()) / total if total > 0 else None,
                        "active": bool((result.indices == feature).logical_and(result.acts > 0).any())})
    return {"example": i, "image_idx": e.image_idx, "prompt": e.prompt.text,
            "answer": tokenizer.decode([result.answer]).strip(), "baseline": tokenizer.decode([result.baseline]).strip(),
            "answer_id": result.answer, "baseline_id": result.baseline, "metric": result.metric,
            "features_total": float(result.scores.sum()), "error_total": float(result.error.sum()),
            "active_features": result.active_features(), "top_features": entries}


def _maps(i: int, result: Attribution, top: list[dict[str, Any]], input_ids: torch.Tensor,
          layout: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    features = [t["feature"] for t in top]
    stacked = torch.stack([result.feature_map(f) for f in features]) if features else torch.zeros(0, len(input_ids))
    return {f"{i}.input_ids": input_ids.to(torch.int64), f"{i}.view": layout["view"].to(torch.int16),
            f"{i}.row": layout["row"].to(torch.int16), f"{i}.col": layout["col"].to(torch.int16),
            f"{i}.features": torch.tensor(features, dtype=torch.int64), f"{i}.maps": stacked.float().contiguous(),
            f"{i}.total": result.scores.sum(-1).float(), f"{i}.error": result.error.float()}


# ---------------------------------------------------------------------------------------------------
# figures


def _figures(rows: list[dict[str, Any]], inputs: LmmInputs, seed: int) -> dict[str, Any]:
    def mean(values: Sequence[float]) -> float | None:
        return sum(values) / len(values) if values else None

    error = [abs(r["error_total"]) / (abs(r["error_total"]) + abs(r["features_total"]) + 1e-12) for r in rows]
    figures: dict[str, Any] = {"examples": len(rows), "metric_mean": mean([r["metric"] for r in rows]),
                               "error_share": mean(error),
                               "active_features_mean": mean([len(r["active_features"]) for r in rows])}
    truth = inputs.top.ground_truth()
    if truth is not None:
        figures.update(_concept_figures(rows, inputs, truth, seed))
    return figures


def _concept_figures(rows: list[dict[str, Any]], inputs: LmmInputs, truth: dict[str, Any],
                     seed: int) -> dict[str, Any]:
    """Toy world: does the top attributed feature stand for the answer's planted concept (module docstring)?"""
    from mmsae.data.images import load_image_set

    concepts = {str(c["concept"]).split(":", 1)[-1]: str(c["concept"]) for c in truth.get("concepts", [])}
    matched = {str(c["concept"]): {c.get("feature"), c.get("f1_feature")} - {None} for c in truth.get("concepts", [])}
    mined_concepts = load_image_set(inputs.image_set, inputs.split)["concepts"]  # what top images index
    rng = random.Random(seed)

    def precision(feature: int, concept: str) -> float:
        return concept_share(inputs.top, mined_concepts, feature, concept)

    # an example whose features all attribute nothing positive (e.g. image tokens at the last layer) has no top
    # feature: the highest of equal zeros would be arbitrary
    scored = [r for r in rows if r["answer"] in concepts and r["top_features"] and r["active_features"]
              and r["top_features"][0]["attribution"] > 0]
    out: dict[str, list[float]] = {"top_is_matched": [], "top_is_matched_random": [], "top_is_concept": [],
                                   "top_is_concept_random": []}
    for r in scored:
        concept, top = concepts[r["answer"]], r["top_features"][0]["feature"]
        drawn = rng.choice(r["active_features"])
        out["top_is_matched"].append(float(top in matched[concept]))
        out["top_is_matched_random"].append(float(drawn in matched[concept]))
        out["top_is_concept"].append(float(precision(top, concept) >= CONCEPT_PRECISION))
        out["top_is_concept_random"].append(float(precision(drawn, concept) >= CONCEPT_PRECISION))
    figures: dict[str, Any] = {"concept_examples": len(scored)}
    figures.update({name: sum(v) / len(v) if v else None for name, v in out.items()})
    return figures


def concept_share(top: Any, image_concepts: Sequence[Sequence[str]], feature: int, concept: str) -> float:
    """The share of a feature's top images (``top``: top examples) that hold ``concept``, from each mined image's
    concepts; 0 for a feature with no top image."""
    tops = top.feature(feature).top_images
    return sum(concept in image_concepts[i] for i in tops) / len(tops) if tops else 0.0


# ---------------------------------------------------------------------------------------------------
# the artifact


def _write(a: AttributeConfig, inputs: LmmInputs, rows: list[dict[str, Any]], maps: dict[str, torch.Tensor],
           images: dict[int, tuple[Any, dict[str, torch.Tensor]]], figures: dict[str, Any], key: OutputKey,
           tokens_kind: str) -> None:
    from safetensors.torch import save

    files = {RECORDS_FILE: "".join(storage.json_text(r) + "\n" for r in rows).encode(), MAPS_FILE: save(maps)}
    if a.heatmaps:
        files.update(_heatmaps(a, inputs, rows, maps, images))
    for name, data in files.items():
        storage.write_bytes(storage.join(a.out, name), data)
    entries = {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for name, data in files.items()}
    storage.write_manifest(
        a.out, KIND, files=entries, config={"attribute": a.model_dump(mode="json")},
        inputs={"top_examples": a.top_examples, **inputs.fingerprinted()}, format_version=FORMAT_VERSION,
        extra={"hookpoint": inputs.hookpoint, "positions": tokens_kind, "figures": figures, KEY_FIELD: key.to_json()})
    log.info("attributed %d examples at %s: %s", len(rows), a.out, figures)


def heatmap_name(example: int, feature: int | None) -> str:
    """File name of an attribution heat map (``feature`` None: all features together)."""
    return f"heatmaps/e{example:04d}-" + ("total" if feature is None else f"f{feature:06d}") + ".png"


def _heatmaps(a: AttributeConfig, inputs: LmmInputs, rows: list[dict[str, Any]], maps: dict[str, torch.Tensor],
              images: dict[int, tuple[Any, dict[str, torch.Tensor]]]) -> dict[str, bytes]:
    """The positive image-token attribution of each example's first top features, and of all, over its image."""
    from mmsae.heatmaps import activation_map, fit_size, load_patch_info, png_bytes, render_overlay

    info = load_patch_info(inputs.model)
    out = {}
    for r in rows:
        i = r["example"]
        image, layout = images[i]
        size = fit_size(image.size, 384)
        shown = image if size == image.size else image.resize(size)
        drawn = [(f, maps[f"{i}.maps"][n]) for n, f in enumerate(maps[f"{i}.features"].tolist()[: a.heatmaps])]
        for feature, values in drawn + [(None, maps[f"{i}.total"])]:
            tokens = {"view": layout["view"].numpy(), "row": layout["row"].numpy(), "col": layout["col"].numpy(),
                      "act": values.clamp_min(0).numpy()}
            heat = activation_map(tokens, (image.height, image.width), info, size=(shown.height, shown.width))
            out[heatmap_name(i, feature)] = png_bytes(render_overlay(shown, heat))
    return out
