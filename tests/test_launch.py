"""Where the train step runs its ranks (`mmsae.launch`): in-process, under torchrun on this node, or as a
Kubeflow Trainer TrainJob followed through a stand-in Kubernetes API."""

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import torch
import yaml
from kfp import dsl
from safetensors.torch import load_file

from mmsae import launch, storage, trainjob
from mmsae.config import TrainConfig, config_from_yaml, dump_config
from mmsae.stages import train as train_stage
from tests.test_components import FakeArtifact, FakeMetrics, pointer_in_metadata
from tests.test_train import cfg_for, make_shards

GPU = "nvidia.com/gpu"
STEP_RESOURCES = {"limits": {"cpu": "8", "memory": "64G", GPU: "4"}, "requests": {"cpu": "8", "memory": "64G"}}
TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}
SECRET_ENV = {"name": "AWS_SECRET_ACCESS_KEY",
              "valueFrom": {"secretKeyRef": {"name": "mmsae-s3", "key": "AWS_SECRET_ACCESS_KEY", "optional": True}}}
STEP_ENV = [
    {"name": "MLFLOW_TRACKING_URI", "valueFrom": {"configMapKeyRef": {"name": "mmsae-env", "key": "MLFLOW_TRACKING_URI"}}},
    SECRET_ENV,
    {"name": "MMSAE_TRAIN_IMAGE", "value": "registry.example/mmsae-train:7"},
    {"name": "PET_NNODES", "value": "9"},  # the runtime's to set: never forwarded
]
AFFINITY = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
    {"matchExpressions": [{"key": "gpu.class", "operator": "In", "values": ["h100"]}]}]}}}


def step_settings(**changes: Any) -> dsl.TaskConfig:
    """What KFP hands the step: its resources, env, tolerations, node selector and affinity."""
    fields = {"resources": STEP_RESOURCES, "env": STEP_ENV, "tolerations": [TOLERATION],
              "node_selector": {"nvidia.com/gpu.present": "true"}, "affinity": AFFINITY, **changes}
    return dsl.TaskConfig(**fields)


def s3_config(tmp_path: Path, **train: Any):
    cfg = cfg_for("s3://bucket/run/cache", tmp_path / "unused", nodes=2, **train)
    cfg.run.workdir, cfg.train.out = "s3://bucket/run", "s3://bucket/run/train"
    return cfg


def job_of(cfg, pod: dsl.TaskConfig | None = None) -> dict[str, Any]:
    return launch.trainjob_for(cfg, cfg.train.shards, "parent-1", launch.PodSettings.of(pod or step_settings()),
                               "registry.example/mmsae-train:7", "team-a")


# ---------------------------------------------------------------------------------------------------
# one node


@pytest.mark.parametrize(("gpus_per_node", "device", "visible", "ranks"), [
    (0, "auto", 4, 4), (0, "auto", 0, 1), (0, "cpu", 4, 1), (0, "cuda:1", 4, 1), (2, "auto", 4, 2), (3, "auto", 0, 3),
])
def test_ranks_are_the_visible_gpus_unless_a_setting_says_otherwise(gpus_per_node, device, visible, ranks):
    config = TrainConfig(gpus_per_node=gpus_per_node, device=device)
    assert launch.ranks_per_node(config, visible_gpus=visible) == ranks


def test_more_ranks_than_gpus_or_ranks_on_one_named_gpu_are_refused():
    with pytest.raises(launch.LaunchError, match=r"gpus_per_node = 8, but this node shows 4 GPUs"):
        launch.ranks_per_node(TrainConfig(gpus_per_node=8), visible_gpus=4)
    with pytest.raises(launch.LaunchError, match=r"train.device = cuda:1 names one GPU"):
        launch.ranks_per_node(TrainConfig(gpus_per_node=2, device="cuda:1"), visible_gpus=4)


@pytest.fixture
def quiet_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch-extensions"))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_two_ranks_through_the_launcher_seal_the_sae_one_rank_would(tmp_path, quiet_ranks):
    shards = make_shards(str(tmp_path / "acts"), n_shards=4)
    one, two = tmp_path / "one", tmp_path / "two"
    alone = launch.train(cfg_for(shards, one))  # no GPU here, no setting: in-process
    launched = launch.train(cfg_for(shards, two, gpus_per_node=2))
    assert (alone.uri, launched.uri) == (str(one), str(two))
    sealed = {out: storage.read_manifest(str(out), train_stage.KIND) for out in (one, two)}
    assert launched.figures == sealed[two].extra["figures"] and alone.figures == sealed[one].extra["figures"]
    assert set(launched.figures) == set(alone.figures)
    assert set(sealed[two].files) == set(sealed[one].files)
    for field in ("variants", "dims", "hookpoints"):
        assert sealed[two].extra[field] == sealed[one].extra[field], field
    a, b = load_file(one / "layers.1" / "sae.safetensors"), load_file(two / "layers.1" / "sae.safetensors")
    for name in a:  # the same global batch over two ranks takes the same steps
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4)


def test_a_failed_rank_fails_the_step_with_its_status_error_and_stderr(tmp_path, quiet_ranks):
    cfg = cfg_for(str(tmp_path / "no-shards-here"), tmp_path / "out", gpus_per_node=2)
    with pytest.raises(launch.LaunchError) as failed:
        launch.train(cfg)
    message = str(failed.value)
    assert "torchrun exited with status 1" in message
    # each rank fails alike; torchrun may stop the second before it records its own failure
    assert re.search(r"rank [01] exited with status 1: TrainError: no activation shards at .*no-shards-here", message)
    assert "no-shards-here" in message.split("stderr ---", 1)[1]  # the rank's own words, from its stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_rank_that_records_nothing_is_still_reported():
    message = launch.failure_message(1, [], {0: ["loading shards"], 1: []}, ["torchrun: SIGKILL"])
    assert "status 1" in message and "no rank recorded an error" in message
    assert "rank 0's stderr ---\nloading shards" in message and "rank 1's" not in message
    assert launch.failure_message(-9, [], {}, ["Killed"]).endswith("torchrun's stderr ---\nKilled")


# ---------------------------------------------------------------------------------------------------
# several nodes: the TrainJob


def test_the_trainjob_carries_the_steps_resources_settings_and_env_by_reference(tmp_path):
    cfg = s3_config(tmp_path)
    job = job_of(cfg)
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"]["namespace"] == "team-a"
    spec = job["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed"}
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 4  # one rank per GPU the step asked for
    assert trainer["resourcesPerNode"] == STEP_RESOURCES
    assert trainer["image"] == "registry.example/mmsae-train:7"
    command = trainer["command"]
    assert command[:3] == ["python3", "-m", "torch.distributed.run"] and "--nproc_per_node" not in command
    assert command[command.index("-m", 2) + 1] == "mmsae.launch"
    assert command[command.index("--shards") + 1] == "s3://bucket/run/cache"
    assert command[command.index("--parent-run-id") + 1] == "parent-1"
    env = {entry["name"]: entry for entry in trainer["env"]}
    assert config_from_yaml(env[launch.CONFIG_ENV]["value"]) == cfg
    assert env["AWS_SECRET_ACCESS_KEY"] == SECRET_ENV and "value" not in env["AWS_SECRET_ACCESS_KEY"]
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]["name"] == "mmsae-env"
    assert "PET_NNODES" not in env
    (override,) = spec["podTemplateOverrides"]
    assert override["targetJobs"] == [{"name": "node"}]
    node = override["spec"]
    assert node["tolerations"] == [TOLERATION] and node["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert node["affinity"] == AFFINITY
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in node["volumes"]
    assert node["containers"] == [{"name": "node", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}]


@pytest.mark.parametrize(("layout", "path"), [
    ("podTemplateOverrides", ["podTemplateOverrides", 0, "spec"]),
    ("podSpecOverrides", ["podSpecOverrides", 0]),
    ("runtimePatches", ["runtimePatches", 0, "trainingRuntimeSpec", "template", "spec", "replicatedJobs", 0,
                        "template", "spec", "template", "spec"]),
])
def test_each_trainer_release_finds_the_node_settings_where_it_reads_them(layout, path, tmp_path):
    spec = job_of(s3_config(tmp_path, job_overrides=layout))["spec"]
    assert set(spec) == {"runtimeRef", "trainer", layout}
    node = spec
    for key in path:
        node = node[key]
    assert node["tolerations"] == [TOLERATION] and node["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_gpus_per_node_sets_the_gpus_and_ranks_of_each_node(tmp_path):
    trainer = job_of(s3_config(tmp_path, gpus_per_node=8))["spec"]["trainer"]
    assert trainer["numProcPerNode"] == 8 and trainer["resourcesPerNode"]["limits"][GPU] == "8"
    assert trainer["resourcesPerNode"]["limits"]["cpu"] == "8"
    bare = job_of(s3_config(tmp_path), pod=dsl.TaskConfig())["spec"]  # a step given nothing: one rank a node
    assert bare["trainer"]["numProcPerNode"] == 1 and "resourcesPerNode" not in bare["trainer"]
    assert "tolerations" not in bare["podTemplateOverrides"][0]["spec"]


def test_the_job_is_named_after_what_it_trains():
    name = trainjob.trainjob_name("train: {k: 4}\n", "s3://b/cache")
    assert name == trainjob.trainjob_name("train: {k: 4}\n", "s3://b/cache")
    assert name != trainjob.trainjob_name("train: {k: 8}\n", "s3://b/cache")
    assert name != trainjob.trainjob_name("train: {k: 4}\n", "s3://b/other")
    assert len(name) <= 63 and name.replace("-", "").isalnum() and name[0].isalpha()


def test_several_nodes_need_shared_storage_a_namespace_and_an_image(tmp_path, monkeypatch):
    local = cfg_for("s3://bucket/run/cache", tmp_path / "out", nodes=2)
    with pytest.raises(launch.LaunchError, match=r"train.out = .*out.*run.workdir = .*local to one machine"):
        launch.train(local, kube_api=lambda: pytest.fail("no job without shared storage"))
    monkeypatch.setattr(trainjob, "NAMESPACE_FILE", tmp_path / "no-such-file")
    with pytest.raises(launch.TrainJobError, match=r"set train.job_namespace"):
        launch.train(s3_config(tmp_path), image="i", kube_api=lambda: None)
    with pytest.raises(launch.LaunchError, match=r"no image for the TrainJob"):
        launch.train(s3_config(tmp_path, job_namespace="team-a"), kube_api=lambda: None)


# ---------------------------------------------------------------------------------------------------
# following the TrainJob through a stand-in Kubernetes API


def condition(kind: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": "True", "reason": reason, "message": message}


RUNNING = {"conditions": [], "jobsStatus": [{"name": "node", "active": 2, "ready": 2, "succeeded": 0, "failed": 0}]}
COMPLETE = {"conditions": [condition("Complete", "JobsCompleted", "jobset completed")]}
FAILED = {"conditions": [condition("Failed", "FailedJobs", "jobset failed: node-1 exited with 1")]}


class FakeKubernetes:
    """The few Kubernetes API endpoints the step calls for TrainJobs: create, get (each get answers the next
    status of ``statuses``, the last one again once they run out) and delete; records every request."""

    def __init__(self, statuses: list[dict[str, Any]], reject: tuple[int, str] | None = None) -> None:
        self.statuses, self.reject = list(statuses), reject
        self.jobs: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, list[str]], Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.serve(self, "POST", body)

            def do_GET(self) -> None:
                fake.serve(self, "GET", None)

            def do_DELETE(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                fake.serve(self, "DELETE", json.loads(self.rfile.read(length)) if length else None)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def serve(self, handler: BaseHTTPRequestHandler, method: str, body: Any) -> None:
        url = urlparse(handler.path)
        self.requests.append((method, url.path, parse_qs(url.query), body))
        parts = url.path.strip("/").split("/")
        if parts[:3] != ["apis", "trainer.kubeflow.org", "v1alpha1"] or parts[5] != "trainjobs":
            return self.answer(handler, 404, {"kind": "Status", "reason": "NotFound", "message": url.path})
        name = parts[6] if len(parts) > 6 else body["metadata"]["name"]
        if method == "POST":
            if self.reject:
                return self.answer(handler, self.reject[0], {"kind": "Status", "message": self.reject[1]})
            if name in self.jobs:
                return self.answer(handler, 409, {"kind": "Status", "reason": "AlreadyExists", "message": name})
            self.jobs[name] = body
            return self.answer(handler, 201, body)
        if name not in self.jobs:
            return self.answer(handler, 404, {"kind": "Status", "reason": "NotFound", "message": name})
        if method == "DELETE":
            del self.jobs[name]
            return self.answer(handler, 200, {"kind": "Status", "status": "Success"})
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return self.answer(handler, 200, {**self.jobs[name], "status": status})

    @staticmethod
    def answer(handler: BaseHTTPRequestHandler, code: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def api(self) -> Any:
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.host
        return client.CustomObjectsApi(client.ApiClient(configuration))

    def made(self, method: str) -> list[tuple[str, dict[str, list[str]], Any]]:
        return [(path, query, body) for verb, path, query, body in self.requests if verb == method]


@pytest.fixture
def kube() -> Iterator[Any]:
    servers: list[FakeKubernetes] = []

    def start(statuses: list[dict[str, Any]], reject: tuple[int, str] | None = None) -> FakeKubernetes:
        fake = FakeKubernetes(statuses, reject)
        fake.thread.start()
        servers.append(fake)
        return fake

    yield start
    for fake in servers:
        fake.server.shutdown()
        fake.server.server_close()


def test_the_step_creates_the_trainjob_and_waits_until_it_completes(kube, tmp_path):
    fake = kube([{}, RUNNING, RUNNING, COMPLETE])
    job, waits = job_of(s3_config(tmp_path)), []
    finished = trainjob.run_trainjob(fake.api(), job, sleep=waits.append)
    assert finished["status"] == COMPLETE
    ((path, query, body),) = fake.made("POST")
    assert path == "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a/trainjobs"
    assert query["fieldValidation"] == ["Strict"]  # a field this cluster does not know is refused, never dropped
    assert body == job
    assert len(fake.made("GET")) == 4 and len(waits) == 3
    assert waits == sorted(waits) and waits[-1] > waits[0]  # backing off


def test_a_failed_trainjob_fails_the_step_with_the_jobs_reason(kube, tmp_path):
    fake = kube([RUNNING, FAILED])
    job = job_of(s3_config(tmp_path))
    with pytest.raises(launch.TrainJobError) as failed:
        trainjob.run_trainjob(fake.api(), job, sleep=lambda _: None)
    assert str(failed.value).startswith(f"TrainJob team-a/{job['metadata']['name']} failed: FailedJobs: jobset "
                                        f"failed: node-1 exited with 1 (the nodes' logs: kubectl logs")


def test_a_retried_step_follows_its_unfinished_job_and_replaces_a_finished_one(kube, tmp_path):
    job = job_of(s3_config(tmp_path))
    fake = kube([RUNNING, COMPLETE])
    fake.jobs[job["metadata"]["name"]] = job  # the first try's job, still running
    trainjob.run_trainjob(fake.api(), job, sleep=lambda _: None)
    assert len(fake.made("POST")) == 1 and fake.made("DELETE") == []  # one create refused (409), then followed
    ended = kube([FAILED, COMPLETE])
    ended.jobs[job["metadata"]["name"]] = job  # an earlier run's job, failed
    trainjob.run_trainjob(ended.api(), job, sleep=lambda _: None)
    (deleted,) = ended.made("DELETE")
    assert deleted[0].endswith(f"/trainjobs/{job['metadata']['name']}")
    assert [body for _, _, body in ended.made("POST")] == [job, job]  # refused, then created anew


def test_a_stopped_step_deletes_its_trainjob(kube, tmp_path):
    fake = kube([RUNNING])

    def stopped(_: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainjob.run_trainjob(fake.api(), job_of(s3_config(tmp_path)), sleep=stopped)
    assert len(fake.made("DELETE")) == 1 and fake.jobs == {}


def test_a_trainjob_field_the_cluster_does_not_know_names_the_setting_to_change(kube, tmp_path):
    fake = kube([COMPLETE], reject=(400, 'TrainJob in version "v1alpha1" cannot be handled as a TrainJob: strict '
                                         'decoding error: unknown field "spec.podTemplateOverrides"'))
    with pytest.raises(launch.TrainJobError, match=r"refused \(400.*unknown field.*set train.job_overrides"):
        trainjob.run_trainjob(fake.api(), job_of(s3_config(tmp_path)), sleep=lambda _: None)


@pytest.mark.services
def test_the_component_with_several_nodes_runs_a_trainjob_and_points_at_its_sae(kube, tmp_path, s3_env, monkeypatch):
    from mmsae import components
    from mmsae.components.train import train as component

    cfg = cfg_for(f"{s3_env}/cache", tmp_path / "unused", nodes=2, job_namespace="team-a")
    cfg.run.workdir, cfg.train.out = s3_env, f"{s3_env}/train"
    figures = {"fvu": 0.25, "steps": 12}
    storage.write_manifest(cfg.train.out, train_stage.KIND, files=[], extra={"figures": figures})  # what rank 0 seals
    fake = kube([RUNNING, COMPLETE])
    monkeypatch.setattr(launch, "cluster_api", fake.api)
    monkeypatch.setattr(trainjob, "POLL_FIRST_S", 0.01)
    sae, metrics = FakeArtifact(tmp_path, "sae"), FakeMetrics(tmp_path)
    component.python_func(config_yaml=dump_config(cfg), parent_run_id="parent-1", sae=sae, metrics=metrics,
                          shards=pointer_in_metadata(tmp_path, "shards", f"{s3_env}/cache"),
                          task_config=step_settings())
    assert sae.metadata["uri"] == f"{s3_env}/train" and metrics.logged == {"fvu": 0.25, "steps": 12.0}
    ((_, _, job),) = fake.made("POST")
    assert job["metadata"]["namespace"] == "team-a"
    assert job["spec"]["trainer"]["numNodes"] == 2 and job["spec"]["trainer"]["image"] == components.TRAIN_IMAGE
    assert job["spec"]["podTemplateOverrides"][0]["spec"]["tolerations"] == [TOLERATION]
    assert "s3-secret-value" not in json.dumps(job)


# ---------------------------------------------------------------------------------------------------
# the component under kfp.local


def test_the_train_component_still_runs_under_kfp_local(tmp_path, quiet_ranks, monkeypatch):
    from kfp import local

    from mmsae.components.train import train as train_component

    @dsl.component(install_kfp_package=False)
    def shards_at(uri: str, shards: dsl.Output[dsl.Dataset]):
        from mmsae.components.pointers import write_pointer

        write_pointer(shards, uri)

    @dsl.pipeline
    def train_only(config_yaml: str, uri: str) -> dsl.Model:
        pointer = shards_at(uri=uri)
        return train_component(config_yaml=config_yaml, parent_run_id="", shards=pointer.outputs["shards"]).outputs["sae"]

    shards = make_shards(str(tmp_path / "acts"), n_shards=2)
    cfg = cfg_for("", tmp_path / "sae")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    model = train_only(config_yaml=dump_config(cfg), uri=shards).output
    assert yaml.safe_load(Path(model.path).read_text()) == {"uri": str(tmp_path / "sae")}
    assert storage.read_manifest(str(tmp_path / "sae"), train_stage.KIND).inputs["shards"] == shards
