"""config.pbtxt parsing and checking (server/repository/config.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from forseti.core.errors import ModelLoadError
from forseti.core.repository.config import model_spec, parse_config_text, read_model_config
from testkit.model_builders import POLICY_CONFIG, SIMPLE_CONFIG


def test_policy_config_gives_batched_spec_with_typed_tensors() -> None:
    spec = model_spec(parse_config_text(POLICY_CONFIG, "policy"), "policy")
    assert spec.backend == "onnxruntime"
    assert spec.max_batch_size == 64
    assert spec.inputs["obs"].ttype.name == "FP32"
    assert spec.inputs["obs"].dims == (8,)
    assert spec.outputs["action"].ttype.name == "INT64"
    assert spec.artifact_filename == "model.onnx"


def test_platform_onnxruntime_onnx_selects_onnxruntime() -> None:
    spec = model_spec(parse_config_text(SIMPLE_CONFIG, "simple"), "simple")
    assert spec.backend == "onnxruntime"


def test_missing_name_is_filled_from_the_folder() -> None:
    config = parse_config_text(POLICY_CONFIG.replace('name: "policy"', ""), "policy")
    assert config.name == "policy"


def test_name_that_differs_from_folder_is_refused() -> None:
    with pytest.raises(ModelLoadError, match="does not match model folder"):
        model_spec(parse_config_text(POLICY_CONFIG, "policy"), "other")


def test_syntax_error_is_reported_with_position() -> None:
    with pytest.raises(ModelLoadError, match=r"invalid config.pbtxt at line \d+, column \d+"):
        parse_config_text("name: policy\nmax_batch_size: {", "policy")


def test_unknown_field_is_refused() -> None:
    with pytest.raises(ModelLoadError, match=r"invalid config\.pbtxt"):
        parse_config_text(POLICY_CONFIG + "\nnot_a_field: 3\n", "policy")


def test_unknown_platform_is_refused_naming_the_choices() -> None:
    text = POLICY_CONFIG.replace('backend: "onnxruntime"', 'platform: "pytorch_libtorch"')
    with pytest.raises(ModelLoadError, match="unsupported platform/backend 'pytorch_libtorch'"):
        model_spec(parse_config_text(text, "policy"), "policy")


def test_unsupported_tensor_types_are_refused() -> None:
    text = POLICY_CONFIG.replace("TYPE_FP32", "TYPE_BF16", 1)
    with pytest.raises(ModelLoadError, match="unsupported data_type TYPE_BF16"):
        model_spec(parse_config_text(text, "policy"), "policy")


def test_zero_dim_is_refused() -> None:
    text = POLICY_CONFIG.replace("dims: [ 8 ]", "dims: [ 0 ]")
    with pytest.raises(ModelLoadError, match="invalid dims"):
        model_spec(parse_config_text(text, "policy"), "policy")


def test_config_without_outputs_is_refused() -> None:
    text = 'name: "m" backend: "onnxruntime" input [ { name: "x" data_type: TYPE_FP32 dims: [1] } ]'
    with pytest.raises(ModelLoadError, match="no output"):
        model_spec(parse_config_text(text, "m"), "m")


def test_missing_config_file_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"missing config\.pbtxt"):
        read_model_config(tmp_path)


def test_default_model_filename_is_honoured() -> None:
    text = POLICY_CONFIG + '\ndefault_model_filename: "policy.onnx"\n'
    assert (
        model_spec(parse_config_text(text, "policy"), "policy").artifact_filename == "policy.onnx"
    )


def test_a_config_parse_error_reason_does_not_quote_the_config() -> None:
    """The reason reaches clients (RepositoryIndex); protobuf's message quotes the text."""
    with pytest.raises(ModelLoadError) as caught:
        parse_config_text('name: "m"\nhunter2_secret_field: 3\n', "m")
    assert "hunter2" not in caught.value.reason
    assert "line 2, column 1" in caught.value.reason and "error id" in caught.value.reason
