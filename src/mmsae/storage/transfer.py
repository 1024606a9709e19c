"""Copies between local paths and URIs: single files, whole folders / prefixes, temporary local copies, and the
download cache (one local copy of a remote input per :func:`cache_dir`, under ``$MMSAE_CACHE_DIR``)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from mmsae.storage.files import _local_temp_path, list_files, write_stream
from mmsae.storage.manifest import MANIFEST_NAME
from mmsae.storage.s3 import _s3_errors, _s3_object_exists, _transfer_config, s3_client, s3_options
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
