"""Stage score: how well each explanation describes its feature, by every configured scorer, each beside its
random baseline.

Reads: an explanations artifact (``score.explanations``; the explain stage's output) and the top-examples
artifact it was made from (``score.top_examples``; ``mmsae.examples``): each explained feature's top, quantile
and negative images and its per-token activation maps; the image set and the LMM's image geometry the
activation shards behind the top examples name; the checkpoints of the configured scorers. Explanations made
from another top-examples artifact (or from one rewritten since) are refused. Writes a scores artifact at
``score.out``:

    manifest.json   kind "scores", format 1; extra: scorers (what each is), skipped_scorers (name -> why it did
                    not run), skip_reasons (per scorer, why some pairs were not scored), figures, output_key
    scores.jsonl    per scorer, one row per scored feature {feature, scorer, score, details}, then its random
                    baseline {scorer, baseline: "random", score, details} (no feature: how the report tells a
                    baseline)

Scorers (``mmsae.scorers``; ``score.scorers`` chooses): ``iou`` (activation masks against a segmentation of
what the explanation names: the planted concepts' masks when the image set has them and no grounding model is
configured, else GroundingDINO + SAM, else skipped), ``clip`` (CLIP score; skipped without
``score.clip_model``), ``detection`` (balanced accuracy of the explain stage's explainer, with its response
cache, telling activating from non-activating images) and ``ground_truth`` (does the explanation name the
feature's planted concept; toy world). Only features whose explanation has status ``ok`` are scored; the
others are counted by status.

The random baseline of every scorer is computed in the same run: each explanation is paired with the images of
another scored feature (a derangement of the scored features seeded by ``score.seed``) and the baseline is the
mean over those pairs. Headline figures: per scorer its mean and ``<scorer>_random``, and per sub-population
(``ground_truth_shared``: features whose top images all hold a planted concept) the same.

A sealed artifact made from the same key (the score settings that shape it, the explainer settings detection
asks with, and the fingerprints of the explanations, the top examples and the checkpoints) is reused; another
is refused unless ``run.overwrite`` is set. Device, batch size and concurrency are not in the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from mmsae import examples, storage
from mmsae.config import RunConfig, ScoreConfig
from mmsae.scorers import Pair, PairResult, PairScore, ScoreError, Scorer, Skipped, Subject, derangement
from mmsae.scorers.iou import Segmenter
from mmsae.stages import explain
from mmsae.stages._base import (
    KEY_FIELD,
    OutputKey,
    StageContext,
    StageOutputs,
    resolve_uri,
    reusable_output,
    stage_context,
)

log = logging.getLogger(__name__)

STEP = "score"
KIND = "scores"
FORMAT_VERSION = 1
RECORDS_FILE = "scores.jsonl"
EXPLANATIONS_KIND = explain.KIND
EXPLANATIONS_FILE = explain.RECORDS_FILE
NOT_IN_KEY = ("explanations", "top_examples", "out", "grounding_model", "sam_model", "clip_model", "device",
              "batch_size", "concurrency")
"""Score settings outside the output key: the inputs (covered by their fingerprints), the output, and the
settings that only place or pace the work."""
SHARED_MIN_IMAGES = 3
"""Ground truth: a concept is shared by a feature's top images when all of them (at least this many) hold it."""
PAIRING = "each explanation scored against the images of another scored feature (a seeded derangement)"

__all__ = ["KIND", "RECORDS_FILE", "ScoreError", "output_key", "run"]


def run(cfg: RunConfig, explanations: str | None = None, top_examples: str | None = None,
        parent_run_id: str | None = None) -> StageOutputs:
    """Score the explanations; ``explanations`` / ``top_examples`` override the config's URIs (the pipeline's
    inputs)."""
    workdir = cfg.run.workdir
    s = cfg.score.model_copy(update={
        "explanations": resolve_uri(explanations, cfg.score.explanations, workdir, "explain"),
        "top_examples": resolve_uri(top_examples, cfg.score.top_examples, workdir, "mine"),
        "out": resolve_uri(None, cfg.score.out, workdir, STEP),
    })
    with stage_context(cfg, STEP, {"score": s.model_dump(mode="json")}, parent_run_id, output=s.out) as ctx:
        inputs = _open_inputs(s)
        plan = _plan(cfg, s, inputs)
        key = output_key(s, plan)
        sealed = reusable_output(s.out, KIND, key, overwrite=ctx.overwrite, setting="score.out")
        figures = dict(sealed.extra["figures"]) if sealed is not None else _score(s, inputs, plan, key, ctx)
        ctx.finish(figures)
    return StageOutputs(s.out, figures)


def output_key(s: ScoreConfig, plan: _Plan) -> OutputKey:
    """What scores are made from: the settings that shape them (with the scorers' backends and the explainer's
    settings) and the fingerprints of the explanations, the top examples and the checkpoints."""
    config = {**s.model_dump(mode="json", exclude=set(NOT_IN_KEY)), "backends": plan.backends}
    return OutputKey.of(config, {"explanations": s.explanations, "top_examples": s.top_examples, **plan.inputs})


# ---------------------------------------------------------------------------------------------------
# inputs


@dataclass
class _Inputs:
    top: examples.TopExamples
    rows: list[dict[str, Any]]
    """explanations.jsonl, by feature."""
    image_set: str
    split: str | None
    model: str
    """The LMM the shards were cached from ('' when unknown): its image geometry, the local explainer."""


def _open_inputs(s: ScoreConfig) -> _Inputs:
    """The explanations and the top examples they were made from; an error names a missing or mismatched one."""
    try:
        top = examples.TopExamples(s.top_examples)
    except (FileNotFoundError, storage.ManifestError) as e:
        raise ScoreError(f"score.top_examples {s.top_examples} holds no top examples ({e}); run the mine stage "
                         "first") from e
    try:
        manifest = storage.read_manifest(s.explanations, kind=EXPLANATIONS_KIND)
    except (FileNotFoundError, storage.ManifestError) as e:
        raise ScoreError(f"score.explanations {s.explanations} holds no explanations ({e}); run the explain stage "
                         "first") from e
    _check_made_from(s, manifest)
    rows = _read_explanations(s.explanations, manifest)
    mined = {int(f) for f in top.extra.get("features", [])}
    unknown = sorted(int(r["feature"]) for r in rows if int(r["feature"]) not in mined)
    if unknown:
        raise ScoreError(f"the explanations at {s.explanations} explain features {unknown[:8]} that the top examples "
                         f"at {s.top_examples} did not mine: they were made from other top examples")
    image_set, split, model = str(top.manifest.inputs.get("image_set", "")), None, ""
    shards_uri = top.manifest.inputs.get("shards", "")
    try:
        from mmsae.activations import ActivationShards

        shards = ActivationShards(shards_uri)
        image_set, split, model = shards.image_set or image_set, shards.split, shards.model
    except (FileNotFoundError, storage.ManifestError, KeyError) as e:
        log.warning("the shards %r named by the top examples cannot be read (%s): the image set's default split "
                    "is used and the LMM is unknown", shards_uri, e)
    return _Inputs(top, rows, image_set, split, model)


def _check_made_from(s: ScoreConfig, manifest: storage.Manifest) -> None:
    """Refuse explanations made from other top examples than ``score.top_examples`` (or from them before they
    were rewritten): by the fingerprint the explanations recorded, else by URI."""
    recorded_uri = manifest.inputs.get("top_examples", "")
    recorded = ((manifest.extra.get(KEY_FIELD) or {}).get("fingerprints") or {}).get("top_examples")
    same = (recorded == storage.fingerprint(s.top_examples)) if recorded else (recorded_uri == s.top_examples)
    if same:
        return
    made_from = (f"the top examples at {recorded_uri} before they were rewritten" if recorded_uri == s.top_examples
                 else f"the top examples at {recorded_uri or '(unrecorded)'}")
    raise ScoreError(f"the explanations at {s.explanations} were made from {made_from}, not from score.top_examples "
                     f"{s.top_examples} as it is now: explain these top examples again, or set score.top_examples to "
                     "the ones the explanations were made from")


def _read_explanations(uri: str, manifest: storage.Manifest) -> list[dict[str, Any]]:
    if EXPLANATIONS_FILE not in manifest.files:
        raise ScoreError(f"the explanations artifact at {uri} lists no {EXPLANATIONS_FILE}")
    text = storage.read_verified_bytes(uri, EXPLANATIONS_FILE, manifest).decode("utf-8")
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            int(row["feature"])
        except (ValueError, KeyError, TypeError) as e:
            raise ScoreError(f"{storage.join(uri, EXPLANATIONS_FILE)} line {n} is not an explanation record "
                             f"({type(e).__name__}: {e})") from e
        rows.append(row)
    return sorted(rows, key=lambda r: int(r["feature"]))


# ---------------------------------------------------------------------------------------------------
# which scorers run


@dataclass
class _Plan:
    """The scorers that run (by name, with their backend), the ones skipped and why, and what they add to the
    output key."""

    backends: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    explainer: Any = None
    """The detection explainer's plan (`mmsae.explainers.ExplainerPlan`), when detection runs."""
    explainer_cache: str = ""


def _plan(cfg: RunConfig, s: ScoreConfig, inputs: _Inputs) -> _Plan:
    plan = _Plan()
    planted = inputs.top.ground_truth() is not None
    for name in dict.fromkeys(s.scorers):
        reason = {"iou": _plan_iou, "clip": _plan_clip, "detection": _plan_detection,
                  "ground_truth": _plan_ground_truth}[name](plan, cfg, s, inputs, planted)
        if reason:
            plan.skipped[name] = reason
            log.warning("scorer %s skipped: %s", name, reason)
    return plan


def _plan_iou(plan: _Plan, cfg: RunConfig, s: ScoreConfig, inputs: _Inputs, planted: bool) -> str:
    if not inputs.model:
        return "the shards behind the top examples name no LMM, whose image geometry the activation maps need"
    if bool(s.grounding_model) != bool(s.sam_model):
        missing = "score.sam_model" if s.grounding_model else "score.grounding_model"
        raise ScoreError(f"IoU with GroundingDINO + SAM needs both checkpoints: set {missing} too (or neither, "
                         "on an image set with planted concepts)")
    if s.grounding_model:
        plan.backends["iou"] = "grounding_dino+sam"
        plan.inputs.update(grounding_model=storage.absolute(s.grounding_model), sam_model=storage.absolute(s.sam_model))
        return ""
    if planted:
        plan.backends["iou"] = "planted_masks"
        return ""
    return "the image set has no planted concepts and score.grounding_model / score.sam_model are not set"


def _plan_clip(plan: _Plan, cfg: RunConfig, s: ScoreConfig, inputs: _Inputs, planted: bool) -> str:
    if not s.clip_model:
        return "score.clip_model is not set"
    plan.backends["clip"] = "clip"
    plan.inputs["clip_model"] = storage.absolute(s.clip_model)
    return ""


def _plan_detection(plan: _Plan, cfg: RunConfig, s: ScoreConfig, inputs: _Inputs, planted: bool) -> str:
    from mmsae.explainers import plan_explainer

    explainer = plan_explainer(cfg.explain, default_model=lambda: inputs.model)
    template = explainer.detect_template.digest if explainer.detect_template is not None else None
    plan.backends["detection"] = {**explainer.key_settings(), "detect_template": template}
    plan.inputs.update(explainer.inputs())
    plan.explainer = explainer
    plan.explainer_cache = resolve_uri(None, cfg.explain.cache, cfg.run.workdir, "explain-cache")
    return ""


def _plan_ground_truth(plan: _Plan, cfg: RunConfig, s: ScoreConfig, inputs: _Inputs, planted: bool) -> str:
    if not planted:
        return "the image set has no planted concepts (the top examples hold no ground truth)"
    plan.backends["ground_truth"] = "planted_concepts"
    return ""


# ---------------------------------------------------------------------------------------------------
# scoring


def _score(s: ScoreConfig, inputs: _Inputs, plan: _Plan, key: OutputKey, ctx: StageContext) -> dict[str, Any]:
    """Score every ok explanation and its baseline pair with every planned scorer; write the artifact (sealed
    last) and return its figures."""
    start = time.perf_counter()
    statuses = Counter(str(r.get("status")) for r in inputs.rows)
    texts = {int(r["feature"]): str(r["explanation"]) for r in inputs.rows
             if r.get("status") == "ok" and r.get("explanation")}
    own, baseline = _pairs(inputs.top, texts, s.seed)
    log.info("scoring %d explanations (%s) with %s", len(own), dict(statuses), list(plan.backends))
    figures: dict[str, Any] = {"features": len(inputs.rows), "explained": len(own),
                               **{f"skipped_{status}": n for status, n in statuses.items() if status != "ok"}}
    rows: list[dict[str, Any]] = []
    described: dict[str, Any] = {}
    reasons: dict[str, dict[str, int]] = {}
    workspace = _Workspace(s, inputs, ctx.device(s.device)) if plan.backends and own else None
    for step, name in enumerate(plan.backends if workspace is not None else (), start=1):
        scorer = workspace.scorer(name, plan)
        try:
            results = scorer.score(own + baseline)
            described[name] = scorer.describe()
        finally:
            scorer.close()
        rows += _rows(name, own, results[: len(own)], results[len(own):], s.seed)
        figures.update(_figures(name, results[: len(own)], results[len(own):]))
        reasons[name] = dict(Counter(r.reason for r in results if isinstance(r, Skipped)))
        ctx.log_progress({"scorers_done": step}, step=step)
    figures["seconds"] = time.perf_counter() - start
    data = "".join(storage.json_text(row) + "\n" for row in rows).encode()
    storage.write_bytes(storage.join(s.out, RECORDS_FILE), data)
    storage.write_manifest(
        s.out, KIND, files={RECORDS_FILE: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}},
        config={"score": s.model_dump(mode="json")},
        inputs={"explanations": s.explanations, "top_examples": s.top_examples, **plan.inputs},
        format_version=FORMAT_VERSION,
        extra={"scorers": described, "skipped_scorers": plan.skipped, "skip_reasons": reasons,
               "features": sorted(p.explained for p in own), "figures": figures, KEY_FIELD: key.to_json()})
    log.info("scored %d explanations at %s: %s", len(own), s.out, figures)
    return figures


def _pairs(top: examples.TopExamples, texts: dict[int, str], seed: int) -> tuple[list[Pair], list[Pair]]:
    """Each scored feature's own pair, and its baseline pair: its explanation against another's images."""
    features = sorted(texts)
    subjects = [_subject(top.feature(f)) for f in features]
    own = [Pair(f, texts[f], subject) for f, subject in zip(features, subjects, strict=True)]
    other = derangement(len(features), seed)
    baseline = [Pair(features[i], texts[features[i]], subjects[j]) for i, j in enumerate(other)]
    if not baseline:
        log.warning("no random baseline: it needs at least two scored features, there are %d", len(features))
    return own, baseline


def _subject(record: examples.FeatureRecord) -> Subject:
    return Subject(record.feature, tuple(record.top_images), tuple(record.quantile_images or record.top_images),
                   tuple(record.negatives))


def _rows(name: str, own: Sequence[Pair], results: Sequence[PairResult], baseline: Sequence[PairResult],
          seed: int) -> list[dict[str, Any]]:
    """The scorer's rows: one per scored feature, then its random baseline (when any baseline pair scored)."""
    rows = [{"feature": pair.explained, "scorer": name, "score": result.score, "details": result.details}
            for pair, result in zip(own, results, strict=True) if isinstance(result, PairScore)]
    scored = [r for r in baseline if isinstance(r, PairScore)]
    if scored:
        values = [r.score for r in scored]
        groups = {g: _mean([r.score for r in scored if g in r.groups]) for g in _groups(scored)}
        rows.append({"scorer": name, "baseline": "random", "score": _mean(values), "details": {
            "pairs": len(values), "std": float(np.std(values)), "seed": seed, "pairing": PAIRING,
            **({"groups": groups} if groups else {})}})
    return rows


def _figures(name: str, own: Sequence[PairResult], baseline: Sequence[PairResult]) -> dict[str, Any]:
    """The scorer's headline figures: its mean and its baseline's, overall and per group, and the counts."""
    scored = [r for r in own if isinstance(r, PairScore)]
    base = [r for r in baseline if isinstance(r, PairScore)]
    out: dict[str, Any] = {name: _mean([r.score for r in scored]), f"{name}_random": _mean([r.score for r in base]),
                           f"{name}_features": len(scored), f"{name}_skipped": len(own) - len(scored)}
    for group in _groups(scored):
        out[f"{name}_{group}"] = _mean([r.score for r in scored if group in r.groups])
        out[f"{name}_{group}_random"] = _mean([r.score for r in base if group in r.groups])
        out[f"{name}_{group}_features"] = sum(group in r.groups for r in scored)
    return out


def _groups(results: Sequence[PairScore]) -> list[str]:
    return sorted({g for r in results for g in r.groups})


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


# ---------------------------------------------------------------------------------------------------
# what the scorers read


class _Workspace:
    """The image set, the image geometry and the top examples' maps, opened once and shared by the scorers."""

    def __init__(self, s: ScoreConfig, inputs: _Inputs, device: torch.device) -> None:
        from mmsae.data.images import load_image_set
        from mmsae.scorers.images import ImageSource

        if not inputs.image_set:
            raise ScoreError(f"the top examples at {s.top_examples} name no image set, which the scorers look at")
        self.s, self.inputs, self.device = s, inputs, device
        self.dataset = load_image_set(inputs.image_set, inputs.split)
        self.images = ImageSource(self.dataset, inputs.top.image_size, inputs.image_set)

    def scorer(self, name: str, plan: _Plan) -> Scorer:
        builders: dict[str, Callable[[_Plan], Scorer]] = {
            "iou": self._iou, "clip": self._clip, "detection": self._detection, "ground_truth": self._ground_truth}
        return builders[name](plan)

    def _iou(self, plan: _Plan) -> Scorer:
        from mmsae.heatmaps import load_patch_info
        from mmsae.scorers.iou import ActivationMasks, IouScorer

        s = self.s
        info = load_patch_info(self.inputs.model, str(self.inputs.top.extra.get("family", "")) or None)
        masks = ActivationMasks(self.inputs.top.activation_tokens, self.inputs.top.image_size, info, s.iou_threshold)
        segmenter: Segmenter
        if plan.backends["iou"] == "planted_masks":
            segmenter = self._concept_segmenter()
        else:
            from mmsae.scorers.grounded import GroundedSegmenter

            segmenter = GroundedSegmenter(s.grounding_model, s.sam_model, self.images.image, self.device,
                                          s.box_threshold, s.text_threshold, s.batch_size)
        return IouScorer(segmenter, masks, s.top_images)

    def _concept_segmenter(self) -> Segmenter:
        from mmsae import groundtruth
        from mmsae.scorers.planted import ConceptSegmenter

        universe = sorted({c for cs in self.concepts for c in cs})
        return ConceptSegmenter(universe, self.concepts.__getitem__, groundtruth.mask_reader(self.dataset),
                                self.inputs.top.image_size)

    @cached_property
    def concepts(self) -> list[list[str]]:
        """The planted concepts of every image of the image set, by image_idx."""
        if "concepts" not in self.dataset.column_names:
            raise ScoreError(f"the image set {self.inputs.image_set} has no concepts column, though the top examples "
                             "hold ground truth: it is not the image set they were mined from")
        return [list(c) for c in self.dataset["concepts"]]

    def _clip(self, plan: _Plan) -> Scorer:
        from mmsae.scorers.clip import ClipScorer

        return ClipScorer(self.s.clip_model, self.images.image, self.device, self.s.top_images, self.s.batch_size)

    def _detection(self, plan: _Plan) -> Scorer:
        from mmsae.explainers import CachedExplainer
        from mmsae.scorers.detection import DetectionScorer

        explainer, cache = plan.explainer, plan.explainer_cache
        return DetectionScorer(lambda: CachedExplainer(explainer.open(), cache), self.images.png,
                               self.s.detect_images, self.s.seed, self.s.concurrency,
                               describe={"backend": explainer.backend, "model": explainer.model, "cache": cache})

    def _ground_truth(self, plan: _Plan) -> Scorer:
        from mmsae.scorers.planted import GroundTruthScorer, detected_concepts

        truth = self.inputs.top.ground_truth() or {}
        top_k = int(self.inputs.top.extra.get("top_k", SHARED_MIN_IMAGES))
        return GroundTruthScorer(self.concepts.__getitem__, truth.get("kinds") or ["color", "texture"],
                                 detected_concepts(truth), min(SHARED_MIN_IMAGES, top_k))
