"""The demo: the whole pipeline DAG on this machine through ``kfp.local``, on the built-in toy world.

Writes under ``out``: ``work/`` (every stage's artifacts), ``kfp/`` (the local pipeline root),
``mlflow.db`` + ``mlartifacts/`` (tracking), ``config.yaml`` (the run config) and ``summary.json``
(each step's headline figures: ``steps`` the run-wide ones, ``layers`` each layer's by step).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mmsae import storage
from mmsae.config import RunConfig, dump_config

log = logging.getLogger(__name__)

#: The demo's run config: the toy world, sized for a 2-core machine.
DEMO_PROFILE = Path(__file__).parent / "profiles" / "demo.yaml"


def demo_config(cfg: RunConfig, out: Path) -> RunConfig:
    """The config with its outputs and tracking pointed inside ``out`` (unless set explicitly)."""
    cfg = cfg.model_copy(deep=True)
    if cfg.run.workdir == RunConfig().run.workdir:
        cfg.run.workdir = str(out / "work")
    if cfg.tracking.uri is None:
        cfg.tracking.uri = f"sqlite:///{out / 'mlflow.db'}"
    if cfg.run.name == RunConfig().run.name:
        cfg.run.name = "demo"
    return cfg


def run_demo(cfg: RunConfig, out: str | Path) -> dict[str, Any]:
    """Run the pipeline locally and return (and write) the summary of every step's figures."""
    from kfp import local

    from mmsae.pipelines.sae_interp import sae_interp
    from mmsae.stages._base import read_layer_summaries, read_summaries

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(cfg, out)
    text = dump_config(cfg)
    (out / "config.yaml").write_text(text)
    log.info("running the pipeline locally; artifacts under %s", out)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out / "kfp"))
    sae_interp(config_yaml=text, run_name=cfg.run.name)
    summary = {
        "workdir": cfg.run.workdir,
        "tracking_uri": cfg.tracking.uri,
        "steps": read_summaries(cfg.run.workdir),
        "layers": read_layer_summaries(cfg.run.workdir),
    }
    (out / "summary.json").write_text(storage.json_text(summary, indent=2, sort_keys=True))
    return summary
