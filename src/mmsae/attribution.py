"""Attribution: how much each SAE feature, at each position, drives an answer token over a baseline token.

Reads nothing from disk and writes nothing: it takes a loaded LMM, an SAE and its hook point, and a batch of
prompts encoded by the LMM's processor (left-padded: the answer is predicted at the last position).

**Splice.** At the hook point the layer's output ``x`` is replaced by ``decode(z) + e`` with ``z = encode(x)``
and ``e = x - decode(z)``, both made leaves of the autograd graph: the forward pass is the model's own (the
error term keeps it exact) and the backward pass reaches every latent and the error node.

**Estimate.** The metric is ``logit(answer) - logit(baseline)`` at the last position. Its first-order
(attribution-patching) estimate of the effect of ablating feature ``f`` at position ``p`` (setting ``z[p, f]``
to 0) is ``grad(metric)[p, f] * (z[p, f] - 0)``: **every feature at every position from one forward and one
backward pass** (only the k active latents of a position can be non-zero). The error node gets
``grad(metric)[p] . e[p]``. The paper's code ran two forwards and a backward per feature instead.

:func:`ablation_effects` measures the true effect of ablating a feature at every position (one forward per
feature, for tests and benchmarks), and :func:`rank_correlation` compares the two.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from mmsae.models.loading import LoadedLMM
    from mmsae.sae.model import TopKSAE

log = logging.getLogger(__name__)

__all__ = ["Attribution", "AttributionError", "ablation_effects", "attribute", "rank_correlation", "single_token"]


class AttributionError(ValueError):
    """An attribution request that cannot run (an answer that is not one token, a width mismatch, an unknown
    hook point)."""


@dataclass
class Attribution:
    """One example's attributions, over its real (non-padding) positions in order."""

    metric: float
    """``logit(answer) - logit(baseline)`` at the last position (the model's own: the splice is exact)."""
    answer: int
    baseline: int
    acts: torch.Tensor
    """``[positions, k]``: the active latents' values ``z``."""
    indices: torch.Tensor
    """``[positions, k]``: which latents they are."""
    scores: torch.Tensor
    """``[positions, k]``: ``grad(metric) * z`` of each active latent."""
    error: torch.Tensor
    """``[positions]``: the error node's attribution ``grad(metric) . e`` (0 outside the attributed positions)."""

    def feature_totals(self, num_latents: int) -> torch.Tensor:
        """``[num_latents]``: each feature's attribution summed over positions."""
        out = torch.zeros(num_latents, dtype=self.scores.dtype)
        return out.index_add_(0, self.indices.reshape(-1), self.scores.reshape(-1))

    def feature_map(self, feature: int) -> torch.Tensor:
        """``[positions]``: one feature's attribution at each position (0 where it is not active)."""
        return (self.scores * (self.indices == feature)).sum(-1)

    def active_features(self) -> list[int]:
        """The features active at some position."""
        return sorted(set(self.indices[self.acts > 0].tolist()))

    def top_features(self, count: int, num_latents: int) -> list[tuple[int, float]]:
        """The ``count`` features with the highest total attribution (highest first)."""
        totals = self.feature_totals(num_latents)
        values, ids = totals.topk(min(count, num_latents))
        return [(int(i), float(v)) for i, v in zip(ids, values, strict=True)]


def single_token(tokenizer: Any, word: str) -> int:
    """The id of ``word`` as one token (as itself, or with a leading space); an error when it takes several."""
    unk = getattr(tokenizer, "unk_token_id", None)
    direct = tokenizer.convert_tokens_to_ids(word)
    if isinstance(direct, int) and direct != unk and direct is not None:
        return direct
    for text in (" " + word, word):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1:
            return int(ids[0])
    raise AttributionError(f"{word!r} is not a single token of the tokenizer ({tokenizer.tokenize(word)}); "
                           "answers and baselines must be one token each")


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """Parameters without gradients for the block (the backward pass reaches only the splice's leaves)."""
    wanted = [p for p in model.parameters() if p.requires_grad]
    for p in wanted:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in wanted:
            p.requires_grad_(True)


def _check(lmm: LoadedLMM, sae: TopKSAE, hookpoint: str):
    from mmsae.models.hooks import HookPointError, resolve_hookpoint

    try:
        point = resolve_hookpoint(lmm.model, hookpoint)
    except HookPointError as e:
        raise AttributionError(f"the model at {lmm.path} has no hook point {hookpoint!r}: {e}") from e
    text = getattr(lmm.config, "text_config", None) or lmm.config
    if sae.d_in != int(text.hidden_size):
        raise AttributionError(f"the SAE takes inputs of width {sae.d_in}, but hook point {point.name} of the "
                               f"model at {lmm.path} has width {text.hidden_size}")
    return point


def attribute(lmm: LoadedLMM, sae: TopKSAE, hookpoint: str, enc: dict[str, Any], answers: Sequence[int],
              baselines: Sequence[int | None], candidates: Sequence[int] = (),
              where: torch.Tensor | None = None) -> list[Attribution]:
    """Attribute every feature at every position of a left-padded batch, in one forward and one backward pass.

    ``answers[b]``: the answer token of example b; ``baselines[b]``: its baseline token, or None to take the
    token of ``candidates`` (other than the answer) that the model ranks highest at that position.
    ``where`` (``[batch, seq]`` bool): the positions whose features are attributed (e.g. the kind of tokens the
    SAE was trained on); features elsewhere are not attributed (0).
    """
    point = _check(lmm, sae, hookpoint)
    leaves: dict[str, torch.Tensor] = {}

    def splice(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        flat = hidden.detach().reshape(-1, hidden.shape[-1]).to(sae.dtype)
        with torch.no_grad():
            acts, idx = sae.encode(flat)
        acts = acts.detach().requires_grad_(True)
        recon = sae.decode(acts, idx)
        error = (flat - recon.detach()).requires_grad_(True)
        leaves.update(acts=acts, indices=idx, error=error)
        spliced = (recon + error).reshape(hidden.shape).to(hidden.dtype)
        return (spliced, *output[1:]) if isinstance(output, tuple) else spliced

    handle = point.module.register_forward_hook(splice)
    try:
        with _frozen(lmm.model), torch.enable_grad():
            logits = lmm.model(**enc, logits_to_keep=1).logits[:, -1].float()
            chosen = _baselines(logits.detach(), answers, baselines, candidates)
            rows = torch.arange(len(answers), device=logits.device)
            metric = logits[rows, torch.as_tensor(list(answers), device=logits.device)] - logits[
                rows, torch.as_tensor(chosen, device=logits.device)]
            metric.sum().backward()  # rows do not interact: each row's gradient is its own metric's
    finally:
        handle.remove()
    return _per_example(leaves, enc["attention_mask"], where, metric.detach(), answers, chosen)


def _baselines(logits: torch.Tensor, answers: Sequence[int], baselines: Sequence[int | None],
               candidates: Sequence[int]) -> list[int]:
    out = []
    for row, (answer, baseline) in enumerate(zip(answers, baselines, strict=True)):
        if baseline is not None:
            out.append(int(baseline))
            continue
        others = [c for c in candidates if c != answer]
        if not others:
            raise AttributionError("no baseline token: give one, or candidates other than the answer")
        out.append(max(others, key=lambda c: float(logits[row, c])))
    return out


def _per_example(leaves: dict[str, torch.Tensor], attention_mask: torch.Tensor, where: torch.Tensor | None,
                 metric: torch.Tensor, answers: Sequence[int], baselines: Sequence[int]) -> list[Attribution]:
    batch, length = attention_mask.shape
    keep = torch.ones(batch, length, 1, dtype=torch.bool) if where is None else where.reshape(batch, length, 1)
    keep = keep.to(attention_mask.device)
    acts = leaves["acts"].detach().reshape(batch, length, -1) * keep
    grads = leaves["acts"].grad.reshape(batch, length, -1)
    indices = leaves["indices"].reshape(batch, length, -1)
    error = leaves["error"]
    error_scores = (error.grad * error.detach()).sum(-1).reshape(batch, length) * keep[..., 0]
    out = []
    for row in range(batch):
        real = attention_mask[row].bool()
        out.append(Attribution(
            metric=float(metric[row]), answer=int(answers[row]), baseline=int(baselines[row]),
            acts=acts[row, real].cpu(), indices=indices[row, real].cpu(),
            scores=(grads[row, real] * acts[row, real]).cpu(), error=error_scores[row, real].cpu()))
    return out


@torch.no_grad()
def ablation_effects(lmm: LoadedLMM, sae: TopKSAE, hookpoint: str, enc: dict[str, Any], answers: Sequence[int],
                     baselines: Sequence[int], features: Sequence[int],
                     where: torch.Tensor | None = None) -> torch.Tensor:
    """``[features, batch]``: metric(clean) - metric(feature ablated at every position of ``where``, default
    all), one forward per feature.

    The ablation sets the feature's code to 0 and keeps the error term: the output is ``x - z[f] * W_dec[f]``.
    """
    point = _check(lmm, sae, hookpoint)
    rows = torch.arange(len(answers))
    answer_ids, baseline_ids = torch.as_tensor(list(answers)), torch.as_tensor(list(baselines))

    def metric() -> torch.Tensor:
        logits = lmm.model(**enc, logits_to_keep=1).logits[:, -1].float().cpu()
        return logits[rows, answer_ids] - logits[rows, baseline_ids]

    clean = metric()
    out = torch.zeros(len(features), len(answers))
    for n, feature in enumerate(features):
        def ablate(_module: torch.nn.Module, _args: Any, output: Any, feature: int = feature) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            flat = hidden.reshape(-1, hidden.shape[-1]).to(sae.dtype)
            acts, idx = sae.encode(flat)
            current = (acts * (idx == feature)).sum(-1, keepdim=True)
            if where is not None:
                current = current * where.reshape(-1, 1).to(current.device)
            ablated = (flat - current * sae.decoder_weight()[feature]).reshape(hidden.shape).to(hidden.dtype)
            return (ablated, *output[1:]) if isinstance(output, tuple) else ablated

        handle = point.module.register_forward_hook(ablate)
        try:
            out[n] = clean - metric()
        finally:
            handle.remove()
    return out


def rank_correlation(first: Sequence[float], second: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get their average rank); NaN with fewer than two values."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if a.size < 2:
        return float("nan")
    ranks_a, ranks_b = _ranks(a), _ranks(b)
    if ranks_a.std() == 0 or ranks_b.std() == 0:
        return float("nan")
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties sharing their average rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    _, group = np.unique(values, return_inverse=True)
    return (np.bincount(group, weights=ranks) / np.bincount(group))[group]
