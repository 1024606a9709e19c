"""The compiled YAML of both pipelines: every stage, GPU requests and the taint, no secret value, caching and
retries as designed, the fan-out over layers and the choice of one layer."""

from __future__ import annotations

import importlib

import pytest
import yaml
from kfp import compiler

LAYER_STEPS = {"layer-config", "cache", "train", "mine", "explain", "score", "attribute", "steer", "report"}
GPU_STEPS = {"cache", "train", "mine", "attribute", "steer"}
SECRET_VALUES = {"AWS_SECRET_ACCESS_KEY": "s3-secret-value-do-not-leak",
                 "AWS_ACCESS_KEY_ID": "s3-key-id-do-not-leak",
                 "OPENAI_API_KEY": "sk-explainer-key-do-not-leak"}
COMPILE_ENV = {
    "MMSAE_PIPELINE_ENV_CONFIGMAP": "mmsae-env",
    "MMSAE_S3_SECRET": "mmsae-s3",
    "MMSAE_EXPLAINER_SECRET": "mmsae-explainer",
    "MMSAE_GPU_NODE_SELECTOR": "nvidia.com/gpu.present=true",
    "MMSAE_GPUS": "2",
    "MMSAE_LAYER_PARALLELISM": "2",
    **SECRET_VALUES,
}


def compile_pipeline(name: str, path, env: dict[str, str], monkeypatch) -> tuple[str, dict, dict]:
    """Compile pipeline ``name`` with ``env`` set while its module is defined; returns the text, the pipeline
    spec and the Kubernetes platform spec ({} when there is none)."""
    from mmsae import pipelines  # noqa: F401

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    module = importlib.import_module(f"mmsae.pipelines.{name}")
    try:
        reloaded = importlib.reload(module)
        compiler.Compiler().compile(getattr(reloaded, name), str(path))
    finally:
        monkeypatch.undo()
        importlib.reload(module)
    text = path.read_text()
    docs = list(yaml.safe_load_all(text))
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    return text, docs[0], platform


@pytest.fixture(scope="module", params=["sae_interp", "retrain_layer"])
def compiled(request, tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        path = tmp_path_factory.mktemp("compiled") / f"{request.param}.yaml"
        text, spec, platform = compile_pipeline(request.param, path, COMPILE_ENV, monkeypatch)
    return request.param, text, spec, platform


def layer_dag(name: str, spec: dict) -> dict:
    """The tasks of one layer: the ParallelFor's body, or the condition's."""
    prefix = "comp-for-loop-" if name == "sae_interp" else "comp-condition-"
    (component,) = [value for key, value in spec["components"].items() if key.startswith(prefix)]
    return component["dag"]["tasks"]


def executor(spec: dict, task: dict) -> dict:
    component = spec["components"][task["componentRef"]["name"]]
    return spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"]


def test_every_stage_is_present_in_order(compiled):
    name, _, spec, _ = compiled
    outer = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    planner = "plan-layers" if name == "sae_interp" else "next-layer"
    assert {"open-tracking", "inputs", planner} <= set(outer)
    assert "close-tracking" in spec["root"]["dag"]["tasks"]
    steps = layer_dag(name, spec)
    assert set(steps) == LAYER_STEPS
    after = {step: set(task.get("dependentTasks", [])) for step, task in steps.items()}
    assert after["cache"] == {"layer-config"}
    assert {"cache", "layer-config"} <= after["train"]
    assert {"train", "cache"} <= after["mine"]
    assert "mine" in after["explain"] and "explain" in after["score"]
    assert after["attribute"] == {"layer-config", "mine"}
    assert {"score", "explain", "attribute"} <= after["steer"] and {"score", "steer", "attribute"} <= after["report"]
    for step in LAYER_STEPS - {"layer-config"}:  # every step of the layer runs under the layer's own config
        source = steps[step]["inputs"]["parameters"]["config_yaml"]["taskOutputParameter"]
        assert source["producerTask"] == "layer-config", step


def test_gpu_tasks_request_gpus_cpu_memory_shm_and_tolerate_the_taint(compiled):
    name, _, spec, platform = compiled
    for step, task in layer_dag(name, spec).items():
        resources = executor(spec, task).get("resources", {})
        label = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        if step not in GPU_STEPS:
            assert "accelerator" not in resources, step
            assert "tolerations" not in platform.get(label, {}), step
            continue
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu", step
        assert resources["accelerator"]["resourceCount"] == "2", step
        assert resources["resourceCpuRequest"] == resources["resourceCpuLimit"] == "8", step
        assert resources["resourceMemoryRequest"] == "64G", step
        assert "mmsae-train" in executor(spec, task)["image"], step
        k8s = platform[label]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s["tolerations"]
        assert k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
        (shm,) = k8s["emptyDirMounts"]
        assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory" and shm["sizeLimit"] == "16Gi"


def test_secrets_are_named_never_their_values(compiled):
    name, text, spec, platform = compiled
    for value in SECRET_VALUES.values():
        assert value not in text
    assert set(platform) == set(spec["deploymentSpec"]["executors"])  # every task gets the cluster env
    for label, k8s in platform.items():
        secrets = {each["secretName"] for each in k8s["secretAsEnv"]}
        asks = label in ("exec-explain", "exec-score")
        assert secrets == ({"mmsae-s3", "mmsae-explainer"} if asks else {"mmsae-s3"}), label
        assert [each["configMapName"] for each in k8s["configMapAsEnv"]] == ["mmsae-env"], label


def test_caching_and_retries_as_designed(compiled):
    name, _, spec, _ = compiled
    outer = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    never_cached = ["open-tracking", "inputs", "plan-layers" if name == "sae_interp" else "next-layer"]
    for step in never_cached:
        assert outer[step]["cachingOptions"] == {}, step  # enableCache false is left out of the YAML
    steps = layer_dag(name, spec)
    assert steps["layer-config"]["cachingOptions"] == {}
    for step in LAYER_STEPS - {"layer-config"}:
        assert steps[step]["cachingOptions"] == {"enableCache": True}, step
        retry = steps[step].get("retryPolicy")
        if step in ("explain", "score"):
            assert retry["maxRetryCount"] == 3 and retry["backoffDuration"] == "60s", step
            assert retry["backoffFactor"] == 2.0 and retry["backoffMaxDuration"] == "900s", step
        else:
            assert retry is None, step


def test_sae_interp_fans_out_over_the_planned_layers(tmp_path, monkeypatch):
    _, spec, _ = compile_pipeline("sae_interp", tmp_path / "p.yaml", COMPILE_ENV, monkeypatch)
    loop = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]["for-loop-2"]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--plan-layers-Output"
    assert loop["iteratorPolicy"] == {"parallelismLimit": 2}
    assert set(loop["dependentTasks"]) == {"plan-layers", "inputs"}  # the loop takes no other task's parameter
    steps = layer_dag("sae_interp", spec)
    layer = steps["layer-config"]["inputs"]["parameters"]["layer"]
    assert layer["componentInputParameter"].endswith("-loop-item") and "layer" in layer["parameterExpressionSelector"]
    for step in LAYER_STEPS - {"layer-config"}:
        parent = steps[step]["inputs"]["parameters"]["parent_run_id"]
        assert "parent_run_id" in parent["parameterExpressionSelector"], step


def test_retrain_layer_runs_the_steps_only_when_a_layer_was_chosen(tmp_path, monkeypatch):
    _, spec, _ = compile_pipeline("retrain_layer", tmp_path / "r.yaml", COMPILE_ENV, monkeypatch)
    outer = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    (condition,) = [task for key, task in outer.items() if key.startswith("condition-")]
    assert condition["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--next-layer-Output'] != ''")
    layer = layer_dag("retrain_layer", spec)["layer-config"]["inputs"]["parameters"]["layer"]
    assert layer == {"componentInputParameter": "pipelinechannel--next-layer-Output"}


def test_without_compile_settings_nothing_is_mounted_but_gpu_tasks_keep_their_defaults(tmp_path, monkeypatch):
    for key in COMPILE_ENV:
        monkeypatch.delenv(key, raising=False)
    _, spec, platform = compile_pipeline("sae_interp", tmp_path / "p.yaml", {}, monkeypatch)
    assert set(platform) == {"exec-cache", "exec-train", "exec-mine", "exec-attribute", "exec-steer"}
    for k8s in platform.values():
        assert set(k8s) == {"tolerations", "emptyDirMounts"}
    train = executor(spec, layer_dag("sae_interp", spec)["train"])
    assert train["resources"]["accelerator"]["resourceCount"] == "1"


def test_the_train_step_hands_its_settings_to_a_trainjob_and_keeps_them_itself(compiled):
    name, _, spec, platform = compiled
    steps = layer_dag(name, spec)
    train = steps["train"]
    component = spec["components"][train["componentRef"]["name"]]
    passed = {each["field"]: each.get("applyToTask", False) for each in component["taskConfigPassthroughs"]}
    assert passed == {field: True for field in ("RESOURCES", "ENV", "KUBERNETES_TOLERATIONS",
                                                "KUBERNETES_NODE_SELECTOR", "KUBERNETES_AFFINITY",
                                                "KUBERNETES_VOLUMES")}
    assert component["inputDefinitions"]["parameters"]["task_config"] == {"isOptional": True,
                                                                          "parameterType": "TASK_CONFIG"}
    assert "task_config" not in train["inputs"]["parameters"]  # KFP fills it in at run time
    container = executor(spec, train)
    assert {"name": "MMSAE_TRAIN_IMAGE", "value": container["image"]} in container["env"]  # the TrainJob's image
    label = component["executorLabel"]
    assert platform[label]["tolerations"] and platform[label]["nodeSelector"]  # still the step's own too
    for step in set(steps) - {"train"}:
        assert "taskConfigPassthroughs" not in spec["components"][steps[step]["componentRef"]["name"]], step
