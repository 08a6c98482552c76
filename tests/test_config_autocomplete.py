"""Config auto-complete for ONNX models (Triton's default), on the functions and on a real
onnxruntime backend built from the completed spec."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto
from tritonclient.grpc import model_config_pb2 as mc

from forseti.core.repository.config import model_spec, parse_config_text
from forseti.server.backends.onnx_external_data import parse_model
from forseti.server.backends.onnxruntime_backend import OnnxRuntimeBackend
from forseti.server.registry.autocomplete import (
    complete_from_onnx,
    complete_platform,
    complete_spec,
)
from testkit.triton_models import add_sub_onnx, identity_onnx


def _empty(name: str = "m") -> mc.ModelConfig:
    return parse_config_text("", name)


def test_the_platform_is_found_from_the_artifacts_name() -> None:
    config = _empty()
    complete_platform(config, ["model.onnx.sealed"])
    assert config.platform == "onnxruntime_onnx"


def test_a_stated_backend_is_kept() -> None:
    config = parse_config_text('backend: "gguf"', "m")
    complete_platform(config, ["model.onnx"])
    assert config.platform == "" and config.backend == "gguf"


def test_a_model_that_can_batch_gets_max_batch_size_4_and_dynamic_batching() -> None:
    config = complete_from_onnx(_empty(), parse_model(add_sub_onnx(TensorProto.FLOAT)))
    assert config.max_batch_size == 4 and config.HasField("dynamic_batching")
    assert [(t.name, list(t.dims), t.data_type) for t in config.input] == [
        ("INPUT0", [16], mc.TYPE_FP32),
        ("INPUT1", [16], mc.TYPE_FP32),
    ]
    assert [t.name for t in config.output] == ["OUTPUT0", "OUTPUT1"]


def test_a_fixed_first_dimension_is_not_a_batch() -> None:
    model = parse_model(add_sub_onnx(TensorProto.INT32, dims=(3, 16)))
    config = complete_from_onnx(_empty(), model)
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [3, 16]


def test_declared_full_rank_dims_keep_max_batch_size_0() -> None:
    text = 'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1, 16 ] } ]'
    config = complete_from_onnx(parse_config_text(text, "m"), parse_model(add_sub_onnx()))
    assert config.max_batch_size == 0
    assert [t.name for t in config.output] == ["OUTPUT0", "OUTPUT1"]


def test_a_batch_of_single_values_is_declared_as_1_reshaped_to_none() -> None:
    model = parse_model(identity_onnx([("x", "y", TensorProto.FLOAT, ["batch"])]))
    config = complete_from_onnx(_empty(), model)
    assert config.max_batch_size == 4
    assert list(config.input[0].dims) == [1] and config.input[0].HasField("reshape")
    assert list(config.input[0].reshape.shape) == []


def test_the_completed_spec_serves_on_onnxruntime() -> None:
    config = _empty()
    complete_platform(config, ["model.onnx"])
    spec = model_spec(config, "m", complete_later=True)
    model = identity_onnx([("x", "y", TensorProto.FLOAT, ["batch"])])
    completed = complete_spec(spec, model)
    assert list(completed.inputs) == ["x"] and completed.max_batch_size == 4
    backend = OnnxRuntimeBackend(completed, model)
    (y,) = backend.run({"x": np.array([[1.5], [2.5]], np.float32)}, ["y"])
    assert y.shape == (2, 1) and y.ravel().tolist() == [1.5, 2.5]


def test_a_complete_config_is_left_as_it_is() -> None:
    text = (
        'platform: "onnxruntime_onnx" max_batch_size: 8 '
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [] } } ] '
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [] } } ]'
    )
    spec = model_spec(parse_config_text(text, "m"), "m")
    model = identity_onnx([("x", "y", TensorProto.FLOAT, ["batch"])])
    assert complete_spec(spec, model) is spec
