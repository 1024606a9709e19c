"""The S3 client: options from the environment, a cached boto3 client, listing, and botocore errors as StorageError.

The endpoint comes from ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``, then ``MLFLOW_S3_ENDPOINT_URL``;
credentials from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` (or any other source
boto3 knows); the region from ``AWS_DEFAULT_REGION`` / ``AWS_REGION``. Requests use path-style addressing and
SigV4, with bounded retries and short connect timeouts (``MMSAE_S3_MAX_ATTEMPTS``, ``MMSAE_S3_CONNECT_TIMEOUT``,
``MMSAE_S3_READ_TIMEOUT``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

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

from mmsae.storage.uris import StorageError, StorageNotFoundError, _split_s3

_MIB = 1024 * 1024


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


def _s3_keys(client: Any, uri: str, bucket: str, prefix: str, recursive: bool) -> Iterator[dict[str, Any]]:
    paginator = client.get_paginator("list_objects_v2")
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    if not recursive:
        kwargs["Delimiter"] = "/"
    with _s3_errors(client, uri, "list"):
        for page in paginator.paginate(**kwargs):
            yield from page.get("Contents", [])


def _s3_object_exists(client: Any, uri: str, bucket: str, key: str) -> dict[str, Any] | None:
    """The HEAD response of the object ``key``, or None if there is none (a prefix, or nothing)."""
    if not key or key.endswith("/"):
        return None
    try:
        with _s3_errors(client, uri, "check"):
            return client.head_object(Bucket=bucket, Key=key)
    except StorageNotFoundError:
        return None
