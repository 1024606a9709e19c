"""Clamp an SAE feature inside an LMM while it generates, and measure what changes.

Reads nothing from disk and writes nothing: it takes a loaded LMM (`mmsae.models.load_lmm`), an SAE
(`mmsae.sae.checkpoint.load_sae`) and the hook point the SAE was trained on.

**The clamp.** At the hook point the layer's output ``x`` is replaced by the SAE's reconstruction of the
clamped code plus the reconstruction error::

    z = encode(x);  z' = z with z'[f] = v at the chosen positions
    out = decode(z') + (x - decode(z))          # the error term keeps everything the SAE misses
        = x + (v - z[f]) * W_dec[f]              # the same, since the decoder is affine

so with nothing clamped the output is ``x`` itself, bit for bit, and the unmodified model's generations are
reproduced exactly. The hook computes the second form (the SAE is encoded only at clamped positions);
``keep_error=False`` drops the error term, as the paper's code did (every position then carries the
reconstruction only), which is kept to show what that costs. ``v`` is set in the code after TopK, so no other
latent is pushed out of the top k by the clamp.

**Positions.** Each of ``image`` (image tokens of the prompt), ``prompt`` (the prompt's text tokens, padding
excluded) and ``generated`` (every generated token, as KV-cached generation feeds it back) can be clamped.
The hook counts the positions it has seen since generation started: the prefill pass covers the prompt, each
later call one generated position. A clamp at the last decoder layer reaches the output only at its own
position: image tokens (and prompt tokens but the last) cannot change the generated text there, which
:func:`inert_positions` names and :class:`Steerer` logs as a warning.

**Batches.** Every batch element carries its own clamp (a feature and a value, or none), so one
``generate`` call covers many features, strengths and prompts. Prompts are left-padded; every element is
decoded.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from PIL import Image

    from mmsae.models.loading import LoadedLMM
    from mmsae.sae.model import TopKSAE

log = logging.getLogger(__name__)

__all__ = ["POSITION_KINDS", "Clamp", "Generated", "Prompt", "SteerError", "Steerer", "concept_words_of",
           "dose_response", "first_token_kl", "inert_positions", "measure", "words_of"]

POSITION_KINDS = ("image", "prompt", "generated")
"""Where a clamp can act: image tokens, the prompt's text tokens, generated tokens."""


class SteerError(ValueError):
    """A steering request that cannot run (feature out of range, width mismatch, unknown hook point, a strength
    that is not finite); raised before any generation."""


@dataclass(frozen=True)
class Clamp:
    """Set ``feature`` to ``value`` (in the SAE's activation units) at the chosen positions."""

    feature: int
    value: float


@dataclass(frozen=True)
class Prompt:
    """A prompt: its text (with the processor's ``<image>`` placeholder when it has an image) and its image."""

    text: str
    image: Image.Image | None = None


@dataclass
class Generated:
    """What one batched ``generate`` returned, per batch element."""

    texts: list[str]
    """The generated text (special tokens dropped)."""
    tokens: list[list[int]]
    """The generated token ids, up to and including the first end-of-sequence token."""
    first_logits: torch.Tensor
    """``[batch, vocab]`` float32: the logits of the first generated token."""


def inert_positions(hook_index: int | None, n_layers: int, positions: Sequence[str]) -> list[str]:
    """The chosen position kinds through which a clamp at this hook point cannot reach the generated text
    (image tokens) or reaches it only at one token (prompt text: its last token).

    At the last decoder layer (or a hook point outside the layers, such as the final norm) nothing later reads
    other positions, so a clamp acts only where the next token is predicted: never at image tokens, at prompt
    text only through its last token (the first generated token's prediction), always at generated tokens.
    """
    if hook_index is not None and hook_index < n_layers - 1:
        return []
    return [p for p in positions if p in ("image", "prompt")]


def first_token_kl(steered: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """``KL(steered || baseline)`` of the first generated token's distributions, per row (nats)."""
    log_p = F.log_softmax(steered.float(), dim=-1)
    log_q = F.log_softmax(baseline.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


class Steerer:
    """Generates with per-element clamps of one SAE's features at its hook point."""

    def __init__(self, lmm: LoadedLMM, sae: TopKSAE, hookpoint: str,
                 positions: Sequence[str] = POSITION_KINDS, keep_error: bool = True):
        from mmsae.models.hooks import HookPointError, decoder_layers, resolve_hookpoint

        unknown = sorted(set(positions) - set(POSITION_KINDS))
        if unknown or not positions:
            raise SteerError(f"steering positions {list(positions)}: expected some of {list(POSITION_KINDS)}")
        try:
            self.point = resolve_hookpoint(lmm.model, hookpoint)
        except HookPointError as e:
            raise SteerError(f"the model at {lmm.path} has no hook point {hookpoint!r}: {e}") from e
        width = _hidden_size(lmm.config)
        if sae.d_in != width:
            raise SteerError(f"the SAE takes inputs of width {sae.d_in}, but hook point {self.point.name} of the "
                             f"model at {lmm.path} has width {width}: the SAE was trained on another model")
        self.lmm, self.sae, self.keep_error = lmm, sae, keep_error
        self.positions = tuple(positions)
        self.n_layers = len(decoder_layers(lmm.model))
        inert = inert_positions(self.point.index, self.n_layers, self.positions)
        if inert:
            log.warning("hook point %s is at the last decoder layer (of %d): nothing after it reads other positions, "
                        "so clamps at %s cannot change the generated text (prompt text acts only through its "
                        "last token); steer at an earlier layer", self.point.name, self.n_layers, " and ".join(inert))

    # ------------------------------------------------------------------------------------------ checks

    def check(self, clamps: Sequence[Clamp | None]) -> None:
        """Refuse a feature out of range or a value that is not finite (before any generation)."""
        for clamp in clamps:
            if clamp is None:
                continue
            if not 0 <= int(clamp.feature) < self.sae.num_latents:
                raise SteerError(f"feature {clamp.feature} is out of range: the SAE has {self.sae.num_latents} "
                                 f"features (0..{self.sae.num_latents - 1})")
            if not math.isfinite(float(clamp.value)):
                raise SteerError(f"the strength of feature {clamp.feature} is {clamp.value}: it must be a finite "
                                 "number")

    # ------------------------------------------------------------------------------------------ inputs

    def encode(self, prompts: Sequence[Prompt]) -> dict[str, Any]:
        """The prompts as one left-padded batch on the model's device."""
        processor = self.lmm.processor
        tokenizer = processor.tokenizer
        images = [p.image for p in prompts]
        if any(i is None for i in images) and any(i is not None for i in images):
            raise SteerError("a batch mixes prompts with and without an image; steer them in separate batches")
        old_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            enc = processor(images=images if images[0] is not None else None, text=[p.text for p in prompts],
                            padding=True, return_tensors="pt")
        finally:
            tokenizer.padding_side = old_side
        device = self.lmm.model.device
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in enc.items()}

    def position_masks(self, enc: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``image`` and ``prompt`` ``[batch, seq]`` bool masks of a left-padded batch (padding in neither)."""
        from mmsae.models.geometry import token_geometry

        ids = enc["input_ids"]
        real = enc["attention_mask"].bool()
        if "pixel_values" in enc:
            geometry = token_geometry(self.lmm.family, self.lmm.config, ids.cpu(), enc.get("image_sizes"),
                                      self.lmm.processor, batch_num_images=enc.get("batch_num_images"))
            image = torch.as_tensor(geometry.is_image, device=ids.device)
        else:
            image = torch.zeros_like(real)
        return {"image": image & real, "prompt": real & ~image}

    # ------------------------------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], clamps: Sequence[Clamp | None], max_new_tokens: int,
                 enc: dict[str, Any] | None = None) -> Generated:
        """Greedy generation of every prompt under its clamp (None: unsteered); every element decoded."""
        if len(prompts) != len(clamps):
            raise SteerError(f"{len(prompts)} prompts but {len(clamps)} clamps; give one clamp (or None) each")
        self.check(clamps)
        enc = enc if enc is not None else self.encode(prompts)
        tokenizer = self.lmm.processor.tokenizer
        with self.clamping(clamps, enc):
            out = self.lmm.model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True, output_logits=True)
        new = out.sequences[:, enc["input_ids"].shape[1]:]
        tokens = [_until_eos(row, tokenizer.eos_token_id) for row in new.tolist()]
        texts = [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        return Generated(texts, tokens, out.logits[0].float().cpu())

    @contextlib.contextmanager
    def clamping(self, clamps: Sequence[Clamp | None], enc: dict[str, Any]) -> Iterator[None]:
        """The clamp hook on the hook point for one batch (its prefill pass, then its generated positions)."""
        self.check(clamps)
        masks = self.position_masks(enc)
        device = enc["input_ids"].device
        prefill = torch.zeros_like(masks["image"])
        for kind in ("image", "prompt"):
            if kind in self.positions:
                prefill |= masks[kind]
        features = torch.tensor([c.feature if c is not None else -1 for c in clamps], device=device)
        values = torch.tensor([float(c.value) if c is not None else 0.0 for c in clamps], device=device,
                              dtype=self.sae.dtype)
        hook = _ClampHook(self.sae, prefill, "generated" in self.positions, features, values, self.keep_error)
        handle = self.point.module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    # ------------------------------------------------------------------------------------------ fluency

    @torch.no_grad()
    def output_nll(self, enc: dict[str, Any], tokens: Sequence[Sequence[int]]) -> list[float]:
        """Mean negative log-likelihood per token of each element's generated ``tokens`` under the unsteered
        model, given its prompt (NaN for an empty output); ``exp`` of it is the perplexity.

        The prompt runs once (with its images) and the outputs are fed after it through the KV cache, as
        generation feeds them: an output holding the image placeholder token is scored like any other.
        """
        longest = max((len(t) for t in tokens), default=0)
        if longest == 0:
            return [float("nan")] * len(tokens)
        device = enc["input_ids"].device
        pad = self.lmm.processor.tokenizer.pad_token_id
        out_ids = torch.full((len(tokens), longest), pad, dtype=torch.long, device=device)
        out_mask = torch.zeros_like(out_ids)
        for row, toks in enumerate(tokens):
            out_ids[row, : len(toks)] = torch.tensor(list(toks), dtype=torch.long)
            out_mask[row, : len(toks)] = 1
        prompt = self.lmm.model(**enc, use_cache=True, logits_to_keep=1)
        mask = torch.cat([enc["attention_mask"], out_mask], dim=1)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, enc["input_ids"].shape[1]:]
        rest = self.lmm.model(input_ids=out_ids, attention_mask=mask, position_ids=positions,
                              cache=prompt.cache, use_cache=True)
        predicted = torch.cat([prompt.logits[:, -1:], rest.logits[:, :-1]], dim=1).float()
        nll = F.cross_entropy(predicted.transpose(1, 2), out_ids, reduction="none") * out_mask
        counts = out_mask.sum(1)
        return [float(n / c) if c else float("nan") for n, c in zip(nll.sum(1).tolist(), counts.tolist(),
                                                                    strict=True)]


class _ClampHook:
    """The forward hook: counts positions across the prefill and decode calls and applies each element's clamp."""

    def __init__(self, sae: TopKSAE, prefill: torch.Tensor, generated: bool, features: torch.Tensor,
                 values: torch.Tensor, keep_error: bool):
        self.sae, self.prefill, self.generated = sae, prefill, generated
        self.features, self.values, self.keep_error = features, values, keep_error
        with torch.no_grad():
            self.directions = sae.decoder_weight().detach().index_select(0, features.clamp_min(0))
        self.seen = 0

    def _mask(self, batch: int, n: int, device: torch.device) -> torch.Tensor:
        """``[batch, n]``: which of the next ``n`` positions are clamped, for elements that carry a clamp."""
        if batch != self.prefill.shape[0]:
            raise SteerError(f"the hook point saw a batch of {batch}, but {self.prefill.shape[0]} clamps were "
                             "given (beam search and sampling several sequences per prompt are not supported)")
        length = self.prefill.shape[1]
        if self.seen >= length:  # a generated position
            return (self.features >= 0)[:, None].expand(batch, n) & self.generated
        cols = torch.arange(self.seen, self.seen + n, device=device)
        from_prompt = self.prefill[:, cols.clamp(max=length - 1)]
        mask = torch.where((cols < length)[None, :], from_prompt, torch.full_like(from_prompt, self.generated))
        return mask & (self.features >= 0)[:, None]

    def __call__(self, _module: torch.nn.Module, _args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        batch, n, width = hidden.shape
        active = self._mask(batch, n, hidden.device)
        self.seen += n
        if self.keep_error and not bool(active.any()):
            return None  # decode(z) + error = x, exactly
        flat = hidden.reshape(-1, width).to(self.sae.dtype)
        acts, idx = self.sae.encode(flat)
        features = self.features.repeat_interleave(n)
        current = (acts * (idx == features[:, None])).sum(-1)
        gain = (self.values.repeat_interleave(n) - current) * active.reshape(-1)
        delta = gain[:, None] * self.directions.repeat_interleave(n, dim=0)  # (v - z[f]) W_dec[f], 0 elsewhere
        base = flat if self.keep_error else self.sae.decode(acts, idx)  # x = decode(z) + error
        steered = (base + delta).reshape(batch, n, width).to(hidden.dtype)
        return (steered, *output[1:]) if isinstance(output, tuple) else steered


def _hidden_size(config: Any) -> int:
    text = getattr(config, "text_config", None) or config
    return int(text.hidden_size)


def _until_eos(row: list[int], eos: int | None) -> list[int]:
    """A generated row cut after its first end-of-sequence token (the padding after it dropped)."""
    if eos is not None and eos in row:
        return row[: row.index(eos) + 1]
    return row


# --------------------------------------------------------------------------------------------------
# measuring what changed

_WORD = re.compile(r"\w+")
STOPWORDS = frozenset(
    "a an the and or of in on at to by for from with as is are be this that these those it its their there "
    "some any each all image images picture region regions highlighted area areas part parts object objects "
    "feature features shows show showing shown appear appears containing contains".split())
"""Words of an explanation that name no concept."""


def words_of(text: str) -> set[str]:
    """The lower-case whole words of a text ("checkered" holds no "red")."""
    return set(_WORD.findall(text.lower()))


def concept_words_of(feature: int, ground_truth: dict[str, Any] | None, explanation: str | None) -> list[str]:
    """The words that say a feature's concept: the planted concepts the mine stage matched to it (toy world:
    its top-K match or its best detector; ``color:red`` -> ``red``), else its explanation's content words."""
    planted = []
    for match in (ground_truth or {}).get("concepts", []):
        if feature in (match.get("feature"), match.get("f1_feature")):
            planted.append(str(match["concept"]).split(":", 1)[-1])
    if planted:
        return sorted(set(planted))
    if not explanation:
        return []
    return sorted(w for w in words_of(explanation) if w not in STOPWORDS and len(w) > 2 and not w.isdigit())


def measure(steered: str, steered_logits: torch.Tensor, steered_nll: float, baseline: str,
            baseline_logits: torch.Tensor, baseline_nll: float, concept: Sequence[str]) -> dict[str, Any]:
    """The metrics of one steered output against the unsteered one (see `mmsae.stages.steer`)."""
    hit = bool(words_of(steered) & set(concept)) if concept else None
    baseline_hit = bool(words_of(baseline) & set(concept)) if concept else None
    return {
        "kl_first_token": float(first_token_kl(steered_logits[None], baseline_logits[None])[0]),
        "concept_hit": hit,
        "baseline_hit": baseline_hit,
        "success": None if hit is None or baseline_hit else hit,
        "changed": steered != baseline,
        "steered_nll": steered_nll,
        "steered_perplexity": math.exp(steered_nll) if math.isfinite(steered_nll) else None,
        "baseline_perplexity": math.exp(baseline_nll) if math.isfinite(baseline_nll) else None,
    }


def _rate(rows: Sequence[dict[str, Any]], name: str) -> float | None:
    values = [r["metrics"][name] for r in rows if r["metrics"][name] is not None]
    return sum(map(float, values)) / len(values) if values else None


def _stats(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rates and means over rows: success over the prompts whose unsteered output does not name the concept;
    perplexity as exp of the mean per-token NLL."""
    nll = [r["metrics"]["steered_nll"] for r in rows if math.isfinite(r["metrics"]["steered_nll"])]
    return {"n": len(rows), "success_rate": _rate(rows, "success"), "hit_rate": _rate(rows, "concept_hit"),
            "changed_rate": _rate(rows, "changed"), "kl_mean": _rate(rows, "kl_first_token"),
            "perplexity": math.exp(sum(nll) / len(nll)) if nll else None}


def dose_response(rows: Sequence[dict[str, Any]], random_rows: Sequence[dict[str, Any]],
                  strengths: Sequence[float]) -> dict[str, Any]:
    """Per feature and strength: its stats beside its random partner's; the best strength (highest success, the
    lowest such strength); and the curve averaged over features."""
    def group(items, key):
        out: dict[tuple, list] = {}
        for r in items:
            out.setdefault(key(r), []).append(r)
        return out

    own = group(rows, lambda r: (r["feature"], float(r["strength"])))
    other = group(random_rows, lambda r: (r["for_feature"], float(r["strength"])))
    features: dict[str, Any] = {}
    for feature in dict.fromkeys(r["feature"] for r in rows):
        curve = {}
        for s in strengths:
            stats = _stats(own.get((feature, float(s)), []))
            rnd = _stats(other.get((feature, float(s)), []))
            curve[str(float(s))] = {**stats, **{f"random_{k}": v for k, v in rnd.items() if k != "n"}}
        scored = [(v["success_rate"], -float(s), s) for s, v in curve.items() if v["success_rate"] is not None]
        best = max(scored)[2] if scored else None
        features[str(feature)] = {"concept_words": next(r["concept_words"] for r in rows if r["feature"] == feature),
                                  "strengths": curve,
                                  "best": {"strength": float(best), **curve[best]} if best is not None else None}
    by_strength = {}
    for s in strengths:
        entries = [v["strengths"][str(float(s))] for v in features.values()]
        by_strength[f"x{float(s):g}"] = {name: _mean([e[name] for e in entries]) for name in (
            "success_rate", "random_success_rate", "kl_mean", "random_kl_mean", "perplexity", "random_perplexity")}
    base = [r["metrics"]["baseline_perplexity"] for r in rows if r["metrics"]["baseline_perplexity"] is not None]
    baseline = math.exp(sum(math.log(b) for b in base) / len(base)) if base else None
    return {"features": features, "by_strength": by_strength, "baseline_perplexity": baseline}


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None
