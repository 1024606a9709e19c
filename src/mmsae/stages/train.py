"""Stage train: TopK sparse autoencoders on cached activations, trained through DeepSpeed.

Reads: an activation-shard artifact (``train.shards``, default ``<run.workdir>/cache``) and, with
``train.init_from``, SAEs in sparsify's layout to continue from. Writes to ``train.out`` (default
``<run.workdir>/train``): per SAE ``[<variant>/]<hookpoint>/cfg.json + sae.safetensors`` (EleutherAI
sparsify's layout), ``metrics.json``, ``state/`` (DeepSpeed checkpoints with the data position and
dead-latent counters, for resume, see :mod:`mmsae.training.state`) and a manifest of kind ``sae`` written
last, whose ``extra["output_key"]`` records the training settings and the inputs' fingerprints. An output
of the same key is reused; one of another key (other settings, or shards rewritten at the same URI) is
refused unless ``run.overwrite``.

One process or many: started in-process for one rank, or by the ``deepspeed`` launcher / ``torchrun``
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); nothing assumes SSH. Each shard of a window is
read by one rank and the rows are exchanged, so every rank trains on its slice of each global batch while
storage is read once (:mod:`mmsae.training.stream`); W ranks compute the same step as one rank with the
same global batch (:mod:`mmsae.training.engine`). Several SAEs (a sweep over width and k, or several hook
points) train from one pass over the data.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from mmsae import storage
from mmsae.activations import ActivationShards
from mmsae.config import RunConfig, TrainConfig
from mmsae.stages._base import (
    KEY_FIELD,
    OutputKey,
    StageOutputs,
    resolve_uri,
    reusable_output,
    stage_context,
)
from mmsae.training import TrainError
from mmsae.training.engine import SaeBundle, Variant, default_lr, process_group, variant_path
from mmsae.training.loop import Trainer

__all__ = ["KIND", "STEP", "TrainError", "output_key", "run"]

log = logging.getLogger(__name__)

STEP = "train"
KIND = "sae"
_NOT_TRAINING = ("out", "log_every", "checkpoint_every", "keep_checkpoints", "eval_lm_images", "device",
                 "cpu_shm_comm", "gpus_per_node", "nodes", "job_runtime", "job_namespace", "job_overrides")
"""Settings that do not change what is trained (where and how it runs included): a run may resume, or its output
be reused, under others."""
_INPUTS = ("shards", "init_from")
"""Settings that name inputs: the key holds their fingerprints instead."""


def run(cfg: RunConfig, shards: str | None = None, parent_run_id: str | None = None) -> StageOutputs:
    """Train the configured SAE(s); ``shards`` overrides ``train.shards`` (the pipeline's input)."""
    t = cfg.train.model_copy(update={
        "shards": resolve_uri(shards, cfg.train.shards, cfg.run.workdir, "cache"),
        "out": resolve_uri(None, cfg.train.out, cfg.run.workdir, STEP),
    })
    with process_group(t) as ranks, stage_context(cfg, STEP, {"train": t.model_dump(mode="json")}, parent_run_id,
                                                  ranks=ranks) as ctx:
        shard_set = open_shards(t)
        key = output_key(t)
        sealed = reusable_output(t.out, KIND, key, overwrite=ctx.overwrite, setting="train.out", context=ctx)
        if sealed is not None:
            figures = dict(sealed.extra["figures"])
        else:
            variants = plan_variants(t, shard_set)
            bundle, figures = Trainer(t, shard_set, variants, ctx, key, overwrite=ctx.overwrite).fit()
            if ctx.is_main:
                _seal(t, bundle, variants, shard_set, figures, key)
        ctx.finish(figures)
    return StageOutputs(t.out, figures)


def output_key(t: TrainConfig) -> OutputKey:
    """What the SAEs are made from: the settings that change what is trained, and the fingerprint of the
    shards (and of ``train.init_from``'s SAEs when given)."""
    settings = {k: v for k, v in t.model_dump(mode="json").items() if k not in _NOT_TRAINING + _INPUTS}
    inputs = {"shards": t.shards, **({"init_from": t.init_from} if t.init_from else {})}
    return OutputKey.of({"train": settings}, inputs)


# ---------------------------------------------------------------------------------------------------
# validation and variants


def open_shards(t: TrainConfig) -> ActivationShards:
    """The shards to train on, checked: hook points present, shards there, none counted with NaN or inf."""
    try:
        shards = ActivationShards(t.shards)
    except (FileNotFoundError, storage.ManifestError) as e:
        raise TrainError(f"no activation shards at {t.shards}: {e}") from e
    hookpoints = t.hookpoints or shards.hookpoints
    missing = [h for h in hookpoints if h not in shards.hookpoints]
    if missing:
        raise TrainError(f"hook points {missing} are not in {t.shards}; it holds {shards.hookpoints}")
    if not shards.shards(hookpoints[0]):
        raise TrainError(f"{t.shards} holds no shards")
    bad = [ref for h in hookpoints for ref in shards.shards(h) if ref.nonfinite]
    if bad:
        raise TrainError(f"{len(bad)} shards of {t.shards} hold NaN or inf (counted when they were written), "
                         f"e.g. {bad[0].name} ({bad[0].nonfinite} rows); re-cache them (e.g. cache.model_dtype=float32)")
    return shards


def plan_variants(t: TrainConfig, shards: ActivationShards) -> list[Variant]:
    """One :class:`Variant` per sweep entry (or the one SAE) and hook point, in that order."""
    hookpoints = t.hookpoints or shards.hookpoints
    out = []
    for spec in t.sweep or [None]:
        k = spec.k if spec and spec.k else t.k
        widths = {h: (spec.num_latents if spec and spec.num_latents else t.num_latents)
                  or t.expansion_factor * shards.dim(h) for h in hookpoints}
        name = "" if spec is None else (spec.name or f"k{k}-m{widths[hookpoints[0]]}")
        for h in hookpoints:
            width, variant_k = widths[h], k
            if t.init_from:
                width, variant_k = _init_shape(t, variant_path(name, h), h, shards.dim(h))
            if variant_k > width:
                raise TrainError(f"k = {variant_k} exceeds the number of latents {width}")
            out.append(Variant(name, h, width, variant_k, t.lr or default_lr(width)))
    return out


def _init_shape(t: TrainConfig, path: str, hookpoint: str, d_in: int) -> tuple[int, int]:
    """Width and k of the SAE at ``<train.init_from>/<path>``; its input width must be the activations'."""
    from mmsae.sae.checkpoint import read_config

    uri = storage.join(t.init_from, path)
    try:
        sae_cfg = read_config(uri)
    except FileNotFoundError as e:
        raise TrainError(f"train.init_from: no SAE at {uri}: {e}") from e
    if sae_cfg.d_in != d_in:
        raise TrainError(f"the SAE at {uri} takes inputs of width {sae_cfg.d_in}, but the activations of "
                         f"{hookpoint} at {t.shards} have width {d_in}")
    return sae_cfg.effective_num_latents, sae_cfg.k


# ---------------------------------------------------------------------------------------------------
# the artifact


@torch.no_grad()
def _seal(t: TrainConfig, bundle: SaeBundle, variants: list[Variant], shards: ActivationShards,
          figures: dict[str, Any], key: OutputKey) -> None:
    """Write every SAE (decoder rows stored normalised, as the forward used them), metrics.json, the manifest."""
    from mmsae.sae.checkpoint import save_sae

    names = []
    for v in variants:
        sae = bundle.saes[v.key]
        sae.set_decoder_norm_to_unit_norm()
        sae.normalize_in_forward = False
        save_sae(sae, storage.join(t.out, v.path))
        names += [f"{v.path}/{n}" for n in storage.list_files(storage.join(t.out, v.path))]
    storage.write_json(storage.join(t.out, "metrics.json"), figures)
    names.append("metrics.json")
    hookpoints = list(dict.fromkeys(v.hookpoint for v in variants))
    storage.write_manifest(
        t.out, KIND, files=names, config={"train": t.model_dump(mode="json")},
        inputs={"shards": t.shards, **({"init_from": t.init_from} if t.init_from else {})},
        extra={"figures": figures, "dims": {h: shards.dim(h) for h in hookpoints},
               "variants": [dataclasses.asdict(v) for v in variants], "hookpoints": hookpoints,
               KEY_FIELD: key.to_json()},
    )
