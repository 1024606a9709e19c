"""SAE checkpoints: EleutherAI sparsify's layout (read and write) and SAELens' layout (export and read back).

sparsify layout, one directory per hookpoint (what :func:`save_sae` writes and :func:`load_sae` reads)::

    <root>/<hookpoint>/cfg.json          {"expansion_factor", "normalize_decoder", "num_latents", "k",
                                          "multi_topk", "d_in"}  (+ legacy keys, see SaeConfig)
    <root>/<hookpoint>/sae.safetensors   encoder.weight [num_latents, d_in], encoder.bias [num_latents],
                                         W_dec [num_latents, d_in], b_dec [d_in]

Released SAEs such as ``lmms-lab/llama3-llava-next-8b-hf-sae-131k`` (``model.layers.24/``) load as they
are; the dtype is taken from the file (bf16 files load as bf16 unless a dtype is asked for).

SAELens layout (v6 schema, what :func:`export_saelens` writes and :func:`load_saelens` reads)::

    <dir>/cfg.json                  {"architecture": "topk", "d_in", "d_sae", "k", "dtype", "device",
                                     "apply_b_dec_to_input": true, "normalize_activations": "none",
                                     "reshape_activations": "none", "rescale_acts_by_decoder_norm": false,
                                     "metadata": {"sae_lens_version": "6.0.0", "hook_name", "model_name", ...}}
    <dir>/sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]

This matches SAELens' ``TopKSAEConfig``/``TopKSAE`` (``sae_lens/saes/topk_sae.py``: ``k``,
``rescale_acts_by_decoder_norm``; ``architecture()`` returns ``"topk"``), the base ``SAEConfig`` fields
and ``to_dict`` (``sae_lens/saes/sae.py``: ``d_in``, ``d_sae``, ``dtype``, ``device``, ``apply_b_dec_to_input``,
``normalize_activations``, ``reshape_activations``, nested ``metadata``) and the file names of
``sae_lens/constants.py``. SAELens' ``TopK`` takes the top k of the pre-activations and applies ReLU to
them, ``encode`` subtracts ``b_dec`` when ``apply_b_dec_to_input`` and ``decode`` is ``acts @ W_dec + b_dec``:
the same function as :class:`~mmsae.sae.model.TopKSAE`. Its loader treats a config without
``metadata.sae_lens_version`` as pre-6.0 and rebuilds ``metadata`` from top-level keys, so the version of
the schema is written.

Paths may be local or ``s3://`` URIs (through :mod:`mmsae.storage`); every file is written atomically, the
weights before the config.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from mmsae import storage
from mmsae.sae.model import SaeConfig, SaeConfigError, TopKSAE

logger = logging.getLogger(__name__)

__all__ = [
    "CFG_FILENAME",
    "SAELENS_SCHEMA_VERSION",
    "SAELENS_WEIGHTS_FILENAME",
    "SPARSIFY_WEIGHTS_FILENAME",
    "CheckpointError",
    "export_saelens",
    "list_hookpoints",
    "load_many",
    "load_sae",
    "load_saelens",
    "natural_key",
    "read_config",
    "save_many",
    "save_sae",
]

CFG_FILENAME = "cfg.json"
SPARSIFY_WEIGHTS_FILENAME = "sae.safetensors"
SAELENS_WEIGHTS_FILENAME = "sae_weights.safetensors"
#: SAELens config schema written by :func:`export_saelens` (its loader reads >= 6.0 configs as they are).
SAELENS_SCHEMA_VERSION = "6.0.0"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed or does not match its config."""


def natural_key(text: str) -> list[Any]:
    """Sort key that orders embedded numbers numerically (``layers.2`` before ``layers.10``)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.removeprefix("torch.")
    if name not in _DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _read_json(uri: str) -> dict[str, Any]:
    if not storage.exists(uri):
        raise CheckpointError(f"{uri} does not exist")
    try:
        data = storage.read_json(uri)
    except storage.StorageError as err:
        raise CheckpointError(str(err)) from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{uri} must hold a JSON object, got {type(data).__name__}")
    return data


def _load_tensors(uri: str, device: torch.device | str) -> dict[str, Tensor]:
    if not storage.exists(uri):
        raise CheckpointError(f"{uri} does not exist")
    with storage.local_copy(uri) as path:
        try:
            return load_file(str(path), device=str(device))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{uri} is not a readable safetensors file: {err}") from err


def _check_tensors(uri: str, tensors: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{uri}: tensors do not match a TopK SAE; missing {missing}, unexpected {unexpected} "
            f"(expected exactly {sorted(expected)})"
        )
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise CheckpointError(f"{uri}: tensor {name!r} has shape {list(got)}, expected {list(shape)}")
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        raise CheckpointError(f"{uri}: tensors have mixed dtypes {sorted(map(str, dtypes))}")


def _build(
    cfg: SaeConfig, state: dict[str, Tensor], device: torch.device | str, dtype: torch.dtype
) -> TopKSAE:
    # Built on the meta device so a 1 B-parameter SAE is not initialised only to be overwritten.
    sae = TopKSAE(cfg, device="meta", dtype=dtype)
    sae.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    return sae


# ------------------------------------------------------------------------------------------- sparsify


def read_config(path: str | Path) -> SaeConfig:
    """The :class:`SaeConfig` of a sparsify-layout SAE directory, without reading its weights.

    A ``cfg.json`` without ``d_in`` (not written by sparsify, but cheap to support) takes it from the
    ``b_dec`` shape in the safetensors header.
    """
    uri = storage.join(str(path), CFG_FILENAME)
    raw = _read_json(uri)
    if "d_in" not in raw:
        weights = storage.join(str(path), SPARSIFY_WEIGHTS_FILENAME)
        raw["d_in"] = _header_shape(weights, "b_dec")[0]
        logger.info("%s has no d_in; took d_in = %d from %s", uri, raw["d_in"], weights)
    try:
        return SaeConfig.from_cfg_json(raw, source=uri)
    except SaeConfigError as err:
        raise CheckpointError(str(err)) from err


def _header_shape(uri: str, name: str) -> list[int]:
    if not storage.exists(uri):
        raise CheckpointError(f"{uri} does not exist")
    with storage.local_copy(uri) as local:
        try:
            with safe_open(str(local), framework="pt") as fh:
                if name not in fh.keys():
                    raise CheckpointError(f"{uri} has no tensor {name!r}; it holds {sorted(fh.keys())}")
                return list(fh.get_slice(name).get_shape())
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{uri} is not a readable safetensors file: {err}") from err


def save_sae(sae: TopKSAE, path: str | Path) -> str:
    """Write ``sae`` to the directory ``path`` (``<root>/<hookpoint>``) in sparsify's layout; returns it."""
    path = str(path)
    tensors = {
        "encoder.weight": sae.encoder.weight.detach().contiguous(),
        "encoder.bias": sae.encoder.bias.detach().contiguous(),
        "W_dec": sae.W_dec.detach().contiguous(),
        "b_dec": sae.b_dec.detach().contiguous(),
    }
    with storage.local_output(storage.join(path, SPARSIFY_WEIGHTS_FILENAME)) as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    storage.write_json(storage.join(path, CFG_FILENAME), sae.cfg.to_cfg_json())
    logger.info("saved SAE (%d latents, k=%d) to %s", sae.num_latents, sae.cfg.k, path)
    return path


def load_sae(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None
) -> TopKSAE:
    """Load a sparsify-layout SAE directory; ``dtype`` None keeps the dtype stored in the file."""
    cfg = read_config(path)
    uri = storage.join(str(path), SPARSIFY_WEIGHTS_FILENAME)
    tensors = _load_tensors(uri, device)
    m, d = cfg.effective_num_latents, cfg.d_in
    _check_tensors(
        uri, tensors, {"encoder.weight": (m, d), "encoder.bias": (m,), "W_dec": (m, d), "b_dec": (d,)}
    )
    file_dtype = next(iter(tensors.values())).dtype
    sae = _build(cfg, tensors, device, _parse_dtype(dtype) or file_dtype)
    logger.info("loaded SAE from %s (%d latents, k=%d, %s)", path, sae.num_latents, cfg.k, sae.dtype)
    return sae


def list_hookpoints(root: str | Path) -> list[str]:
    """Hookpoints under ``root`` (directories holding both ``cfg.json`` and ``sae.safetensors``), natural order."""
    files = set(storage.list_files(str(root)))
    found = []
    for rel in files:
        parent, _, name = rel.rpartition("/")
        if name == CFG_FILENAME and parent and f"{parent}/{SPARSIFY_WEIGHTS_FILENAME}" in files:
            found.append(parent)
    return sorted(found, key=natural_key)


def save_many(saes: Mapping[str, TopKSAE], root: str | Path) -> list[str]:
    """Save one SAE per hookpoint under ``root`` (``<root>/<hookpoint>/...``); returns the directories."""
    return [save_sae(sae, storage.join(str(root), hookpoint)) for hookpoint, sae in saes.items()]


def load_many(
    root: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None
) -> dict[str, TopKSAE]:
    """Every SAE under ``root`` as ``{hookpoint: TopKSAE}`` in natural hookpoint order."""
    hookpoints = list_hookpoints(root)
    if not hookpoints:
        raise CheckpointError(
            f"no SAE found under {root}: expected <hookpoint>/{CFG_FILENAME} + "
            f"<hookpoint>/{SPARSIFY_WEIGHTS_FILENAME}"
        )
    return {hp: load_sae(storage.join(str(root), hp), device=device, dtype=dtype) for hp in hookpoints}


# -------------------------------------------------------------------------------------------- SAELens


def export_saelens(
    sae: TopKSAE,
    path: str | Path,
    *,
    hook_name: str,
    model_name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Write ``sae`` to the directory ``path`` in SAELens' (v6) TopK layout; returns it.

    ``hook_name`` is where the SAE reads its input (e.g. ``model.layers.24``); ``metadata`` adds keys to
    the config's ``metadata`` object (SAELens keeps unknown keys there).
    """
    path = str(path)
    tensors = {
        "W_enc": sae.encoder.weight.detach().t().contiguous(),
        "b_enc": sae.encoder.bias.detach().contiguous(),
        "W_dec": sae.W_dec.detach().contiguous(),
        "b_dec": sae.b_dec.detach().contiguous(),
    }
    meta: dict[str, Any] = {
        "sae_lens_version": SAELENS_SCHEMA_VERSION,
        "sae_lens_training_version": SAELENS_SCHEMA_VERSION,
        "hook_name": hook_name,
        "model_name": model_name,
    }
    meta.update(metadata or {})
    cfg = {
        "architecture": "topk",
        "d_in": sae.d_in,
        "d_sae": sae.num_latents,
        "k": sae.cfg.k,
        "dtype": _dtype_name(sae.dtype),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": meta,
    }
    with storage.local_output(storage.join(path, SAELENS_WEIGHTS_FILENAME)) as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    storage.write_json(storage.join(path, CFG_FILENAME), cfg)
    logger.info("exported SAE to SAELens layout at %s (hook %s)", path, hook_name)
    return path


def load_saelens(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None
) -> TopKSAE:
    """Read a SAELens TopK SAE directory (as :func:`export_saelens` writes) into a :class:`TopKSAE`.

    Refuses configurations whose forward pass differs from this module's: another architecture,
    ``apply_b_dec_to_input`` false, activation normalisation, ``rescale_acts_by_decoder_norm``.
    """
    uri = storage.join(str(path), CFG_FILENAME)
    raw = _read_json(uri)
    arch = raw.get("architecture")
    if arch != "topk":
        raise CheckpointError(f"{uri}: architecture {arch!r} is not supported; expected 'topk'")
    checks = {
        "apply_b_dec_to_input": (raw.get("apply_b_dec_to_input", True), True),
        "normalize_activations": (raw.get("normalize_activations") or "none", "none"),
        "rescale_acts_by_decoder_norm": (raw.get("rescale_acts_by_decoder_norm", False), False),
        "reshape_activations": (raw.get("reshape_activations") or "none", "none"),
    }
    for key, (value, supported) in checks.items():
        if value != supported:
            raise CheckpointError(f"{uri}: {key} = {value!r} is not supported; expected {supported!r}")
    k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
    try:
        d_in, d_sae, k = int(raw["d_in"]), int(raw["d_sae"]), int(k)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{uri}: needs integer d_in, d_sae and k ({err})") from err

    weights_uri = storage.join(str(path), SAELENS_WEIGHTS_FILENAME)
    tensors = _load_tensors(weights_uri, device)
    _check_tensors(
        weights_uri,
        tensors,
        {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)},
    )
    norms = torch.linalg.vector_norm(tensors["W_dec"].float(), dim=1)
    unit = bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-2))
    expansion = d_sae // d_in if d_sae % d_in == 0 else max(1, math.ceil(d_sae / d_in))
    try:
        cfg = SaeConfig(d_in=d_in, num_latents=d_sae, k=k, expansion_factor=expansion, normalize_decoder=unit)
    except ValueError as err:
        raise CheckpointError(f"{uri}: {err}") from err
    state = {
        "encoder.weight": tensors["W_enc"].t(),
        "encoder.bias": tensors["b_enc"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }
    file_dtype = tensors["W_enc"].dtype
    cfg_dtype = _DTYPES.get(str(raw.get("dtype", "")).removeprefix("torch."))
    sae = _build(
        cfg,
        {n: t.contiguous() for n, t in state.items()},
        device,
        _parse_dtype(dtype) or cfg_dtype or file_dtype,
    )
    logger.info("loaded SAELens SAE from %s (%d latents, k=%d)", path, d_sae, k)
    return sae
