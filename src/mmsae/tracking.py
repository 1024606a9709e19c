"""MLflow tracking: one parent run per pipeline run and one child run per stage.

Reads the tracking URI from the explicit argument, else ``$MLFLOW_TRACKING_URI``, else a sqlite file
``mlflow.db`` in the working directory (MLflow refuses its plain file store). The experiment is the given
name unless ``$MLFLOW_EXPERIMENT_ID`` is set. Writes runs, params, metrics, tags and artifacts to that
tracking server or database.

Stages of a pipeline run in separate processes, so the parent run travels as a run-id string and every call
names its run explicitly through :class:`mlflow.MlflowClient`; nothing here uses MLflow's global
active-run stack. When Kubeflow's MLflow integration has already created the task's own run and injected
``$MLFLOW_RUN_ID``, a stage logs into that run instead of opening another child, and leaves ending it to
Kubeflow.

Typical use::

    parent = start_pipeline_run("mmsae", params=cfg_dict)
    with stage_run("train", parent_run_id=parent, config=cfg.train.model_dump()) as tracker:
        tracker.log_metrics({"fvu": 0.12}, step=100)
    end_pipeline_run(parent)
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import posixpath
import re
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "mmsae"
"""Experiment used when none is named and ``$MLFLOW_EXPERIMENT_ID`` is not set."""
DEFAULT_DB_NAME = "mlflow.db"
"""Name of the sqlite file used when no tracking URI is given."""
CONFIG_ARTIFACT = "config.yaml"
"""Artifact name under which a stage's config is stored."""

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_EXPERIMENT_ID = "MLFLOW_EXPERIMENT_ID"
ENV_RUN_ID = "MLFLOW_RUN_ID"

TAG_STAGE = "mmsae.stage"
TAG_LAYER = "mmsae.layer"
"""Tag of a stage run that works on one layer."""
TAG_PIPELINE = "mmsae.pipeline"
TAG_KFP_JOB_ID = "kfp.job_id"
TAG_KFP_JOB_NAME = "kfp.job_name"
TAG_EXTERNAL = "mmsae.external_run"
"""Set on a run that someone else (Kubeflow) created and will end; :func:`end_pipeline_run` leaves it."""
TAG_STATUS = "mmsae.status"
TAG_OUTPUT = "mmsae.output"
"""The URI a stage run writes to: an interrupted run of the same stage and output is found by it."""
"""Outcome of a stage (or pipeline) in a run that Kubeflow owns and ends itself."""

_STATUSES = ("FINISHED", "FAILED", "KILLED")
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")
_TRUNCATION_MARK = "...[truncated]"


class TrackingError(RuntimeError):
    """A tracking URI, run or experiment that cannot be used; the message names it."""


# ----------------------------------------------------------------------------------------------------------
# Resolution of URI, experiment and runs


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Return the tracking URI to use: ``uri``, else ``$MLFLOW_TRACKING_URI``, else a sqlite file in the cwd.

    Raises :class:`TrackingError` for a plain path or ``file:`` URI, since MLflow 3 refuses its file store.
    """
    chosen = uri or os.environ.get(ENV_TRACKING_URI) or ""
    if not chosen:
        return f"sqlite:///{Path.cwd().resolve() / DEFAULT_DB_NAME}"
    scheme = chosen.split(":", 1)[0] if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", chosen) else ""
    if scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise TrackingError(
            f"tracking URI {chosen!r} is a plain file store, which MLflow refuses; expected a database URI "
            "such as 'sqlite:///<abs path>/mlflow.db' or a server URL such as 'http://127.0.0.1:5000'"
        )
    return chosen


def _client(uri: str | None) -> MlflowClient:
    return MlflowClient(tracking_uri=resolve_tracking_uri(uri))


def _sqlite_artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a local sqlite backend live in ``mlartifacts/`` beside the database file."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db_path = tracking_uri[len("sqlite:///") :]
    if not db_path or db_path == ":memory:":
        return None
    return (Path(db_path).resolve().parent / "mlartifacts").as_uri()


def _experiment_id(client: MlflowClient, experiment: str) -> str:
    """``$MLFLOW_EXPERIMENT_ID`` when set, else the id of ``experiment``, created if missing."""
    env_id = os.environ.get(ENV_EXPERIMENT_ID)
    if env_id:
        return env_id
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        if found.lifecycle_stage != "active":
            raise TrackingError(
                f"MLflow experiment {experiment!r} (id {found.experiment_id}) is deleted; restore it or "
                "choose another experiment name"
            )
        return found.experiment_id
    try:
        return client.create_experiment(
            experiment, artifact_location=_sqlite_artifact_location(client.tracking_uri)
        )
    except MlflowException:
        # Another process created it between our lookup and our create.
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


def _get_run(client: MlflowClient, run_id: str, what: str):
    try:
        return client.get_run(run_id)
    except MlflowException as err:
        raise TrackingError(
            f"{what} {run_id!r} was not found at tracking URI {client.tracking_uri!r}: {err.message}"
        ) from err


# ----------------------------------------------------------------------------------------------------------
# Flattening and limits


def flatten(data: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``.

    Lists and other values are kept as leaves.
    """
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, full, sep))
        else:
            out[full] = value
    return out


def _clean_key(key: str) -> str:
    """Make ``key`` acceptable to MLflow: allowed characters only, no path tricks, at most 250 chars."""
    cleaned = _BAD_KEY_CHARS.sub("_", key)
    if posixpath.normpath(cleaned) != cleaned or cleaned in (".", "") or cleaned.startswith(("/", "..")):
        cleaned = cleaned.replace("/", "_").strip(".") or "_"
    return cleaned[:MAX_ENTITY_KEY_LENGTH]


def metric_name(key: str) -> str:
    """The one naming rule of metrics, in MLflow and in KFP alike: path separators become dots."""
    return _clean_key(key.replace("/", "."))


def metric_values(figures: Mapping[str, Any]) -> dict[str, float]:
    """A stage's figures as metrics: nested mappings flattened, finite real numbers only (no bools, no
    text, no NaN or inf: those are logged as a warning, not sent), names by :func:`metric_name`."""
    out: dict[str, float] = {}
    for key, value in flatten(figures).items():
        if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        if not math.isfinite(float(value)):
            logger.warning("figure %r is %s: not logged as a metric", key, value)
            continue
        out[metric_name(key)] = float(value)
    return out


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    return value[: limit - len(_TRUNCATION_MARK)] + _TRUNCATION_MARK


def _as_text(value: Any) -> str:
    """A param or tag value as text: strings as they are, containers as compact YAML."""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple | Mapping):
        try:
            return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
        except yaml.YAMLError:
            return str(value)
    return str(value)


def _to_plain(config: Any) -> dict[str, Any]:
    """A config given as a mapping or a pydantic model, as a plain JSON-like dict."""
    if config is None:
        return {}
    if hasattr(config, "model_dump"):
        return config.model_dump(mode="json")
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config must be a mapping or a pydantic model, got {type(config).__name__}")


# ----------------------------------------------------------------------------------------------------------
# Trackers


class StageTracker:
    """Logs into one MLflow run named by id; safe to use from any thread of the process."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self._client = client
        self._run_id = run_id

    @property
    def run_id(self) -> str:
        """Id of the MLflow run this tracker writes to."""
        return self._run_id

    @property
    def tracking_uri(self) -> str:
        return self._client.tracking_uri

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params, nested mappings flattened to dotted keys, values cut to MLflow's 6000 chars."""
        flat = flatten(params)
        entries = [
            Param(_clean_key(k), _truncate(_as_text(v), MAX_PARAM_VAL_LENGTH)) for k, v in flat.items()
        ]
        if entries:
            self._client.log_batch(self._run_id, params=entries, synchronous=True)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics (nested mappings flattened); a non-numeric value is a ``TypeError``."""
        now = int(time.time() * 1000)
        entries = []
        for key, value in flatten(metrics).items():
            if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"metric {key!r} must be a real number, got {type(value).__name__} {value!r}")
            number = float(value)
            if not math.isfinite(number):
                logger.warning("metric %r is %s at step %s", key, number, step)
            entries.append(Metric(metric_name(key), number, now, int(step or 0)))
        if entries:
            self._client.log_batch(self._run_id, metrics=entries, synchronous=True)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a directory's content, under ``artifact_path`` of the run."""
        path = Path(local_path)
        if path.is_dir():
            self._client.log_artifacts(self._run_id, str(path), artifact_path)
        elif path.is_file():
            self._client.log_artifact(self._run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"artifact to log does not exist: {path}")

    def log_dict(self, data: Mapping[str, Any] | list[Any], name: str) -> None:
        """Store ``data`` as an artifact file ``name`` (YAML for .yaml/.yml, else JSON)."""
        self._client.log_dict(self._run_id, data, name)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags, values cut to MLflow's 8000 chars."""
        entries = [
            RunTag(_clean_key(str(k)), _truncate(_as_text(v), MAX_TAG_VAL_LENGTH)) for k, v in tags.items()
        ]
        if entries:
            self._client.log_batch(self._run_id, tags=entries, synchronous=True)

    def __repr__(self) -> str:
        return f"StageTracker(run_id={self._run_id!r}, uri={self._client.tracking_uri!r})"


class NullTracker:
    """Same interface as :class:`StageTracker`; does nothing (tracking disabled)."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        pass

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, data: Mapping[str, Any] | list[Any], name: str) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return "NullTracker()"


# ----------------------------------------------------------------------------------------------------------
# Pipeline runs


def start_pipeline_run(
    name: str,
    tags: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    *,
    kfp_job_id: str | None = None,
    kfp_job_name: str | None = None,
) -> str:
    """Open the parent run of a pipeline run and return its id (pass it to every stage as a string).

    ``params`` are flattened to dotted keys. ``kfp_job_id``/``kfp_job_name`` (the KFP run's placeholders)
    become the tags ``kfp.job_id``/``kfp.job_name``. When ``$MLFLOW_RUN_ID`` is set, Kubeflow already
    manages the runs: no run is created; the id returned is the parent of that run (or the run itself), it
    gets the tags and params, and :func:`end_pipeline_run` will leave its status alone.
    """
    client = _client(uri)
    all_tags: dict[str, Any] = {TAG_PIPELINE: name, **(tags or {})}
    if kfp_job_id:
        all_tags[TAG_KFP_JOB_ID] = kfp_job_id
    if kfp_job_name:
        all_tags[TAG_KFP_JOB_NAME] = kfp_job_name

    injected = os.environ.get(ENV_RUN_ID)
    if injected:
        task_run = _get_run(client, injected, f"run from ${ENV_RUN_ID}")
        run_id = task_run.data.tags.get(MLFLOW_PARENT_RUN_ID) or injected
        all_tags[TAG_EXTERNAL] = "true"
        logger.info("using the Kubeflow-managed MLflow run %s as the pipeline run", run_id)
    else:
        experiment_id = _experiment_id(client, experiment)
        run = client.create_run(experiment_id, run_name=name)
        run_id = run.info.run_id
        logger.info(
            "MLflow pipeline run %s (%s) in experiment %s at %s",
            run_id,
            name,
            experiment_id,
            client.tracking_uri,
        )
    tracker = StageTracker(client, run_id)
    tracker.set_tags(all_tags)
    if params:
        tracker.log_params(params)
    return run_id


def find_pipeline_run(kfp_job_id: str, uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT) -> str | None:
    """The id of the pipeline run tagged with ``kfp_job_id`` (latest if several), or None.

    The exit handler of a KFP pipeline may not take another task's output, so it finds the parent run
    this way instead of being handed its id.
    """
    if not kfp_job_id:
        return None
    client = _client(uri)
    experiment_id = _experiment_id(client, experiment)
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_KFP_JOB_ID}` = '{kfp_job_id}'",
        order_by=["attributes.start_time DESC"],
        max_results=1000,
    )
    pipelines = [run for run in runs if TAG_PIPELINE in run.data.tags]  # its stage runs carry the tag too
    return pipelines[0].info.run_id if pipelines else None


def end_pipeline_run(run_id: str, status: str = "FINISHED", uri: str | None = None) -> None:
    """End the pipeline run ``run_id`` with ``status`` (FINISHED, FAILED or KILLED).

    A run that Kubeflow manages (see :func:`start_pipeline_run`) only gets a status tag.
    """
    status = status.upper()
    if status not in _STATUSES:
        raise ValueError(f"pipeline run status must be one of {', '.join(_STATUSES)}, got {status!r}")
    client = _client(uri)
    run = _get_run(client, run_id, "pipeline run")
    if run.data.tags.get(TAG_EXTERNAL) == "true":
        client.set_tag(run_id, TAG_STATUS, status)
        return
    client.set_terminated(run_id, status)
    logger.info("MLflow pipeline run %s ended %s", run_id, status)


# ----------------------------------------------------------------------------------------------------------
# Stage runs


@contextmanager
def stage_run(
    stage: str,
    parent_run_id: str | None = None,
    config: Mapping[str, Any] | Any | None = None,
    uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    enabled: bool = True,
    output: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[StageTracker | NullTracker]:
    """Track one stage; yields a tracker (a :class:`NullTracker` when ``enabled`` is false).

    Run chosen, in order: ``$MLFLOW_RUN_ID`` (Kubeflow's own task run: logged into, not ended here); else
    the run of this stage and ``output`` that a killed process left RUNNING under the same parent (a resumed
    stage goes on in its run; such runs under another parent are marked KILLED); else a new child of
    ``parent_run_id`` named ``stage``, in the parent's experiment; else a new top-level run in
    ``$MLFLOW_EXPERIMENT_ID`` or ``experiment``.
    A new child also carries its parent's ``kfp.job_id`` tag (the KFP run id). ``tags`` are set on the run.
    ``config`` (a mapping or pydantic model) is logged as flattened params and as ``config.yaml``. A run
    this function created ends FINISHED, or FAILED when the block raises; the exception propagates.
    """
    if not enabled:
        yield NullTracker()
        return

    client = _client(uri)
    injected = os.environ.get(ENV_RUN_ID)
    owned = not injected
    if injected:
        run_id = _get_run(client, injected, f"run from ${ENV_RUN_ID}").info.run_id
        logger.info("stage %s logs into the MLflow run %s given by $%s", stage, run_id, ENV_RUN_ID)
    else:
        run_id = _open_stage_run(client, stage, parent_run_id, experiment, output)

    tracker = StageTracker(client, run_id)
    if not owned:
        tracker.set_tags({TAG_STAGE: stage})
    if tags:
        tracker.set_tags(tags)
    plain = _to_plain(config)
    if plain:
        _log_params_once(client, tracker, plain)
        tracker.log_dict(plain, CONFIG_ARTIFACT)

    try:
        yield tracker
    except BaseException:
        interrupted = isinstance(sys.exc_info()[1], KeyboardInterrupt | GeneratorExit)
        _finish(client, run_id, owned, "KILLED" if interrupted else "FAILED")
        raise
    _finish(client, run_id, owned, "FINISHED")


def _open_stage_run(client: MlflowClient, stage: str, parent_run_id: str | None, experiment: str,
                    output: str | None) -> str:
    """The run a stage logs into: the one an interrupted process left RUNNING for this stage, output and
    parent, else a new one (under ``parent_run_id`` when given)."""
    tags = {TAG_STAGE: stage}
    if parent_run_id:
        parent = _get_run(client, parent_run_id, f"parent run of stage {stage!r}")
        experiment_id = parent.info.experiment_id
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        if parent.data.tags.get(TAG_KFP_JOB_ID):
            tags[TAG_KFP_JOB_ID] = parent.data.tags[TAG_KFP_JOB_ID]
    else:
        experiment_id = _experiment_id(client, experiment)
    if output:
        tags[TAG_OUTPUT] = _truncate(output, MAX_TAG_VAL_LENGTH)
        resumed = _adopt_interrupted_run(client, experiment_id, stage, tags[TAG_OUTPUT], parent_run_id)
        if resumed is not None:
            return resumed
    run_id = client.create_run(experiment_id, run_name=stage, tags=tags).info.run_id
    logger.info("MLflow run %s for stage %s (parent %s)", run_id, stage, parent_run_id or "none")
    return run_id


def _adopt_interrupted_run(client: MlflowClient, experiment_id: str, stage: str, output: str,
                           parent_run_id: str | None) -> str | None:
    """The newest RUNNING run of ``stage`` writing ``output`` under the same parent (a killed process left it);
    every other such run is marked KILLED. None when there is none."""
    if "'" in output:  # not expressible in a filter string: nothing to adopt
        return None
    interrupted = client.search_runs(
        [experiment_id], order_by=["attributes.start_time DESC"], max_results=100,
        filter_string=(f"tags.`{TAG_STAGE}` = '{stage}' and tags.`{TAG_OUTPUT}` = '{output}' "
                       "and attributes.status = 'RUNNING'"))
    adopted = None
    for run in interrupted:
        if adopted is None and run.data.tags.get(MLFLOW_PARENT_RUN_ID) == (parent_run_id or None):
            adopted = run.info.run_id
            logger.warning("stage %s goes on in MLflow run %s, left RUNNING by an interrupted run of %s",
                           stage, adopted, output)
        else:
            client.set_terminated(run.info.run_id, "KILLED")
            logger.warning("MLflow run %s of stage %s (%s) was left RUNNING by an interrupted run: marked KILLED",
                           run.info.run_id, stage, output)
    return adopted


def _log_params_once(client: MlflowClient, tracker: StageTracker, params: Mapping[str, Any]) -> None:
    """Log params; on a run that already has some (an interrupted run gone on), only the new ones (MLflow
    refuses to change a param), with a warning for any whose value differs."""
    existing = client.get_run(tracker.run_id).data.params
    if not existing:
        tracker.log_params(params)
        return
    flat = {_clean_key(key): value for key, value in flatten(params).items()}
    changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != _truncate(_as_text(v),
                                                                                             MAX_PARAM_VAL_LENGTH))
    if changed:
        logger.warning("params %s differ from those the interrupted run logged; the first values are kept",
                       changed[:10])
    tracker.log_params({k: v for k, v in flat.items() if k not in existing})


def _finish(client: MlflowClient, run_id: str, owned: bool, status: str) -> None:
    try:
        if owned:
            client.set_terminated(run_id, status)
        else:
            client.set_tag(run_id, TAG_STATUS, status)
    except MlflowException:
        if status == "FINISHED":
            raise
        # Never hide the stage's own error behind a tracking error.
        logger.exception("could not mark MLflow run %s as %s", run_id, status)


# ----------------------------------------------------------------------------------------------------------
# Reading back


def stage_runs(parent_run_id: str, uri: str | None = None) -> dict[str, str]:
    """Map of stage name to run id for the child runs of ``parent_run_id`` (latest run per stage)."""
    client = _client(uri)
    parent = _get_run(client, parent_run_id, "pipeline run")
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )
    out: dict[str, str] = {}
    for run in runs:
        name = run.data.tags.get(TAG_STAGE) or run.data.tags.get(MLFLOW_RUN_NAME) or run.info.run_name
        out[name] = run.info.run_id
    return out
