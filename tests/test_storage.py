"""Tests of mmsae.storage on local paths and on a real S3 server (SeaweedFS), and of mmsae.services.s3."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from mmsae import storage
from mmsae.services.s3 import GRPC_OFFSET, S3Server, pick_ports
from mmsae.storage import ChecksumError, ManifestError, StorageError, StorageNotFoundError


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.services)])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same tests run on a local directory and on an S3 prefix in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_env")


class Boom(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------ URIs


def test_is_s3_tells_s3_uris_from_local_paths(tmp_path: Path) -> None:
    assert storage.is_s3("s3://bucket/key")
    assert not storage.is_s3(str(tmp_path))
    assert not storage.is_s3(tmp_path)
    assert not storage.is_s3("file:///tmp/x")


def test_join_uses_slashes_for_s3_and_os_paths_locally(tmp_path: Path) -> None:
    assert storage.join("s3://bucket/a/", "/b/", "c.txt") == "s3://bucket/a/b/c.txt"
    assert storage.join("s3://bucket", "x") == "s3://bucket/x"
    assert storage.join(tmp_path, "a", "b.txt") == str(tmp_path / "a" / "b.txt")


def test_s3_uri_without_bucket_is_rejected() -> None:
    with pytest.raises(storage.StorageURIError, match="no bucket"):
        storage.read_bytes("s3:///key")


# ------------------------------------------------------------------------------------ round trips


def test_bytes_text_and_json_round_trip(base: str) -> None:
    data = os.urandom(1000)
    storage.write_bytes(storage.join(base, "deep/dir/blob.bin"), data)
    storage.write_text(storage.join(base, "note.txt"), "héllo\n")
    storage.write_json(storage.join(base, "obj.json"), {"a": [1, 2.5, None], "p": Path("/x/y"), "s": "ü"})

    assert storage.read_bytes(storage.join(base, "deep/dir/blob.bin")) == data
    assert storage.read_text(storage.join(base, "note.txt")) == "héllo\n"
    assert storage.read_json(storage.join(base, "obj.json")) == {"a": [1, 2.5, None], "p": "/x/y", "s": "ü"}


def test_overwrite_replaces_content(base: str) -> None:
    uri = storage.join(base, "f.txt")
    storage.write_text(uri, "one")
    storage.write_text(uri, "two")
    assert storage.read_text(uri) == "two"


def test_reading_a_missing_file_raises_file_not_found_naming_the_uri(base: str) -> None:
    uri = storage.join(base, "nope", "missing.bin")
    with pytest.raises(FileNotFoundError) as info:
        storage.read_bytes(uri)
    assert isinstance(info.value, StorageNotFoundError)
    assert uri in str(info.value)


def test_invalid_json_error_names_the_uri(base: str) -> None:
    uri = storage.join(base, "bad.json")
    storage.write_text(uri, "{not json")
    with pytest.raises(StorageError, match="bad.json"):
        storage.read_json(uri)


def test_list_files_gives_sorted_relative_paths(base: str) -> None:
    for name in ["b.txt", "a.txt", "sub/z.bin", "sub/deeper/y.bin"]:
        storage.write_text(storage.join(base, "root", name), name)
    storage.write_text(storage.join(base, "rootother.txt"), "not under root/")

    assert storage.list_files(storage.join(base, "root")) == [
        "a.txt",
        "b.txt",
        "sub/deeper/y.bin",
        "sub/z.bin",
    ]
    assert storage.list_files(storage.join(base, "root"), recursive=False) == ["a.txt", "b.txt"]
    assert storage.list_files(storage.join(base, "root", "sub")) == ["deeper/y.bin", "z.bin"]
    assert storage.list_files(storage.join(base, "absent")) == []


def test_exists_and_delete_for_files_and_directories(base: str) -> None:
    file_uri = storage.join(base, "d", "f.txt")
    other = storage.join(base, "d", "sub", "g.txt")
    assert not storage.exists(file_uri)
    storage.write_text(file_uri, "x")
    storage.write_text(other, "y")
    assert storage.exists(file_uri)
    assert storage.exists(storage.join(base, "d"))  # a directory / non-empty prefix exists

    storage.delete(file_uri)
    assert not storage.exists(file_uri)
    assert storage.exists(other)

    storage.delete(storage.join(base, "d"))
    assert not storage.exists(other)
    assert not storage.exists(storage.join(base, "d"))
    storage.delete(storage.join(base, "d"))  # deleting what is gone is not an error


def test_upload_and_download_file_round_trip(base: str, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(5000))
    uri = storage.join(base, "up", "file.bin")
    storage.upload_file(src, uri)
    out = storage.download_file(uri, tmp_path / "dl" / "file.bin")
    assert out.read_bytes() == src.read_bytes()
    assert storage.sha256_file(out) == hashlib.sha256(src.read_bytes()).hexdigest()


def test_upload_and_download_dir_round_trip(base: str, tmp_path: Path) -> None:
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "weights.bin").write_bytes(os.urandom(3000))
    uri = storage.join(base, "models", "m1")

    assert storage.upload_dir(src, uri) == ["config.json", "sub/weights.bin"]
    names = storage.download_dir(uri, tmp_path / "back")
    assert names == ["config.json", "sub/weights.bin"]
    for name in names:
        assert (tmp_path / "back" / name).read_bytes() == (src / name).read_bytes()


def test_download_dir_of_nothing_raises_not_found(base: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="empty-model"):
        storage.download_dir(storage.join(base, "empty-model"), tmp_path / "x")


def test_upload_dir_sends_manifest_last(base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "art"
    src.mkdir()
    for name in ["a.bin", "manifest.json", "z.bin"]:
        (src / name).write_text(name)
    order: list[str] = []
    real_upload = storage.upload_file

    def recording_upload(local_path, uri, **kwargs):  # type: ignore[no-untyped-def]
        order.append(Path(local_path).name)
        real_upload(local_path, uri, **kwargs)

    monkeypatch.setattr(storage.transfer, "upload_file", recording_upload)
    storage.upload_dir(src, storage.join(base, "art"))
    assert order == ["a.bin", "z.bin", "manifest.json"]


def test_local_copy_gives_a_local_path_for_files_and_directories(base: str) -> None:
    storage.write_text(storage.join(base, "m", "config.json"), "{}")
    storage.write_bytes(storage.join(base, "m", "w", "x.bin"), b"\x00\x01")

    with storage.local_copy(storage.join(base, "m")) as path:
        assert path.is_dir()
        assert (path / "config.json").read_text() == "{}"
        assert (path / "w" / "x.bin").read_bytes() == b"\x00\x01"
    with storage.local_copy(storage.join(base, "m", "config.json")) as path:
        assert path.is_file()
        assert path.read_text() == "{}"
    if storage.is_s3(base):
        assert not path.exists()  # the temporary download is gone
    with pytest.raises(FileNotFoundError), storage.local_copy(storage.join(base, "nothing")):
        pass


# --------------------------------------------------------------------------------------- atomicity


def test_write_is_atomic_under_crash(base: str) -> None:
    uri = storage.join(base, "atomic", "data.bin")
    storage.write_bytes(uri, b"old content")
    with pytest.raises(Boom), storage.atomic_writer(uri) as fh:
        fh.write(b"new partial data " * 1000)
        raise Boom("crash mid-write")
    assert storage.read_bytes(uri) == b"old content"
    assert storage.list_files(storage.join(base, "atomic")) == ["data.bin"]

    fresh = storage.join(base, "atomic", "never.bin")
    with pytest.raises(Boom), storage.atomic_writer(fresh) as fh:
        fh.write(b"partial")
        raise Boom("crash mid-write")
    assert not storage.exists(fresh)


def test_local_write_crash_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "out" / "x.bin"
    with pytest.raises(Boom), storage.atomic_writer(target) as fh:
        fh.write(b"abc")
        assert list(target.parent.iterdir()), "the partial data is in a temporary file beside the target"
        assert not target.exists()
        raise Boom("crash")
    assert list(target.parent.iterdir()) == []


def test_atomic_writer_publishes_on_success(base: str) -> None:
    uri = storage.join(base, "w.bin")
    with storage.atomic_writer(uri) as fh:
        fh.write(b"part1-")
        fh.write(b"part2")
    assert storage.read_bytes(uri) == b"part1-part2"


def test_local_output_publishes_only_on_success(base: str) -> None:
    uri = storage.join(base, "lo", "shard.bin")
    with storage.local_output(uri) as path:
        path.write_bytes(b"shard")
    assert storage.read_bytes(uri) == b"shard"
    with pytest.raises(Boom), storage.local_output(uri) as path:
        path.write_bytes(b"half")
        raise Boom("crash")
    assert storage.read_bytes(uri) == b"shard"


# ------------------------------------------------------------------------------------------- manifests


def _make_artifact(base: str) -> str:
    art = storage.join(base, "acts")
    storage.write_bytes(storage.join(art, "shard-00000.safetensors"), os.urandom(2048))
    storage.write_text(storage.join(art, "meta", "info.txt"), "hello")
    return art


def test_manifest_round_trip_records_hashes_config_and_inputs(base: str) -> None:
    art = _make_artifact(base)
    written = storage.write_manifest(
        art,
        "activations",
        config={"layer": 3, "hook": "resid"},
        inputs={"model": "s3://models/tiny", "images": Path("/data/images")},
        extra={"n_tokens": 128},
        format_version=2,
    )
    manifest = storage.read_manifest(art, kind="activations")
    assert manifest == written
    assert manifest.kind == "activations" and manifest.format_version == 2
    assert manifest.config == {"layer": 3, "hook": "resid"}
    assert manifest.inputs == {"model": "s3://models/tiny", "images": "/data/images"}
    assert manifest.extra == {"n_tokens": 128}
    assert sorted(manifest.files) == ["meta/info.txt", "shard-00000.safetensors"]
    shard = storage.read_bytes(storage.join(art, "shard-00000.safetensors"))
    assert manifest.files["shard-00000.safetensors"].sha256 == hashlib.sha256(shard).hexdigest()
    assert manifest.files["shard-00000.safetensors"].bytes == 2048
    raw = storage.read_json(storage.join(art, storage.MANIFEST_NAME))
    assert {"kind", "format_version", "created_at", "config", "inputs", "files", "extra"} <= set(raw)

    storage.verify_file(art, "meta/info.txt", manifest)
    assert storage.read_verified_bytes(art, "meta/info.txt", manifest) == b"hello"
    assert storage.verify_artifact(art, kind="activations") == manifest


def test_tampered_file_raises_checksum_error_naming_it(base: str) -> None:
    art = _make_artifact(base)
    manifest = storage.write_manifest(art, "activations")
    storage.write_text(storage.join(art, "meta", "info.txt"), "hellO")  # same size, different bytes

    with pytest.raises(ChecksumError, match="meta/info.txt"):
        storage.verify_file(art, "meta/info.txt", manifest)
    with pytest.raises(ChecksumError, match="meta/info.txt"):
        storage.read_verified_bytes(art, "meta/info.txt", manifest)
    with pytest.raises(ChecksumError, match="meta/info.txt"):
        storage.verify_artifact(art)
    storage.verify_file(art, "shard-00000.safetensors", manifest)  # the untouched file still passes


def test_file_not_in_manifest_is_refused(base: str) -> None:
    art = _make_artifact(base)
    manifest = storage.write_manifest(art, "activations", files=["meta/info.txt"])
    assert list(manifest.files) == ["meta/info.txt"]
    with pytest.raises(ManifestError, match="shard-00000.safetensors"):
        storage.read_verified_bytes(art, "shard-00000.safetensors", manifest)


def test_precomputed_hashes_are_taken_as_given(base: str) -> None:
    art = _make_artifact(base)
    wrong = {"sha256": "0" * 64, "bytes": 5}
    manifest = storage.write_manifest(art, "activations", files={"meta/info.txt": wrong})
    assert manifest.files["meta/info.txt"].sha256 == "0" * 64
    with pytest.raises(ChecksumError, match="meta/info.txt"):
        storage.verify_file(art, "meta/info.txt", manifest)


def test_wrong_kind_raises_manifest_error_naming_both_kinds(base: str) -> None:
    art = _make_artifact(base)
    storage.write_manifest(art, "activations")
    with pytest.raises(ManifestError, match="'activations'.*expected a 'sae'"):
        storage.read_manifest(art, kind="sae")
    with pytest.raises(ManifestError, match="format version 1"):
        storage.read_manifest(art, kind="activations", format_version=2)


def test_missing_manifest_raises_manifest_error_naming_the_directory(base: str) -> None:
    art = _make_artifact(base)
    with pytest.raises(ManifestError, match="acts.*no manifest.json"):
        storage.read_manifest(art, kind="activations")


def test_invalid_manifest_is_refused(base: str) -> None:
    art = _make_artifact(base)
    storage.write_json(
        storage.join(art, storage.MANIFEST_NAME), {"kind": "x", "files": {"a": {"sha256": "zz"}}}
    )
    with pytest.raises(ManifestError, match="not a valid manifest"):
        storage.read_manifest(art)


# ---------------------------------------------------------------------------------------- S3 only


@pytest.mark.services
def test_multipart_upload_of_12_mb_round_trips(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMSAE_S3_MULTIPART_CHUNKSIZE", str(5 * 1024 * 1024))
    data = os.urandom(12 * 1000 * 1000)
    uri = storage.join(s3_env, "big.bin")
    storage.write_bytes(uri, data, multipart_threshold=5 * 1024 * 1024)

    bucket, key = uri[len("s3://") :].split("/", 1)
    head = storage.s3_client().head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # three parts of 5 MiB at most
    assert storage.read_bytes(uri) == data


@pytest.mark.services
def test_small_upload_is_a_single_put(s3_env: str) -> None:
    uri = storage.join(s3_env, "small.bin")
    storage.write_bytes(uri, b"x" * 1000, multipart_threshold=5 * 1024 * 1024)
    bucket, key = uri[len("s3://") :].split("/", 1)
    assert "-" not in storage.s3_client().head_object(Bucket=bucket, Key=key)["ETag"]


class FailingStream(io.RawIOBase):
    """Gives ``good`` bytes, then fails as a crashing producer would."""

    def __init__(self, good: int) -> None:
        self.left = good

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[no-untyped-def]
        if self.left <= 0:
            raise Boom("producer died mid-upload")
        n = min(len(buf), self.left)
        buf[:n] = b"\x07" * n
        self.left -= n
        return n


@pytest.mark.services
def test_failed_multipart_upload_leaves_no_object(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMSAE_S3_MULTIPART_CHUNKSIZE", str(5 * 1024 * 1024))
    uri = storage.join(s3_env, "broken.bin")
    with pytest.raises(Boom):
        storage.write_stream(uri, FailingStream(7 * 1024 * 1024), multipart_threshold=5 * 1024 * 1024)
    assert not storage.exists(uri)
    bucket = uri[len("s3://") :].split("/", 1)[0]
    uploads = storage.s3_client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert uploads == [], "the failed multipart upload was not aborted"


@pytest.mark.services
def test_wrong_credentials_give_a_clear_storage_error(
    s3_env: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = storage.join(s3_env, "secret.txt")
    storage.write_text(uri, "x")
    bucket = uri[len("s3://") :].split("/", 1)[0]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    for action in (
        lambda: storage.read_bytes(uri),
        lambda: storage.write_text(uri, "y"),
        lambda: storage.exists(uri),
        lambda: storage.list_files(s3_env),
    ):
        with pytest.raises(StorageError, match="rejected the credentials") as info:
            action()
        assert bucket in str(info.value)
        assert s3_server.endpoint_url in str(info.value)
        assert not isinstance(info.value, FileNotFoundError)

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unknown-key")
    with pytest.raises(StorageError, match="rejected the credentials"):
        storage.read_bytes(uri)


@pytest.mark.services
def test_missing_bucket_is_not_found_naming_the_bucket(s3_env: str) -> None:
    with pytest.raises(FileNotFoundError, match="no-such-bucket-x1"):
        storage.read_bytes("s3://no-such-bucket-x1/a.txt")
    assert not storage.exists("s3://no-such-bucket-x1/a.txt")
    assert storage.list_files("s3://no-such-bucket-x1/a") == []


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_endpoint_fails_fast_naming_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.delenv("MMSAE_S3_MAX_ATTEMPTS", raising=False)
    sends: list[str] = []
    storage.s3_client().meta.events.register("before-send.s3", lambda **kw: sends.append("try"))

    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.read_bytes("s3://bucket/key.bin")
    elapsed = time.monotonic() - start

    message = str(info.value)
    assert endpoint in message
    assert "could not reach" in message and "after 3 attempts" in message
    assert len(sends) == 3
    assert elapsed < 10, f"bounded retries took {elapsed:.1f} s"


def test_endpoint_comes_from_aws_variables_before_the_mlflow_one(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT_URL",
        "MLFLOW_S3_ENDPOINT_URL",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
    ):
        monkeypatch.delenv(name, raising=False)
    assert storage.s3_options().endpoint_url is None
    assert storage.s3_options().region == "us-east-1"
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://mlflow-s3:9000")
    assert storage.s3_options().endpoint_url == "http://mlflow-s3:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:9000")
    assert storage.s3_options().endpoint_url == "http://generic:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:9000")
    assert storage.s3_options().endpoint_url == "http://s3-only:9000"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert storage.s3_options().region == "eu-west-1"


@pytest.mark.services
def test_mlflow_endpoint_variable_alone_reaches_the_server(
    s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    uri = storage.join(s3_env, "via-mlflow-var.txt")
    storage.write_text(uri, "ok")
    assert storage.read_text(uri) == "ok"


# -------------------------------------------------------------------------------------- S3Server


def test_pick_ports_gives_distinct_free_ports_with_free_grpc_ports() -> None:
    ports = pick_ports()
    assert set(ports) == {"master", "volume", "filer", "s3", "admin"}
    every = list(ports.values()) + [p + GRPC_OFFSET for p in ports.values()]
    assert len(set(every)) == len(every)
    for port in every:
        assert port < 32768  # below the ephemeral range
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.services
def test_second_s3_server_runs_beside_the_first_stops_cleanly_and_keeps_objects(
    s3_server: S3Server, tmp_path: Path
) -> None:
    root = tmp_path / "second"
    with S3Server(root, access_key="other", secret_key="other-secret", stop_timeout=5) as second:
        assert second.endpoint_url != s3_server.endpoint_url
        assert not set(second.ports.values()) & set(s3_server.ports.values())
        second.create_bucket("only-on-second")
        second.client().put_object(Bucket="only-on-second", Key="k.txt", Body=b"kept")
        assert "only-on-second" not in {b["Name"] for b in s3_server.client().list_buckets()["Buckets"]}
        identities = json.loads((root / "s3-identities.json").read_text())["identities"]
        assert identities[0]["credentials"] == [{"accessKey": "other", "secretKey": "other-secret"}]
        pid = second._proc.pid if second._proc else -1
        port = second.port
    assert not second.running
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert not _listening(port)
    assert (root / "weed.log").stat().st_size > 0
    assert not list(Path("/tmp").glob(f"seaweedfs-*-{port}.sock"))

    with S3Server(root, access_key="other", secret_key="other-secret", stop_timeout=5) as again:
        assert again.client().get_object(Bucket="only-on-second", Key="k.txt")["Body"].read() == b"kept"


def test_remove_stale_temps_removes_only_the_named_writers_temps(tmp_path):
    from mmsae.storage.files import _TMP_PREFIX

    (tmp_path / "sub").mkdir()
    mine = tmp_path / "sub" / f"{_TMP_PREFIX}shard-001-00003.safetensors.abc"
    other = tmp_path / f"{_TMP_PREFIX}shard-002-00000.safetensors.def"
    keep = tmp_path / "shard-001-00000.safetensors"
    for p in (mine, other, keep):
        p.write_bytes(b"x")
    assert storage.remove_stale_temps(str(tmp_path), of="shard-001-") == 1
    assert not mine.exists() and other.exists() and keep.exists()
    assert storage.remove_stale_temps(str(tmp_path)) == 1
    assert not other.exists() and keep.exists()


# ------------------------------------------------------------------------------ fingerprints, caches


def test_fingerprint_changes_when_anything_under_the_uri_changes(base: str) -> None:
    root = storage.join(base, "input")
    storage.write_text(storage.join(root, "a.txt"), "aaaa")
    storage.write_bytes(storage.join(root, "sub", "b.bin"), b"\0" * 100)
    first = storage.fingerprint(root)
    assert len(first) == 64 and storage.fingerprint(root) == first  # stable while nothing changes

    seen = {first}
    storage.write_text(storage.join(root, "a.txt"), "bbbb")  # same size, new content
    seen.add(storage.fingerprint(root))
    storage.write_text(storage.join(root, "sub", "c.txt"), "new file")
    seen.add(storage.fingerprint(root))
    storage.delete(storage.join(root, "sub", "b.bin"))
    seen.add(storage.fingerprint(root))
    assert len(seen) == 4

    one = storage.join(root, "a.txt")  # a single file or object
    before = storage.fingerprint(one)
    storage.write_text(one, "cccc")
    assert storage.fingerprint(one) != before

    with pytest.raises(StorageNotFoundError, match="nothing-here"):
        storage.fingerprint(storage.join(base, "nothing-here"))


def test_fingerprint_of_an_artifact_is_its_manifest(base: str) -> None:
    root = storage.join(base, "artifact")
    storage.write_text(storage.join(root, "data.txt"), "one")
    storage.write_manifest(root, "image_set")
    sealed = storage.fingerprint(root)
    assert sealed == storage.fingerprint(root)
    storage.write_manifest(root, "image_set")  # rebuilt: a new manifest (its creation time at least differs)
    assert storage.fingerprint(root) != sealed
    # a manifest.json that is not an mmsae manifest is just another file
    other = storage.join(base, "hf-model")
    storage.write_text(storage.join(other, "manifest.json"), '{"weights": "x"}')
    before = storage.fingerprint(other)
    storage.write_text(storage.join(other, "weights.bin"), "w")
    assert storage.fingerprint(other) != before


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_local_writes_get_the_mode_a_plain_open_would_give(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as fh:
            fh.write("x")
        storage.write_bytes(tmp_path / "w.bin", b"x")
        with storage.atomic_writer(tmp_path / "a.bin") as fh:
            fh.write(b"x")
        with storage.local_output(tmp_path / "o.bin") as path:
            path.write_bytes(b"x")
        storage.upload_file(tmp_path / "w.bin", tmp_path / "up" / "u.bin")
        storage.download_file(tmp_path / "w.bin", tmp_path / "down" / "d.bin")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == want
    modes = {p.name: oct(p.stat().st_mode & 0o777)
             for p in [tmp_path / "w.bin", tmp_path / "a.bin", tmp_path / "o.bin", tmp_path / "up" / "u.bin",
                       tmp_path / "down" / "d.bin"]}
    assert modes == dict.fromkeys(modes, oct(want))


def test_cache_dir_is_keyed_by_uri_and_fingerprint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMSAE_CACHE_DIR", str(tmp_path / "c"))
    uri = "s3://bucket/models/my model/"
    plain = storage.cache_dir("models", uri)
    assert plain.parent == tmp_path / "c" / "models"  # under $MMSAE_CACHE_DIR/<section>
    assert plain.name.startswith("my_model-")  # a readable stem: the URI's last part, made path-safe
    assert storage.cache_dir("models", uri) == plain  # the same URI: the same folder
    assert storage.cache_dir("models", uri.rstrip("/")) == plain  # a trailing slash names the same thing
    others = {storage.cache_dir("models", other) for other in
              ("s3://bucket/models/my model2", "s3://other/models/my model", "s3://bucket/v2/my model")}
    assert len(others | {plain}) == 4  # different URIs (the same last part included): different folders
    assert storage.cache_dir("datasets", uri).parent == tmp_path / "c" / "datasets"

    a, b = storage.cache_dir("models", uri, "a" * 64), storage.cache_dir("models", uri, "b" * 64)
    assert len({plain, a, b}) == 3 and a.parent == b.parent == plain.parent  # a fingerprint changes the folder
    assert storage.cache_dir("models", uri, "a" * 64) == a
    assert storage.cache_dir("models", "s3://bucket/", default_stem="model").name.startswith("bucket-")


def test_download_cached_downloads_once_and_serves_the_copy(
    base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = storage.join(base, "remote-dir")
    storage.write_text(storage.join(remote, "config.json"), "{}")
    storage.write_bytes(storage.join(remote, "sub", "w.bin"), b"weights")
    got = storage.download_cached(remote, tmp_path / "cache" / "d")
    assert got == tmp_path / "cache" / "d"
    assert (got / "sub" / "w.bin").read_bytes() == b"weights"
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name != "d"]  # no partial folder left

    obj = storage.join(base, "data.parquet")
    storage.write_bytes(obj, b"PAR1")
    one = storage.download_cached(obj, tmp_path / "cache" / "o")
    assert one == tmp_path / "cache" / "o" / "data.parquet" and one.read_bytes() == b"PAR1"

    def no_download(*args, **kw):
        raise AssertionError("a complete cached copy must not be downloaded again")

    monkeypatch.setattr(storage.transfer, "download_dir", no_download)
    monkeypatch.setattr(storage.transfer, "download_file", no_download)
    assert storage.download_cached(remote, tmp_path / "cache" / "d") == got
    assert storage.download_cached(obj, tmp_path / "cache" / "o") == one


def test_json_is_standard_non_finite_numbers_written_as_null(tmp_path):
    import math

    uri = str(tmp_path / "figures.json")
    storage.write_json(uri, {"loss": float("nan"), "max": [float("inf"), 1.5], "n": np.int64(3)})
    text = Path(uri).read_text()
    assert "NaN" not in text and "Infinity" not in text
    strict = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert strict == {"loss": None, "max": [None, 1.5], "n": 3}
    assert json.loads(storage.json_text([-math.inf])) == [None]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_read_range_returns_only_the_asked_bytes(where, tmp_path, request):
    base = request.getfixturevalue("s3_env") if where == "s3" else str(tmp_path)
    uri = storage.join(base, "data.bin")
    storage.write_bytes(uri, bytes(range(100)))
    assert storage.read_range(uri, 10, 14) == bytes([10, 11, 12, 13])
    assert storage.read_range(uri, 98, 200) == bytes([98, 99])
    assert storage.read_range(uri, 5, 5) == b""
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        storage.read_range(storage.join(base, "missing.bin"), 0, 4)
