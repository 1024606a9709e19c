"""The tokens an SAE feature's decoder direction promotes and suppresses through the LMM's unembedding.

Reads, from the model folder the shards name (local or ``s3://``), only the output embedding ``W_U`` (the
``lm_head`` weight, or the input embedding when the two are tied and no head is saved), the weight ``g`` of
the language model's final norm, and the tokenizer files; the other weights are not read (for ``s3://`` only
the file holding those tensors is downloaded, into the download cache). Writes nothing.

The logit of token ``t`` for feature ``f`` is ``W_U[t] · (g ⊙ d_f)`` with ``d_f`` the feature's decoder row
scaled to unit norm: the direct effect on the next-token logits of adding the direction to the residual
stream, as the logit lens reads it. The final norm's weight is applied because it rescales each dimension
before the unembedding and so changes the ranking; its input-dependent scale (one positive factor per token)
does not change the ranking and is left out, as are the later layers and, for a LayerNorm, the mean
subtraction and bias. Safetensors checkpoints only; other models (or hook points of another width) get no
logit tokens.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmsae import storage

log = logging.getLogger(__name__)

__all__ = ["Unembedding", "load_unembedding", "logit_tokens"]

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")
_LM = r"^(?:language_model\.model\.|model\.language_model\.|language_model\.|model\.)?"
HEAD_KEY = re.compile(r"^(?:language_model\.)?lm_head\.weight$")
EMBED_KEY = re.compile(_LM + r"embed_tokens\.weight$")
NORM_KEY = re.compile(_LM + r"norm\.weight$")
BLOCK = 1024
"""Features whose logits over the vocabulary are computed at once."""


@dataclass
class Unembedding:
    """The output embedding ``[vocab, d]``, the final norm's weight ``[d]`` (None: no norm found), and the
    tokenizer that names the tokens."""

    weight: torch.Tensor
    norm: torch.Tensor | None
    tokenizer: Any

    @property
    def width(self) -> int:
        return int(self.weight.shape[1])


def load_unembedding(model_uri: str) -> Unembedding | None:
    """The unembedding of the model at ``model_uri``; None (logged) when it has no LM head, no safetensors
    weights or no tokenizer."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    names = set(storage.list_files(model_uri, recursive=False))
    keys = _weight_files(model_uri, names)
    if keys is None:
        log.info("no logit tokens: %s has no %s", model_uri, WEIGHTS_FILE)
        return None
    head = _first_key(keys, HEAD_KEY) or _first_key(keys, EMBED_KEY)
    if head is None:
        log.info("no logit tokens: %s has no lm_head or embed_tokens weight", model_uri)
        return None
    norm = _first_key(keys, NORM_KEY)
    tensors: dict[str, torch.Tensor] = {}
    for key in filter(None, (head, norm)):
        with safe_open(str(_local_file(model_uri, keys[key])), framework="pt") as f:
            tensors[key] = f.get_tensor(key).float()
    with tempfile.TemporaryDirectory(prefix="mmsae-tokenizer-") as tmp:
        for name in TOKENIZER_FILES:
            if name in names:
                storage.download_file(storage.join(model_uri, name), Path(tmp) / name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(tmp)
        except (OSError, ValueError) as e:
            log.info("no logit tokens: the tokenizer of %s cannot be loaded: %s", model_uri, e)
            return None
    log.info("unembedding of %s: %s %s, final norm %s", model_uri, head, tuple(tensors[head].shape), norm)
    return Unembedding(tensors[head], tensors.get(norm) if norm else None, tokenizer)


def _weight_files(model_uri: str, names: set[str]) -> dict[str, str] | None:
    """Tensor name -> weights file holding it (None: no safetensors weights)."""
    if WEIGHTS_INDEX in names:
        return dict(json.loads(storage.read_text(storage.join(model_uri, WEIGHTS_INDEX)))["weight_map"])
    if WEIGHTS_FILE not in names:
        return None
    from safetensors import safe_open

    with safe_open(str(_local_file(model_uri, WEIGHTS_FILE)), framework="pt") as f:
        return dict.fromkeys(f.keys(), WEIGHTS_FILE)


def _first_key(keys: dict[str, str], pattern: re.Pattern[str]) -> str | None:
    return next((k for k in sorted(keys) if pattern.match(k)), None)


def _local_file(model_uri: str, name: str) -> Path:
    """A local path of one file of the model (a cached download for ``s3://``: reused while unchanged)."""
    uri = storage.join(model_uri, name)
    if not storage.is_s3(uri):
        return Path(uri)
    target = storage.cache_dir("models", uri, storage.fingerprint(model_uri), default_stem="weights")
    return storage.download_cached(uri, target, is_dir=False)


@torch.no_grad()
def logit_tokens(unembedding: Unembedding, decoder: torch.Tensor, features: Sequence[int], n: int
                 ) -> tuple[list[list[dict[str, Any]]], list[list[dict[str, Any]]]]:
    """Per feature, of its decoder row (of ``decoder`` ``[latents, d]``): the ``n`` tokens of the highest logits
    (highest first) and of the lowest (lowest first), each ``{"token", "logit"}``."""
    weight = unembedding.weight.to(decoder.device)
    gain = None if unembedding.norm is None else unembedding.norm.to(decoder.device)
    n = min(n, int(weight.shape[0]))
    if not features or n == 0:
        return [[] for _ in features], [[] for _ in features]
    ids = torch.as_tensor(list(features), dtype=torch.int64, device=decoder.device)
    top_ids, top_vals, low_ids, low_vals = [], [], [], []
    for start in range(0, len(ids), BLOCK):
        rows = decoder[ids[start : start + BLOCK]].float()
        rows = rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)
        logits = (rows if gain is None else rows * gain) @ weight.T
        high, low = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        top_ids.append(high.indices.cpu()), top_vals.append(high.values.cpu())
        low_ids.append(low.indices.cpu()), low_vals.append(low.values.cpu())
    names = _token_names(unembedding.tokenizer, torch.cat(top_ids + low_ids).unique().tolist())
    return (_entries(torch.cat(top_ids), torch.cat(top_vals), names),
            _entries(torch.cat(low_ids), torch.cat(low_vals), names))


def _token_names(tokenizer: Any, ids: Sequence[int]) -> dict[int, str]:
    """Each token as text; a token that is part of a character (decoded as U+FFFD) under its own name."""
    texts = tokenizer.batch_decode([[i] for i in ids])
    names = tokenizer.convert_ids_to_tokens(list(ids))
    return {i: name if "\ufffd" in text else text for i, text, name in zip(ids, texts, names, strict=True)}


def _entries(ids: torch.Tensor, values: torch.Tensor, names: dict[int, str]) -> list[list[dict[str, Any]]]:
    return [[{"token": names[i], "logit": v} for i, v in zip(row_ids, row_values, strict=True)]
            for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)]
