"""Repository layout and version policy (server/repository/layout.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from forseti.core.errors import ModelLoadError
from forseti.core.repository.layout import (
    find_artifact,
    list_models,
    parse_version_name,
    select_versions,
    version_dirs,
)


def policy(text: str) -> mc.ModelVersionPolicy:
    return text_format.Parse(text, mc.ModelVersionPolicy())


def test_default_policy_is_latest_one() -> None:
    assert select_versions(mc.ModelVersionPolicy(), [1, 3, 2]) == [3]


def test_latest_n_keeps_the_n_newest() -> None:
    assert select_versions(policy("latest { num_versions: 2 }"), [1, 10, 2, 9]) == [9, 10]


def test_all_keeps_every_version() -> None:
    assert select_versions(policy("all {}"), [3, 1, 2]) == [1, 2, 3]


def test_specific_keeps_only_named_versions_that_exist() -> None:
    assert select_versions(policy("specific { versions: [1, 3, 7] }"), [1, 2, 3]) == [1, 3]


def test_hidden_and_non_numeric_folders_are_not_versions(tmp_path: Path) -> None:
    for name in ("1", "2", ".publish-abc", "latest", "3x"):
        (tmp_path / name).mkdir()
    (tmp_path / "4").write_text("a file, not a folder")
    assert sorted(version_dirs(tmp_path)) == [1, 2]


def test_hidden_model_folders_are_not_models(tmp_path: Path) -> None:
    for name in ("a", ".trash", "b"):
        (tmp_path / name).mkdir()
    assert list_models(tmp_path) == ["a", "b"]


def test_sealed_artifact_is_preferred(tmp_path: Path) -> None:
    (tmp_path / "model.onnx.sealed").write_bytes(b"x")
    artifact = find_artifact(tmp_path, "model.onnx", allow_plaintext=False)
    assert artifact.sealed
    assert artifact.filename == "model.onnx"


def test_plaintext_is_refused_unless_allowed(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="--allow-plaintext"):
        find_artifact(tmp_path, "model.onnx", allow_plaintext=False)
    assert not find_artifact(tmp_path, "model.onnx", allow_plaintext=True).sealed


def test_missing_artifact_names_the_expected_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model\.onnx\.sealed"):
        find_artifact(tmp_path, "model.onnx", allow_plaintext=False)


# Names that str.isdigit() (or int()) would take for a version number, and names that are
# plainly not one: each is skipped with a warning while the real versions still count.
ODD_NAMES = ["²", "٣", "03", "00", "1.5", "-1", "+2", " 4", "4 ", "1" * 40, "9" * 19, "latest"]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_version_folder_is_skipped_with_a_warning(
    tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    for real in ("1", "2"):
        (tmp_path / real).mkdir()
    (tmp_path / name).mkdir()
    with caplog.at_level(logging.WARNING, logger="forseti.core.repository.layout"):
        assert sorted(version_dirs(tmp_path)) == [1, 2]
    assert [r for r in caplog.records if repr(str(tmp_path / name)) in r.getMessage()]


def test_odd_version_folder_is_warned_about_once_not_on_every_scan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "²").mkdir()
    with caplog.at_level(logging.WARNING, logger="forseti.core.repository.layout"):
        for _ in range(5):
            assert sorted(version_dirs(tmp_path)) == [1]
    warned = [r for r in caplog.records if "²" in r.getMessage()]
    assert len(warned) == 1


@pytest.mark.parametrize(
    ("name", "number"),
    [("0", 0), ("1", 1), ("10", 10), ("999999999999999999", 999999999999999999)],
)
def test_version_names_are_ascii_digits_without_leading_zeros(name: str, number: int) -> None:
    assert parse_version_name(name) == number


@pytest.mark.parametrize("name", [*ODD_NAMES, "", "1\n", "\uff11"])
def test_anything_else_is_not_a_version_name(name: str) -> None:
    assert parse_version_name(name) is None


def test_version_zero_is_a_version(tmp_path: Path) -> None:
    for name in ("0", "1"):
        (tmp_path / name).mkdir()
    assert sorted(version_dirs(tmp_path)) == [0, 1]
