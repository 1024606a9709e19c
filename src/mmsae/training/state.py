"""The training states a run resumes from: DeepSpeed checkpoints under ``<train.out>/state``.

A state is DeepSpeed's checkpoint folder ``stepNNNNNNNN`` (the client state holds the data position, the
dead-latent counters and the step), with ``latest`` naming the newest. ``resume-key.json`` beside them
records the :class:`~mmsae.stages._base.OutputKey` of the run they belong to (training settings and the
shards' fingerprint): a run resumes only from states of its own key. States of another key are refused
with :class:`~mmsae.stages._base.OutputMismatchError`, or dropped under ``run.overwrite``.

With ``train.out`` on S3 the states are written to a local folder in the download cache and each node's
local rank 0 uploads what its ranks wrote before ``latest`` moves; a node without a local state fetches the
newest once. Only the newest ``train.keep_checkpoints`` states are kept, locally and on S3.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmsae import storage
from mmsae.stages._base import OutputKey, OutputMismatchError, StageContext, mismatch_message

log = logging.getLogger(__name__)

STATE_DIR = "state"
RESUME_KEY = "resume-key.json"
"""Beside the training states: the key of the run they belong to; a run resumes only from its own."""
LATEST = "latest"
"""DeepSpeed's file naming the newest state (written last: a state without it is not complete)."""


def state_tag(step: int) -> str:
    return f"step{step:08d}"


def older_states(names: Iterable[str], tag: str, keep: int) -> set[str]:
    """The state tags among ``names`` to delete once ``tag`` is saved: all but the newest ``keep``."""
    older = sorted(n for n in names if n.startswith("step") and n != tag)
    return set(older[: max(0, len(older) - (keep - 1))])


class TrainingStates:
    """The states of the run writing to ``out`` whose key is ``key``, seen from one rank."""

    def __init__(self, out: str, key: OutputKey, ctx: StageContext, *, keep: int, overwrite: bool):
        self.out, self.key, self.ctx, self.keep, self.overwrite = out, key, ctx, keep, overwrite
        self.on_s3 = storage.is_s3(out)
        self.remote = storage.join(out, STATE_DIR)
        self.local = storage.cache_dir("train-state", out) if self.on_s3 else Path(out) / STATE_DIR
        """Where DeepSpeed writes: the state folder itself, or a local copy of the one on S3."""

    def prepare(self) -> bool:
        """Whether to resume: True when a state of this run's key is there (fetched from S3 if need be).

        A state of another key is refused, or dropped under ``run.overwrite``; whatever holds no complete
        state is cleared, so a fresh run starts from an empty folder. Every rank must call this.
        """
        self._fetch()
        resuming = (self.local / LATEST).exists()
        changes = self.key.changes(self._recorded_key()) if resuming else []
        if changes and not self.overwrite:
            raise OutputMismatchError(mismatch_message("training states", f"train.out {self.remote}", changes,
                                                       "train.out"))
        self.ctx.barrier()  # every rank has looked before anything is deleted
        if changes:
            log.warning("%s: dropping the training states of another config or other inputs (%s)", self.remote,
                        "; ".join(changes[:8]))
        if changes or not resuming:
            self._clear()
        self.ctx.barrier()
        return resuming and not changes

    def load(self, engine) -> dict[str, Any]:
        """Load the newest state into ``engine``; its client state."""
        _, client = engine.load_checkpoint(str(self.local))
        return client

    def save(self, engine, step: int, client: dict[str, Any]) -> None:
        """Save a state (every rank); on S3 each node uploads what its ranks wrote before ``latest`` moves;
        then the older states beyond ``keep`` are deleted."""
        tag = state_tag(step)
        if self.ctx.is_main and not (self.local / RESUME_KEY).exists():
            self.local.mkdir(parents=True, exist_ok=True)
            storage.write_json(str(self.local / RESUME_KEY), self.key.to_json())
        # DeepSpeed writes `latest` in place: a kill during that write would leave no readable state. It is
        # written here instead, atomically, once every rank's files are complete.
        engine.save_checkpoint(str(self.local), tag=tag, client_state=client, save_latest=False)
        self.ctx.barrier()
        if self.ctx.local_rank == 0:
            storage.write_text(str(self.local / LATEST), tag)
        self.ctx.barrier()
        if self.on_s3:
            if self.ctx.local_rank == 0:
                storage.upload_dir(self.local / tag, storage.join(self.remote, tag))
            self.ctx.barrier()
            if self.ctx.is_main:
                storage.upload_file(self.local / RESUME_KEY, storage.join(self.remote, RESUME_KEY))
                storage.write_text(storage.join(self.remote, LATEST), tag)
        self._prune(tag)

    # -- internals ----------------------------------------------------------------------------------------

    def _recorded_key(self) -> Any:
        path = self.local / RESUME_KEY
        return storage.read_json(str(path)) if path.exists() else None

    def _fetch(self) -> None:
        """On S3, a node without a local state fetches the newest once (local rank 0); then every rank goes on."""
        if self.on_s3 and self.ctx.local_rank == 0 and not (self.local / LATEST).exists():
            if storage.exists(storage.join(self.remote, LATEST)):
                tag = storage.read_text(storage.join(self.remote, LATEST)).strip()
                storage.download_dir(storage.join(self.remote, tag), self.local / tag)
                if storage.exists(storage.join(self.remote, RESUME_KEY)):
                    storage.download_file(storage.join(self.remote, RESUME_KEY), self.local / RESUME_KEY)
                storage.write_text(str(self.local / LATEST), tag)  # last: a partial download is not a state
        self.ctx.barrier()

    def _clear(self) -> None:
        """Delete every state: each node's local folder (its local rank 0), and on S3 the remote one (rank 0)."""
        if self.ctx.local_rank == 0 and self.local.exists():
            shutil.rmtree(self.local, ignore_errors=True)
        if self.on_s3 and self.ctx.is_main:
            for name in self._remote_files():
                storage.delete(storage.join(self.remote, name))

    def _remote_files(self) -> list[str]:
        try:
            return storage.list_files(self.remote)
        except FileNotFoundError:
            return []

    def _prune(self, tag: str) -> None:
        if self.ctx.local_rank == 0:
            tags = [p.name for p in self.local.iterdir() if p.is_dir()]
            for name in older_states(tags, tag, self.keep):
                shutil.rmtree(self.local / name, ignore_errors=True)
        if self.on_s3 and self.ctx.is_main:
            files = self._remote_files()
            drop = older_states({f.split("/", 1)[0] for f in files}, tag, self.keep)
            for name in files:
                if name.split("/", 1)[0] in drop:
                    storage.delete(storage.join(self.remote, name))
