"""Stage toyworld: build the toy world's image set and its trained toy LMM, the pipeline's built-in inputs.

Reads: the ``toyworld`` and ``toylmm`` config sections.
Writes: ``<workdir>/toyworld/images`` (an image set: HF dataset on disk + manifest) and
``<workdir>/toyworld/lmm`` (the toy LLaVA-NeXT, ``save_pretrained`` layout + manifest). The toy LMM is
trained once per config and cached (``$MMSAE_CACHE_DIR``); later runs copy it.
Both outputs are skipped when a complete artifact built from the same config is already there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsae import storage, tracking
from mmsae.config import RunConfig
from mmsae.stages.common import record_summary, stage_uri

log = logging.getLogger(__name__)

STEP = "toyworld"
LMM_KIND = "lmm"


@dataclass(frozen=True)
class ToyWorldOutputs:
    image_set_uri: str
    lmm_uri: str
    figures: dict[str, Any]


def run(cfg: RunConfig, parent_run_id: str | None = None) -> ToyWorldOutputs:
    """Build (or reuse) the toy world and the toy LMM under the run's workdir."""
    from mmsae.data import toyworld
    from mmsae.models import toy

    images_uri = stage_uri(cfg.run.workdir, STEP, "images")
    lmm_uri = stage_uri(cfg.run.workdir, STEP, "lmm")
    world_cfg = cfg.toyworld.model_dump(mode="json")
    with tracking.stage_run(
        STEP,
        parent_run_id=parent_run_id,
        config={"toyworld": world_cfg, "toylmm": cfg.toylmm.model_dump(mode="json")},
        uri=cfg.tracking.uri,
        experiment=cfg.tracking.experiment,
        enabled=cfg.tracking.enabled,
    ) as tr:
        if _complete(images_uri, "image_set", world_cfg):
            log.info("image set already built at %s", images_uri)
            world_info = storage.read_manifest(images_uri, kind="image_set").extra
        else:
            world_info = toyworld.build(cfg.toyworld, images_uri)

        lmm_dir, lmm_metrics = toy.get_or_train(cfg.toylmm, cfg.toyworld)
        lmm_cfg = {"toylmm": cfg.toylmm.model_dump(mode="json"), "toyworld": world_cfg}
        if not _complete(lmm_uri, LMM_KIND, lmm_cfg):
            _publish_model(Path(lmm_dir), lmm_uri, lmm_cfg, lmm_metrics)

        figures = {
            "n_train_images": int(world_info.get("n_train", cfg.toyworld.n_train)),
            "n_heldout_images": int(world_info.get("n_heldout", cfg.toyworld.n_heldout)),
            "toy_lmm_pair_accuracy": float(lmm_metrics["pair_accuracy"]),
            "toy_lmm_color_accuracy": float(lmm_metrics["color_accuracy"]),
            "toy_lmm_texture_accuracy": float(lmm_metrics["texture_accuracy"]),
        }
        tr.log_metrics(figures)
        record_summary(cfg.run.workdir, STEP, figures)
    return ToyWorldOutputs(images_uri, lmm_uri, figures)


def _complete(uri: str, kind: str, config: dict[str, Any]) -> bool:
    """True when ``uri`` holds a finished artifact of ``kind`` built from exactly ``config``."""
    try:
        manifest = storage.read_manifest(uri, kind=kind)
    except (FileNotFoundError, storage.ManifestError):
        return False
    return manifest.config == config


def _publish_model(local_dir: Path, uri: str, config: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Copy a saved model directory to ``uri`` and seal it with a manifest (written last)."""
    names = sorted(str(p.relative_to(local_dir)) for p in local_dir.rglob("*") if p.is_file())
    names = [n for n in names if n != storage.MANIFEST_NAME]
    for name in names:
        storage.upload_file(local_dir / name, storage.join(uri, name))
    from mmsae.models.toy import PROMPT

    storage.write_manifest(
        uri, LMM_KIND, files=names, config=config,
        extra={"family": "llava_next", "metrics": metrics, "prompt": PROMPT},
    )
    log.info("toy LMM published at %s", uri)
