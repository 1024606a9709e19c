"""The Kubeflow Trainer TrainJob of a train step over several nodes: built from the step's own settings,
created, and followed until it completes or fails.

The job (``trainer.kubeflow.org/v1alpha1``) refers to a ClusterTrainingRuntime (``train.job_runtime``), runs
``train.nodes`` nodes of the step's image, each with the step's resources (the GPU count, and so the ranks
per node, set by ``train.gpus_per_node`` when given), env (values, and ConfigMap and Secret references by
name: no secret value is ever copied), tolerations, node selector, affinity and volumes, plus a memory-backed
/dev/shm. Those scheduling settings go in the field the cluster's Trainer release reads
(``train.job_overrides``); the job is created with strict field validation, so a field that release does not
know is refused rather than silently dropped. A job of the same name (the same config and shards) that has
not finished is followed instead of started twice; a finished one is replaced. The step polls the job with
backoff until its ``Complete`` or ``Failed`` condition (:class:`TrainJobError`, with the cluster's reason and
message), and deletes it when stopped (SIGTERM) while waiting.

What the nodes run (torchrun over ``mmsae.launch``) is :mod:`mmsae.launch`'s to say.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mmsae.config import TrainConfig
from mmsae.training import TrainError

__all__ = ["PodSettings", "TrainJobError", "build_trainjob", "cluster_api", "job_state", "run_trainjob",
           "trainjob_name"]

log = logging.getLogger(__name__)

TRAINER_GROUP, TRAINER_VERSION, TRAINJOB_PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
TRAINER_NODE = "node"
"""The replicated job and the container of a Trainer runtime that run the trainer."""
PATCH_MANAGER = "mmsae.io/train-step"
"""Who owns the job's runtime patch (``train.job_overrides = runtimePatches``)."""
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
SHM_VOLUME = {"name": "dshm", "emptyDir": {"medium": "Memory"}}
SHM_MOUNT = {"name": "dshm", "mountPath": "/dev/shm"}
GENERAL_RESOURCES = ("cpu", "memory", "ephemeral-storage")
"""Resources that are not accelerators (nor ``hugepages-*``)."""
POLL_FIRST_S, POLL_FACTOR, POLL_MAX_S = 5.0, 1.5, 60.0
"""Seconds before the first poll of a TrainJob, growth per poll, most seconds between polls."""
POLL_FAILURES_TOLERATED = 10
"""Consecutive failed reads of the TrainJob (API server restarts, network) before the step gives up."""


class TrainJobError(TrainError):
    """A TrainJob that failed, was refused, or vanished; the message names it and gives the cluster's reason."""


@dataclasses.dataclass(frozen=True)
class PodSettings:
    """What the step's pod was given (KFP's ``TaskConfig``: Kubernetes JSON), to give every TrainJob node."""

    resources: Mapping[str, Any] | None = None
    env: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    tolerations: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    node_selector: Mapping[str, str] | None = None
    affinity: Mapping[str, Any] | None = None
    volumes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    volume_mounts: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @classmethod
    def of(cls, task_config: Any) -> PodSettings:
        """From a ``kfp.dsl.TaskConfig`` (or anything with its attributes); None gives empty settings."""
        def field(name: str, empty: Any) -> Any:
            value = getattr(task_config, name, None)
            return copy.deepcopy(value) if value else empty

        return cls(resources=field("resources", None), env=field("env", []), tolerations=field("tolerations", []),
                   node_selector=field("node_selector", None), affinity=field("affinity", None),
                   volumes=field("volumes", []), volume_mounts=field("volume_mounts", []))


def own_namespace() -> str:
    """The namespace of this pod's service account."""
    try:
        return NAMESPACE_FILE.read_text().strip()
    except OSError as e:
        raise TrainJobError(f"train.nodes > 1: no namespace for the TrainJob: set train.job_namespace (outside a "
                            f"pod there is no {NAMESPACE_FILE}: {e})") from e


def trainjob_name(config_yaml: str, shards: str) -> str:
    """A DNS label naming the job by what it trains (the config and the shards)."""
    return "mmsae-train-" + hashlib.sha256(f"{shards}\n{config_yaml}".encode()).hexdigest()[:16]


def resources_per_node(resources: Mapping[str, Any] | None, gpus_per_node: int) -> tuple[dict[str, Any], int]:
    """The step's resources for each node, the accelerator count replaced by ``gpus_per_node`` when it is
    set, and the ranks per node: ``gpus_per_node``, else the accelerator count, else 1."""
    per_node = copy.deepcopy(dict(resources or {}))
    limits = per_node.get("limits") or {}
    accelerators = [name for name in limits if name not in GENERAL_RESOURCES and not name.startswith("hugepages-")]
    if gpus_per_node:
        for part in ("limits", "requests"):
            for name in accelerators:
                if name in (per_node.get(part) or {}):
                    per_node[part][name] = str(gpus_per_node)
        return per_node, gpus_per_node
    counts = [int(float(str(limits[name]))) for name in accelerators]
    return per_node, max(counts, default=0) or 1


def job_env(pod_env: list[dict[str, Any]], values: Mapping[str, str]) -> list[dict[str, Any]]:
    """The step's env (values, and references to ConfigMaps and Secrets by name) and ``values``; torchrun's
    ``PET_*`` variables are the runtime's to set."""
    merged = {entry["name"]: entry for entry in pod_env if not entry["name"].startswith("PET_")}
    merged.update({name: {"name": name, "value": value} for name, value in values.items()})
    return list(merged.values())


def node_overrides(layout: str, pod: PodSettings) -> dict[str, Any]:
    """The TrainJob spec field giving the trainer nodes the step's scheduling settings, volumes and a
    memory-backed /dev/shm, in the ``layout`` the Trainer release knows."""
    mounts = list(pod.volume_mounts)
    volumes = list(pod.volumes)
    if not any(mount.get("mountPath") == SHM_MOUNT["mountPath"] for mount in mounts):
        mounts.append(SHM_MOUNT)
        volumes.append(SHM_VOLUME)
    spec: dict[str, Any] = {"volumes": volumes, "containers": [{"name": TRAINER_NODE, "volumeMounts": mounts}]}
    if pod.tolerations:
        spec["tolerations"] = pod.tolerations
    if pod.node_selector:
        spec["nodeSelector"] = dict(pod.node_selector)
    if pod.affinity:
        spec["affinity"] = dict(pod.affinity)
    target = [{"name": TRAINER_NODE}]
    if layout == "podSpecOverrides":
        return {layout: [{"targetJobs": target, **spec}]}
    if layout == "podTemplateOverrides":
        return {layout: [{"targetJobs": target, "spec": spec}]}
    if layout == "runtimePatches":
        job = {"name": TRAINER_NODE, "template": {"spec": {"template": {"spec": spec}}}}
        return {layout: [{"manager": PATCH_MANAGER,
                          "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [job]}}}}]}
    raise ValueError(f"train.job_overrides = {layout!r}; expected podTemplateOverrides, podSpecOverrides or "
                     f"runtimePatches")


def build_trainjob(t: TrainConfig, *, name: str, namespace: str, image: str, pod: PodSettings, command: list[str],
                   env: Mapping[str, str]) -> dict[str, Any]:
    """The TrainJob: ``train.nodes`` nodes of ``image`` with the step's resources and settings, each running
    ``command`` with the step's env and ``env``."""
    resources, ranks = resources_per_node(pod.resources, t.gpus_per_node)
    trainer: dict[str, Any] = {
        "image": image,
        "command": list(command),
        "env": job_env(pod.env, env),
        "numNodes": t.nodes,
        "numProcPerNode": ranks,
    }
    if resources:
        trainer["resourcesPerNode"] = resources
    return {
        "apiVersion": f"{TRAINER_GROUP}/{TRAINER_VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/part-of": "mmsae", "app.kubernetes.io/component": "train"}},
        "spec": {"runtimeRef": {"name": t.job_runtime}, "trainer": trainer,
                 **node_overrides(t.job_overrides, pod)},
    }


def job_state(job: Mapping[str, Any]) -> tuple[str, str]:
    """``("Complete" | "Failed" | "Running", "reason: message")`` from a TrainJob's status conditions."""
    conditions = (job.get("status") or {}).get("conditions") or []
    for kind in ("Failed", "Complete"):
        for condition in conditions:
            if condition.get("type") == kind and str(condition.get("status")) == "True":
                return kind, f"{condition.get('reason', '')}: {condition.get('message', '')}".strip(": ")
    latest = ", ".join(f"{c.get('type')}={c.get('status')} ({c.get('reason', '')})" for c in conditions)
    return "Running", latest or "no conditions yet"


def poll_delays(first: float | None = None, most: float | None = None) -> Iterator[float]:
    """Seconds between polls: ``first`` (default :data:`POLL_FIRST_S`), growing by :data:`POLL_FACTOR` up to
    ``most`` (default :data:`POLL_MAX_S`)."""
    delay, most = first or POLL_FIRST_S, most or POLL_MAX_S
    while True:
        yield delay
        delay = min(delay * POLL_FACTOR, most)


def run_trainjob(api: Any, job: dict[str, Any], sleep: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Create ``job`` (or follow the unfinished one of its name), wait until it completes and return it;
    :class:`TrainJobError` when it fails. Stopped while waiting, the job is deleted. ``sleep`` waits between
    polls (default ``time.sleep``)."""
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    sleep = sleep or time.sleep
    restore = _stop_on_sigterm()
    try:
        submit(api, job, sleep)
        return follow(api, namespace, name, sleep)
    except (KeyboardInterrupt, SystemExit):
        log.warning("train step stopped: deleting TrainJob %s/%s", namespace, name)
        _delete_quietly(api, namespace, name)
        raise
    finally:
        restore()


def submit(api: Any, job: dict[str, Any], sleep: Callable[[float], None]) -> None:
    """Create ``job``; when one of its name exists, follow it if unfinished, else replace it."""
    from kubernetes.client.exceptions import ApiException

    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    try:
        _create(api, job)
        return
    except ApiException as error:
        if error.status != 409:
            raise _refused(error, job) from error
    state, detail = job_state(api.get_namespaced_custom_object(TRAINER_GROUP, TRAINER_VERSION, namespace,
                                                               TRAINJOB_PLURAL, name))
    if state == "Running":
        log.info("TrainJob %s/%s (same config and shards) has not finished: following it", namespace, name)
        return
    log.info("TrainJob %s/%s of the same config and shards ended earlier (%s: %s): replacing it", namespace, name,
             state, detail)
    api.delete_namespaced_custom_object(TRAINER_GROUP, TRAINER_VERSION, namespace, TRAINJOB_PLURAL, name,
                                        propagation_policy="Foreground")
    _wait_until_gone(api, namespace, name, sleep)
    try:
        _create(api, job)
    except ApiException as error:
        raise _refused(error, job) from error


def _create(api: Any, job: dict[str, Any]) -> None:
    """Create the TrainJob, a field the cluster does not know being an error (not silently dropped)."""
    metadata, trainer = job["metadata"], job["spec"]["trainer"]
    api.create_namespaced_custom_object(TRAINER_GROUP, TRAINER_VERSION, metadata["namespace"], TRAINJOB_PLURAL, job,
                                        field_validation="Strict")
    log.info("created TrainJob %s/%s: %s nodes x %s ranks on runtime %s", metadata["namespace"], metadata["name"],
             trainer["numNodes"], trainer["numProcPerNode"], job["spec"]["runtimeRef"]["name"])


def _refused(error: Any, job: dict[str, Any]) -> TrainJobError:
    """The cluster's refusal of the TrainJob, with what to do about the usual causes."""
    try:
        detail = json.loads(error.body or "{}").get("message") or error.body
    except (TypeError, ValueError):
        detail = error.body or str(error)
    hints = {
        403: "the step's service account needs create, get and delete on trainjobs.trainer.kubeflow.org",
        404: "is Kubeflow Trainer installed (the TrainJob resource, trainer.kubeflow.org/v1alpha1)?",
    }
    hint = hints.get(error.status, "")
    if "unknown field" in str(detail):
        layout = next(key for key in job["spec"] if key not in ("runtimeRef", "trainer"))
        hint = (f"when the unknown field is spec.{layout}, set train.job_overrides to the field this Trainer release "
                f"knows (kubectl explain trainjob.spec)")
    metadata = job["metadata"]
    return TrainJobError(f"TrainJob {metadata['namespace']}/{metadata['name']} was refused ({error.status} "
                         f"{error.reason}): {detail}" + (f"; {hint}" if hint else ""))


def _wait_until_gone(api: Any, namespace: str, name: str, sleep: Callable[[float], None], polls: int = 60) -> None:
    from kubernetes.client.exceptions import ApiException

    for delay in itertools.islice(poll_delays(first=1.0, most=10.0), polls):
        try:
            api.get_namespaced_custom_object(TRAINER_GROUP, TRAINER_VERSION, namespace, TRAINJOB_PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                return
            raise
        sleep(delay)
    raise TrainJobError(f"TrainJob {namespace}/{name} was deleted to be replaced, but is still there after "
                        f"{polls} polls; delete it (kubectl delete trainjob -n {namespace} {name}) and retry")


def follow(api: Any, namespace: str, name: str, sleep: Callable[[float], None]) -> dict[str, Any]:
    """Poll the TrainJob (with backoff) until it completes (returned) or fails (:class:`TrainJobError`)."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    reported, failures = "", 0
    logs = f"the nodes' logs: kubectl logs -n {namespace} -l jobset.sigs.k8s.io/jobset-name={name}"
    for delay in poll_delays():
        try:
            job = api.get_namespaced_custom_object(TRAINER_GROUP, TRAINER_VERSION, namespace, TRAINJOB_PLURAL, name)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as error:
            if getattr(error, "status", None) == 404:
                raise TrainJobError(f"TrainJob {namespace}/{name} was deleted while the step waited for it") from error
            failures += 1
            if failures > POLL_FAILURES_TOLERATED:
                raise TrainJobError(f"could not read TrainJob {namespace}/{name} {failures} times in a row: {error}; "
                                    f"it may still be running ({logs})") from error
            log.warning("reading TrainJob %s/%s failed (%s); trying again", namespace, name, error)
            sleep(delay)
            continue
        failures = 0
        state, detail = job_state(job)
        if state == "Complete":
            log.info("TrainJob %s/%s completed: %s", namespace, name, detail)
            return job
        if state == "Failed":
            raise TrainJobError(f"TrainJob {namespace}/{name} failed: {detail} ({logs})")
        progress = f"{detail}; {_jobs_summary(job)}"
        if progress != reported:
            log.info("TrainJob %s/%s: %s", namespace, name, progress)
            reported = progress
        sleep(delay)
    raise AssertionError("poll_delays never ends")


def _jobs_summary(job: Mapping[str, Any]) -> str:
    jobs = (job.get("status") or {}).get("jobsStatus") or []
    parts = [f"{j.get('name')}: {j.get('active', 0)} active, {j.get('ready', 0)} ready, {j.get('succeeded', 0)} "
             f"succeeded, {j.get('failed', 0)} failed" for j in jobs]
    return "; ".join(parts) or "no jobs yet"


def _stop_on_sigterm() -> Callable[[], None]:
    """Make SIGTERM (a stopped run) raise SystemExit while the step waits; returns what restores the handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _delete_quietly(api: Any, namespace: str, name: str) -> None:
    try:
        api.delete_namespaced_custom_object(TRAINER_GROUP, TRAINER_VERSION, namespace, TRAINJOB_PLURAL, name,
                                            propagation_policy="Foreground")
    except Exception as error:  # the step is stopping anyway: say so, and go on stopping
        log.warning("could not delete TrainJob %s/%s: %s", namespace, name, error)


def cluster_api() -> Any:
    """A ``CustomObjectsApi`` of this pod's cluster (its service account), else of the local kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as error:
            raise TrainJobError(f"train.nodes > 1 needs the Kubernetes API, but there is neither an in-cluster "
                                f"service account nor a kubeconfig: {error}") from error
    return client.CustomObjectsApi()

