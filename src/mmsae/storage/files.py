"""Reading and writing single files and objects, atomically; existence, listing and deletion.

Local files are written to a hidden temporary file in the same directory, fsynced, given the mode a plain
``open()`` would give them (0o666 less the umask) and renamed over the final name; S3 objects are uploaded
with one PUT or a multipart upload (threshold ``MMSAE_S3_MULTIPART_THRESHOLD`` bytes, or the
``multipart_threshold`` argument), which S3 only shows once it is complete.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any, BinaryIO

from pydantic import BaseModel

from mmsae.storage.s3 import _s3_errors, _s3_keys, _transfer_config, s3_client, s3_options
from mmsae.storage.uris import (
    URI,
    StorageError,
    StorageNotFoundError,
    _local,
    _local_not_found,
    _s3_object,
    _split_s3,
    is_s3,
)

logger = logging.getLogger(__name__)

_TMP_PREFIX = ".mmsae-tmp-"
_CHUNK = 1024 * 1024


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


def read_range(uri: URI, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a file or object (fewer where it ends sooner); S3 reads only that range."""
    if end <= start:
        return b""
    if is_s3(uri):
        uri = str(uri)
        bucket, key = _s3_object(uri)
        client = s3_client()
        with _s3_errors(client, uri, "read"):
            return client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")["Body"].read()
    path = _local(uri)
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            return fh.read(end - start)
    except FileNotFoundError:
        raise _local_not_found(path, uri) from None


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


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(value) for value in obj]
    return obj


def json_text(obj: Any, *, indent: int | None = None, sort_keys: bool = False) -> str:
    """``obj`` as standard JSON: paths, pydantic models and numpy values converted, NaN and inf as null.

    Python's own ``json.dumps`` writes bare ``NaN`` and ``Infinity``, which no JSON parser outside Python
    reads; every JSON file mmsae writes goes through here instead.
    """
    plain = json.loads(json.dumps(obj, default=_json_default))  # numpy scalars etc. to plain values first
    return json.dumps(_finite(plain), indent=indent, ensure_ascii=False, sort_keys=sort_keys, allow_nan=False)


def write_json(uri: URI, obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` atomically as UTF-8 standard JSON (see :func:`json_text`)."""
    write_text(uri, json_text(obj, indent=indent) + "\n")


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
            with open(tmp, "rb") as fh:
                write_stream(uri, fh, multipart_threshold=multipart_threshold)
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
