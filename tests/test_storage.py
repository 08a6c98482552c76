"""The storage interface, the same behaviour on a local folder and on a real S3 protocol (moto
in server mode): listing, whole reads with a limit, create-if-absent, replace-if-unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from forseti.core.storage import ConflictError, Storage, TooLarge, open_storage
from forseti.core.storage.object_store import parse_s3_url
from testkit.object_store import S3Server, s3_server


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


@pytest.fixture(params=["folder", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "folder":
        return open_storage(tmp_path)
    server: S3Server = request.getfixturevalue("s3")
    bucket = f"b-{abs(hash(tmp_path.name)) % 10**8}"
    return open_storage(server.bucket(bucket) + "/some/prefix")


def test_listing_sees_folders_and_objects_level_by_level(storage: Storage) -> None:
    storage.write("m/config.pbtxt", b"c")
    storage.write("m/1/model.onnx.sealed", b"x")
    storage.write("m2/config.pbtxt", b"c")
    assert storage.list_dir("").folders == ["m", "m2"]
    level = storage.list_dir("m")
    assert level.folders == ["1"] and list(level.objects) == ["config.pbtxt"]
    assert [i.key for i in storage.list_all("m")] == ["m/1/model.onnx.sealed", "m/config.pbtxt"]


def test_read_refuses_an_object_over_the_limit(storage: Storage) -> None:
    storage.write("big", b"x" * 100)
    assert storage.read("big", max_bytes=100) == b"x" * 100
    with pytest.raises(TooLarge):
        storage.read("big", max_bytes=99)


def test_create_refuses_an_existing_object(storage: Storage) -> None:
    storage.create("claim", b"first")
    with pytest.raises(ConflictError):
        storage.create("claim", b"second")
    assert storage.read("claim") == b"first"


def test_replace_refuses_a_changed_object(storage: Storage) -> None:
    first = storage.create("manifest", b"1")
    second = storage.replace("manifest", b"2", first.etag)
    with pytest.raises(ConflictError):
        storage.replace("manifest", b"3", first.etag)
    assert storage.read("manifest") == b"2"
    assert storage.stat("manifest") == second
    assert storage.stat("absent") is None


def test_triton_s3_url_forms() -> None:
    assert parse_s3_url("s3://bucket/a/b") == (None, "bucket", "a/b")
    assert parse_s3_url("s3://host:9000/bucket/a") == ("http://host:9000", "bucket", "a")
    assert parse_s3_url("s3://https://host:9000/bucket") == ("https://host:9000", "bucket", "")
