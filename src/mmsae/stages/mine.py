"""Stage mine: stream activation shards through an SAE and keep, per feature, its top images and their maps.

Reads: an activation-shard artifact (``mine.shards``; ``mmsae.activations``) and an SAE (``mine.sae``: the
train stage's output, or one folder in sparsify's layout); for heat maps and ground truth also the image
set and the LMM's image geometry that the shards name. Writes a top-examples artifact at ``mine.out``
(format in ``mmsae.examples``): per feature its top-K images by score (max or mean over the image's
tokens), activating images sampled across score quantiles, random images where it never fires, its token
and image frequencies, its max and mean activation and a histogram of its activations; the tokens its
decoder direction promotes and suppresses through the LMM's unembedding (``mmsae.unembed``); the per-token
activation maps of every kept image over all its views; heat-map PNGs; and, when the image set has planted
concepts, the ground-truth figures (``mmsae.groundtruth``). The mining itself is
:class:`mmsae.mining.Miner`, in memory bounded by features x K.

Shards whose manifest counts rows holding NaN or inf are refused before mining, as train refuses them; the
codes of every shard are checked as they are encoded (a shard whose count was not recorded may hold such
rows, and an SAE may overflow): a NaN or inf code is refused, naming the shard, so no such value reaches
the ranking or the artifact's JSON.

A sealed artifact made from the same key (the mine settings that shape it, and the fingerprints of the
shards and the SAE) is reused; one made from another key is refused unless ``run.overwrite`` is set
(``mmsae.stages._base.reusable_output``). ``mine.batch_rows``, ``mine.max_block`` and ``mine.device`` bound
memory or place the work and are not part of the key: the artifact's files do not depend on them.

Heat maps are rendered for the top images (``mmsae.heatmaps``) at most ``mine.heatmap_max_side`` pixels
on the long side: the image is scaled down and the activation map sampled on the smaller grid at the
original image's geometry, so they stay aligned (ground truth measures its IoU on maps at the original
size). The overlays of one feature share a scale (its largest activation on a patch token of those
images), the masked renderings use each image's own maximum.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from mmsae import activations, examples, storage
from mmsae.config import MineConfig, RunConfig
from mmsae.mining import MineError, Miner, MineResult, NonFiniteCodesError
from mmsae.selection import select_features
from mmsae.stages._base import (
    KEY_FIELD,
    OutputKey,
    StageContext,
    StageOutputs,
    resolve_uri,
    reusable_output,
    stage_context,
)

if TYPE_CHECKING:
    from datasets import Dataset
    from PIL import Image

    from mmsae.models.geometry import PatchInfo
    from mmsae.sae.model import TopKSAE

log = logging.getLogger(__name__)

STEP = "mine"
NOT_IN_KEY = ("shards", "sae", "out", "device", "batch_rows", "max_block")
"""Mine settings outside the output key: the inputs (covered by their fingerprints), the output, and the
settings that only bound memory or place the work."""


def run(cfg: RunConfig, shards: str | None = None, sae: str | None = None,
        parent_run_id: str | None = None) -> StageOutputs:
    """Mine top examples; ``shards`` / ``sae`` override the config's URIs (the pipeline's inputs)."""
    workdir = cfg.run.workdir
    m = cfg.mine.model_copy(update={
        "shards": resolve_uri(shards, cfg.mine.shards, workdir, "cache"),
        "sae": resolve_uri(sae, cfg.mine.sae, workdir, "train"),
        "out": resolve_uri(None, cfg.mine.out, workdir, STEP),
    })
    with stage_context(cfg, STEP, {"mine": m.model_dump(mode="json")}, parent_run_id) as ctx:
        shard_set = _open_shards(m)
        key = output_key(m)
        sealed = reusable_output(m.out, examples.KIND, key, overwrite=cfg.run.overwrite, setting="mine.out")
        figures = dict(sealed.extra["figures"]) if sealed is not None else _mine(m, shard_set, key, ctx)
        ctx.finish(figures)
    return StageOutputs(m.out, figures)


def output_key(m: MineConfig) -> OutputKey:
    """What top examples are made from: the mine settings that shape them and the shards' and SAE's fingerprints."""
    return OutputKey.of(m.model_dump(mode="json", exclude=set(NOT_IN_KEY)), {"shards": m.shards, "sae": m.sae})


def _mine(m: MineConfig, shard_set: activations.ActivationShards, key: OutputKey, ctx: StageContext
          ) -> dict[str, Any]:
    """Mine, write the artifact (sealed last) and return its figures."""
    inputs = _open_inputs(m, shard_set, ctx.device(m.device))
    result, seconds = _mine_shards(m, inputs, ctx)
    if m.logit_tokens and shard_set.model:
        _add_logit_tokens(m, inputs, result.records)
    selected = select_features(result.records, m.select, m.seed)
    figures = _figures(m, result, selected, seconds)
    files = _ArtifactFiles(m.out)
    files.put(examples.FEATURES_FILE, "".join(storage.json_text(r.to_json()) + "\n" for r in result.records).encode())
    files.put(examples.MAPS_FILE, examples.encode_maps(result.maps))
    files.put(examples.IMAGES_FILE, _referenced_images(result, inputs.image_sizes))
    tokens_of = _token_reader(result.maps)
    if m.heatmaps != "none":
        chosen = set(selected)
        which = result.records if m.heatmaps == "mined" else [r for r in result.records if r.feature in chosen]
        figures["heatmaps"] = _render_heatmaps(which, inputs, tokens_of, m, files.put)
    if inputs.labels is not None:
        figures.update(_ground_truth(m, inputs, result, tokens_of, files.put))
    storage.write_manifest(
        m.out, examples.KIND, files=files.entries, config={"mine": m.model_dump(mode="json")},
        inputs={"sae": m.sae, "shards": m.shards, "image_set": shard_set.image_set},
        format_version=examples.FORMAT_VERSION,
        extra={"hookpoint": inputs.hookpoint, "family": inputs.family, "num_latents": inputs.sae.num_latents,
               "k": inputs.sae.cfg.k, "score": m.score, "top_k": m.top_k, "n_quantiles": m.n_quantiles,
               "n_random": m.n_random, "features": [r.feature for r in result.records], "selected": selected,
               "figures": figures, "sae_path": inputs.sae_path, "tokens": m.tokens,
               "heatmap_max_side": m.heatmap_max_side, KEY_FIELD: key.to_json()},
    )
    log.info("mined %d features at %s: %s", len(result.records), m.out, figures)
    return figures


# ---------------------------------------------------------------------------------------------------
# inputs


@dataclass
class _Inputs:
    """What mining reads besides the shards' rows: the SAE, the image sizes, and what heat maps and ground
    truth need (the image set, the LMM's image geometry, the images' concept labels)."""

    shards: activations.ActivationShards
    hookpoint: str
    sae_path: str
    sae: TopKSAE
    image_sizes: activations.ImageTable
    family: str
    image_set: Dataset | None = None
    patch_info: PatchInfo | None = None
    concepts: Sequence[str] = ()
    labels: torch.Tensor | None = None


def _open_shards(m: MineConfig) -> activations.ActivationShards:
    try:
        return activations.ActivationShards(m.shards)
    except (FileNotFoundError, storage.ManifestError) as e:
        raise MineError(f"no activation shards at {m.shards}: {e}") from e


def _open_inputs(m: MineConfig, shards: activations.ActivationShards, device: torch.device) -> _Inputs:
    from mmsae.sae.checkpoint import load_sae

    sae_path, hookpoint = resolve_sae(m, shards)
    _refuse_nonfinite_shards(m, shards, hookpoint)
    sae = load_sae(sae_path, device=device, dtype=m.dtype)
    if sae.d_in != shards.dim(hookpoint):
        raise MineError(f"the SAE at {sae_path} takes inputs of width {sae.d_in}, but the activations of "
                        f"{hookpoint} at {m.shards} have width {shards.dim(hookpoint)}")
    inputs = _Inputs(shards, hookpoint, sae_path, sae, _shard_images(shards),
                     str(shards.manifest.extra.get("family", "")))
    need_images = m.heatmaps != "none"
    if not (need_images or shards.image_set):
        return inputs
    if not shards.image_set:
        raise MineError(f"the shards at {m.shards} name no image set, which heat maps need; set mine.heatmaps=none")
    from mmsae import groundtruth
    from mmsae.data.images import load_image_set

    inputs.image_set = load_image_set(shards.image_set, shards.split)
    if shards.model:
        from mmsae.heatmaps import load_patch_info

        inputs.patch_info = load_patch_info(shards.model, inputs.family or None)
    elif need_images:
        raise MineError(f"the shards at {m.shards} name no model, whose image geometry heat maps need; "
                        "set mine.heatmaps=none")
    if groundtruth.has_ground_truth(inputs.image_set):
        inputs.concepts, inputs.labels = groundtruth.concept_labels(inputs.image_set["concepts"])
    return inputs


def resolve_sae(m: MineConfig, shards: activations.ActivationShards) -> tuple[str, str]:
    """(SAE folder, hook point) to mine: ``mine.sae`` itself when it is one SAE folder, else
    ``<sae>/[<variant>/]<hookpoint>`` of the train stage's output."""
    from mmsae.sae.checkpoint import CFG_FILENAME

    hookpoint = m.hookpoint or shards.hookpoints[0]
    if hookpoint not in shards.hookpoints:
        raise MineError(f"hook point {hookpoint!r} is not in the shards at {m.shards}; they hold "
                        f"{shards.hookpoints}")
    if storage.exists(storage.join(m.sae, CFG_FILENAME)):
        return m.sae, hookpoint
    try:
        sealed = storage.read_manifest(m.sae, kind="sae")
        names = sorted({v.get("name", "") for v in sealed.extra.get("variants", [])})
    except (FileNotFoundError, storage.ManifestError):
        names = []
    if not m.variant and len(names) > 1:
        raise MineError(f"the SAEs at {m.sae} are a sweep of {names}; choose one with mine.variant")
    path = storage.join(m.sae, *([m.variant] if m.variant else []), hookpoint)
    if not storage.exists(storage.join(path, CFG_FILENAME)):
        raise MineError(f"no SAE for hook point {hookpoint!r} at {path} (expected {CFG_FILENAME} and "
                        f"sae.safetensors in sparsify's layout)")
    return path, hookpoint


def _refuse_nonfinite_shards(m: MineConfig, shards: activations.ActivationShards, hookpoint: str) -> None:
    """Refuse shards whose manifest counts rows holding NaN or inf (as train does): they would rank first."""
    bad = [ref for ref in shards.shards(hookpoint) if ref.nonfinite]
    if bad:
        named = ", ".join(f"{ref.name} ({ref.nonfinite} rows)" for ref in bad[:5])
        raise MineError(f"{len(bad)} shards of {m.shards} hold rows with NaN or inf (counted when they were "
                        f"cached): {named}{', ...' if len(bad) > 5 else ''}. Mining them would rank those rows "
                        "first; re-cache them with a dtype whose range holds the activations (e.g. "
                        "cache.model_dtype=float32)")


def _shard_images(shards: activations.ActivationShards) -> activations.ImageTable:
    """image_idx -> (width, height) of every cached image (the shards' binary image table)."""
    try:
        return shards.image_sizes()
    except activations.ShardFormatError as e:
        raise MineError(str(e)) from e


# ---------------------------------------------------------------------------------------------------
# mining


def _mine_shards(m: MineConfig, inputs: _Inputs, ctx: StageContext) -> tuple[MineResult, float]:
    """Stream the hook point's shards through the SAE into a :class:`Miner`; its result and the seconds taken."""
    sae = inputs.sae
    miner = Miner.from_config(m, sae.num_latents, sae.device, inputs.labels)

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = sae.encode(x.to(sae.device, sae.dtype))
        return out.top_acts, out.top_indices

    start = time.perf_counter()
    refs = inputs.shards.shards(inputs.hookpoint)
    with torch.inference_mode(), tqdm(total=len(refs), desc="mine", unit="shard") as bar:
        for n, ref in enumerate(refs, start=1):
            cols = inputs.shards.read(ref)
            keep = activations.token_mask(cols, m.tokens)
            try:
                miner.add_shard({c: v[keep] for c, v in cols.items()}, encode, m.batch_rows)
            except NonFiniteCodesError as e:
                raise MineError(_nonfinite_message(m, ref, e)) from e
            ctx.log_progress({"tokens_per_s": miner.tokens / (time.perf_counter() - start), "images": miner.images,
                              "state_mib": miner.state_bytes() / 2**20}, step=n)
            bar.update(1)
    if miner.tokens == 0:
        raise MineError(f"the shards at {m.shards} hold no {m.tokens} tokens for hook point {inputs.hookpoint!r}")
    result = miner.finish()
    return result, time.perf_counter() - start


def _nonfinite_message(m: MineConfig, ref: activations.ShardRef, error: Exception) -> str:
    where = f"shard {ref.name} of {m.shards}"
    if ref.nonfinite is None:
        return (f"{where} holds NaN or inf activations ({error}; its count was not recorded when it was "
                "cached). Re-cache it with a dtype whose range holds the activations (e.g. "
                "cache.model_dtype=float32)")
    return (f"the SAE's codes of {where} hold NaN or inf ({error}) although its rows were counted finite: "
            f"the SAE at {m.sae} overflows in mine.dtype={m.dtype} or holds NaN; mine with mine.dtype=float32")


def _add_logit_tokens(m: MineConfig, inputs: _Inputs, records: Sequence[examples.FeatureRecord]) -> None:
    """Give each record the tokens its decoder direction promotes and suppresses (``mmsae.unembed``)."""
    from mmsae.unembed import load_unembedding, logit_tokens

    unembedding = load_unembedding(inputs.shards.model)
    if unembedding is None:
        return
    if unembedding.width != inputs.sae.d_in:
        log.info("no logit tokens: the unembedding of %s takes width %d, the SAE's hook point %s has %d",
                 inputs.shards.model, unembedding.width, inputs.hookpoint, inputs.sae.d_in)
        return
    promoted, suppressed = logit_tokens(unembedding, inputs.sae.W_dec.detach(), [r.feature for r in records],
                                        m.logit_tokens)
    for record, up, down in zip(records, promoted, suppressed, strict=True):
        record.promoted, record.suppressed = up, down


def _figures(m: MineConfig, result: MineResult, selected: list[int], seconds: float) -> dict[str, Any]:
    alive = sum(1 for r in result.records if r.top)
    figures: dict[str, Any] = {
        "features_mined": len(result.records),
        "features_alive": alive,
        "dead_pct": 100.0 * (1 - alive / len(result.records)) if result.records else 0.0,
        "features_selected": len(selected),
        "images": result.images,
        "tokens": result.tokens,
        "tokens_per_s": result.tokens / seconds if seconds > 0 else 0.0,
        "map_rows": int(result.maps["feature"].numel()),
        "peak_state_mib": result.peak_state_bytes / 2**20,
    }
    if not m.features:  # every latent mined: the frequencies add up to the mean number active per token
        figures["mean_l0"] = float(sum(r.frequency for r in result.records))
    return figures


# ---------------------------------------------------------------------------------------------------
# the artifact


class _ArtifactFiles:
    """Writes the artifact's files (from any thread) and keeps their manifest entries."""

    def __init__(self, out: str):
        self.out = out
        self.entries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def put(self, name: str, data: bytes) -> None:
        storage.write_bytes(storage.join(self.out, name), data)
        with self._lock:
            self.entries[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _referenced_images(result: MineResult, sizes: activations.ImageTable) -> bytes:
    """images.json: the size of every image a record names."""
    referenced = sorted({t["image_idx"] for r in result.records for t in r.top}
                        | {q["image_idx"] for r in result.records for q in r.quantiles}
                        | {i for r in result.records for i in r.negatives})
    return storage.json_text({str(i): {"width": sizes[i][0], "height": sizes[i][1]} for i in referenced},
                             sort_keys=True).encode()


TokenReader = Callable[[int, int], dict[str, np.ndarray]]


def _token_reader(maps: Mapping[str, torch.Tensor]) -> TokenReader:
    """``tokens_of(feature, image_idx)``: that pair's rows of the maps (sorted by feature, image)."""
    feature = maps["feature"].numpy().astype(np.int64)
    image = maps["image_idx"].numpy()
    index: dict[tuple[int, int], tuple[int, int]] = {}
    if len(feature):
        change = np.flatnonzero((np.diff(feature) != 0) | (np.diff(image) != 0)) + 1
        starts = np.concatenate([[0], change]).tolist()
        ends = np.concatenate([change, [len(feature)]]).tolist()
        index = {(int(feature[s]), int(image[s])): (s, e) for s, e in zip(starts, ends, strict=True)}

    def tokens_of(feature_id: int, image_idx: int) -> dict[str, np.ndarray]:
        start, end = index.get((feature_id, image_idx), (0, 0))
        return {c: v[start:end].numpy() for c, v in maps.items()}

    return tokens_of


def _ground_truth(m: MineConfig, inputs: _Inputs, result: MineResult, tokens_of: TokenReader,
                  put: Callable[[str, bytes], None]) -> dict[str, float]:
    """Score the features against the image set's planted concepts; writes ground_truth.json."""
    from mmsae import groundtruth

    counts = result.label_counts
    detectors = groundtruth.best_detectors(counts["label_hits"], counts["image_count"], counts["label_images"],
                                           list(inputs.concepts), [r.feature for r in result.records])
    matches = groundtruth.concept_matches(
        result.records, inputs.image_set["concepts"], top_k=m.top_k, tokens_of=tokens_of,
        mask_of=groundtruth.mask_reader(inputs.image_set), info=inputs.patch_info,
        image_ids=inputs.image_sizes.ids().tolist(), threshold=m.gt_iou_threshold, detectors=detectors)
    figures = groundtruth.summarize(matches, m.gt_kinds)
    rows = {"kinds": list(m.gt_kinds), "threshold": m.gt_iou_threshold, "iou": groundtruth.IOU_METHOD,
            "figures": figures, "concepts": [x.to_json() for x in matches]}
    put(examples.GROUND_TRUTH_FILE, storage.json_text(rows, indent=2).encode())
    return figures


def _render_heatmaps(records: Sequence[examples.FeatureRecord], inputs: _Inputs, tokens_of: TokenReader,
                     m: MineConfig, put: Callable[[str, bytes], None]) -> int:
    """Overlay and masked PNGs of the top images of ``records``, at most ``mine.heatmap_max_side`` pixels on the
    long side; returns the number of files written."""
    from mmsae.heatmaps import activation_map, png_bytes, render_masked, render_overlay

    image = _image_reader(inputs, m.heatmap_max_side)
    jobs = [(r, rank, t["image_idx"]) for r in records for rank, t in enumerate(r.top[: m.heatmap_top])]
    # the overlays of one feature share a scale: its largest activation on a drawable (patch) token
    vmax: dict[int, float] = {}
    for rec, _, i in jobs:
        tokens = tokens_of(rec.feature, i)
        drawn = tokens["act"][tokens["view"] >= 0]
        vmax[rec.feature] = max(vmax.get(rec.feature, 0.0), float(drawn.max()) if drawn.size else 0.0)

    def one(job) -> int:
        rec, rank, i = job
        img = image(i)
        width, height = inputs.image_sizes[i]
        heat = activation_map(tokens_of(rec.feature, i), (height, width), inputs.patch_info,
                              size=(img.height, img.width))
        put(examples.heatmap_name(rec.feature, "overlay", rank, i),
            png_bytes(render_overlay(img, heat, vmax[rec.feature] or None)))
        put(examples.heatmap_name(rec.feature, "masked", rank, i), png_bytes(render_masked(img, heat)))
        return 2

    # rendering releases the GIL in torch and Pillow, and writes to S3 wait on the network: overlap them
    workers = max(1, min(8, 2 * (os.cpu_count() or 1)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return sum(tqdm(pool.map(one, jobs), total=len(jobs), desc="heat maps", unit="image"))


def _image_reader(inputs: _Inputs, max_side: int | None) -> Callable[[int], Image.Image]:
    """``image(i)``: image i of the image set as RGB, checked against the cached size and scaled down to
    ``max_side`` pixels on its long side (cached: images recur across features)."""
    from PIL import Image

    from mmsae.heatmaps import fit_size

    images = inputs.image_set.select_columns(["image"])
    sizes = inputs.image_sizes

    @lru_cache(maxsize=512)
    def image(i: int) -> Image.Image:
        img = images[i]["image"].convert("RGB")
        if img.size != sizes[i]:
            raise MineError(f"image {i} of the image set is {img.size} (width, height), but the shards recorded "
                            f"{sizes[i]}: the image set is not the one that was cached")
        size = fit_size(img.size, max_side)
        return img if size == img.size else img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)

    return image
