"""Parity: exported ONNX policies against the real SB3 models they come from (briefly trained,
with and without VecNormalize)."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from stable_baselines3 import A2C, DQN, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

from forseti.exporters.errors import ParityError
from forseti.exporters.onnx_export import export_onnx
from forseti.exporters.parity import SANE_BOUND, check_parity, sample_observations
from forseti.exporters.policy_description import describe_policy, obs_normalization_from

# SB3 models start from their initialisation (PPO's logits from a 0.01-gain layer, nearly
# flat); random perturbations give every layer real weight, without the seconds a training run
# costs on a shared 2-core machine.
WEIGHT_NOISE = 0.3
CASES = [
    (PPO, "CartPole-v1"),
    (PPO, "Pendulum-v1"),
    (A2C, "CartPole-v1"),
    (DQN, "CartPole-v1"),
    (SAC, "Pendulum-v1"),
    (TD3, "Pendulum-v1"),
]
PARAMS = [
    pytest.param(cls, env_id, normalize, id=f"{cls.__name__}-{env_id}-{tag}")
    for cls, env_id in CASES
    for normalize, tag in ((False, "raw"), (True, "vecnormalize"))
]

Trained = tuple[BaseAlgorithm, VecNormalize | None]


@pytest.fixture(scope="module")
def trained() -> Any:
    """Builds each (algorithm, env, normalised) model once per module."""
    cache: dict[tuple[type, str, bool], Trained] = {}

    def get(cls: type, env_id: str, normalize: bool) -> Trained:
        key = (cls, env_id, normalize)
        if key not in cache:
            venv = make_vec_env(env_id, n_envs=2, seed=0)
            if normalize:
                venv = VecNormalize(venv, norm_reward=False)
                venv.reset()
                venv.action_space.seed(0)
                for _ in range(64):  # random steps give VecNormalize real statistics
                    venv.step(np.array([venv.action_space.sample() for _ in range(2)]))
            model = cls("MlpPolicy", venv, seed=0, device="cpu", policy_kwargs={"net_arch": [32]})
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for param in model.policy.parameters():
                    param.add_(WEIGHT_NOISE * torch.randn(param.shape, generator=generator))
            cache[key] = (model, venv if normalize else None)
        return cache[key]

    return get


def _export(model: BaseAlgorithm, venv: VecNormalize | None) -> bytes:
    return export_onnx(describe_policy(model, obs_normalization_from(venv)))


@pytest.mark.parametrize(("cls", "env_id", "normalize"), PARAMS)
def test_exported_policy_matches_sb3_predict(
    trained: Any, cls: type, env_id: str, normalize: bool
) -> None:
    model, venv = trained(cls, env_id, normalize)
    if normalize:
        assert venv is not None and np.abs(venv.obs_rms.mean).max() > 0  # real statistics
    report = check_parity(_export(model, venv), model, venv, env_id=env_id, n=1000, seed=3)
    assert (report.n, report.n_sampled, report.n_visited) == (1000, 500, 500)
    assert report.mismatches == 0
    assert report.max_abs_error <= 1e-5 * 100  # values/logits use a relative tolerance
    assert report.errors.get("action", 0.0) <= 1e-5


def test_a_flipped_weight_fails_parity_naming_the_mismatch(trained: Any) -> None:
    model, venv = trained(PPO, "CartPole-v1", False)
    onnx_model = onnx.load_from_string(_export(model, venv))
    weight = next(t for t in onnx_model.graph.initializer if t.name.startswith("actor.0.weight"))
    values = numpy_helper.to_array(weight).copy()
    values[0, 2] = -values[0, 2] + 1.0
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    with pytest.raises(ParityError, match=r"parity check failed: \d+ of 1000 observations differ"):
        check_parity(onnx_model.SerializeToString(), model, venv, env_id="CartPole-v1")


def test_a_corrupted_box_policy_fails_parity_on_its_actions(trained: Any) -> None:
    model, venv = trained(SAC, "Pendulum-v1", False)
    onnx_model = onnx.load_from_string(_export(model, venv))
    bias = next(t for t in onnx_model.graph.initializer if t.name.startswith("actor.1.bias"))
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 1e-3, bias.name))
    with pytest.raises(ParityError, match="output 'action'"):
        check_parity(onnx_model.SerializeToString(), model, venv, n=200)


def test_an_export_missing_the_normalisation_fails_parity(trained: Any) -> None:
    model, venv = trained(PPO, "Pendulum-v1", True)
    without = export_onnx(describe_policy(model, None))
    with pytest.raises(ParityError, match="do not publish it"):
        check_parity(without, model, venv, env_id="Pendulum-v1")


def test_bytes_that_are_not_onnx_fail_parity(trained: Any) -> None:
    model, venv = trained(PPO, "CartPole-v1", False)
    with pytest.raises(ParityError, match="onnxruntime cannot load"):
        check_parity(b"not an onnx model", model, venv)


def test_normalisation_statistics_can_be_passed_instead_of_vecnormalize(trained: Any) -> None:
    model, venv = trained(DQN, "CartPole-v1", True)
    norm = obs_normalization_from(venv)
    report = check_parity(_export(model, venv), model, norm, n=300)
    assert report.mismatches == 0 and report.n == 300


def test_given_visited_states_replace_the_rollout(trained: Any) -> None:
    model, venv = trained(TD3, "Pendulum-v1", False)
    visited = np.tile(np.array([[1.0, 0.0, 0.5]], np.float32), (800, 1))
    report = check_parity(_export(model, venv), model, venv, visited=visited, n=1000)
    assert (report.n_sampled, report.n_visited) == (500, 500)


def test_without_env_or_visited_states_all_observations_are_sampled(trained: Any) -> None:
    model, venv = trained(A2C, "CartPole-v1", False)
    report = check_parity(_export(model, venv), model, venv, n=1000)
    assert (report.n_sampled, report.n_visited) == (1000, 0)


def test_huge_cartpole_bounds_are_sampled_within_the_sane_box() -> None:
    space = gym.make("CartPole-v1").observation_space
    obs = sample_observations(space, 2000, np.random.default_rng(0))
    assert np.isfinite(obs).all() and np.abs(obs).max() <= SANE_BOUND
    # Finite, modest bounds (cart position +-4.8, pole angle +-0.42 rad) are kept as they are.
    assert np.abs(obs[:, 0]).max() > 4.0 and np.abs(obs[:, 0]).max() <= 4.8
    assert np.abs(obs[:, 2]).max() <= space.high[2]
    assert np.abs(obs[:, 1]).max() > 9.0


def test_a_one_sided_infinite_bound_keeps_a_non_empty_box() -> None:
    low, high = np.array([-np.inf, 50], np.float32), np.array([-50, np.inf], np.float32)
    space = gym.spaces.Box(low, high, dtype=np.float32)
    obs = sample_observations(space, 500, np.random.default_rng(0))
    assert (obs[:, 0] >= -50 - 2 * SANE_BOUND).all() and (obs[:, 0] <= -50).all()
    assert (obs[:, 1] >= 50).all() and (obs[:, 1] <= 50 + 2 * SANE_BOUND).all()


class GridEnv(gym.Env):
    """Observations shaped [2, 3] (flattened by MlpPolicy), two actions."""

    observation_space = gym.spaces.Box(-1, 1, (2, 3), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        return self.observation_space.sample(), 0.0, False, False, {}


def test_a_two_dimensional_observation_is_served_flattened() -> None:
    model = DQN("MlpPolicy", GridEnv(), seed=0, device="cpu", policy_kwargs={"net_arch": [8]})
    desc = describe_policy(model)
    assert (desc.obs_dim, desc.obs_shape) == (6, (2, 3))
    report = check_parity(export_onnx(desc), model, None, n=200)
    assert report.mismatches == 0


def _flat_policy_export(second_bias: float) -> tuple[PPO, bytes]:
    """A CartPole policy whose logits are equal everywhere (SB3 picks action 0), exported with
    the second logit raised by ``second_bias`` (the export picks action 1)."""
    model = PPO("MlpPolicy", "CartPole-v1", device="cpu", seed=0)
    with torch.no_grad():
        model.policy.action_net.weight.zero_()
        model.policy.action_net.bias.zero_()
    description = describe_policy(model)
    description.actor[-1].bias[1] = np.float32(second_bias)
    return model, export_onnx(description)


def test_actions_that_differ_only_at_a_float_tie_pass_and_are_counted() -> None:
    model, onnx_bytes = _flat_policy_export(1e-9)
    report = check_parity(onnx_bytes, model, env_id="CartPole-v1", n=200)
    assert report.ties == 200
    assert report.mismatches == 0


def test_actions_that_differ_beyond_a_tie_still_fail() -> None:
    model, onnx_bytes = _flat_policy_export(1e-3)
    with pytest.raises(ParityError, match="200 of 200 observations differ"):
        check_parity(onnx_bytes, model, env_id="CartPole-v1", n=200)
