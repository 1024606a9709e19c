"""The stage skeleton: what every stage shares, so that a stage module holds only its own logic.

- Where outputs go (:func:`resolve_uri`: the argument, else the config, else ``<run.workdir>/<step>``).
- When an existing output is reused (:class:`OutputKey`, :func:`reusable_output`): one rule for every stage.
- The stage's tracking context and summary (:func:`stage_context`, :meth:`StageContext.finish`): an MLflow
  run per stage, the headline figures logged once and written to ``<workdir>/summary/<step>.json`` (a
  stage of one layer: ``<workdir>/summary/layers/<layer>/<step>.json``), which the demo gathers into one
  ``summary.json`` and the report reads.
- Device choice and distributed barriers (:func:`choose_device`, :meth:`StageContext.barrier`).
- What a stage returns (:class:`StageOutputs`).

The reuse rule. A sealed output (an artifact whose manifest is written) is reused only when its manifest
records the same :class:`OutputKey`: the stage config that shapes its bytes **and** the fingerprint of every
input (`mmsae.storage.fingerprint`: an input artifact's manifest, else a raw input's file listing). Anything
else is refused with :class:`OutputMismatchError`, which names what changed and how to proceed (another
output location, or ``run.overwrite=true`` to replace it). Partial work (progress records, training states)
is resumed under the same rule: only from a run with the same key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mmsae import storage, tracking
from mmsae.config import RunConfig

log = logging.getLogger(__name__)

SUMMARY_DIR = "summary"
LAYERS_DIR = "layers"
KEY_FIELD = "output_key"
"""The manifest ``extra`` field that records the :class:`OutputKey` an artifact was made from."""


class OutputMismatchError(RuntimeError):
    """An existing output was made from another config or other inputs; the message says what changed."""


@dataclass(frozen=True)
class StageOutputs:
    """What a stage returns: its main output's URI, its headline figures, and any other named outputs."""

    uri: str
    figures: dict[str, Any]
    uris: dict[str, str] = field(default_factory=dict)
    """Other outputs by name (the toy world's ``lmm``, the report's ``index``)."""


def resolve_uri(given: str | None, configured: str | None, workdir: str, *default: str) -> str:
    """An input or output location: the argument (a pipeline's input), else the config, else the workdir's;
    a local path made absolute (`mmsae.storage.absolute`), so what manifests record holds from any directory."""
    return storage.absolute(given or configured or storage.join(workdir, *default))


# --------------------------------------------------------------------------------------------------
# the reuse rule


@dataclass(frozen=True)
class OutputKey:
    """What an output is made from: the stage config that shapes its bytes and the fingerprint of each input."""

    config: dict[str, Any]
    fingerprints: dict[str, str]

    @classmethod
    def of(cls, config: Mapping[str, Any], inputs: Mapping[str, str]) -> OutputKey:
        """Fingerprint each input (name -> URI); a missing input is an error naming it."""
        prints = {}
        for name, uri in inputs.items():
            try:
                prints[name] = storage.fingerprint(uri)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"input {name} {uri} does not exist ({e}); expected a local path, "
                                        f"file:// or s3:// URI") from e
        return cls(json.loads(json.dumps(dict(config), sort_keys=True)), prints)

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "fingerprints": self.fingerprints}

    def digest(self) -> str:
        """A short hash of the whole key (what progress records and resume keys hold)."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def changes(self, recorded: Mapping[str, Any] | None) -> list[str]:
        """What differs between this key and a recorded one, one phrase each (empty: the same)."""
        if not isinstance(recorded, Mapping):
            return ["it records no config and input fingerprints (made by an older version)"]
        out = []
        old_config = tracking.flatten(recorded.get("config") or {})
        new_config = tracking.flatten(self.config)
        for name in sorted(set(old_config) | set(new_config)):
            if old_config.get(name) != new_config.get(name):
                out.append(f"setting {name}: {_short(old_config.get(name))} -> {_short(new_config.get(name))}")
        old_prints = recorded.get("fingerprints") or {}
        for name in sorted(set(old_prints) | set(self.fingerprints)):
            if old_prints.get(name) != self.fingerprints.get(name):
                out.append(f"input {name} was rewritten or replaced" if name in old_prints and name in
                           self.fingerprints else f"input {name} is new or gone")
        return out


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if value is not None else "(unset)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def mismatch_message(what: str, where: str, changes: list[str], setting: str) -> str:
    """The one wording of a refused output: what is there, what changed, and the two ways on."""
    listed = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
    return (f"{where} holds {what} made from another config or other inputs ({listed}). Set {setting} to "
            f"another location, or run.overwrite=true to replace it")


def reusable_output(out: str, kind: str, key: OutputKey, *, overwrite: bool, setting: str,
                    context: StageContext | None = None) -> storage.Manifest | None:
    """The sealed artifact at ``out`` when it was made from ``key``; None when there is none to reuse.

    A folder holding another kind of artifact, or a manifest that cannot be read, is always refused (it is
    not this stage's to replace). An artifact of this kind made from another key is refused with
    :class:`OutputMismatchError`, or deleted (manifest first) when ``overwrite`` is set. Under several ranks
    pass the stage's ``context``: every rank reads, rank 0 alone deletes, between two barriers.
    """
    sealed = sealed_artifact(out, kind, setting)
    if sealed is None:
        return None
    changes = key.changes(sealed.extra.get(KEY_FIELD))
    if not changes:
        log.info("%s: reusing the %s artifact already there (same config and inputs)", out, kind)
        return sealed
    if not overwrite:
        raise OutputMismatchError(mismatch_message(f"a {kind!r} artifact", f"{setting} {out}", changes, setting))
    log.warning("%s: replacing the %s artifact made from another config or other inputs (run.overwrite: %s)",
                out, kind, "; ".join(changes[:8]))
    if context is not None:
        context.barrier()  # every rank has read the manifest before it goes
    if context is None or context.is_main:
        delete_artifact(out, sealed)
    if context is not None:
        context.barrier()
    return None


def sealed_artifact(out: str, kind: str, setting: str) -> storage.Manifest | None:
    """The manifest of the ``kind`` artifact at ``out``; None when there is no manifest.

    A manifest of another kind, or one that cannot be read, is an error: that folder is not ours to overwrite.
    """
    try:
        sealed = storage.read_manifest(out)
    except storage.ManifestError as e:
        if not storage.exists(storage.join(out, storage.MANIFEST_NAME)):
            return None
        raise OutputMismatchError(f"{setting} {out} holds a {storage.MANIFEST_NAME} that cannot be read ({e}); "
                                  f"expected a {kind!r} artifact or none: choose another {setting}") from e
    if sealed.kind != kind:
        raise OutputMismatchError(f"{setting} {out} holds a {sealed.kind!r} artifact, not a {kind!r} one; choose "
                                  f"another {setting} (or delete that folder to reuse it)")
    return sealed


def delete_artifact(out: str, sealed: storage.Manifest) -> None:
    """Delete a sealed artifact: its manifest first (it is no longer complete), then the files it lists."""
    storage.delete(storage.join(out, storage.MANIFEST_NAME))
    for name in sealed.files:
        storage.delete(storage.join(out, name))


# --------------------------------------------------------------------------------------------------
# processes and devices


def dist_env() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from the launcher's variables (one process: ``(0, 1, 0)``)."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def choose_device(setting: str, local_rank: int = 0) -> torch.device:
    """``auto``: the local rank's GPU when there is one, else the CPU; otherwise the device named."""
    if setting == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(setting)


# --------------------------------------------------------------------------------------------------
# tracking and summaries


@dataclass
class StageContext:
    """One stage's run: its tracker, its place among the ranks, and where its summary goes."""

    step: str
    workdir: str
    overwrite: bool
    tracker: tracking.StageTracker | tracking.NullTracker
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    last_step: int = 0
    """The highest progress step logged; the headline figures are logged at it (MLflow's latest value)."""
    layer: str | None = None
    """The one layer this stage run works on (its summary goes under that layer), None for run-wide work."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that seals outputs, logs and writes the summary."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for with one)."""
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def device(self, setting: str) -> torch.device:
        return choose_device(setting, self.local_rank)

    def log_progress(self, metrics: Mapping[str, Any], step: int) -> None:
        """Progress figures at a step (rank 0 only), named and filtered by `mmsae.tracking.metric_values`."""
        if self.is_main:
            self.tracker.log_metrics(tracking.metric_values(metrics), step=step)
            self.last_step = max(self.last_step, step)

    def finish(self, figures: Mapping[str, Any]) -> None:
        """Log the stage's headline figures and write them to the run's summary (rank 0 only).

        Logged at the last progress step, later than any progress value, so MLflow shows it as the latest.
        """
        if not self.is_main:
            return
        self.tracker.log_metrics(tracking.metric_values(figures), step=self.last_step)
        record_summary(self.workdir, self.step, dict(figures), self.layer)


@contextlib.contextmanager
def stage_context(cfg: RunConfig, step: str, config: Mapping[str, Any], parent_run_id: str | None = None,
                  ranks: tuple[int, int, int] = (0, 1, 0), output: str | None = None,
                  tags: Mapping[str, Any] | None = None, per_layer: bool = True) -> Iterator[StageContext]:
    """The stage's MLflow run (rank 0 only; params from ``config``) and its :class:`StageContext`.

    ``output``, the stage's output URI, lets a stage resumed after a kill go on in the MLflow run the killed
    process left RUNNING (`mmsae.tracking.stage_run`). A ``per_layer`` stage whose config names exactly one
    layer (``cache.layers``) is tagged ``mmsae.layer`` and records its summary under that layer; every run is
    tagged with ``tags``.
    """
    rank, world, local_rank = ranks
    layers = cfg.cache.layers
    layer = layers[0] if per_layer and len(layers) == 1 else None
    run_tags = {tracking.TAG_LAYER: layer} if layer is not None else {}
    with tracking.stage_run(step, parent_run_id=parent_run_id, config=dict(config), uri=cfg.tracking.uri,
                            experiment=cfg.tracking.experiment, enabled=cfg.tracking.enabled and rank == 0,
                            output=output, tags={**run_tags, **(tags or {})}) as tracker:
        yield StageContext(step, cfg.run.workdir, cfg.run.overwrite, tracker, rank, world, local_rank,
                           layer=None if layer is None else layer_slug(layer))


def layer_slug(layer: Any) -> str:
    """A layer (an index or a hook-point name) as a folder name."""
    return re.sub(r"[^\w.\-]", "_", str(layer)) or "_"


def _summary_folder(workdir: str, layer: int | str | None) -> str:
    base = storage.join(workdir, SUMMARY_DIR)
    return base if layer is None else storage.join(base, LAYERS_DIR, layer_slug(layer))


def record_summary(workdir: str, step: str, figures: dict[str, Any], layer: int | str | None = None) -> str:
    """Write a step's headline figures (atomically; under ``layer`` when given) and return the URI written."""
    uri = storage.join(_summary_folder(workdir, layer), f"{step}.json")
    storage.write_json(uri, figures)
    log.info("%s%s: %s", step, "" if layer is None else f" (layer {layer})", figures)
    return uri


def read_summaries(workdir: str, layer: int | str | None = None) -> dict[str, dict[str, Any]]:
    """The headline figures of the run-wide steps recorded under a workdir, keyed by step name; with
    ``layer``, those of that layer's steps on top."""
    out = _read_folder(_summary_folder(workdir, None))
    return out if layer is None else {**out, **_read_folder(_summary_folder(workdir, layer))}


def read_layer_summaries(workdir: str) -> dict[str, dict[str, dict[str, Any]]]:
    """Each layer's steps' headline figures recorded under a workdir: layer (as a folder name) -> step -> figures."""
    base = storage.join(workdir, SUMMARY_DIR, LAYERS_DIR)
    layers = sorted({name.split("/", 1)[0] for name in storage.list_files(base) if "/" in name})
    return {layer: _read_folder(storage.join(base, layer)) for layer in layers}


def _read_folder(base: str) -> dict[str, dict[str, Any]]:
    return {name[: -len(".json")]: storage.read_json(storage.join(base, name))
            for name in storage.list_files(base, recursive=False) if name.endswith(".json")}


def model_prompt(model_uri: str) -> str:
    """The prompt an LMM artifact recommends in its manifest (the toy LMM records its own), else ``<image>``."""
    try:
        return str(storage.read_manifest(model_uri).extra.get("prompt", "<image>"))
    except (FileNotFoundError, storage.ManifestError):
        return "<image>"
