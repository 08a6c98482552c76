"""onnxruntime backend: providers, instances, signature checks (server/backends/...)."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from forseti.core.errors import ModelLoadError
from forseti.core.repository.config import model_spec, parse_config_text
from forseti.server.backends.onnxruntime_backend import (
    OnnxRuntimeBackend,
    choose_providers,
    instance_count,
)
from forseti.server.registry.warmup import warm_up
from testkit.model_builders import POLICY_CONFIG, policy_onnx

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"


def config(extra: str = "") -> mc.ModelConfig:
    return text_format.Parse(POLICY_CONFIG + extra, mc.ModelConfig())


def test_cpu_only_build_uses_cpu() -> None:
    assert choose_providers(config(), [CPU]) == [CPU]


def test_auto_kind_prefers_cuda_when_present() -> None:
    assert choose_providers(config(), [TRT, CUDA, CPU]) == [CUDA, CPU]


def test_kind_cpu_never_uses_a_gpu() -> None:
    cfg = config("instance_group [ { kind: KIND_CPU } ]")
    assert choose_providers(cfg, [TRT, CUDA, CPU]) == [CPU]


def test_tensorrt_accelerator_puts_tensorrt_first() -> None:
    cfg = config(
        "optimization { execution_accelerators { "
        'gpu_execution_accelerator : [ { name : "tensorrt" } ] } }'
    )
    assert choose_providers(cfg, [TRT, CUDA, CPU]) == [TRT, CUDA, CPU]


def test_kind_gpu_without_a_gpu_provider_is_a_clear_load_error() -> None:
    cfg = config("instance_group [ { kind: KIND_GPU } ]")
    with pytest.raises(ModelLoadError, match="KIND_GPU"):
        choose_providers(cfg, [CPU])


def test_instance_count_sums_groups_and_defaults_to_one() -> None:
    assert instance_count(config()) == 1
    cfg = config("instance_group [ { kind: KIND_CPU count: 2 }, { kind: KIND_CPU count: 3 } ]")
    assert instance_count(cfg) == 5


def test_backend_builds_one_session_per_instance_and_runs() -> None:
    cfg = POLICY_CONFIG + "instance_group [ { kind: KIND_CPU count: 3 } ]"
    spec = model_spec(parse_config_text(cfg, "policy"), "policy")
    backend = OnnxRuntimeBackend(spec, policy_onnx(2))
    assert backend.instance_count == 3
    assert len(backend._sessions) == 3
    action, logits = backend.run({"obs": np.zeros((5, 8), np.float32)}, ["action", "logits"])
    assert action.shape == (5, 1)
    assert (action == 2).all()
    assert logits.dtype == np.float32


def test_model_whose_input_dim_disagrees_with_config_is_refused() -> None:
    spec = model_spec(
        parse_config_text(POLICY_CONFIG.replace("[ 8 ]", "[ 6 ]"), "policy"), "policy"
    )
    with pytest.raises(ModelLoadError, match="input 'obs'"):
        OnnxRuntimeBackend(spec, policy_onnx(1))


def test_model_whose_output_type_disagrees_with_config_is_refused() -> None:
    text = POLICY_CONFIG.replace("TYPE_INT64", "TYPE_INT32")
    spec = model_spec(parse_config_text(text, "policy"), "policy")
    with pytest.raises(ModelLoadError, match="output 'action': config says INT32, model has INT64"):
        OnnxRuntimeBackend(spec, policy_onnx(1))


def test_bytes_that_are_not_onnx_are_a_load_error() -> None:
    spec = model_spec(parse_config_text(POLICY_CONFIG, "policy"), "policy")
    with pytest.raises(ModelLoadError, match="onnxruntime could not load"):
        OnnxRuntimeBackend(spec, b"definitely not a model")


def test_warm_up_runs_batch_one_and_max_batch_and_returns_a_time() -> None:
    spec = model_spec(parse_config_text(POLICY_CONFIG, "policy"), "policy")
    assert warm_up(spec, OnnxRuntimeBackend(spec, policy_onnx(1))) > 0
