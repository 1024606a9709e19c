"""The headline figures of the dashboard: what each recorded figure is called, its unit and what it means.

:data:`FIGURES` is the one table of known figure names. A key is ``"<step>/<name>"`` (a figure whose
meaning depends on the step) or ``"<name>"``; ``{kind}`` in a key stands for a word (a token kind, a concept
kind) that the label takes. Figures of a sweep of SAEs carry their variant as a path prefix
(``k32-m4096/layers.1/heldout_fvu_image``), shown after the label. A figure the table does not know is
shown under its raw key. A figure may name its baseline (another figure of the same step, e.g. the
precision a random feature would reach): the baseline is shown beside it, not as a figure of its own.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mmsae import tracking

STEP_ORDER = ("toyworld", "cache", "train", "mine", "explain", "score", "steer", "attribute")
"""Steps in pipeline order (others follow by name)."""


@dataclass(frozen=True)
class Figure:
    label: str
    unit: str
    """"" (a plain number), "count", "%" (already a percentage), "bytes", or a unit shown after the value."""
    meaning: str
    baseline: str | None = None
    """Name of the figure (same step) that this one is judged against."""
    baseline_label: str = "random"
    group: str | None = None
    """Shown on a card of its own with this title (e.g. the ground-truth figures of the mine step)."""


_GT = "ground truth"
FIGURES: dict[str, Figure] = {
    "toyworld/n_train_images": Figure("training images", "count", "scenes in the toy world's training split"),
    "toyworld/n_heldout_images": Figure("held-out images", "count", "scenes in the toy world's held-out split"),
    "toyworld/toy_lmm_pair_accuracy": Figure("toy LMM colour+texture accuracy", "",
                                             "share of objects whose colour and texture the toy LMM's captions name"),
    "toyworld/toy_lmm_{kind}_accuracy": Figure("toy LMM {kind} accuracy", "",
                                               "share of objects whose {kind} the toy LMM's captions name"),
    "cache/images": Figure("images cached", "count", "images whose activations were written"),
    "cache/images_skipped": Figure("images skipped", "count", "images that could not be decoded"),
    "cache/tokens": Figure("tokens cached", "count", "activation rows per hook point"),
    "cache/shards": Figure("shards", "count", "shard files per hook point"),
    "cache/images_per_s_rank0": Figure("throughput", "images/s", "images per second on rank 0"),
    "cache/tokens_per_s_rank0": Figure("throughput", "tokens/s", "activation rows per second on rank 0"),
    "cache/bytes_written": Figure("written", "bytes", "size of the shards and their tables"),
    "train/steps": Figure("steps", "count", "optimizer steps taken"),
    "train/tokens": Figure("tokens trained on", "count", "activation rows the SAE saw"),
    "train/dead_pct": Figure("dead latents (AuxK counter)", "%", "latents that did not fire within the last "
                             "train.dead_tokens training tokens; lags the final weights (see mine's share)"),
    "heldout_never_fired_pct": Figure("never fired on held-out tokens", "%",
                                      "latents that fired on no held-out token"),
    "heldout_fvu_{kind}": Figure("held-out FVU, {kind} tokens", "",
                                 "variance the reconstruction leaves unexplained (0 perfect, 1 no better than the mean)"),
    "heldout_tokens_{kind}": Figure("held-out tokens, {kind}", "count", "tokens the held-out figures are measured on"),
    "lm_loss_clean": Figure("caption loss, clean", "nats/token", "the LMM's loss on held-out captions"),
    "lm_loss_sae": Figure("caption loss, SAE spliced in", "nats/token",
                          "the same loss with the hook point's output replaced by its reconstruction",
                          baseline="lm_loss_clean", baseline_label="clean"),
    "lm_loss_zero": Figure("caption loss, hook point zeroed", "nats/token",
                           "the same loss with the hook point's output set to zero"),
    "lm_delta_loss": Figure("loss added by the SAE", "nats/token", "SAE-spliced loss minus clean loss"),
    "loss_recovered": Figure("loss recovered", "", "(zeroed − SAE) / (zeroed − clean): 1 means the SAE loses nothing"),
    "lm_eval_images": Figure("caption-loss images", "count", "held-out images the caption losses average over"),
    "mine/features_mined": Figure("features mined", "count", "SAE latents whose top images were sought"),
    "mine/features_alive": Figure("features that fire", "count", "mined features with at least one top image"),
    "mine/dead_pct": Figure("features that never fire", "%", "mined features active on no image"),
    "mine/features_selected": Figure("features selected", "count", "features later stages explain (mine.select)"),
    "mine/images": Figure("images mined", "count", "images streamed through the SAE"),
    "mine/tokens": Figure("tokens mined", "count", "tokens streamed through the SAE"),
    "mine/tokens_per_s": Figure("throughput", "tokens/s", "tokens encoded and mined per second"),
    "mine/map_rows": Figure("token-map rows", "count", "activating tokens stored for the kept images"),
    "mine/peak_state_mib": Figure("peak miner state", "MiB", "largest memory held by the miner's running state"),
    "mine/mean_l0": Figure("mean L0", "", "features active per token, on average"),
    "mine/heatmaps": Figure("heat maps", "count", "heat-map PNGs rendered"),
    "gt_concepts": Figure("concepts scored", "count", "planted concepts of the kinds counted", group=_GT),
    "gt_topk_precision": Figure("top-K precision", "", "share of the best-matching feature's top-K images that hold "
                                "the concept, mean over concepts", baseline="gt_topk_precision_random", group=_GT),
    "gt_topk_precision_random": Figure("top-K precision of a random feature", "",
                                       "the concepts' mean base rate", group=_GT),
    "gt_features_distinct": Figure("distinct best-matching features", "count",
                                   "features that match at least one concept", group=_GT),
    "gt_iou": Figure("IoU with the concept mask", "", "overlap of the matching feature's heat map (cut at a share "
                     "of its maximum) with the concept's mask", group=_GT),
    "gt_f1": Figure("detection F1", "", "best F1 of a feature's firing as a detector of the concept over all images",
                    baseline="gt_f1_always_fires", baseline_label="always fires", group=_GT),
    "gt_f1_always_fires": Figure("detection F1 of a feature that always fires", "", "2p / (1 + p) for base rate p",
                                 group=_GT),
    "gt_f1_features_distinct": Figure("distinct detector features", "count",
                                      "features that detect at least one concept best", group=_GT),
    "gt_f1_iou": Figure("detector IoU with the concept mask", "", "IoU of the best detector's heat maps over its "
                        "top and quantile-sampled images holding the concept", group=_GT),
    "gt_f1_on_patches": Figure("detector activation on patches", "", "share of the best detectors' activation on "
                               "their concept's images that lies on patch tokens (the rest: image-newline tokens, "
                               "which no heat map shows)", group=_GT),
    "gt_f1_on_patches_{kind}": Figure("detector activation on patches, {kind}", "", "the same, over {kind} concepts",
                                      group=_GT),
    "explain/features": Figure("features explained", "count", "selected features the explain stage answered for"),
    "explain/ok": Figure("explanations", "count", "features the explainer described"),
    "explain/unable": Figure("unable to tell", "count", "features whose images the explainer found no common pattern in"),
    "explain/failed": Figure("failed", "count", "replies that could not be parsed or requests that were refused"),
    "explain/no_examples": Figure("no examples", "count", "selected features with no activating image (not asked)"),
    "explain/cached": Figure("answers from the cache", "count", "answers already in the response cache"),
    "explain/requests": Figure("requests", "count", "questions sent to the explainer in this run"),
    "explain/features_per_s": Figure("throughput", "features/s", "features explained per second"),
    "explain/mean_latency_s": Figure("mean latency", "s", "seconds from request to reply"),
    "score/iou": Figure("IoU with the named region", "", "overlap of the feature's activation mask with a "
                        "segmentation of what its explanation names, on its top images", baseline="iou_random"),
    "score/clip": Figure("CLIP score", "", "100 x cosine of the explanation with the top images (CLIP)",
                         baseline="clip_random"),
    "score/detection": Figure("detection balanced accuracy", "", "the explainer, given the explanation, tells the "
                              "feature's activating images from non-activating ones (chance 0.5)",
                              baseline="detection_random"),
    "score/ground_truth": Figure("explanation names the planted concept", "", "share of planted-concept features "
                                 "whose explanation names their concept", baseline="ground_truth_random"),
    "score/ground_truth_shared": Figure("names the concept its top images share", "", "the same, over features "
                                        "whose top images all hold one planted concept",
                                        baseline="ground_truth_shared_random"),
    "score/{kind}_features": Figure("features scored ({kind})", "count", "explanations this scorer scored"),
    "score/{kind}_skipped": Figure("features not scored ({kind})", "count", "explanations this scorer could not "
                                   "score (no image, no mask, a failed answer)"),
    "steer/features_steered": Figure("features steered", "count", "features clamped while the LMM generated"),
    "steer/features_with_concept": Figure("features with a concept", "count", "steered features with concept words "
                                          "to judge their outputs by (a planted concept or an explanation)"),
    "steer/generations": Figure("generations", "count", "steered outputs, the random baseline's included"),
    "steer/generations_per_s": Figure("throughput", "generations/s", "steered outputs generated per second"),
    "steer/success_best": Figure("steering success at the best strength", "", "share of prompts whose output newly "
                                 "names the feature's concept, at each feature's best strength, mean over features",
                                 baseline="success_best_random"),
    "steer/success_best_random": Figure("steering success of a random feature", "",
                                        "the same for a random feature at those strengths"),
    "steer/features_success_over_half": Figure("features steered to their concept", "", "share of features whose "
                                               "best strength succeeds on more than half the prompts"),
    "steer/kl_at_best": Figure("KL of the first token at the best strength", "nats",
                               "KL(steered || unsteered) of the first generated token, mean over features"),
    "steer/perplexity_at_best": Figure("steered perplexity at the best strength", "", "perplexity of the steered "
                                       "outputs under the unsteered model (fluency), mean over features",
                                       baseline="baseline_perplexity", baseline_label="unsteered"),
    "steer/baseline_perplexity": Figure("unsteered perplexity", "", "perplexity of the unsteered outputs"),
    "attribute/examples": Figure("examples attributed", "count", "prompts whose answer token was attributed to "
                                 "every feature at every position"),
    "attribute/metric_mean": Figure("mean logit difference", "logits", "logit(answer) - logit(baseline) at the "
                                    "last position, mean over examples"),
    "attribute/error_share": Figure("share of the SAE's error", "", "|error| / (|error| + |features|) of the summed "
                                    "attributions, mean over examples (0: the features account for all of it)"),
    "attribute/active_features_mean": Figure("active features per example", "",
                                             "features active at the attributed tokens, mean over examples"),
    "attribute/concept_examples": Figure("examples with a planted answer", "count",
                                         "examples whose answer is a planted concept's word (toy world)"),
    "attribute/top_is_matched": Figure("top feature is the concept's match", "", "share of those examples whose top "
                                       "attributed feature is the mine stage's match for the answer's concept",
                                       baseline="top_is_matched_random", baseline_label="random active feature"),
    "attribute/top_is_matched_random": Figure("a random active feature is the concept's match", "",
                                              "the same for a feature drawn among those active on the example"),
    "attribute/top_is_concept": Figure("top feature stands for the concept", "", "share of those examples whose top "
                                       "attributed feature's top images mostly (at least 80 %) hold the concept",
                                       baseline="top_is_concept_random", baseline_label="random active feature"),
    "attribute/top_is_concept_random": Figure("a random active feature stands for the concept", "",
                                              "the same for a feature drawn among those active on the example"),
    "gt_topk_precision_{kind}": Figure("top-K precision, {kind}", "", "the same, over {kind} concepts", group=_GT),
    "gt_iou_{kind}": Figure("IoU, {kind}", "", "the same, over {kind} concepts", group=_GT),
    "gt_f1_{kind}": Figure("detection F1, {kind}", "", "the same, over {kind} concepts", group=_GT),
    "gt_f1_recall_{kind}": Figure("detection recall, {kind}", "",
                                  "share of the concept's images its best detector fires on", group=_GT),
    "gt_f1_iou_{kind}": Figure("detector IoU, {kind}", "", "the same, over {kind} concepts", group=_GT),
}

GROUND_TRUTH_COLUMNS = {
    "concept": "concept", "kind": "kind", "feature": "best feature", "hits": "top-K hits", "top_k": "K",
    "precision": "top-K precision", "iou": "IoU", "iou_images": "IoU images", "base_rate": "base rate",
    "tied": "tied features", "f1_feature": "detector feature", "f1": "F1", "f1_precision": "F1 precision",
    "f1_recall": "F1 recall", "f1_iou": "detector IoU", "f1_iou_images": "detector IoU images",
    "f1_on_patches": "detector activation on patches",
}
"""Column labels of the per-concept ground-truth table (unknown columns keep their names)."""

_PATTERNS = [(re.compile("^" + re.escape(key).replace(re.escape("{kind}"), "(?P<kind>[a-z0-9]+)") + "$"), key)
             for key in FIGURES if "{kind}" in key]


def describe(step: str, name: str) -> Figure | None:
    """The table's entry for figure ``name`` of ``step`` (its labels filled in), or None when unknown."""
    for key in (f"{step}/{name}", name):
        if key in FIGURES:
            return FIGURES[key]
    for pattern, key in _PATTERNS:
        found = pattern.match(f"{step}/{name}") if "/" in key else pattern.match(name)
        if found:
            fig = FIGURES[key]
            kind = found.group("kind")
            return Figure(fig.label.format(kind=kind), fig.unit, fig.meaning.format(kind=kind),
                          fig.baseline, fig.baseline_label, fig.group)
    return None


def headline(summaries: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Cards of headline figures, one per step (and group), in pipeline order: each row a figure with its
    label, raw key, value with unit, meaning and, when recorded, its baseline beside it."""
    cards: dict[str, dict[str, Any]] = {}
    for step in sorted(summaries, key=lambda s: (STEP_ORDER.index(s) if s in STEP_ORDER else len(STEP_ORDER), s)):
        figures = summaries[step]
        flat = dict(tracking.flatten(figures)) if isinstance(figures, Mapping) else {"value": figures}
        entries = {key: _split(step, key) for key in flat}
        shown_as_baseline = {f"{prefix}{fig.baseline}" for key, (prefix, fig) in entries.items()
                             if fig and fig.baseline and f"{prefix}{fig.baseline}" in flat}
        for key, (prefix, fig) in entries.items():
            if key in shown_as_baseline:
                continue
            group = fig.group if fig and fig.group else None
            card = cards.setdefault(f"{step}:{group}", {"step": step if group is None else _slug(group),
                                                        "title": step if group is None else f"{group} ({step})",
                                                        "rows": []})
            card["rows"].append(_row(key, flat[key], prefix, fig, flat))
    return list(cards.values())


def _split(step: str, key: str) -> tuple[str, Figure | None]:
    """A figure's variant prefix (``name/hookpoint/`` of a sweep, else "") and its table entry."""
    prefix, _, name = key.rpartition("/")
    return (prefix + "/" if prefix else ""), describe(step, name)


def _row(key: str, value: Any, prefix: str, fig: Figure | None, flat: Mapping[str, Any]) -> dict[str, Any]:
    if fig is None:
        return {"key": key, "label": key, "known": False, "value": format_value(value, ""), "meaning": "",
                "baseline": None}
    baseline = None
    if fig.baseline and f"{prefix}{fig.baseline}" in flat:
        baseline = {"label": fig.baseline_label, "key": f"{prefix}{fig.baseline}",
                    "value": format_value(flat[f"{prefix}{fig.baseline}"], fig.unit)}
    label = fig.label + (f" ({prefix.rstrip('/')})" if prefix else "")
    return {"key": key, "label": label, "known": True, "value": format_value(value, fig.unit),
            "meaning": fig.meaning, "baseline": baseline}


def format_value(value: Any, unit: str) -> str:
    """A figure's value with its unit, e.g. ``12.5 %``, ``3.1 MiB``, ``1,024``."""
    if isinstance(value, bool) or value is None or not isinstance(value, int | float):
        return "" if value is None else str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    if unit == "bytes":
        return _bytes(float(value))
    if unit == "count" or (isinstance(value, int) and unit == ""):
        return f"{int(value):,}"
    text = number(value)
    return f"{text} %" if unit == "%" else f"{text} {unit}" if unit else text


def finite_number(value: Any, booleans: bool = False) -> float | None:
    """A record's value as a finite float (numbers and numeric strings; booleans as 0 and 1 only when
    ``booleans``), else None."""
    if value is None or (isinstance(value, bool) and not booleans):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def whole_number(value: Any) -> int | None:
    """A record's value as an int when it is a whole finite number (not a boolean), else None."""
    x = finite_number(value)
    return int(x) if x is not None and x.is_integer() else None


def number(value: float | int) -> str:
    """A number as people read it: thousands separators for integers and from 1,000 up, 4 significant
    digits below (3 in exponent notation beyond that range)."""
    if isinstance(value, int):
        return f"{value:,}"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e15):
        return f"{value:.3g}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _bytes(n: float) -> str:
    if abs(n) < 1024:
        return f"{n:,.0f} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "GiB":
            break
    return f"{n:.3g} {unit}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-") or "x"
