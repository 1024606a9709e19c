"""What every stage shares: where its outputs go and how it records its headline figures.

Writes ``<workdir>/summary/<step>.json`` (the step's headline figures), which the demo gathers into one
``summary.json`` and the pipeline's final report reads.
"""

from __future__ import annotations

import logging
from typing import Any

from mmsae import storage

log = logging.getLogger(__name__)

SUMMARY_DIR = "summary"


def stage_uri(workdir: str, *parts: str) -> str:
    """The URI of a stage's output directory under the run's workdir."""
    return storage.join(workdir, *parts)


def record_summary(workdir: str, step: str, figures: dict[str, Any]) -> str:
    """Write a step's headline figures (atomically) and return the URI written."""
    uri = storage.join(workdir, SUMMARY_DIR, f"{step}.json")
    storage.write_json(uri, figures)
    log.info("%s: %s", step, figures)
    return uri


def read_summaries(workdir: str) -> dict[str, dict[str, Any]]:
    """All steps' headline figures recorded under a workdir, keyed by step name."""
    base = storage.join(workdir, SUMMARY_DIR)
    try:
        names = storage.list_files(base)
    except FileNotFoundError:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        if name.endswith(".json"):
            out[name[: -len(".json")]] = storage.read_json(storage.join(base, name))
    return out


def model_prompt(model_uri: str) -> str:
    """The prompt an LMM artifact recommends in its manifest (the toy LMM records its own), else ``<image>``."""
    try:
        return str(storage.read_manifest(model_uri).extra.get("prompt", "<image>"))
    except (FileNotFoundError, storage.ManifestError):
        return "<image>"
