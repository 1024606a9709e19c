"""URI I/O for local paths and ``s3://bucket/key`` objects, atomic writes, artifact manifests, sha256 checks.

Every stage reads its inputs and writes its outputs through this package, so a stage never cares whether its
working directory is a local folder or an S3 prefix. Callers use the names re-exported here
(``from mmsae import storage``; ``storage.join``, ``storage.read_manifest``, ...); the modules hold:

- :mod:`.uris`: telling local paths from ``s3://`` URIs, joining them, and the storage errors;
- :mod:`.s3`: the S3 client, configured from the environment (endpoint from ``AWS_ENDPOINT_URL_S3``, then
  ``AWS_ENDPOINT_URL``, then ``MLFLOW_S3_ENDPOINT_URL``; the usual ``AWS_*`` credentials and region; bounded
  retries and short timeouts, so an unreachable endpoint fails in seconds with a :class:`StorageError` that
  names it), and botocore errors turned into storage errors;
- :mod:`.files`: reads and atomic writes of single files and objects (no half-written file or object is
  ever visible under its final name), existence, listing, deletion;
- :mod:`.transfer`: uploads and downloads of files and folders, temporary local copies, and the download
  cache (:func:`download_cached` keeps one local copy of a remote input per :func:`cache_dir`, under
  ``$MMSAE_CACHE_DIR``, keyed by URI and fingerprint);
- :mod:`.manifest`: the ``manifest.json`` of every artifact directory (:class:`Manifest`, written last, so its
  presence marks a complete artifact), sha256 checks of the files it lists, and :func:`fingerprint`, a
  cheap content fingerprint of a folder, file, prefix or object.
"""

from __future__ import annotations

from mmsae.storage.files import (
    atomic_writer,
    delete,
    exists,
    json_text,
    list_files,
    local_output,
    read_bytes,
    read_json,
    read_range,
    read_text,
    remove_stale_temps,
    write_bytes,
    write_json,
    write_stream,
    write_text,
)
from mmsae.storage.manifest import (
    MANIFEST_NAME,
    ChecksumError,
    FileEntry,
    Manifest,
    ManifestError,
    fingerprint,
    read_manifest,
    read_verified_bytes,
    sha256_file,
    verify_artifact,
    verify_file,
    write_manifest,
)
from mmsae.storage.s3 import S3Options, s3_client, s3_options
from mmsae.storage.transfer import (
    DOWNLOAD_COMPLETE,
    cache_dir,
    cache_root,
    download_cached,
    download_dir,
    download_file,
    local_copy,
    upload_dir,
    upload_file,
)
from mmsae.storage.uris import URI, StorageError, StorageNotFoundError, StorageURIError, absolute, is_s3, join

__all__ = [
    "DOWNLOAD_COMPLETE",
    "MANIFEST_NAME",
    "URI",
    "ChecksumError",
    "FileEntry",
    "Manifest",
    "ManifestError",
    "S3Options",
    "StorageError",
    "StorageNotFoundError",
    "StorageURIError",
    "absolute",
    "atomic_writer",
    "cache_dir",
    "cache_root",
    "delete",
    "download_cached",
    "download_dir",
    "download_file",
    "exists",
    "fingerprint",
    "is_s3",
    "join",
    "json_text",
    "list_files",
    "local_copy",
    "local_output",
    "read_bytes",
    "read_json",
    "read_range",
    "read_manifest",
    "read_text",
    "read_verified_bytes",
    "remove_stale_temps",
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
