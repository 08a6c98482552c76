"""ONNX export: graphs built from policy descriptions, run in onnxruntime."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from stable_baselines3 import PPO

from forseti.exporters.errors import ExportError
from forseti.exporters.onnx_export import export_onnx, onnx_outputs
from forseti.exporters.policy_description import (
    ACTIVATIONS,
    DenseLayer,
    ObsNormalization,
    PolicyDescription,
    describe_policy,
    evaluate,
)

RNG = np.random.default_rng(7)


def _layer(n_in: int, n_out: int, activation: str = "identity") -> DenseLayer:
    weight = RNG.standard_normal((n_out, n_in)).astype(np.float32)
    return DenseLayer(weight, RNG.standard_normal(n_out).astype(np.float32), activation)


def _desc(**changes: Any) -> PolicyDescription:
    """A discrete actor-critic over 5 observations with normalisation."""
    fields: dict[str, Any] = dict(
        algorithm="PPO",
        obs_dim=5,
        action_space="discrete",
        n_actions=3,
        action_dim=None,
        action_low=None,
        action_high=None,
        action_transform="argmax",
        obs_normalization=ObsNormalization(
            mean=RNG.standard_normal(5), var=RNG.uniform(0.1, 4, 5), epsilon=1e-8, clip=5.0
        ),
        actor=(_layer(5, 16, "tanh"), _layer(16, 3)),
        value=(_layer(5, 16, "tanh"), _layer(16, 1)),
        extra_output="logits",
    )
    fields.update(changes)
    return PolicyDescription(**fields)


def _box_desc(transform: str) -> PolicyDescription:
    last = "tanh" if transform == "scale" else "identity"
    return _desc(
        algorithm="SAC",
        action_space="box",
        n_actions=None,
        action_dim=2,
        action_low=np.array([-2.0, 0.0], np.float32),
        action_high=np.array([2.0, 10.0], np.float32),
        action_transform=transform,
        actor=(_layer(5, 8, "relu"), _layer(8, 2, last)),
        value=None,
        extra_output=None,
    )


def _run(data: bytes, obs: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"obs": obs}), strict=True))


def _obs(n: int, dim: int = 5) -> np.ndarray:
    return RNG.uniform(-4, 4, (n, dim)).astype(np.float32)


def test_graph_passes_the_full_onnx_check_with_a_dynamic_batch_dimension() -> None:
    model = onnx.load_from_string(export_onnx(_desc()))
    onnx.checker.check_model(model, full_check=True)
    for tensor in [*model.graph.input, *model.graph.output]:
        first = tensor.type.tensor_type.shape.dim[0]
        assert first.dim_param == "batch" and not first.HasField("dim_value")


def test_batch_of_1_and_of_64_give_the_same_rows() -> None:
    data = export_onnx(_desc())
    obs = _obs(64)
    batch = _run(data, obs)
    for i in (0, 31, 63):
        single = _run(data, obs[i : i + 1])
        for name, value in single.items():
            assert value.shape[0] == 1
            np.testing.assert_array_equal(value[0], batch[name][i])


def test_outputs_have_the_declared_names_types_and_dims() -> None:
    desc = _desc()
    out = _run(export_onnx(desc), _obs(10))
    specs = onnx_outputs(desc)
    assert list(out) == [spec.name for spec in specs] == ["action", "value", "logits"]
    types = {"TYPE_INT64": np.int64, "TYPE_FP32": np.float32}
    for spec in specs:
        assert out[spec.name].dtype == types[spec.data_type]
        assert out[spec.name].shape == (10, *spec.dims)


def test_discrete_graph_matches_the_numpy_reference_with_normalisation_inside() -> None:
    desc = _desc()
    obs = _obs(500)
    got, want = _run(export_onnx(desc), obs), evaluate(desc, obs)
    np.testing.assert_array_equal(got["action"], want["action"])
    np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(got["value"], want["value"], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("transform", ["clip", "scale"])
def test_box_actions_stay_within_bounds_and_match_the_reference(transform: str) -> None:
    desc = _box_desc(transform)
    obs = _obs(500)
    got = _run(export_onnx(desc), obs)["action"]
    assert (got >= desc.action_low).all() and (got <= desc.action_high).all()
    np.testing.assert_allclose(got, evaluate(desc, obs)["action"], atol=1e-5, rtol=0)


def test_clip_transform_reaches_both_bounds() -> None:
    got = _run(export_onnx(_box_desc("clip")), _obs(500) * 10)["action"]
    assert got.min(axis=0).tolist() == [-2.0, 0.0] and got.max(axis=0).tolist() == [2.0, 10.0]


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_each_activation_matches_its_definition(activation: str) -> None:
    desc = _desc(
        actor=(_layer(5, 16, activation), _layer(16, 3)),
        value=(_layer(5, 4, activation), _layer(4, 1, activation)),
    )
    obs = _obs(200)
    got, want = _run(export_onnx(desc), obs), evaluate(desc, obs)
    np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(got["value"], want["value"], atol=1e-4, rtol=1e-5)


def test_sb3_policy_graph_carries_its_contract_as_metadata() -> None:
    model = PPO("MlpPolicy", "Pendulum-v1", seed=0, device="cpu")
    onnx_model = onnx.load_from_string(export_onnx(describe_policy(model)))
    props = {p.key: p.value for p in onnx_model.metadata_props}
    assert props["forseti.algorithm"] == "PPO"
    assert props["forseti.action_transform"] == "clip"
    assert props["forseti.action_low"] == "[-2.0]"
    assert onnx_model.producer_name == "forseti"


def test_too_old_opset_is_refused() -> None:
    with pytest.raises(ExportError, match="opset 11"):
        export_onnx(_desc(), opset=11)
