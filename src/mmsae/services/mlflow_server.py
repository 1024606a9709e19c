"""A local MLflow tracking server on loopback, for the local services mode and the tests.

Runs ``mlflow server`` with a sqlite backend ``<root>/mlflow.db`` and proxied artifacts in
``<root>/mlartifacts`` (or an ``s3://`` destination, given the S3 endpoint and credentials in ``env``).
Writes the database, the artifacts and the server's log ``<root>/mlflow-server.log``. One worker and no
job runner, so it answers ``/health`` within about 8 s on a small machine.

    with MlflowServer("runs/mlflow") as server:
        start_pipeline_run("demo", uri=server.uri)
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from mmsae.services.process import LOG_TAIL_CHARS, log_tail, stop_group, wait_healthy

logger = logging.getLogger(__name__)

LOG_NAME = "mlflow-server.log"
DB_NAME = "mlflow.db"
_LOG_TAIL_CHARS = 3000


class MlflowServerError(RuntimeError):
    """The MLflow server did not start, or died; the message carries the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class MlflowServer:
    """``mlflow server`` as a child process group; a context manager that starts and stops it."""

    def __init__(
        self,
        root: str | Path,
        artifacts_destination: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 90.0,
    ) -> None:
        """``root`` holds the database and log; ``artifacts_destination`` defaults to ``<root>/mlartifacts``.

        ``env`` is added to the server's environment (e.g. ``MLFLOW_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
        ``AWS_SECRET_ACCESS_KEY`` for an ``s3://`` destination).
        """
        self.root = Path(root).resolve()
        self.artifacts_destination = artifacts_destination or str(self.root / "mlartifacts")
        self.host = host
        self.port = port
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.log_path = self.root / LOG_NAME
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        """Tracking URI of the server, e.g. ``http://127.0.0.1:5072``."""
        if self.port is None:
            raise MlflowServerError("the MLflow server has no port yet; call start() first")
        return f"http://{self.host}:{self.port}"

    @property
    def backend_store_uri(self) -> str:
        return f"sqlite:///{self.root / DB_NAME}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        """The command line that starts the server."""
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_store_uri,
            "--artifacts-destination",
            self.artifacts_destination,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def start(self) -> MlflowServer:
        """Start the server and wait until ``/health`` answers; raises :class:`MlflowServerError` otherwise."""
        if self.running:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.artifacts_destination.startswith(("s3://", "gs://", "wasbs://", "abfss://")):
            Path(self.artifacts_destination).mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port(self.host)
        env = {
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            **self.env,
        }
        # A client URI inherited from the caller must not steer the server itself.
        env.pop("MLFLOW_TRACKING_URI", None)
        logger.info("starting MLflow server on %s (store %s)", self.uri, self.root)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.root,
                start_new_session=True,
            )
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        logger.info("MLflow server ready at %s", self.uri)
        return self

    def _wait_healthy(self) -> None:
        assert self._proc is not None
        wait_healthy(self._proc, f"{self.uri}/health", self.startup_timeout, "MLflow server", self.log_path,
                     MlflowServerError, poll=0.25)

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The end of the server's log."""
        return log_tail(self.log_path, chars)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and its worker processes (SIGTERM to its process group, then SIGKILL)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop_group(proc, timeout, "MLflow server", grace=5.0)
        logger.info("MLflow server on port %s stopped", self.port)

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        port = self.port if self.port is not None else "?"
        return f"MlflowServer({self.host}:{port}, root={str(self.root)!r}, {state})"
