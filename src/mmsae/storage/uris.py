"""URIs: local paths (``file://`` URIs included) and ``s3://bucket/key``, and the errors storage raises for them."""

from __future__ import annotations

import os
from pathlib import Path

URI = str | os.PathLike[str]


class StorageError(RuntimeError):
    """An object store or file system operation failed; the message names the URI and, for S3, the endpoint."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The file or object does not exist; the message names the URI."""


class StorageURIError(ValueError):
    """A URI that cannot be parsed (e.g. ``s3://`` without a bucket)."""


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


def _local_not_found(path: Path, uri: URI) -> StorageNotFoundError:
    return StorageNotFoundError(f"{os.fspath(uri)} does not exist (local path {path})")


def absolute(uri: URI) -> str:
    """``uri`` made independent of the working directory: a local path made absolute (``~`` expanded,
    ``file://`` dropped), an S3 URI as it is. What artifacts record, so a later stage run from elsewhere finds it."""
    if is_s3(uri):
        return str(uri)
    return str(_local(uri).absolute())


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
