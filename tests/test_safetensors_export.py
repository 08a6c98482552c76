"""safetensors export of a policy description: stable names, metadata, lossless round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

from forseti.exporters.errors import ExportError
from forseti.exporters.policy_description import (
    PolicyDescription,
    describe_policy,
    evaluate,
    obs_normalization_from,
)
from forseti.exporters.safetensors_export import description_from_safetensors, export_safetensors


@pytest.fixture(scope="module")
def desc() -> PolicyDescription:
    venv = VecNormalize(make_vec_env("Pendulum-v1", n_envs=1, seed=0))
    venv.reset()
    for _ in range(20):
        venv.step(np.array([venv.action_space.sample()]))
    model = PPO("MlpPolicy", venv, seed=0, device="cpu", policy_kwargs={"net_arch": [16, 16]})
    return describe_policy(model, obs_normalization_from(venv))


def test_tensors_have_stable_names(desc: PolicyDescription) -> None:
    tensors = st_load(export_safetensors(desc))
    assert sorted(tensors) == sorted(
        [f"actor.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
        + [f"value.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
        + ["obs_normalization.mean", "obs_normalization.var", "action.low", "action.high"]
    )
    assert tensors["actor.0.weight"].shape == (16, 3) and tensors["actor.0.weight"].dtype == "f4"
    assert tensors["obs_normalization.mean"].dtype == np.float64


def test_metadata_describes_the_architecture(desc: PolicyDescription) -> None:
    data = export_safetensors(desc)
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    meta = header["__metadata__"]
    assert meta["format"] == "forseti.policy" and meta["algorithm"] == "PPO"
    assert json.loads(meta["actor_activations"]) == ["tanh", "tanh", "identity"]
    assert meta["action_transform"] == "clip" and meta["obs_dim"] == "3"
    assert "elu" in json.loads(meta["activation_semantics"])


def test_round_trip_gives_the_same_policy(desc: PolicyDescription) -> None:
    back = description_from_safetensors(export_safetensors(desc))
    obs = np.random.default_rng(0).uniform(-5, 5, (100, 3)).astype(np.float32)
    for name, value in evaluate(desc, obs).items():
        np.testing.assert_array_equal(evaluate(back, obs)[name], value)
    assert back.obs_normalization is not None and desc.obs_normalization is not None
    assert back.obs_normalization.epsilon == desc.obs_normalization.epsilon
    assert (back.algorithm, back.action_transform) == (desc.algorithm, desc.action_transform)


def test_a_foreign_safetensors_file_is_refused() -> None:
    data = st_save({"w": np.zeros(3, np.float32)}, metadata={"format": "pt"})
    with pytest.raises(ExportError, match="not a Forseti policy"):
        description_from_safetensors(data)


def test_a_missing_layer_tensor_is_reported(desc: PolicyDescription) -> None:
    data = export_safetensors(desc)
    tensors = st_load(data)
    del tensors["actor.1.bias"]
    meta = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    with pytest.raises(ExportError, match=r"actor\.1\.bias"):
        description_from_safetensors(st_save(tensors, metadata=meta))
