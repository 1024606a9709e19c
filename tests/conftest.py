"""Shared pytest fixtures."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from mmsae.services.s3 import S3Server

# ---------------------------------------------------------------------------------------------------
# S3: one SeaweedFS server per test session, a fresh bucket per test
# ---------------------------------------------------------------------------------------------------

S3_ACCESS_KEY = "mmsae-test"
S3_SECRET_KEY = "mmsae-test-secret"

# Client settings that change how mmsae.storage talks to S3; tests start from the defaults.
_S3_CLIENT_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "MMSAE_S3_MAX_ATTEMPTS",
    "MMSAE_S3_CONNECT_TIMEOUT",
    "MMSAE_S3_READ_TIMEOUT",
    "MMSAE_S3_MULTIPART_THRESHOLD",
    "MMSAE_S3_MULTIPART_CHUNKSIZE",
    "MMSAE_S3_MAX_CONCURRENCY",
)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server on 127.0.0.1 for the whole session (fails if `weed` is not installed)."""
    server = S3Server(
        tmp_path_factory.mktemp("s3server"),
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
        stop_timeout=5.0,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the AWS_* environment at the session's S3 server, create a fresh bucket; yields ``s3://bucket/base``."""
    for name in _S3_CLIENT_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    s3_server.create_bucket(bucket)
    return f"s3://{bucket}/base"


@pytest.fixture
def single_thread():
    """Tiny tensors: one thread avoids OpenMP/MKL hand-off costs, which dominate on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def run_cfg(tmp_path):
    """A run config over a workdir holding the report tests' mined features (``test_report.make_top_examples``)."""
    from test_report import make_top_examples

    from mmsae.config import RunConfig

    cfg = RunConfig()
    cfg.run.workdir = str(tmp_path / "work")
    cfg.run.name = "toy-run"
    cfg.tracking.enabled = False
    cfg.run.overwrite = True  # tests render one workdir many times, with other settings
    make_top_examples(str(tmp_path / "work" / "mine"))
    return cfg

