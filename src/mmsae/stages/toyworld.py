"""Stage toyworld: build the toy world's image set and its trained toy LMM, the pipeline's built-in inputs.

Reads: the ``toyworld`` and ``toylmm`` config sections.
Writes: ``<workdir>/toyworld/images`` (an image set: HF dataset on disk + manifest) and
``<workdir>/toyworld/lmm`` (the toy LLaVA-NeXT, ``save_pretrained`` layout + manifest). The toy LMM is
trained once per config and cached (``$MMSAE_CACHE_DIR``); later runs copy it.
Each output follows the stages' one reuse rule (`mmsae.stages._base`): a complete artifact built from the
same config is reused; one built from another config is refused unless ``run.overwrite`` is set.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mmsae import storage
from mmsae.config import RunConfig
from mmsae.stages._base import (
    KEY_FIELD,
    OutputKey,
    StageOutputs,
    resolve_uri,
    reusable_output,
    stage_context,
)

log = logging.getLogger(__name__)

STEP = "toyworld"
IMAGE_SET_KIND = "image_set"
LMM_KIND = "lmm"


def run(cfg: RunConfig, parent_run_id: str | None = None) -> StageOutputs:
    """Build (or reuse) the toy world and the toy LMM under the run's workdir.

    Returns the image set's URI as ``uri`` and the LMM's as ``uris["lmm"]``.
    """
    from mmsae.data import toyworld
    from mmsae.models import toy

    images_uri = resolve_uri(None, None, cfg.run.workdir, STEP, "images")
    lmm_uri = resolve_uri(None, None, cfg.run.workdir, STEP, "lmm")
    world_cfg = cfg.toyworld.model_dump(mode="json")
    lmm_cfg = {"toylmm": cfg.toylmm.model_dump(mode="json"), "toyworld": world_cfg}
    with stage_context(cfg, STEP, lmm_cfg, parent_run_id, output=images_uri, per_layer=False) as ctx:
        images_key = OutputKey.of({"toyworld": world_cfg}, {})
        sealed = reusable_output(images_uri, IMAGE_SET_KIND, images_key, overwrite=ctx.overwrite,
                                 setting="run.workdir")
        if sealed is not None:
            world_info = sealed.extra
        else:
            world_info = toyworld.build(cfg.toyworld, images_uri, manifest_extra={KEY_FIELD: images_key.to_json()})

        lmm_dir, lmm_metrics = toy.get_or_train(cfg.toylmm, cfg.toyworld)
        lmm_key = OutputKey.of(lmm_cfg, {})
        if reusable_output(lmm_uri, LMM_KIND, lmm_key, overwrite=ctx.overwrite, setting="run.workdir") is None:
            _publish_model(Path(lmm_dir), lmm_uri, lmm_cfg, lmm_metrics, lmm_key)

        figures = {
            "n_train_images": int(world_info.get("n_train", cfg.toyworld.n_train)),
            "n_heldout_images": int(world_info.get("n_heldout", cfg.toyworld.n_heldout)),
            "toy_lmm_pair_accuracy": float(lmm_metrics["pair_accuracy"]),
            "toy_lmm_color_accuracy": float(lmm_metrics["color_accuracy"]),
            "toy_lmm_texture_accuracy": float(lmm_metrics["texture_accuracy"]),
        }
        ctx.finish(figures)
    return StageOutputs(images_uri, figures, {"lmm": lmm_uri})


def _publish_model(local_dir: Path, uri: str, config: dict[str, Any], metrics: dict[str, Any],
                   key: OutputKey) -> None:
    """Copy a saved model directory to ``uri`` and seal it with a manifest (written last)."""
    names = sorted(str(p.relative_to(local_dir)) for p in local_dir.rglob("*") if p.is_file())
    names = [n for n in names if n != storage.MANIFEST_NAME]
    for name in names:
        storage.upload_file(local_dir / name, storage.join(uri, name))
    from mmsae.models.toy import PROMPT

    storage.write_manifest(
        uri, LMM_KIND, files=names, config=config,
        extra={"family": "llava_next", "metrics": metrics, "prompt": PROMPT, KEY_FIELD: key.to_json()},
    )
    log.info("toy LMM published at %s", uri)
