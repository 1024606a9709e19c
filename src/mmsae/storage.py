"""URI I/O for local paths and ``s3://bucket/key`` objects, atomic writes, artifact manifests, sha256 checks.

Every stage reads its inputs and writes its outputs through this module, so a stage never cares whether its
working directory is a local folder or an S3 prefix.

Reads: local files, and S3 objects through boto3. The S3 endpoint and credentials come from the standard
environment variables: ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``, then ``MLFLOW_S3_ENDPOINT_URL``
(set by MLflow/Kubeflow deployments) for the endpoint; ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN`` (or any other source boto3 knows, e.g. a web identity token) for the credentials;
``AWS_DEFAULT_REGION`` / ``AWS_REGION`` for the region. Requests use path-style addressing and SigV4, with
bounded retries and short connect timeouts (``MMSAE_S3_MAX_ATTEMPTS``, ``MMSAE_S3_CONNECT_TIMEOUT``,
``MMSAE_S3_READ_TIMEOUT``), so an unreachable endpoint fails in seconds with a :class:`StorageError` that
names it.

Writes are atomic: no half-written file or object is ever visible under its final name. Local files are
written to a hidden temporary file in the same directory, fsynced, given the mode a plain ``open()`` would
give them (0o666 less the umask) and renamed over the final name; S3 objects are uploaded with one PUT or
a multipart upload (threshold ``MMSAE_S3_MULTIPART_THRESHOLD`` bytes, or the ``multipart_threshold``
argument), which S3 only shows once it is complete.

Inputs rewritten in place: :func:`fingerprint` is a cheap content fingerprint of a folder, file, prefix or
object (an artifact's manifest, else names, sizes and mtimes / ETags); :func:`download_cached` keeps one
local copy of a remote input per :func:`cache_dir` (``$MMSAE_CACHE_DIR``, keyed by URI and fingerprint).

Artifacts: every artifact directory holds a ``manifest.json`` (:class:`Manifest`) written last, so its
presence marks a complete artifact. It records the artifact's kind, format version, config, inputs and a
sha256 per data file; :func:`read_manifest` and :func:`verify_file` refuse missing manifests, wrong kinds
and corrupted files with errors naming the directory or file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, BinaryIO

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_NAME",
    "ChecksumError",
    "FileEntry",
    "Manifest",
    "ManifestError",
    "S3Options",
    "StorageError",
    "StorageNotFoundError",
    "StorageURIError",
    "DOWNLOAD_COMPLETE",
    "atomic_writer",
    "cache_dir",
    "cache_root",
    "delete",
    "download_dir",
    "download_cached",
    "download_file",
    "exists",
    "fingerprint",
    "is_s3",
    "join",
    "list_files",
    "local_copy",
    "local_output",
    "read_bytes",
    "read_json",
    "read_manifest",
    "read_text",
    "read_verified_bytes",
    "s3_client",
    "s3_options",
    "sha256_file",
    "upload_dir",
    "upload_file",
    "verify_artifact",
    "verify_file",
    "write_bytes",
    "write_json",
    "write_manifest",
    "write_stream",
    "write_text",
]

MANIFEST_NAME = "manifest.json"
"""File name of the manifest inside every artifact directory."""

_TMP_PREFIX = ".mmsae-tmp-"
_CHUNK = 1024 * 1024
_MIB = 1024 * 1024

URI = str | os.PathLike[str]


# --------------------------------------------------------------------------------------------- errors


class StorageError(RuntimeError):
    """An object store or file system operation failed; the message names the URI and, for S3, the endpoint."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The file or object does not exist; the message names the URI."""


class StorageURIError(ValueError):
    """A URI that cannot be parsed (e.g. ``s3://`` without a bucket)."""


class ManifestError(ValueError):
    """An artifact directory whose manifest is missing, unreadable, of the wrong kind or does not list a file."""


class ChecksumError(ManifestError):
    """A file whose sha256 or size differs from the one its manifest records; the message names the file."""


# ------------------------------------------------------------------------------------------- settings


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise StorageError(f"environment variable {name}={raw!r} is not a number") from None
    if value <= 0:
        raise StorageError(f"environment variable {name}={raw!r} must be positive")
    return value


@dataclass(frozen=True)
class S3Options:
    """Client behaviour for S3: endpoint, region, retries, timeouts and multipart settings."""

    endpoint_url: str | None
    region: str
    max_attempts: int = 3
    connect_timeout: float = 3.0
    read_timeout: float = 60.0
    multipart_threshold: int = 64 * _MIB
    multipart_chunksize: int = 16 * _MIB
    max_concurrency: int = 4


def s3_options() -> S3Options:
    """The S3 options the environment asks for right now (read on every call, so tests can change them)."""
    endpoint = (
        os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
        or None
    )
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    return S3Options(
        endpoint_url=endpoint,
        region=region,
        max_attempts=int(_env_number("MMSAE_S3_MAX_ATTEMPTS", 3)),
        connect_timeout=_env_number("MMSAE_S3_CONNECT_TIMEOUT", 3.0),
        read_timeout=_env_number("MMSAE_S3_READ_TIMEOUT", 60.0),
        multipart_threshold=int(_env_number("MMSAE_S3_MULTIPART_THRESHOLD", 64 * _MIB)),
        multipart_chunksize=int(_env_number("MMSAE_S3_MULTIPART_CHUNKSIZE", 16 * _MIB)),
        max_concurrency=int(_env_number("MMSAE_S3_MAX_CONCURRENCY", 4)),
    )


_CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)
_client_lock = threading.Lock()


@lru_cache(maxsize=8)
def _make_client(options: S3Options, env_key: tuple[str | None, ...]) -> Any:
    del env_key  # part of the cache key only: a change of credentials in the environment gives a new client
    session = boto3.session.Session(region_name=options.region)
    config = BotoConfig(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        retries={"mode": "standard", "total_max_attempts": options.max_attempts},
        connect_timeout=options.connect_timeout,
        read_timeout=options.read_timeout,
        max_pool_connections=max(10, options.max_concurrency * 2),
    )
    return session.client("s3", endpoint_url=options.endpoint_url, config=config)


def s3_client() -> Any:
    """A boto3 S3 client configured from the environment (cached per endpoint and credentials)."""
    options = s3_options()
    env_key = tuple(os.environ.get(name) for name in _CREDENTIAL_ENV)
    with _client_lock:
        return _make_client(options, env_key)


def _transfer_config(options: S3Options, multipart_threshold: int | None = None) -> TransferConfig:
    threshold = options.multipart_threshold if multipart_threshold is None else int(multipart_threshold)
    return TransferConfig(
        multipart_threshold=threshold,
        multipart_chunksize=options.multipart_chunksize,
        max_concurrency=options.max_concurrency,
        num_download_attempts=options.max_attempts,
    )


# ----------------------------------------------------------------------------------------------- URIs


def is_s3(uri: URI) -> bool:
    """True for ``s3://`` URIs, False for local paths (``file://`` URIs included)."""
    return isinstance(uri, str) and uri.startswith("s3://")


def _split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageURIError(f"S3 URI {uri!r} has no bucket; expected s3://bucket/key")
    return bucket, key


def _s3_object(uri: str) -> tuple[str, str]:
    bucket, key = _split_s3(uri)
    if not key or key.endswith("/"):
        raise StorageURIError(f"S3 URI {uri!r} names no object; expected s3://bucket/key with a key")
    return bucket, key


def _local(uri: URI) -> Path:
    text = os.fspath(uri)
    if text.startswith("file://"):
        text = text[len("file://") :]
    return Path(text).expanduser()


def remove_stale_temps(dir_uri: URI, of: str = "") -> int:
    """Delete the temp files that a writer killed mid-write left under a local directory; returns how many.

    Only a crash leaves them, and they are never visible under a final name; S3 needs nothing (an
    object appears only when its upload completes). ``of`` limits it to temps of files whose names start
    with it (one writer's own files); call it only when no other writer of those files is active.
    """
    if is_s3(dir_uri):
        return 0
    root = _local(dir_uri)
    if not root.is_dir():
        return 0
    stale = [p for p in root.rglob(f"{_TMP_PREFIX}{of}*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def join(uri: URI, *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI (always with ``/`` for S3)."""
    if is_s3(uri):
        out = str(uri).rstrip("/")
        for part in parts:
            part = str(part).strip("/")
            if part:
                out = f"{out}/{part}"
        return out
    return str(_local(uri).joinpath(*[str(p) for p in parts]))


def _describe_endpoint(client: Any) -> str:
    return str(client.meta.endpoint_url)


_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_DENIED_CODES = {
    "403",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
}


@contextlib.contextmanager
def _s3_errors(client: Any, uri: str, action: str) -> Iterator[None]:
    """Turn botocore errors into StorageError / StorageNotFoundError naming the URI and endpoint."""
    endpoint = _describe_endpoint(client)
    try:
        yield
    except ClientError as err:
        error = err.response.get("Error", {})
        code = str(error.get("Code", "?"))
        message = error.get("Message", "")
        bucket = _split_s3(uri)[0]
        if code == "NoSuchBucket":
            raise StorageNotFoundError(
                f"{uri} does not exist: bucket {bucket!r} does not exist at S3 endpoint {endpoint}"
            ) from err
        if code in _NOT_FOUND_CODES:
            raise StorageNotFoundError(f"{uri} does not exist (S3 endpoint {endpoint})") from err
        if code in _DENIED_CODES:
            raise StorageError(
                f"S3 endpoint {endpoint} rejected the credentials for bucket {bucket!r} while trying to "
                f"{action} {uri} ({code}: {message or 'access denied'}); check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY"
            ) from err
        raise StorageError(f"could not {action} {uri} at S3 endpoint {endpoint}: {code}: {message}") from err
    except (NoCredentialsError, PartialCredentialsError) as err:
        raise StorageError(
            f"no usable S3 credentials to {action} {uri} (endpoint {endpoint}): {err}; set AWS_ACCESS_KEY_ID "
            "and AWS_SECRET_ACCESS_KEY"
        ) from err
    except (BotoConnectionError, HTTPClientError) as err:
        attempts = client.meta.config.retries.get("total_max_attempts", "?")
        raise StorageError(
            f"could not reach S3 endpoint {endpoint} after {attempts} attempts (while trying to {action} "
            f"{uri}): {err}"
        ) from err
    except BotoCoreError as err:
        raise StorageError(f"could not {action} {uri} at S3 endpoint {endpoint}: {err}") from err


# ------------------------------------------------------------------------------------- local helpers


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_umask() -> int | None:
    """The process umask from /proc (Linux), or None where it cannot be read that way."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _startup_umask() -> int:
    umask = _read_umask()
    if umask is None:  # swapping the umask is not thread-safe: done once, at import
        umask = os.umask(0o022)
        os.umask(umask)
    return umask


_STARTUP_UMASK = _startup_umask()


def _new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the umask (mkstemp alone gives 0o600)."""
    umask = _read_umask()
    return 0o666 & ~(_STARTUP_UMASK if umask is None else umask)


@contextlib.contextmanager
def _local_temp_path(final: Path) -> Iterator[Path]:
    """A hidden temporary path next to ``final`` that replaces it on success and is removed on failure.

    The published file has the mode a plain ``open()`` would give it (0o666 less the umask), so other
    users of a shared volume can read it as they could any other file written there.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{final.name}.", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _local_not_found(path: Path, uri: URI) -> StorageNotFoundError:
    return StorageNotFoundError(f"{os.fspath(uri)} does not exist (local path {path})")


# -------------------------------------------------------------------------------------- reads/writes


def read_bytes(uri: URI) -> bytes:
    """The whole content of a file or object."""
    if is_s3(uri):
        uri = str(uri)
        bucket, key = _s3_object(uri)
        client = s3_client()
        with _s3_errors(client, uri, "read"):
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    path = _local(uri)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _local_not_found(path, uri) from None
    except IsADirectoryError:
        raise StorageError(f"{os.fspath(uri)} is a directory, expected a file") from None


def write_stream(uri: URI, stream: BinaryIO | IO[bytes], *, multipart_threshold: int | None = None) -> None:
    """Copy a readable binary stream to a file or object atomically.

    On S3 a stream longer than the multipart threshold goes up as a multipart upload, which is aborted
    (nothing visible) if reading the stream fails.
    """
    if is_s3(uri):
        uri = str(uri)
        bucket, key = _s3_object(uri)
        options = s3_options()
        client = s3_client()
        with _s3_errors(client, uri, "write"):
            client.upload_fileobj(stream, bucket, key, Config=_transfer_config(options, multipart_threshold))
        logger.debug("wrote %s", uri)
        return
    path = _local(uri)
    with _local_temp_path(path) as tmp, open(tmp, "wb") as out:
        shutil.copyfileobj(stream, out, _CHUNK)
    logger.debug("wrote %s", path)


def write_bytes(
    uri: URI, data: bytes | bytearray | memoryview, *, multipart_threshold: int | None = None
) -> None:
    """Write ``data`` to a file or object atomically (parent directories are created)."""
    if is_s3(uri):
        write_stream(uri, io.BytesIO(bytes(data)), multipart_threshold=multipart_threshold)
        return
    path = _local(uri)
    with _local_temp_path(path) as tmp:
        tmp.write_bytes(data)
    logger.debug("wrote %s (%d bytes)", path, len(data))


def read_text(uri: URI, encoding: str = "utf-8") -> str:
    """The content of a text file or object."""
    return read_bytes(uri).decode(encoding)


def write_text(uri: URI, text: str, encoding: str = "utf-8") -> None:
    """Write text atomically."""
    write_bytes(uri, text.encode(encoding))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "dtype") and hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    raise TypeError(f"cannot write an object of type {type(obj).__name__} as JSON")


def read_json(uri: URI) -> Any:
    """Parse a JSON file or object; a syntax error names the URI."""
    raw = read_bytes(uri)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise StorageError(f"{os.fspath(uri)} is not valid JSON: {err}") from err


def write_json(uri: URI, obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as UTF-8 JSON atomically (paths, pydantic models and numpy values are converted)."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default)
    write_text(uri, text + "\n")


@contextlib.contextmanager
def atomic_writer(uri: URI, *, multipart_threshold: int | None = None) -> Iterator[BinaryIO]:
    """Open a binary file for writing whose content appears under ``uri`` only if the block succeeds.

    If the block raises, the final name keeps its old content (or stays absent).
    """
    if is_s3(uri):
        with tempfile.TemporaryFile() as spool:
            yield spool  # type: ignore[misc]
            spool.flush()
            spool.seek(0)
            write_stream(uri, spool, multipart_threshold=multipart_threshold)
        return
    path = _local(uri)
    with _local_temp_path(path) as tmp, open(tmp, "wb") as fh:
        yield fh


@contextlib.contextmanager
def local_output(uri: URI, *, multipart_threshold: int | None = None) -> Iterator[Path]:
    """A local path to write a file to (e.g. with a library that only takes paths), published on success.

    For a local ``uri`` the path is a hidden temporary file beside it that is renamed over it; for S3 it is
    a temporary file that is uploaded. If the block raises, nothing is published.
    """
    if is_s3(uri):
        with tempfile.TemporaryDirectory(prefix="mmsae-out-") as tmpdir:
            tmp = Path(tmpdir) / Path(_s3_object(str(uri))[1]).name
            yield tmp
            if not tmp.exists():
                raise StorageError(f"nothing was written to {tmp} for {uri}")
            upload_file(tmp, uri, multipart_threshold=multipart_threshold)
        return
    with _local_temp_path(_local(uri)) as tmp:
        yield tmp


# ------------------------------------------------------------------------------- exists/list/delete


def exists(uri: URI) -> bool:
    """True if a file, a directory, an object or a non-empty S3 prefix exists at ``uri``."""
    if not is_s3(uri):
        return _local(uri).exists()
    uri = str(uri)
    bucket, key = _split_s3(uri)
    client = s3_client()
    if not key:
        try:
            with _s3_errors(client, uri, "check"):
                client.head_bucket(Bucket=bucket)
            return True
        except StorageNotFoundError:
            return False
    if not key.endswith("/"):
        try:
            with _s3_errors(client, uri, "check"):
                client.head_object(Bucket=bucket, Key=key)
            return True
        except StorageNotFoundError:
            pass
    prefix = key.rstrip("/") + "/"
    try:
        with _s3_errors(client, uri, "list"):
            resp = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except StorageNotFoundError:
        return False
    return resp.get("KeyCount", 0) > 0


def _s3_keys(client: Any, uri: str, bucket: str, prefix: str, recursive: bool) -> Iterator[dict[str, Any]]:
    paginator = client.get_paginator("list_objects_v2")
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    if not recursive:
        kwargs["Delimiter"] = "/"
    with _s3_errors(client, uri, "list"):
        for page in paginator.paginate(**kwargs):
            yield from page.get("Contents", [])


def list_files(prefix_uri: URI, recursive: bool = True) -> list[str]:
    """Sorted paths (``/``-separated, relative to ``prefix_uri``) of the files under a directory or prefix.

    A directory or prefix that does not exist has no files (an empty list). Temporary files of writes in
    progress are not listed.
    """
    if is_s3(prefix_uri):
        uri = str(prefix_uri)
        bucket, key = _split_s3(uri)
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        client = s3_client()
        out = []
        try:
            for obj in _s3_keys(client, uri, bucket, prefix, recursive):
                rel = obj["Key"][len(prefix) :]
                if rel and not rel.endswith("/"):
                    out.append(rel)
        except StorageNotFoundError:
            return []
        return sorted(out)
    root = _local(prefix_uri)
    if not root.is_dir():
        return []
    candidates = root.rglob("*") if recursive else root.iterdir()
    return sorted(
        p.relative_to(root).as_posix()
        for p in candidates
        if p.is_file() and not p.name.startswith(_TMP_PREFIX)
    )


def delete(uri: URI) -> None:
    """Delete a file or object, or a directory / prefix with everything under it. Missing is not an error."""
    if not is_s3(uri):
        path = _local(uri)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        logger.debug("deleted %s", path)
        return
    uri = str(uri)
    bucket, key = _split_s3(uri)
    client = s3_client()
    keys: list[str] = []
    if key and not key.endswith("/"):
        keys.append(key)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    try:
        keys.extend(obj["Key"] for obj in _s3_keys(client, uri, bucket, prefix, recursive=True))
    except StorageNotFoundError:
        return
    with _s3_errors(client, uri, "delete"):
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            resp = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            errors = resp.get("Errors", [])
            if errors:
                first = errors[0]
                raise StorageError(
                    f"could not delete {len(errors)} object(s) under {uri}, e.g. s3://{bucket}/{first.get('Key')}: "
                    f"{first.get('Code')}: {first.get('Message')}"
                )
    logger.debug("deleted %s (%d objects)", uri, len(keys))


# ------------------------------------------------------------------------------------ file transfers


def upload_file(local_path: URI, uri: URI, *, multipart_threshold: int | None = None) -> None:
    """Copy a local file to ``uri`` (S3 object or local path) atomically."""
    src = _local(local_path)
    if not src.is_file():
        raise StorageNotFoundError(f"cannot upload {src}: no such file")
    if is_s3(uri):
        with open(src, "rb") as fh:
            write_stream(uri, fh, multipart_threshold=multipart_threshold)
        return
    dst = _local(uri)
    with _local_temp_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def download_file(uri: URI, local_path: URI) -> Path:
    """Copy a file or object to a local path atomically; returns the local path."""
    dst = _local(local_path)
    if not is_s3(uri):
        src = _local(uri)
        if not src.is_file():
            raise _local_not_found(src, uri)
        with _local_temp_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        return dst
    uri = str(uri)
    bucket, key = _s3_object(uri)
    options = s3_options()
    client = s3_client()
    with _local_temp_path(dst) as tmp, open(tmp, "wb") as fh, _s3_errors(client, uri, "download"):
        client.download_fileobj(bucket, key, fh, Config=_transfer_config(options))
    logger.debug("downloaded %s -> %s", uri, dst)
    return dst


def _manifest_last(names: Iterable[str]) -> list[str]:
    names = sorted(names)
    return [n for n in names if n != MANIFEST_NAME] + [n for n in names if n == MANIFEST_NAME]


def upload_dir(local_dir: URI, uri: URI, *, multipart_threshold: int | None = None) -> list[str]:
    """Copy every file under a local directory to ``uri``; ``manifest.json`` goes last. Returns the names."""
    src = _local(local_dir)
    if not src.is_dir():
        raise StorageNotFoundError(f"cannot upload {src}: no such directory")
    names = _manifest_last(list_files(src))
    for name in tqdm(names, desc=f"upload {src.name}", unit="file", disable=len(names) < 20, leave=False):
        upload_file(src / name, join(uri, name), multipart_threshold=multipart_threshold)
    logger.info("uploaded %d files from %s to %s", len(names), src, os.fspath(uri))
    return names


def download_dir(uri: URI, local_dir: URI) -> list[str]:
    """Copy every file under a directory or prefix into ``local_dir``; ``manifest.json`` goes last.

    Returns the relative names. Raises StorageNotFoundError if there is nothing under ``uri``.
    """
    names = _manifest_last(list_files(uri))
    if not names:
        raise StorageNotFoundError(f"{os.fspath(uri)} does not exist or holds no files")
    dst = _local(local_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for name in tqdm(
        names, desc=f"download {Path(str(uri)).name}", unit="file", disable=len(names) < 20, leave=False
    ):
        download_file(join(uri, name), dst / name)
    logger.info("downloaded %d files from %s to %s", len(names), os.fspath(uri), dst)
    return names


@contextlib.contextmanager
def local_copy(uri: URI) -> Iterator[Path]:
    """A local path holding the file or directory at ``uri``.

    For a local URI this is the path itself (nothing is copied, so do not modify it); for S3 it is a
    temporary download (a single object, or every object under the prefix) removed on exit.
    """
    if not is_s3(uri):
        path = _local(uri)
        if not path.exists():
            raise _local_not_found(path, uri)
        yield path
        return
    uri = str(uri)
    bucket, key = _split_s3(uri)
    name = Path(key.rstrip("/")).name or bucket
    with tempfile.TemporaryDirectory(prefix="mmsae-copy-") as tmpdir:
        target = Path(tmpdir) / name
        if _s3_object_exists(s3_client(), uri, bucket, key) is not None:
            download_file(uri, target)
        else:
            download_dir(uri, target)
        yield target


# ------------------------------------------------------------------------------ fingerprints and caches


def _manifest_bytes(raw: bytes) -> bytes | None:
    """``raw`` if it is a manifest mmsae wrote (a valid :class:`Manifest`), else None."""
    try:
        Manifest.model_validate_json(raw)
    except ValidationError:
        return None
    return raw


def _s3_object_exists(client: Any, uri: str, bucket: str, key: str) -> dict[str, Any] | None:
    """The HEAD response of the object ``key``, or None if there is none (a prefix, or nothing)."""
    if not key or key.endswith("/"):
        return None
    try:
        with _s3_errors(client, uri, "check"):
            return client.head_object(Bucket=bucket, Key=key)
    except StorageNotFoundError:
        return None


def fingerprint(uri: URI) -> str:
    """A cheap content fingerprint (hex sha256) of the file, folder, object or prefix at ``uri``.

    It changes when anything under ``uri`` is rewritten, added or removed, without reading the data:
    - a folder or prefix holding a ``manifest.json`` written by mmsae: that manifest's bytes (an artifact is
      rewritten with a new manifest, written last, whose creation time alone differs);
    - otherwise, a local file or folder: the sorted (relative path, size, mtime_ns) of every file under it
      (temporary files of writes in progress left out);
    - an S3 prefix or object: the sorted (key, size, ETag) of every object under it.

    Raises StorageNotFoundError naming ``uri`` when nothing is there.
    """
    digest = hashlib.sha256()
    if not is_s3(uri):
        root = _local(uri)
        if root.is_file():
            st = root.stat()
            digest.update(json.dumps(["file", root.name, st.st_size, st.st_mtime_ns]).encode())
            return digest.hexdigest()
        if not root.is_dir():
            raise _local_not_found(root, uri)
        manifest = root / MANIFEST_NAME
        if manifest.is_file() and (raw := _manifest_bytes(manifest.read_bytes())) is not None:
            digest.update(b"manifest\0" + raw)
            return digest.hexdigest()
        entries = []
        for dirpath, _dirs, names in os.walk(root):
            for name in names:
                if name.startswith(_TMP_PREFIX):
                    continue
                p = Path(dirpath) / name
                try:
                    st = p.stat()
                except FileNotFoundError:  # removed while we walked
                    continue
                entries.append([p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
        entries.sort()
        digest.update(json.dumps(["dir", entries]).encode())
        return digest.hexdigest()
    uri = str(uri)
    bucket, key = _split_s3(uri)
    client = s3_client()
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    try:
        raw = read_bytes(join(uri, MANIFEST_NAME)) if prefix else None
    except StorageNotFoundError:
        raw = None
    if raw is not None and _manifest_bytes(raw) is not None:
        digest.update(b"manifest\0" + raw)
        return digest.hexdigest()
    try:
        objects = [[o["Key"][len(prefix):], int(o["Size"]), str(o.get("ETag", ""))]
                   for o in _s3_keys(client, uri, bucket, prefix, recursive=True)]
    except StorageNotFoundError:
        objects = []
    if not objects:
        head = _s3_object_exists(client, uri, bucket, key)
        if head is None:
            raise StorageNotFoundError(f"{uri} does not exist: no object and nothing under the prefix "
                                       f"(S3 endpoint {_describe_endpoint(client)})")
        digest.update(json.dumps(["object", key, int(head.get("ContentLength", 0)),
                                  str(head.get("ETag", ""))]).encode())
        return digest.hexdigest()
    objects.sort()
    digest.update(json.dumps(["prefix", objects]).encode())
    return digest.hexdigest()


def cache_root() -> Path:
    """Where downloads are cached: ``$MMSAE_CACHE_DIR``, default ``~/.cache/mmsae``."""
    return Path(os.environ.get("MMSAE_CACHE_DIR") or Path.home() / ".cache" / "mmsae")


def cache_dir(section: str, uri: str, fingerprint: str | None = None, *, default_stem: str = "item") -> Path:
    """The local folder of ``uri`` in the download cache: ``cache_root()/section/<name>-<hash of uri>``.

    With a ``fingerprint`` (see :func:`fingerprint`) the folder is also keyed by it, so a remote input
    rewritten at the same URI is downloaded afresh instead of served from a stale copy.
    """
    text = uri.rstrip("/")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", text.rsplit("/", 1)[-1])[:60] or default_stem
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    name = f"{stem}-{digest}"
    if fingerprint is not None:
        name += f"-{fingerprint[:16]}"
    return cache_root() / section / name


DOWNLOAD_COMPLETE = ".mmsae-download-complete"
"""Marker file of a complete download in a cache folder (see :func:`download_cached`); it names what was
downloaded on its first line and the local path (relative to the folder) on its second."""


def download_cached(uri: URI, target: URI, *, is_dir: bool | None = None) -> Path:
    """Download the folder / prefix or the single object at ``uri`` into the cache folder ``target`` once.

    Returns the local copy: ``target`` itself for a folder, ``target/<object name>`` for an object. A complete
    copy (marked by :data:`DOWNLOAD_COMPLETE`) is reused; a download goes to a temporary sibling renamed into
    place when done, so an interrupted one leaves nothing that counts and is redone. ``is_dir`` says which
    of the two ``uri`` is (None: ask the store).
    """
    uri_text, target = os.fspath(uri), _local(target)
    marker = target / DOWNLOAD_COMPLETE
    if marker.is_file():
        lines = marker.read_text().splitlines()
        logger.info("using cached copy of %s in %s", uri_text, target)
        return target / lines[1] if len(lines) > 1 and lines[1] != "." else target
    if is_dir is None:
        if is_s3(uri_text):
            bucket, key = _split_s3(uri_text)
            is_dir = _s3_object_exists(s3_client(), uri_text, bucket, key) is None
        else:
            is_dir = _local(uri_text).is_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    logger.info("downloading %s to %s", uri_text, target)
    rel = "."
    try:
        if is_dir:
            download_dir(uri_text, tmp)
        else:
            rel = Path(uri_text.rstrip("/")).name or "object"
            download_file(uri_text, tmp / rel)
        (tmp / DOWNLOAD_COMPLETE).write_text(f"{uri_text}\n{rel}\n")
        if marker.is_file():
            logger.info("another process finished downloading %s first; using its copy", uri_text)
        else:
            if target.exists():
                shutil.rmtree(target)  # an interrupted earlier download
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target if rel == "." else target / rel


# --------------------------------------------------------------------------------------------- hashes


def sha256_file(path: URI) -> str:
    """Hex sha256 of a local file."""
    p = _local(path)
    try:
        with open(p, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except FileNotFoundError:
        raise _local_not_found(p, path) from None


def _sha256_and_size(uri: URI) -> tuple[str, int]:
    if not is_s3(uri):
        p = _local(uri)
        try:
            return sha256_file(p), p.stat().st_size
        except FileNotFoundError:
            raise _local_not_found(p, uri) from None
    uri = str(uri)
    bucket, key = _s3_object(uri)
    client = s3_client()
    digest = hashlib.sha256()
    size = 0
    with _s3_errors(client, uri, "read"):
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        for chunk in body.iter_chunks(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


# ------------------------------------------------------------------------------------------ manifests


class FileEntry(BaseModel):
    """Checksum and size of one data file of an artifact."""

    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Manifest(BaseModel):
    """The ``manifest.json`` of an artifact directory."""

    model_config = ConfigDict(extra="ignore")

    kind: str
    """Artifact kind, e.g. ``activations`` or ``sae``."""
    format_version: int = 1
    """Version of the artifact's file layout."""
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    """When the artifact was completed (UTC)."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Config that produced the artifact."""
    inputs: dict[str, str] = Field(default_factory=dict)
    """Name -> URI of each input artifact."""
    files: dict[str, FileEntry] = Field(default_factory=dict)
    """Relative file name -> sha256 and size of each data file."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Kind-specific metadata (counts, shapes, dtypes, ...)."""


def _as_dict(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return json.loads(json.dumps(dict(value), default=_json_default))
    raise TypeError(f"manifest {what} must be a mapping or a pydantic model, got {type(value).__name__}")


def write_manifest(
    dir_uri: URI,
    kind: str,
    files: Iterable[str] | Mapping[str, FileEntry | Mapping[str, Any]] | None = None,
    config: Mapping[str, Any] | BaseModel | None = None,
    inputs: Mapping[str, URI] | None = None,
    extra: Mapping[str, Any] | None = None,
    format_version: int = 1,
) -> Manifest:
    """Write ``manifest.json`` into an artifact directory, last and atomically; returns the manifest.

    ``files`` lists the data files (relative names) already written to the directory, whose sha256 and size
    are computed here, or maps names to precomputed ``{"sha256", "bytes"}``. By default every file in the
    directory except the manifest is listed.
    """
    if files is None:
        files = [n for n in list_files(dir_uri) if n != MANIFEST_NAME]
    entries: dict[str, FileEntry] = {}
    if isinstance(files, Mapping):
        for name, entry in files.items():
            entries[name] = entry if isinstance(entry, FileEntry) else FileEntry.model_validate(entry)
    else:
        for name in files:
            if name == MANIFEST_NAME:
                continue
            digest, size = _sha256_and_size(join(dir_uri, name))
            entries[name] = FileEntry(sha256=digest, bytes=size)
    manifest = Manifest(
        kind=kind,
        format_version=format_version,
        config=_as_dict(config, "config"),
        inputs={k: os.fspath(v) for k, v in (inputs or {}).items()},
        files=dict(sorted(entries.items())),
        extra=_as_dict(extra, "extra"),
    )
    write_text(join(dir_uri, MANIFEST_NAME), manifest.model_dump_json(indent=2) + "\n")
    logger.info("wrote %s manifest for %s (%d files)", kind, os.fspath(dir_uri), len(entries))
    return manifest


def read_manifest(dir_uri: URI, kind: str | None = None, *, format_version: int | None = None) -> Manifest:
    """Read an artifact directory's manifest, checking its kind (and format version) when given."""
    uri = join(dir_uri, MANIFEST_NAME)
    try:
        raw = read_bytes(uri)
    except FileNotFoundError:
        raise ManifestError(
            f"{os.fspath(dir_uri)} is not a complete artifact: it has no {MANIFEST_NAME}"
            + (f" (expected a {kind!r} artifact)" if kind else "")
        ) from None
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as err:
        raise ManifestError(f"{uri} is not a valid manifest: {err}") from err
    if kind is not None and manifest.kind != kind:
        raise ManifestError(
            f"{os.fspath(dir_uri)} holds a {manifest.kind!r} artifact, expected a {kind!r} artifact"
        )
    if format_version is not None and manifest.format_version != format_version:
        raise ManifestError(
            f"{os.fspath(dir_uri)} has format version {manifest.format_version} of {manifest.kind!r}, "
            f"expected version {format_version}"
        )
    return manifest


def _entry(dir_uri: URI, name: str, manifest: Manifest) -> FileEntry:
    entry = manifest.files.get(name)
    if entry is None:
        raise ManifestError(
            f"{name!r} is not listed in the manifest of {os.fspath(dir_uri)} (it lists {sorted(manifest.files)})"
        )
    return entry


def _check(uri: str, entry: FileEntry, digest: str, size: int) -> None:
    if digest != entry.sha256 or size != entry.bytes:
        raise ChecksumError(
            f"{uri} is corrupted: sha256 {digest} ({size} bytes), the manifest expects "
            f"{entry.sha256} ({entry.bytes} bytes)"
        )


def verify_file(dir_uri: URI, name: str, manifest: Manifest) -> None:
    """Check one file of an artifact against its manifest; raises ChecksumError naming the file."""
    entry = _entry(dir_uri, name, manifest)
    uri = join(dir_uri, name)
    digest, size = _sha256_and_size(uri)
    _check(uri, entry, digest, size)


def read_verified_bytes(dir_uri: URI, name: str, manifest: Manifest) -> bytes:
    """Read one file of an artifact, checking it against its manifest (ChecksumError naming the file)."""
    entry = _entry(dir_uri, name, manifest)
    uri = join(dir_uri, name)
    data = read_bytes(uri)
    _check(uri, entry, hashlib.sha256(data).hexdigest(), len(data))
    return data


def verify_artifact(dir_uri: URI, kind: str | None = None) -> Manifest:
    """Read the manifest of an artifact directory and verify every file it lists; returns the manifest."""
    manifest = read_manifest(dir_uri, kind)
    for name in manifest.files:
        verify_file(dir_uri, name, manifest)
    return manifest
