"""Repository layout and version policy (server/repository/layout.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from forseti.core.errors import ModelLoadError
from forseti.core.repository.layout import (
    find_artifact,
    list_models,
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
