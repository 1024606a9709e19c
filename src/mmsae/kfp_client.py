"""mmsae's pipelines on a Kubeflow Pipelines server: compile them, upload them as pipeline versions, start
runs and recurring runs, through ``kfp.Client`` and KFP's v2beta1 REST API.

The server is the given endpoint, else ``$KF_PIPELINES_ENDPOINT``. Credentials, in order: the given token,
else ``$KF_PIPELINES_TOKEN`` (a bearer token, e.g. from ``kubectl create token``), else the projected
service-account token file at ``$KF_PIPELINES_SA_TOKEN_PATH`` (default
``/var/run/secrets/kubeflow/pipelines/token``, as multi-user KFP mounts it), re-read on every request;
else none. The namespace (multi-user KFP: the profile namespace) is the given one, else
``$KF_PIPELINES_NAMESPACE``, else none (shared pipelines, single-user KFP).

A pipeline version is named after mmsae's version and the compiled YAML's sha256 (``0.1.0-3f9c2a1b7d4e``),
so uploading an unchanged pipeline again finds the version already there and uploads nothing.
Runs receive the whole run config as the pipeline parameter ``config_yaml``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import logging
import os
import pkgutil
import re
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

ENDPOINT_ENV = "KF_PIPELINES_ENDPOINT"
TOKEN_ENV = "KF_PIPELINES_TOKEN"
NAMESPACE_ENV = "KF_PIPELINES_NAMESPACE"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
DEFAULT_SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
UI_ENDPOINT_ENV = "KF_PIPELINES_UI_ENDPOINT"
"""KFP's own variable for the UI's address, when it differs from the API's (links in the output)."""

CONFIG_PARAMETER = "config_yaml"
"""The pipeline parameter that carries the run config (YAML text)."""
RUN_NAME_PARAMETER = "run_name"
MAX_CONCURRENCY = 10
"""KFP refuses recurring runs with more concurrent runs than this."""
CRON_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_CRON_FIELD = re.compile(r"^[0-9A-Za-z*?/,\-LW#]+$")
_EVERY = re.compile(r"^@every (\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


class KfpError(RuntimeError):
    """The KFP server could not be reached, refused a request, or a pipeline, cron or setting is unusable."""


@dataclass(frozen=True)
class Connection:
    """Where the KFP API is and how to authenticate (resolved from arguments and environment)."""

    endpoint: str
    token: str | None = None
    token_path: str | None = None
    namespace: str | None = None

    @property
    def ui(self) -> str:
        return os.environ.get(UI_ENDPOINT_ENV, self.endpoint).rstrip("/")


@dataclass(frozen=True)
class PipelineVersion:
    """A pipeline version on the server; ``created`` is false when it was already there."""

    pipeline: str
    pipeline_id: str
    version: str
    version_id: str
    created: bool


def connection(endpoint: str | None = None, token: str | None = None, namespace: str | None = None) -> Connection:
    """The connection from the arguments, else the environment (see the module docstring)."""
    endpoint = endpoint or os.environ.get(ENDPOINT_ENV, "")
    if not endpoint:
        raise KfpError(f"no KFP endpoint: pass --endpoint or set ${ENDPOINT_ENV} (e.g. http://localhost:8888 "
                       "after kubectl -n kubeflow port-forward svc/ml-pipeline 8888)")
    if not re.match(r"^https?://", endpoint):
        raise KfpError(f"KFP endpoint {endpoint!r} is not an http:// or https:// URL")
    token = token or os.environ.get(TOKEN_ENV) or None
    token_path = None
    if not token:
        candidate = os.environ.get(SA_TOKEN_PATH_ENV, DEFAULT_SA_TOKEN_PATH)
        token_path = candidate if Path(candidate).is_file() else None
    return Connection(endpoint.rstrip("/"), token, token_path, namespace or os.environ.get(NAMESPACE_ENV) or None)


def connect(conn: Connection):
    """A ``kfp.Client`` for ``conn``."""
    import kfp
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    credentials = ServiceAccountTokenVolumeCredentials(conn.token_path) if conn.token_path else None
    with warnings.catch_warnings(), _kfp_calls(conn, "connect to"):
        warnings.simplefilter("ignore", FutureWarning)
        return kfp.Client(host=conn.endpoint, existing_token=conn.token, credentials=credentials,
                          namespace=conn.namespace or "kubeflow", ui_host=conn.ui)


@contextlib.contextmanager
def _kfp_calls(conn: Connection, action: str) -> Iterator[None]:
    """KFP client calls: their printed links go to the debug log, their errors become :class:`KfpError`."""
    from kfp_server_api.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    except ApiException as err:
        raise KfpError(f"KFP API at {conn.endpoint} refused to {action}: {err.status} {err.reason}: "
                       f"{_api_message(err.body)}") from err
    except (HTTPError, OSError) as err:
        raise KfpError(f"cannot reach the KFP API at {conn.endpoint} to {action}: {err}") from err
    finally:
        if printed.getvalue().strip():
            log.debug("kfp: %s", printed.getvalue().strip())


def _api_message(body: Any) -> str:
    try:
        data = json.loads(body)
    except (TypeError, ValueError):
        return str(body or "").strip()[:500]
    return str(data.get("message") or data.get("error") or data)[:500] if isinstance(data, dict) else str(data)


# ----------------------------------------------------------------------------------------------------------
# the pipelines of this package


def pipeline_names() -> list[str]:
    """Names of mmsae's pipelines: modules of ``mmsae.pipelines`` that define a pipeline of their own name."""
    from mmsae import pipelines

    return [info.name for info in pkgutil.iter_modules(pipelines.__path__)
            if not info.name.startswith("_") and _pipeline_function(info.name) is not None]


def _pipeline_function(name: str):
    from kfp.dsl.graph_component import GraphComponent

    try:
        module = importlib.import_module(f"mmsae.pipelines.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"mmsae.pipelines.{name}":
            return None
        raise
    function = getattr(module, name, None)
    return function if isinstance(function, GraphComponent) else None


def compile_pipeline(name: str, out_dir: Path) -> Path:
    """Compile pipeline ``name`` to ``out_dir/<name>.yaml`` (KFP IR YAML) and return the path."""
    from kfp import compiler

    function = _pipeline_function(name) if re.match(r"^[a-z_][a-z0-9_]*$", name) else None
    if function is None:
        raise KfpError(f"no pipeline named {name!r}; mmsae's pipelines: {', '.join(pipeline_names())}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.yaml"
    compiler.Compiler().compile(function, str(path))
    return path


def pipeline_spec(package: Path) -> dict[str, Any]:
    """The pipeline spec (first YAML document) of a compiled package."""
    return next(yaml.safe_load_all(package.read_text()))


def pipeline_display_name(package: Path) -> str:
    return pipeline_spec(package)["pipelineInfo"]["name"]


def pipeline_parameters(package: Path) -> set[str]:
    """Names of the parameters a compiled pipeline takes."""
    spec = pipeline_spec(package)
    return set(spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {}))


def version_name(package: Path) -> str:
    """``<mmsae version>-<first 12 hex digits of the package's sha256>``."""
    try:
        own = version("mmsae")
    except PackageNotFoundError:  # pragma: no cover - the package runs installed
        own = "0"
    return f"{own}-{hashlib.sha256(package.read_bytes()).hexdigest()[:12]}"


def _run_parameters(package: Path, config_yaml: str, run_name: str = "") -> dict[str, str]:
    declared = pipeline_parameters(package)
    if CONFIG_PARAMETER not in declared:
        raise KfpError(f"pipeline {pipeline_display_name(package)} takes no {CONFIG_PARAMETER} parameter "
                       f"(it takes: {', '.join(sorted(declared)) or 'none'})")
    params = {CONFIG_PARAMETER: config_yaml}
    if run_name and RUN_NAME_PARAMETER in declared:
        params[RUN_NAME_PARAMETER] = run_name
    return params


# ----------------------------------------------------------------------------------------------------------
# server operations


def _equals(key: str, value: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": key, "stringValue": value}]})


def upload(client, conn: Connection, package: Path, description: str = "") -> PipelineVersion:
    """Upload ``package`` as a version of its pipeline (the pipeline is created when missing); a version of
    the same name (same content) already there is returned as it is."""
    name = pipeline_display_name(package)
    wanted = version_name(package)
    with _kfp_calls(conn, f"look up pipeline {name}"):
        found = client.list_pipelines(filter=_equals("display_name", name), namespace=conn.namespace).pipelines
    if found:
        pipeline_id = found[0].pipeline_id
        with _kfp_calls(conn, f"list the versions of pipeline {name}"):
            versions = client.list_pipeline_versions(pipeline_id, filter=_equals("display_name", wanted))
        existing = [v for v in (versions.pipeline_versions or []) if v.display_name == wanted]
        if existing:
            log.info("pipeline %s version %s is already on the server", name, wanted)
            return PipelineVersion(name, pipeline_id, wanted, existing[0].pipeline_version_id, False)
        with _kfp_calls(conn, f"upload version {wanted} of pipeline {name}"):
            made = client.upload_pipeline_version(str(package), wanted, pipeline_id=pipeline_id,
                                                  description=description or None)
        log.info("uploaded pipeline %s version %s", name, wanted)
        return PipelineVersion(name, pipeline_id, wanted, made.pipeline_version_id, True)
    # A new pipeline comes with a first version named after the pipeline: it is replaced by one named as
    # above, so that the next upload of the same content finds it.
    with _kfp_calls(conn, f"upload pipeline {name}"):
        pipeline_id = client.upload_pipeline(str(package), pipeline_name=name, description=description or None,
                                             namespace=conn.namespace).pipeline_id
        unnamed = client.list_pipeline_versions(pipeline_id).pipeline_versions or []
        made = client.upload_pipeline_version(str(package), wanted, pipeline_id=pipeline_id,
                                              description=description or None)
        for version in unnamed:
            client.delete_pipeline_version(pipeline_id, version.pipeline_version_id)
    log.info("uploaded the new pipeline %s (%s) version %s", name, pipeline_id, wanted)
    return PipelineVersion(name, pipeline_id, wanted, made.pipeline_version_id, True)


def _experiment_id(client, conn: Connection, experiment: str) -> str:
    with _kfp_calls(conn, f"find or create experiment {experiment}"):
        return client.create_experiment(name=experiment, namespace=conn.namespace).experiment_id


def submit(client, conn: Connection, package: Path, config_yaml: str, *, experiment: str,
           run_name: str) -> dict[str, Any]:
    """Upload ``package`` (unless that version is there) and start one run of it with ``config_yaml``."""
    uploaded = upload(client, conn, package)
    params = _run_parameters(package, config_yaml, run_name)
    experiment_id = _experiment_id(client, conn, experiment)
    with _kfp_calls(conn, f"start a run of {uploaded.pipeline}"):
        run = client.run_pipeline(experiment_id, run_name, params=params, pipeline_id=uploaded.pipeline_id,
                                  version_id=uploaded.version_id)
    log.info("started run %s (%s) of %s version %s", run_name, run.run_id, uploaded.pipeline, uploaded.version)
    return {"run_id": run.run_id, "run_name": run_name, "experiment_id": experiment_id,
            "url": f"{conn.ui}/#/runs/details/{run.run_id}", **asdict(uploaded)}


def check_cron(expression: str) -> str:
    """``expression`` when it is a cron schedule KFP takes: six fields, seconds first
    (``0 0 3 * * *``: 03:00 every day), or ``@daily``-style descriptors and ``@every 6h``."""
    text = " ".join(expression.split())
    if text.startswith("@"):
        if text in CRON_DESCRIPTORS or _EVERY.match(text):
            return text
        raise KfpError(f"cron {expression!r}: unknown descriptor; use one of {', '.join(CRON_DESCRIPTORS)} "
                       "or '@every <duration>' (e.g. '@every 24h')")
    fields = text.split(" ")
    if len(fields) == 5:
        raise KfpError(f"cron {expression!r} has 5 fields; KFP's cron has 6, seconds first: '0 {text}'")
    if len(fields) != 6 or not all(_CRON_FIELD.match(field) for field in fields):
        raise KfpError(f"cron {expression!r} is not KFP's cron format: 6 fields, seconds minutes hours "
                       "day-of-month month day-of-week, e.g. '0 0 3 * * *' (03:00 every day)")
    return text


def schedule(client, conn: Connection, package: Path, config_yaml: str, *, experiment: str, name: str,
             cron: str, max_concurrency: int = 1, catch_up: bool = False) -> dict[str, Any]:
    """Upload ``package`` (unless that version is there) and create an enabled recurring run of it: a run
    with ``config_yaml`` at every time of ``cron``, at most ``max_concurrency`` at once; missed times are
    run afterwards only with ``catch_up``."""
    cron = check_cron(cron)
    if not 1 <= max_concurrency <= MAX_CONCURRENCY:
        raise KfpError(f"max concurrency {max_concurrency}: KFP takes 1 to {MAX_CONCURRENCY} concurrent runs")
    uploaded = upload(client, conn, package)
    params = _run_parameters(package, config_yaml)
    experiment_id = _experiment_id(client, conn, experiment)
    with _kfp_calls(conn, f"create recurring run {name}"):
        made = client.create_recurring_run(
            experiment_id, name, description=f"mmsae {uploaded.pipeline} on cron '{cron}'",
            cron_expression=cron, max_concurrency=max_concurrency, no_catchup=not catch_up, params=params,
            pipeline_id=uploaded.pipeline_id, version_id=uploaded.version_id, enabled=True)
    log.info("recurring run %s (%s): %s on cron '%s'", name, made.recurring_run_id, uploaded.pipeline, cron)
    return {"recurring_run_id": made.recurring_run_id, "name": name, "cron": cron,
            "max_concurrency": max_concurrency, "catch_up": catch_up, "experiment_id": experiment_id,
            "url": f"{conn.ui}/#/recurringrun/details/{made.recurring_run_id}", **asdict(uploaded)}


@contextlib.contextmanager
def compiled(name: str) -> Iterator[Path]:
    """Pipeline ``name`` compiled into a temporary folder: yields the package's path."""
    with tempfile.TemporaryDirectory(prefix="mmsae-pipeline-") as folder:
        yield compile_pipeline(name, Path(folder))


def upload_all(client, conn: Connection, names: list[str]) -> list[dict[str, Any]]:
    """Compile and upload each pipeline of ``names`` (see :func:`upload`)."""
    uploaded = []
    for name in names:
        with compiled(name) as package:
            uploaded.append(asdict(upload(client, conn, package)))
    return uploaded
