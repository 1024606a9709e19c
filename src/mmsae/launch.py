"""Where the train stage runs: in this process, as one rank per GPU of this node, or as a TrainJob over
several nodes. The pipeline's train step calls :func:`train`; the stage itself (`mmsae.stages.train`) is
the same in each case, since it joins the launcher's process group when RANK and the rest are set.

- **One node** (``train.nodes = 1``): ranks = ``train.gpus_per_node``, else the GPUs this process sees
  (:func:`ranks_per_node`). One: the stage runs in-process. More: the ranks are started with
  ``python -m torch.distributed.run --standalone --nproc_per_node N -m mmsae.launch`` and waited for. torchrun
  rather than the ``deepspeed`` launcher: it ships with torch (no second launcher in the image), picks a free
  rendezvous port itself (``--standalone``: two steps on one machine never collide), starts CPU ranks as
  readily as GPU ranks (so the CPU tests run this very path, on gloo), and is what Kubeflow Trainer's
  ``torch-distributed`` runtime expects on each node (it sets torchrun's ``PET_*`` variables), so one command
  serves one node and many. The ranks read the run config from a YAML file and get the shards and the MLflow
  parent run as arguments (``mmsae train`` has no parent-run option, hence the small entry point :func:`main`
  here). A failed launch raises :class:`LaunchError` naming each failed rank's exit status and error, with
  the tail of the failed ranks' stderr.
- **Several nodes** (``train.nodes > 1``): a Kubeflow Trainer ``TrainJob`` (:mod:`mmsae.trainjob`) in the
  step's image, with the step's resources per node and settings, each node running the same torchrun command
  with the run config in ``$MMSAE_CONFIG_YAML``; the step waits for it. The ranks write to shared storage
  (s3://, checked first), where the step then finds the sealed SAE.

Either way the step's figures are those the stage sealed in the SAE's manifest.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mmsae import storage
from mmsae.config import RunConfig, TrainConfig, config_from_yaml, dump_config, load_config
from mmsae.stages import train as train_stage
from mmsae.stages._base import StageOutputs, resolve_uri
from mmsae.training import TrainError
from mmsae.trainjob import (
    PodSettings,
    TrainJobError,
    build_trainjob,
    cluster_api,
    own_namespace,
    run_trainjob,
    trainjob_name,
)

__all__ = ["LaunchError", "PodSettings", "TrainJobError", "main", "ranks_per_node", "train", "trainjob_for"]

log = logging.getLogger(__name__)

RANK_ENTRY = "mmsae.launch"
"""The module each rank runs (:func:`main`)."""
CONFIG_ENV = "MMSAE_CONFIG_YAML"
"""The run config's YAML text, for ranks started without a config file (a TrainJob's)."""
RECORDS_ENV = "MMSAE_LAUNCH_RECORDS"
"""Folder where each failed rank records its exit status and error for the launcher."""
STDERR_TAIL_LINES = 20
"""Lines of each failed rank's stderr an error message ends with."""


class LaunchError(TrainError):
    """The ranks, or the TrainJob, did not train the SAE; the message says what failed."""


def train(cfg: RunConfig, shards: str | None = None, parent_run_id: str | None = None,
          pod: PodSettings | None = None, image: str = "", kube_api: Callable[[], Any] | None = None) -> StageOutputs:
    """Run the train stage on every GPU given: in-process, as ranks on this node, or as a TrainJob.

    ``pod`` and ``image`` (the step's own) and ``kube_api`` (a ``CustomObjectsApi`` factory; default: the
    cluster's) serve ``train.nodes > 1`` only.
    """
    t = cfg.train
    if t.nodes > 1:
        return train_on_nodes(cfg, shards, parent_run_id, pod or PodSettings(), image, kube_api or cluster_api)
    ranks = ranks_per_node(t)
    if ranks == 1:
        return train_stage.run(cfg, shards=shards, parent_run_id=parent_run_id)
    log.info("train: starting %d ranks on this node", ranks)
    return train_on_this_node(cfg, shards, parent_run_id, ranks)


def output_uri(cfg: RunConfig) -> str:
    """Where the stage writes the SAE (as `mmsae.stages.train.run` resolves it)."""
    return resolve_uri(None, cfg.train.out, cfg.run.workdir, train_stage.STEP)


def sealed_outputs(cfg: RunConfig) -> StageOutputs:
    """The SAE the ranks sealed, with the figures its manifest records."""
    uri = output_uri(cfg)
    try:
        manifest = storage.read_manifest(uri, train_stage.KIND)
    except (FileNotFoundError, storage.ManifestError) as e:
        raise LaunchError(f"the ranks ended without error but left no sealed SAE at {uri}: {e}") from e
    return StageOutputs(uri, dict(manifest.extra.get("figures") or {}))


# ---------------------------------------------------------------------------------------------------
# one node: torchrun


def ranks_per_node(t: TrainConfig, visible_gpus: int | None = None) -> int:
    """``train.gpus_per_node``, else one rank per visible GPU when ``train.device`` is ``auto`` (at least one)."""
    if visible_gpus is None:
        import torch

        visible_gpus = torch.cuda.device_count()
    if not t.gpus_per_node:
        return max(visible_gpus, 1) if t.device == "auto" else 1
    if t.gpus_per_node > 1 and t.device.startswith("cuda:"):
        raise LaunchError(f"train.gpus_per_node = {t.gpus_per_node} ranks, but train.device = {t.device} names "
                          f"one GPU; set train.device to auto (each rank then takes cuda:LOCAL_RANK)")
    if visible_gpus and t.gpus_per_node > visible_gpus and t.device == "auto":
        raise LaunchError(f"train.gpus_per_node = {t.gpus_per_node}, but this node shows {visible_gpus} GPUs; "
                          f"set it to at most {visible_gpus}, or 0 for all of them")
    return t.gpus_per_node


def rank_command(config_path: str | None, shards: str | None, parent_run_id: str | None,
                 launcher_args: tuple[str, ...] | list[str] = (), python: str = sys.executable) -> list[str]:
    """torchrun running :func:`main` on each rank, with ``launcher_args`` (none: as torchrun's ``PET_*``
    variables say, which a Trainer torch runtime sets on each node)."""
    command = [python, "-m", "torch.distributed.run", *launcher_args, "-m", RANK_ENTRY]
    if config_path:
        command += ["--config", config_path]
    if shards:
        command += ["--shards", shards]
    if parent_run_id:
        command += ["--parent-run-id", parent_run_id]
    return command


def train_on_this_node(cfg: RunConfig, shards: str | None, parent_run_id: str | None, ranks: int) -> StageOutputs:
    """Start ``ranks`` ranks with torchrun (each rank's output also kept in a file), wait, and return the SAE
    they sealed; :class:`LaunchError` if any rank failed."""
    with tempfile.TemporaryDirectory(prefix="mmsae-launch-") as folder:
        base = Path(folder)
        (base / "run.yaml").write_text(dump_config(cfg))
        (base / "ranks").mkdir()
        launcher_args = ["--standalone", "--nproc_per_node", str(ranks), "--log-dir", str(base / "logs"), "--tee", "3"]
        env = {name: value for name, value in os.environ.items()
               if name not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env[RECORDS_ENV] = str(base / "ranks")
        command = rank_command(str(base / "run.yaml"), shards, parent_run_id, launcher_args)
        status, launcher_tail = run_keeping_stderr_tail(command, env)
        if status != 0:
            raise LaunchError(failure_message(status, read_failures(base / "ranks"), rank_stderr_tails(base / "logs"),
                                              launcher_tail))
    return sealed_outputs(cfg)


def run_keeping_stderr_tail(command: list[str], env: Mapping[str, str],
                            lines: int = STDERR_TAIL_LINES) -> tuple[int, list[str]]:
    """Run ``command``, passing its stderr through to ours; returns its exit status and last ``lines`` of stderr."""
    tail: collections.deque[str] = collections.deque(maxlen=lines)
    with subprocess.Popen(command, env=dict(env), stderr=subprocess.PIPE, text=True, errors="replace") as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line.rstrip("\n"))
        status = proc.wait()
    return status, list(tail)


def read_failures(folder: Path) -> list[dict[str, Any]]:
    """What each failed rank recorded (rank, status, error), by rank."""
    found = []
    for path in folder.glob("rank-*.json"):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda record: record.get("rank", 0))


def rank_stderr_tails(log_dir: Path, lines: int = STDERR_TAIL_LINES) -> dict[int, list[str]]:
    """The last ``lines`` of each rank's stderr, from torchrun's log folder (``<run>/attempt_<n>/<rank>/``)."""
    tails = {}
    for path in sorted(log_dir.glob("*/attempt_*/*/stderr.log")):
        try:
            tails[int(path.parent.name)] = path.read_text(errors="replace").splitlines()[-lines:]
        except (OSError, ValueError):
            continue
    return tails


def failure_message(status: int, failures: list[dict[str, Any]], rank_tails: Mapping[int, list[str]],
                    launcher_tail: list[str]) -> str:
    """One message for a failed launch: torchrun's status, each failed rank's status and error, and the tail
    of the failed ranks' stderr (of every rank's when none recorded a failure; else of torchrun's)."""
    ranks = "; ".join(f"rank {f.get('rank')} exited with status {f.get('status')}: {f.get('error')}" for f in failures)
    failed = [f.get("rank") for f in failures]
    shown = {rank: rank_tails[rank] for rank in failed if rank in rank_tails}
    shown = shown or {rank: tail for rank, tail in rank_tails.items() if tail}
    parts = [f"train ranks failed (torchrun exited with status {status}): "
             f"{ranks or 'no rank recorded an error (killed by a signal, or out of memory?)'}"]
    for rank, tail in sorted(shown.items()):
        parts.append(f"--- last {len(tail)} lines of rank {rank}'s stderr ---\n" + "\n".join(tail))
    if not shown:
        parts.append(f"--- last {len(launcher_tail)} lines of torchrun's stderr ---\n" + ("\n".join(launcher_tail)
                                                                                          or "(none)"))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """One rank of the train stage (what torchrun starts); a failure is recorded for the launcher."""
    parser = argparse.ArgumentParser(prog=f"python -m {RANK_ENTRY}", description=main.__doc__)
    parser.add_argument("--config", help=f"run config YAML file (default: the YAML text in ${CONFIG_ENV})")
    parser.add_argument("--shards", help="activation-shard URI (overrides train.shards)")
    parser.add_argument("--parent-run-id", help="MLflow run of the pipeline run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        cfg = load_config(args.config) if args.config else config_from_yaml(os.environ.get(CONFIG_ENV, ""), CONFIG_ENV)
        train_stage.run(cfg, shards=args.shards, parent_run_id=args.parent_run_id)
    except BaseException as error:
        record_failure(error)
        raise
    return 0


def record_failure(error: BaseException) -> None:
    """Leave this rank's exit status and error where the launcher looks (``$MMSAE_LAUNCH_RECORDS``)."""
    folder = os.environ.get(RECORDS_ENV)
    status = error.code if isinstance(error, SystemExit) else 1
    if not folder or status in (0, None):
        return
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "status": status if isinstance(status, int) else 1,
              "error": f"{type(error).__name__}: {error}"}
    try:
        Path(folder, f"rank-{rank}.json").write_text(json.dumps(record))
    except OSError as e:
        log.warning("could not record rank %d's failure in %s: %s", rank, folder, e)


# ---------------------------------------------------------------------------------------------------
# several nodes: a Kubeflow Trainer TrainJob


def train_on_nodes(cfg: RunConfig, shards: str | None, parent_run_id: str | None, pod: PodSettings, image: str,
                   kube_api: Callable[[], Any]) -> StageOutputs:
    """Run the stage as a TrainJob of ``train.nodes`` nodes, follow it, and return the SAE it sealed."""
    shards_uri = resolve_uri(shards, cfg.train.shards, cfg.run.workdir, "cache")
    require_shared_storage(cfg, shards_uri)
    if not image:
        raise LaunchError("train.nodes > 1: no image for the TrainJob's nodes (the step's own image is read from "
                          "$MMSAE_TRAIN_IMAGE, which the pipeline sets on its GPU steps)")
    job = trainjob_for(cfg, shards_uri, parent_run_id, pod, image, cfg.train.job_namespace or own_namespace())
    run_trainjob(kube_api(), job)
    return sealed_outputs(cfg)


def trainjob_for(cfg: RunConfig, shards: str, parent_run_id: str | None, pod: PodSettings, image: str,
                 namespace: str) -> dict[str, Any]:
    """The TrainJob whose nodes each run torchrun over :func:`main`, the run config in ``$MMSAE_CONFIG_YAML``."""
    config_yaml = dump_config(cfg)
    return build_trainjob(cfg.train, name=trainjob_name(config_yaml, shards), namespace=namespace, image=image,
                          pod=pod, command=rank_command(None, shards, parent_run_id, python="python3"),
                          env={CONFIG_ENV: config_yaml})


def require_shared_storage(cfg: RunConfig, shards: str) -> None:
    """Every node reads the shards and rank 0 writes the SAE, states and summary: all on s3://."""
    places = {"train.out": output_uri(cfg), "train.shards": shards, "run.workdir": cfg.run.workdir}
    if cfg.train.init_from:
        places["train.init_from"] = cfg.train.init_from
    local = {setting: uri for setting, uri in places.items() if not storage.is_s3(uri)}
    if local:
        listed = ", ".join(f"{setting} = {uri}" for setting, uri in local.items())
        raise LaunchError(f"train.nodes = {cfg.train.nodes} needs storage every node shares, but {listed} "
                          f"is local to one machine; use s3:// locations (or train.nodes = 1)")


if __name__ == "__main__":
    sys.exit(main())
