"""Artifact manifests, sha256 checks and content fingerprints.

Every artifact directory holds a ``manifest.json`` (:class:`Manifest`) written last, so its presence marks a
complete artifact. It records the artifact's kind, format version, config, inputs and a sha256 per data file;
:func:`read_manifest` and :func:`verify_file` refuse missing manifests, wrong kinds and corrupted files with
errors naming the directory or file. :func:`fingerprint` is a cheap content fingerprint of a folder, file,
prefix or object: an artifact's manifest, else names, sizes and mtimes / ETags.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmsae.storage.files import _CHUNK, _TMP_PREFIX, _json_default, list_files, read_bytes, write_text
from mmsae.storage.s3 import _describe_endpoint, _s3_errors, _s3_keys, _s3_object_exists, s3_client
from mmsae.storage.uris import (
    URI,
    StorageNotFoundError,
    _local,
    _local_not_found,
    _s3_object,
    _split_s3,
    is_s3,
    join,
)

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
"""File name of the manifest inside every artifact directory."""


class ManifestError(ValueError):
    """An artifact directory whose manifest is missing, unreadable, of the wrong kind or does not list a file."""


class ChecksumError(ManifestError):
    """A file whose sha256 or size differs from the one its manifest records; the message names the file."""


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


def _manifest_bytes(raw: bytes) -> bytes | None:
    """``raw`` if it is a manifest mmsae wrote (a valid :class:`Manifest`), else None."""
    try:
        Manifest.model_validate_json(raw)
    except ValidationError:
        return None
    return raw


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
