"""Policy config.pbtxt: built from a description, read back by the server's own parser."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from forseti.core.repository.config import model_spec, parameter, parse_config_text
from forseti.exporters.errors import ExportError
from forseti.exporters.model_config import policy_config_text
from forseti.exporters.onnx_export import export_onnx
from forseti.exporters.policy_description import DenseLayer, PolicyDescription
from forseti.server.backends.onnxruntime_backend import OnnxRuntimeBackend

RNG = np.random.default_rng(3)
RUN_PARAMS = {"env_id": "CartPole-v1", "run_id": "run-42", "spec_hash": "ab12"}


def _layer(n_in: int, n_out: int, activation: str = "identity") -> DenseLayer:
    weight = RNG.standard_normal((n_out, n_in)).astype(np.float32)
    return DenseLayer(weight, np.zeros(n_out, np.float32), activation)


def _discrete() -> PolicyDescription:
    return PolicyDescription(
        algorithm="PPO",
        obs_dim=4,
        action_space="discrete",
        n_actions=2,
        action_dim=None,
        action_low=None,
        action_high=None,
        action_transform="argmax",
        obs_normalization=None,
        actor=(_layer(4, 8, "tanh"), _layer(8, 2)),
        value=(_layer(4, 8, "tanh"), _layer(8, 1)),
        extra_output="logits",
    )


def _box() -> PolicyDescription:
    return PolicyDescription(
        algorithm="SAC",
        obs_dim=3,
        action_space="box",
        n_actions=None,
        action_dim=1,
        action_low=np.array([-2.0], np.float32),
        action_high=np.array([2.0], np.float32),
        action_transform="scale",
        obs_normalization=None,
        actor=(_layer(3, 8, "relu"), _layer(8, 1, "tanh")),
        value=None,
        extra_output=None,
    )


def _spec_of(text: str, name: str = "cartpole_policy") -> Any:
    return model_spec(parse_config_text(text, name), name)


def test_discrete_config_round_trips_through_the_server_parser() -> None:
    text = policy_config_text(
        "cartpole_policy", _discrete(), max_batch_size=64, parameters=RUN_PARAMS
    )
    spec = _spec_of(text)
    assert spec.backend == "onnxruntime" and spec.max_batch_size == 64
    assert spec.artifact_filename == "model.onnx"
    assert {n: (t.ttype.name, t.dims) for n, t in spec.inputs.items()} == {"obs": ("FP32", (4,))}
    outputs = {n: (t.ttype.name, t.dims) for n, t in spec.outputs.items()}
    assert outputs == {"action": ("INT64", (1,)), "value": ("FP32", (1,)), "logits": ("FP32", (2,))}
    assert spec.config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU


def test_parameters_record_the_run_and_the_action_space() -> None:
    text = policy_config_text(
        "cartpole_policy", _discrete(), max_batch_size=8, parameters=RUN_PARAMS
    )
    config = parse_config_text(text, "cartpole_policy")
    assert parameter(config, "env_id") == "CartPole-v1"
    assert parameter(config, "run_id") == "run-42"
    assert parameter(config, "algorithm") == "PPO"
    assert parameter(config, "action_space") == "discrete"
    assert parameter(config, "n_actions") == "2"
    assert parameter(config, "obs_dim") == "4"


def test_box_config_records_bounds_and_float_actions() -> None:
    text = policy_config_text("pendulum", _box(), max_batch_size=16, parameters={})
    spec = _spec_of(text, "pendulum")
    assert spec.outputs["action"].ttype.name == "FP32" and spec.outputs["action"].dims == (1,)
    assert json.loads(parameter(spec.config, "action_low") or "") == [-2.0]
    assert json.loads(parameter(spec.config, "action_high") or "") == [2.0]
    assert parameter(spec.config, "action_transform") == "scale"


def test_gguf_backend_is_named_as_a_backend() -> None:
    text = policy_config_text("pendulum", _box(), max_batch_size=4, parameters={}, backend="gguf")
    spec = _spec_of(text, "pendulum")
    assert spec.backend == "gguf" and spec.artifact_filename == "model.gguf"
    assert not spec.config.platform


def test_dynamic_batching_is_declared_only_when_asked() -> None:
    plain = policy_config_text("m", _box(), max_batch_size=4, parameters={})
    batched = policy_config_text(
        "m", _box(), max_batch_size=4, parameters={}, dynamic_batching=True
    )
    assert not _spec_of(plain, "m").config.HasField("dynamic_batching")
    assert _spec_of(batched, "m").config.HasField("dynamic_batching")


def test_a_parameter_that_contradicts_the_policy_is_refused() -> None:
    with pytest.raises(ExportError, match="'algorithm'='DQN' contradicts"):
        policy_config_text("m", _discrete(), max_batch_size=4, parameters={"algorithm": "DQN"})


def test_an_unbatched_policy_config_is_refused() -> None:
    with pytest.raises(ExportError, match="max_batch_size must be >= 1"):
        policy_config_text("m", _discrete(), max_batch_size=0, parameters={})


@pytest.mark.parametrize("make", [_discrete, _box], ids=["discrete", "box"])
def test_config_and_exported_graph_agree_in_the_server_backend(make: Any) -> None:
    desc = make()
    spec = _spec_of(policy_config_text("m", desc, max_batch_size=32, parameters={}), "m")
    backend = OnnxRuntimeBackend(spec, export_onnx(desc))  # checks the graph's signature
    try:
        obs = RNG.standard_normal((32, desc.obs_dim)).astype(np.float32)
        outputs = backend.run({"obs": obs}, list(spec.outputs))
        for out, tensor in zip(outputs, spec.outputs.values(), strict=True):
            assert out.shape == (32, *tensor.dims)
            assert out.dtype == tensor.ttype.dtype
    finally:
        backend.close()
