"""Triton's model-repository extension as its clients meet it: names refused before anything
happens (Triton's texts), an unknown model's load failure, and loads with a config override
or file overrides (in process, real gRPC, real onnxruntime)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto
from tritonclient.grpc.aio import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from testkit.model_builders import publish_sealed, write_config
from testkit.triton_models import add_sub_onnx, write_plain_model
from tests.inprocess_server import run_inprocess

SIMPLE = """
name: "simple"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
        { name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
         { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("triton_control")
    write_plain_model(root, "simple", SIMPLE, add_sub_onnx(TensorProto.FLOAT))
    return root


def _serve(repo: Path, body: Callable[..., Any], **options: Any) -> Any:
    return run_inprocess(repo, None, body, allow_plaintext=True, **options)


def _load_refusals(repo: Path, names: list[str]) -> list[InferenceServerException]:
    async def body(client, srv):
        refusals = []
        for name in names:
            with pytest.raises(InferenceServerException) as caught:
                await client.load_model(name)
            refusals.append(caught.value)
        return refusals

    return _serve(repo, body)


@pytest.mark.parametrize("name", ["", " ", "\t\n"])
def test_an_empty_model_name_is_refused_with_tritons_text(repo: Path, name: str) -> None:
    (refused,) = _load_refusals(repo, [name])
    assert refused.status() == "StatusCode.INVALID_ARGUMENT"
    assert "Model name cannot be empty. Please enter a valid name to deploy." in refused.message()


def test_path_traversal_names_are_refused_with_tritons_text(repo: Path) -> None:
    names = ["../etc", "a/../b", "..", " ..", "model/", "/etc/passwd"]
    for refused in _load_refusals(repo, names):
        assert "model name must not contain path traversal characters" in refused.message()


def test_an_unknown_but_valid_name_fails_to_poll(repo: Path) -> None:
    for refused in _load_refusals(repo, ["model123", "...", "..my_model"]):
        assert "path traversal" not in refused.message()
        assert "failed to poll from model repository" in refused.message()
        assert refused.message().startswith("failed to load")


def test_load_outside_explicit_mode_is_unavailable_with_tritons_text(repo: Path) -> None:
    async def body(client, srv):
        with pytest.raises(InferenceServerException) as caught:
            await client.load_model("simple")
        return caught.value

    refused = _serve(repo, body, control_mode="none")
    assert refused.status() == "StatusCode.UNAVAILABLE"
    assert refused.message().startswith(
        "explicit model load / unload is not allowed if polling is enabled"
    )


# ---- loads with parameters ------------------------------------------------------------------


def test_a_config_override_replaces_the_config_and_the_rest_is_completed(repo: Path) -> None:
    async def body(client, srv):
        await client.load_model("simple", config='{"max_batch_size":"16"}')
        overridden = (await client.get_model_config("simple")).config
        await client.load_model("simple")
        restored = (await client.get_model_config("simple")).config
        return overridden, restored

    overridden, restored = _serve(repo, body)
    assert overridden.max_batch_size == 16
    assert overridden.platform == "onnxruntime_onnx"
    assert [t.name for t in overridden.input] == ["INPUT0", "INPUT1"]
    assert list(overridden.input[0].dims) == [16]
    assert restored.max_batch_size == 8


def test_an_invalid_config_override_is_refused_and_the_model_keeps_serving(repo: Path) -> None:
    async def body(client, srv):
        await client.load_model("simple")
        with pytest.raises(InferenceServerException) as caught:
            await client.load_model("simple", config='"parameters": {"config": {{"x": 1}}}')
        return caught.value, await client.is_model_ready("simple")

    refused, still_ready = _serve(repo, body)
    assert refused.status() == "StatusCode.INVALID_ARGUMENT"
    assert refused.message().startswith("failed to load 'simple', Invalid config override")
    assert still_ready


def test_a_file_override_path_component_over_name_max_is_internal_as_in_triton(
    repo: Path,
) -> None:
    async def body(client, srv):
        with pytest.raises(InferenceServerException) as caught:
            await client.load_model("simple", config="{}", files={"file:" + "A" * 256: b"a"})
        return caught.value

    refused = _serve(repo, body)
    assert refused.status() == "StatusCode.INTERNAL"
    assert "failed to poll from model repository" in refused.message()


def test_file_overrides_are_refused_naming_how_to_publish(repo: Path) -> None:
    async def body(client, srv):
        with pytest.raises(InferenceServerException) as caught:
            await client.load_model("simple", config="{}", files={"file:1/model.onnx": b"x"})
        return caught.value, await client.is_model_ready("simple")

    refused, ready = _serve(repo, body)
    assert refused.status() == "StatusCode.INVALID_ARGUMENT"
    assert "file overrides" in refused.message() and "forseti publish" in refused.message()
    assert not ready


def test_statistics_of_a_version_that_is_not_ready_get_tritons_text(repo: Path) -> None:
    async def body(client, srv):
        await client.load_model("simple")
        with pytest.raises(InferenceServerException) as caught:
            await client.get_inference_statistics("simple", model_version="2")
        return caught.value

    refused = _serve(repo, body)
    assert refused.status() == "StatusCode.INVALID_ARGUMENT"
    assert "requested model version is not available for model 'simple'" in refused.message()


def test_a_deleted_config_is_replaced_by_the_completed_one_on_reload(tmp_path: Path) -> None:
    # As Triton's L0_lifecycle test_dynamic_file_delete: with its config gone, the model is
    # reloaded from the completed config, whose version policy (latest 1) keeps only v3.
    folder = write_plain_model(
        tmp_path,
        "simple",
        SIMPLE + "version_policy: { all {} }\n",
        add_sub_onnx(TensorProto.FLOAT),
    )
    (folder / "3").mkdir()
    (folder / "3" / "model.onnx").write_bytes((folder / "1" / "model.onnx").read_bytes())

    async def body(client, srv):
        before = [await client.is_model_ready("simple", v) for v in ("1", "3")]
        (folder / "config.pbtxt").unlink()
        await srv.registry.load_model("simple")
        after = [await client.is_model_ready("simple", v) for v in ("1", "3")]
        config = (await client.get_model_config("simple")).config
        return before, after, config

    before, after, config = _serve(tmp_path, body, load=["simple"])
    assert before == [True, True]
    assert after == [False, True]
    assert config.max_batch_size == 4 and [t.name for t in config.input] == ["INPUT0", "INPUT1"]


def test_labels_are_not_read_in_a_sealed_repository(tmp_path: Path, keyring) -> None:
    # The model manifest authenticates the config and the versions' files, not label files:
    # a sealed model answers value:index, so nobody without the key can change its labels.
    config = SIMPLE.replace(
        'name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] }',
        'name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] label_filename: "labels.txt" }',
    )
    write_config(tmp_path, "simple", config)
    (tmp_path / "simple" / "labels.txt").write_text("".join(f"x{i}\n" for i in range(16)))
    publish_sealed(tmp_path, "simple", add_sub_onnx(TensorProto.FLOAT), keyring, version=1)
    a = np.arange(16, dtype=np.float32).reshape(1, 16)

    async def body(client, srv):
        tensors = []
        for name in ("INPUT0", "INPUT1"):
            tensor = InferInput(name, [1, 16], "FP32")
            tensor.set_data_from_numpy(a)
            tensors.append(tensor)
        result = await client.infer(
            "simple", tensors, outputs=[InferRequestedOutput("OUTPUT0", class_count=1)]
        )
        return result.as_numpy("OUTPUT0")

    classes = run_inprocess(tmp_path, keyring, body, load=["simple"])
    assert classes[0][0].decode() == "30.000000:15"
