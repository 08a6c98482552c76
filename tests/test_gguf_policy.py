"""GGUF policy export: real (untrained) SB3 policies written as GGUF, read back with
gguf.GGUFReader and the server's loader, and compared with the ONNX export of the same policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from stable_baselines3 import PPO, SAC
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

from forseti.core.gguf import policy_format as fmt
from forseti.core.gguf.reader import load_policy
from forseti.exporters.errors import ExportError
from forseti.exporters.gguf_policy import export_gguf
from forseti.exporters.onnx_export import export_onnx
from forseti.exporters.parity import sample_observations
from forseti.exporters.policy_description import (
    PolicyDescription,
    describe_policy,
    obs_normalization_from,
)
from tests.sb3_policies import POLICY_CASE_IDS, POLICY_CASES


def _describe(cls: type, env_id: str, activation: type) -> tuple[PolicyDescription, object]:
    model = cls(
        "MlpPolicy", env_id, seed=0, device="cpu", policy_kwargs={"activation_fn": activation}
    )
    return describe_policy(model), model.observation_space


def _onnx_outputs(desc: PolicyDescription, obs: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(export_onnx(desc), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"obs": obs}), strict=True))


def _gguf_outputs(blob: bytes, names: list[str], obs: np.ndarray) -> dict[str, np.ndarray]:
    return dict(zip(names, load_policy(blob).forward(obs, names), strict=True))


def _fields(blob: bytes, tmp_path: Path) -> tuple[dict[str, object], dict[str, tuple]]:
    path = tmp_path / "policy.gguf"
    path.write_bytes(blob)
    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {
        t.name: (t.tensor_type, tuple(int(d) for d in reversed(t.shape.tolist())))
        for t in reader.tensors
    }
    return fields, tensors


@pytest.mark.parametrize(("cls", "env_id", "activation"), POLICY_CASES, ids=POLICY_CASE_IDS)
def test_f32_gguf_matches_onnx_within_1e_5(cls: type, env_id: str, activation: type) -> None:
    desc, space = _describe(cls, env_id, activation)
    obs = sample_observations(space, 1000, np.random.default_rng(0))
    expected = _onnx_outputs(desc, obs)

    got = _gguf_outputs(export_gguf(desc, weight_type="f32"), list(expected), obs)

    for name, want in expected.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        if want.dtype == np.int64:
            np.testing.assert_array_equal(got[name], want, err_msg=name)
        else:
            np.testing.assert_allclose(got[name], want, atol=1e-5, rtol=0, err_msg=name)


def test_normalised_policy_matches_onnx(tmp_path: Path) -> None:
    venv = VecNormalize(make_vec_env("Pendulum-v1", n_envs=1, seed=0))
    venv.reset()
    for _ in range(50):
        venv.step(np.array([venv.action_space.sample()]))  # real statistics, not the defaults
    model = PPO("MlpPolicy", venv, seed=0, device="cpu")
    desc = describe_policy(model, obs_normalization_from(venv))
    obs = sample_observations(model.observation_space, 1000, np.random.default_rng(1))
    expected = _onnx_outputs(desc, obs)

    blob = export_gguf(desc)
    got = _gguf_outputs(blob, list(expected), obs)

    for name, want in expected.items():
        np.testing.assert_allclose(got[name], want, atol=1e-5, rtol=0, err_msg=name)
    fields, tensors = _fields(blob, tmp_path)
    assert fields[fmt.K_OBS_NORMALIZATION] is True
    assert fields[fmt.K_OBS_NORM_CLIP] == pytest.approx(venv.clip_obs)
    assert tensors[fmt.OBS_MEAN] == (GGMLQuantizationType.F32, (3,))
    assert tensors[fmt.OBS_STD] == (GGMLQuantizationType.F32, (3,))


def test_metadata_fully_describes_a_discrete_policy(tmp_path: Path) -> None:
    model = PPO("MlpPolicy", "CartPole-v1", seed=0, device="cpu", policy_kwargs={"net_arch": [32]})
    desc = describe_policy(model)

    fields, tensors = _fields(export_gguf(desc), tmp_path)

    assert fields["general.architecture"] == fmt.ARCHITECTURE
    assert fields[fmt.K_FORMAT_VERSION] == fmt.FORMAT_VERSION
    assert fields[fmt.K_ALGORITHM] == "PPO"
    assert fields[fmt.K_OBS_DIM] == 4
    assert fields[fmt.K_ACTION_SPACE] == "discrete"
    assert fields[fmt.K_ACTION_TRANSFORM] == "argmax"
    assert fields[fmt.K_N_ACTIONS] == 2
    assert fields[fmt.K_ACTOR_LAYERS] == 2
    assert fields[fmt.K_ACTOR_ACTIVATIONS] == ["tanh", "identity"]
    assert fields[fmt.K_VALUE_LAYERS] == 2
    assert fields[fmt.K_INPUT_NAME] == "obs"
    assert fields[fmt.K_OUTPUT_NAMES] == ["action", "value", "logits"]
    assert fields[fmt.K_EXTRA_OUTPUT] == "logits"
    assert tensors["actor.0.weight"] == (GGMLQuantizationType.F32, (32, 4))
    assert tensors["actor.1.weight"] == (GGMLQuantizationType.F32, (2, 32))
    assert tensors["value.1.bias"] == (GGMLQuantizationType.F32, (1,))


def test_metadata_carries_box_bounds(tmp_path: Path) -> None:
    desc, _ = _describe(SAC, "Pendulum-v1", torch.nn.ReLU)

    fields, _ = _fields(export_gguf(desc), tmp_path)

    assert fields[fmt.K_ACTION_SPACE] == "box"
    assert fields[fmt.K_ACTION_TRANSFORM] == "scale"
    assert fields[fmt.K_ACTION_DIM] == 1
    assert fields[fmt.K_ACTION_LOW] == [-2.0]
    assert fields[fmt.K_ACTION_HIGH] == [2.0]
    assert fmt.K_VALUE_ACTIVATIONS not in fields and fields[fmt.K_VALUE_LAYERS] == 0


def test_q8_0_quantises_wide_weights_and_keeps_biases_f32(tmp_path: Path) -> None:
    model = PPO("MlpPolicy", "CartPole-v1", seed=0, device="cpu")  # 4 -> 64 -> 64 -> 2
    desc = describe_policy(model)

    fields, tensors = _fields(export_gguf(desc, weight_type="Q8_0"), tmp_path)

    assert fields[fmt.K_WEIGHT_TYPE] == "q8_0"
    assert tensors["actor.0.weight"][0] == GGMLQuantizationType.F16  # rows of 4: no Q8_0 block
    assert tensors["actor.1.weight"][0] == GGMLQuantizationType.Q8_0
    assert tensors["actor.2.weight"][0] == GGMLQuantizationType.Q8_0
    assert all(t == GGMLQuantizationType.F32 for n, (t, _) in tensors.items() if "bias" in n)


@pytest.mark.parametrize(("weight_type", "atol"), [("f16", 5e-3), ("q8_0", 5e-2)])
def test_reduced_precision_outputs_stay_close_to_onnx(weight_type: str, atol: float) -> None:
    # Action agreement on 1,000+ observations is checked through the server with a trained
    # policy (tests/test_gguf_backend.py); untrained networks sit near ties everywhere.
    desc, space = _describe(PPO, "Pendulum-v1", torch.nn.Tanh)
    obs = sample_observations(space, 1000, np.random.default_rng(2))
    expected = _onnx_outputs(desc, obs)

    got = _gguf_outputs(export_gguf(desc, weight_type=weight_type), list(expected), obs)

    for name in ("action", "value"):
        err = float(np.abs(got[name] - expected[name]).max())
        assert 0 < err < atol, f"{name}: max abs error {err}"


def test_unknown_weight_type_is_refused() -> None:
    desc, _ = _describe(PPO, "CartPole-v1", torch.nn.Tanh)

    with pytest.raises(ExportError, match="weight_type must be one of f32, f16, q8_0"):
        export_gguf(desc, weight_type="q4_0")
