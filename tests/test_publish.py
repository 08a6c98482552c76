"""Atomic publishing of version folders (server/repository/publish.py)."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from forseti.core.repository.layout import version_dirs
from forseti.core.repository.publish import PublishError, publish_version


def _files(number: int) -> dict[str, bytes]:
    return {"model.onnx.sealed": f"version {number} pid {os.getpid()}".encode()}


def test_publish_takes_the_next_number(tmp_path: Path) -> None:
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "f").write_text("x")
    assert publish_version(tmp_path, _files) == 4
    assert (tmp_path / "4" / "model.onnx.sealed").read_bytes().startswith(b"version 4 ")


def test_publish_leaves_no_hidden_folder_behind(tmp_path: Path) -> None:
    publish_version(tmp_path, _files)
    assert [p.name for p in tmp_path.iterdir()] == ["1"]


def test_files_are_made_for_the_number_they_land_in(tmp_path: Path) -> None:
    seen: list[int] = []

    def files(number: int) -> dict[str, bytes]:
        seen.append(number)
        if number == 1:  # another publisher takes 1 while we write
            (tmp_path / "1").mkdir()
            (tmp_path / "1" / "f").write_text("theirs")
        return _files(number)

    assert publish_version(tmp_path, files) == 2
    assert seen == [1, 2]
    assert (tmp_path / "1" / "f").read_text() == "theirs"
    assert (tmp_path / "2" / "model.onnx.sealed").read_bytes().startswith(b"version 2 ")


def test_explicit_version_that_exists_is_refused(tmp_path: Path) -> None:
    publish_version(tmp_path, _files, version=1)
    with pytest.raises(PublishError, match="already exists"):
        publish_version(tmp_path, _files, version=1)


def test_failing_file_maker_publishes_nothing(tmp_path: Path) -> None:
    def broken(number: int) -> dict[str, bytes]:
        return {"../escape": b"x"}

    with pytest.raises(PublishError, match="invalid file name"):
        publish_version(tmp_path, broken)
    assert list(tmp_path.iterdir()) == []


def _publish_many(folder: str, count: int) -> list[int]:
    return [publish_version(Path(folder), _files) for _ in range(count)]


def test_concurrent_publishers_never_share_a_number(tmp_path: Path) -> None:
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.starmap(_publish_many, [(str(tmp_path), 10)] * 4)
    numbers = [n for r in results for n in r]
    assert sorted(numbers) == list(range(1, 41))
    assert sorted(version_dirs(tmp_path)) == list(range(1, 41))
    for n in numbers:
        content = (tmp_path / str(n) / "model.onnx.sealed").read_bytes()
        assert content.startswith(f"version {n} ".encode())
