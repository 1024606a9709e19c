"""`mmsae pipeline upload / submit / schedule` against a stand-in of the KFP API (the part of KFP's v2beta1 REST
API that kfp.Client uses) served on 127.0.0.1 by the test: what each request carries."""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from typer.testing import CliRunner

from mmsae import kfp_client
from mmsae.cli import app
from mmsae.config import dump_config, load_config

API = "/apis/v2beta1"
runner = CliRunner()


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any = None
    upload: bytes | None = None


@dataclass
class FakeKfp:
    """Pipelines, versions, experiments, runs and recurring runs in memory; every request is recorded."""

    requests: list[Request] = field(default_factory=list)
    pipelines: list[dict[str, Any]] = field(default_factory=list)
    versions: list[dict[str, Any]] = field(default_factory=list)
    experiments: list[dict[str, Any]] = field(default_factory=list)
    refuse: dict[str, tuple[int, str]] = field(default_factory=dict)
    """path suffix -> (status, message) to answer with an error."""

    def seen(self, method: str, suffix: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path.endswith(suffix)]

    def handle(self, request: Request) -> tuple[int, dict[str, Any]]:
        for suffix, answer in self.refuse.items():
            if request.path.endswith(suffix):
                return answer[0], {"message": answer[1], "code": 3}
        route = (request.method, request.path[len(API):])
        if route == ("GET", "/healthz"):
            return 200, {"multi_user": False}
        if route == ("GET", "/pipelines"):
            return 200, {"pipelines": self._matching(self.pipelines, request), "total_size": 0}
        if route == ("POST", "/pipelines/upload"):
            pipeline = {"pipeline_id": _id(), "display_name": request.query["name"],
                        "namespace": request.query.get("namespace", "")}
            self.pipelines.append(pipeline)
            self._add_version(pipeline["pipeline_id"], request.query["name"])
            return 200, pipeline
        if route == ("POST", "/pipelines/upload_version"):
            return 200, self._add_version(request.query["pipelineid"], request.query["name"])
        if request.method == "GET" and request.path.endswith("/versions"):
            pipeline_id = request.path.split("/")[-2]
            found = [v for v in self.versions if v["pipeline_id"] == pipeline_id]
            return 200, {"pipeline_versions": self._matching(list(reversed(found)), request)}
        if request.method == "DELETE" and "/versions/" in request.path:
            version_id = request.path.rsplit("/", 1)[-1]
            self.versions = [v for v in self.versions if v["pipeline_version_id"] != version_id]
            return 200, {}
        if route == ("GET", "/experiments"):
            return 200, {"experiments": self._matching(self.experiments, request)}
        if route == ("POST", "/experiments"):
            experiment = {**request.body, "experiment_id": _id()}
            self.experiments.append(experiment)
            return 200, experiment
        if route == ("POST", "/runs"):
            return 200, {**request.body, "run_id": _id(), "state": "PENDING"}
        if route == ("POST", "/recurringruns"):
            return 200, {**request.body, "recurring_run_id": _id(), "status": "ENABLED"}
        return 404, {"message": f"no route {route}"}

    def _add_version(self, pipeline_id: str, name: str) -> dict[str, Any]:
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": _id(), "display_name": name}
        self.versions.append(version)
        return version

    @staticmethod
    def _matching(items: list[dict[str, Any]], request: Request) -> list[dict[str, Any]]:
        found = items
        if "filter" in request.query:
            for predicate in json.loads(request.query["filter"])["predicates"]:
                assert predicate["operation"] in ("EQUALS", 1)  # protobuf JSON: name or number
                found = [i for i in found if i.get(predicate["key"]) == predicate["stringValue"]]
        if request.query.get("namespace"):
            found = [i for i in found if i.get("namespace", "") == request.query["namespace"]]
        return found[: int(request.query.get("page_size", 100))]


def _id() -> str:
    return str(uuid.uuid4())


def _uploaded_file(content_type: str, body: bytes) -> bytes:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    (part,) = [p for p in message.iter_parts() if p.get_param("name", header="content-disposition") == "uploadfile"]
    return part.get_payload(decode=True)


@pytest.fixture
def kfp_api() -> Iterator[tuple[FakeKfp, str]]:
    fake = FakeKfp()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            request = Request(self.command, url.path, {k: v[0] for k, v in parse_qs(url.query).items()},
                              {k.lower(): v for k, v in self.headers.items()})
            content_type = self.headers.get("Content-Type", "")
            if content_type.startswith("multipart/form-data"):
                request.upload = _uploaded_file(content_type, raw)
            elif raw:
                request.body = json.loads(raw)
            fake.requests.append(request)
            try:
                status, answer = fake.handle(request)
            except Exception as err:  # a request the stand-in did not expect: fail loudly
                status, answer = 500, {"message": f"stand-in error: {err!r}"}
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _kfp_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (kfp_client.ENDPOINT_ENV, kfp_client.TOKEN_ENV, kfp_client.NAMESPACE_ENV, kfp_client.UI_ENDPOINT_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(kfp_client.SA_TOKEN_PATH_ENV, str(tmp_path / "no-token"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # kfp.Client reads ~/.config/kfp/context.json


@pytest.fixture
def run_config(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text("run:\n  name: layers\n  workdir: s3://mmsae/runs/layers\ncache:\n  layers: [4]\n")
    return path


def _invoke(*args: str) -> dict[str, Any] | list[Any]:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_submit_uploads_the_pipeline_and_starts_a_run_with_the_config(kfp_api, run_config, monkeypatch) -> None:
    fake, url = kfp_api
    monkeypatch.setenv(kfp_client.ENDPOINT_ENV, url)
    monkeypatch.setenv(kfp_client.TOKEN_ENV, "user-token")
    out = _invoke("pipeline", "submit", "--config", str(run_config), "--set", "train.k=8",
                  "--run-name", "layer-4", "--experiment", "sae-layers")

    (upload,) = fake.seen("POST", "/pipelines/upload")
    package = yaml.safe_load_all(upload.upload.decode())
    assert next(package)["pipelineInfo"]["name"] == "mmsae-sae-interp" == upload.query["name"]
    (experiment,) = fake.seen("POST", "/experiments")
    assert experiment.body["display_name"] == "sae-layers"
    (run,) = fake.seen("POST", "/runs")
    assert run.body["display_name"] == "layer-4"
    assert run.body["experiment_id"] == fake.experiments[0]["experiment_id"] == out["experiment_id"]
    reference = run.body["pipeline_version_reference"]
    (version,) = fake.versions  # the pipeline's first, unnamed version was replaced by the named one
    assert version["display_name"] == out["version"] and out["version"].startswith("0.1.0-")
    assert reference == {"pipeline_id": fake.pipelines[0]["pipeline_id"],
                         "pipeline_version_id": version["pipeline_version_id"]}
    assert len(fake.seen("DELETE", "")) == 1
    parameters = run.body["runtime_config"]["parameters"]
    expected = dump_config(load_config(run_config, ["train.k=8"]))
    assert parameters["config_yaml"] == expected
    assert yaml.safe_load(parameters["config_yaml"])["train"]["k"] == 8
    assert yaml.safe_load(parameters["config_yaml"])["cache"]["layers"] == [4]
    assert parameters["run_name"] == "layer-4"
    assert "pipeline_spec" not in run.body or run.body["pipeline_spec"] is None
    assert {r.headers.get("authorization") for r in fake.requests} == {"Bearer user-token"}
    assert out["run_id"] and out["url"] == f"{url}/#/runs/details/{out['run_id']}"
    assert out["created"] is True


def test_an_unchanged_pipeline_is_not_uploaded_again_and_a_changed_one_gets_a_new_version(
        kfp_api, run_config, tmp_path) -> None:
    fake, url = kfp_api
    first = _invoke("pipeline", "upload", "--endpoint", url)
    again = _invoke("pipeline", "submit", "--endpoint", url, "--config", str(run_config))
    uploaded = {p["pipeline"]: p for p in first}
    assert sorted(uploaded) == ["mmsae-retrain-layer", "mmsae-sae-interp"]
    assert all(p["created"] is True for p in first)
    assert again["created"] is False and again["version_id"] == uploaded["mmsae-sae-interp"]["version_id"]
    assert len(fake.seen("POST", "/pipelines/upload")) == 2
    assert len(fake.seen("POST", "/pipelines/upload_version")) == 2  # with each new pipeline only
    assert again["run_name"].startswith("layers-")  # default: <run.name>-<date>-<time>

    conn = kfp_client.connection(url)
    with kfp_client.compiled("sae_interp") as package:
        changed = tmp_path / "sae_interp.yaml"
        changed.write_text(package.read_text() + "\n# another build\n")
    made = kfp_client.upload(kfp_client.connect(conn), conn, changed)
    request = fake.seen("POST", "/pipelines/upload_version")[-1]
    assert len(fake.versions) == 3  # one per pipeline, and the changed one's second
    original = uploaded["mmsae-sae-interp"]
    assert made.created and request.query["pipelineid"] == original["pipeline_id"]
    assert request.query["name"] == made.version == kfp_client.version_name(changed) != original["version"]
    assert request.upload == changed.read_bytes()


def test_schedule_creates_an_enabled_recurring_run_on_the_cron_with_bounded_concurrency(
        kfp_api, run_config) -> None:
    fake, url = kfp_api
    out = _invoke("pipeline", "schedule", "--endpoint", url, "--pipeline", "sae_interp", "--config", str(run_config),
                  "--set", "train.k=32", "--cron", "0 0 3 * * *", "--max-concurrency", "2")
    (recurring,) = fake.seen("POST", "/recurringruns")
    body = recurring.body
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert "periodic_schedule" not in body["trigger"] or body["trigger"]["periodic_schedule"] is None
    assert int(body["max_concurrency"]) == 2
    assert body["mode"] == "ENABLE" and body["no_catchup"] is True
    assert body["display_name"] == "layers-sae_interp" == out["name"]
    parameters = body["runtime_config"]["parameters"]
    assert parameters == {"config_yaml": dump_config(load_config(run_config, ["train.k=32"]))}
    assert body["pipeline_version_reference"]["pipeline_version_id"] == out["version_id"]
    assert out["recurring_run_id"] and out["cron"] == "0 0 3 * * *" and out["max_concurrency"] == 2


@pytest.mark.parametrize(("args", "message"), [
    (["--cron", "0 3 * * *"], "has 5 fields; KFP's cron has 6, seconds first: '0 0 3 * * *'"),
    (["--cron", "every day"], "not KFP's cron format"),
    (["--cron", "@sometimes"], "unknown descriptor"),
    (["--cron", "@daily", "--max-concurrency", "11"], "KFP takes 1 to 10 concurrent runs"),
    (["--cron", "@every 6h", "--pipeline", "retrain_layers"], "no pipeline named 'retrain_layers'"),
], ids=["five-fields", "words", "descriptor", "concurrency", "pipeline"])
def test_schedule_refuses_what_kfp_would_refuse_before_sending_anything(kfp_api, run_config, args, message) -> None:
    fake, url = kfp_api
    result = runner.invoke(app, ["pipeline", "schedule", "--endpoint", url, "--config", str(run_config),
                                 "--pipeline", "sae_interp", *args])
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split())
    assert not [r for r in fake.requests if r.method == "POST"]


def test_namespace_and_projected_token_go_with_every_request(kfp_api, run_config, tmp_path, monkeypatch) -> None:
    fake, url = kfp_api
    token = tmp_path / "token"
    token.write_text("projected-sa-token")
    monkeypatch.setenv(kfp_client.SA_TOKEN_PATH_ENV, str(token))
    monkeypatch.setenv(kfp_client.NAMESPACE_ENV, "team-a")
    _invoke("pipeline", "submit", "--endpoint", url, "--config", str(run_config))
    (upload,) = fake.seen("POST", "/pipelines/upload")
    assert upload.query["namespace"] == "team-a"
    assert fake.seen("GET", "/pipelines")[0].query["namespace"] == "team-a"
    assert fake.seen("POST", "/experiments")[0].body["namespace"] == "team-a"
    assert {r.headers.get("authorization") for r in fake.requests} == {"Bearer projected-sa-token"}


def test_a_refused_request_is_one_line_with_the_servers_message(kfp_api, run_config) -> None:
    fake, url = kfp_api
    fake.refuse["/runs"] = (400, "Invalid input error: config_yaml is too long")
    result = runner.invoke(app, ["pipeline", "submit", "--endpoint", url, "--config", str(run_config)])
    assert result.exit_code == 1
    assert "refused to start a run of mmsae-sae-interp: 400" in result.output
    assert "config_yaml is too long" in result.output


def test_no_endpoint_and_no_server_are_clear_errors(run_config) -> None:
    result = runner.invoke(app, ["pipeline", "submit", "--config", str(run_config)])
    assert result.exit_code == 1 and "no KFP endpoint: pass --endpoint or set $KF_PIPELINES_ENDPOINT" in result.output
    closed = f"http://127.0.0.1:{_closed_port()}"
    result = runner.invoke(app, ["pipeline", "upload", "--endpoint", closed])
    assert result.exit_code == 1 and f"cannot reach the KFP API at {closed}" in result.output


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_compile_writes_every_pipeline_and_cron_check_accepts_kfp_forms(tmp_path) -> None:
    result = runner.invoke(app, ["pipeline", "compile", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("*.yaml")) == [f"{n}.yaml" for n in sorted(kfp_client.pipeline_names())]
    assert "sae_interp" in kfp_client.pipeline_names()
    assert kfp_client.pipeline_parameters(tmp_path / "sae_interp.yaml") >= {"config_yaml", "run_name"}
    for cron in ("0 0 3 * * *", "0 */30 * * * 1-5", "@daily", "@every 1h30m", "0 0 9 ? * MON-FRI"):
        assert kfp_client.check_cron(cron) == cron
