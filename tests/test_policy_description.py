"""PolicyDescription: SB3 MlpPolicy models (real, untrained) described as dense chains."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import A2C, DQN, PPO, SAC, TD3
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

from forseti.exporters.errors import ExportError
from forseti.exporters.policy_description import (
    ACTION,
    ACTION_ARGMAX,
    ACTION_CLIP,
    ACTION_SCALE,
    DenseLayer,
    IOSpec,
    ObsNormalization,
    PolicyDescription,
    describe_policy,
    evaluate,
    obs_normalization_from,
    policy_outputs,
)
from tests.sb3_policies import POLICY_CASE_IDS, POLICY_CASES


class SpacesEnv(gym.Env):
    """A gymnasium env with the given spaces and random observations, for policy shapes no
    registered env has (images, MultiDiscrete actions)."""

    def __init__(self, observation_space: gym.Space, action_space: gym.Space) -> None:
        self.observation_space = observation_space
        self.action_space = action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        return self.observation_space.sample(), 0.0, False, False, {}


def _obs(desc: PolicyDescription, n: int = 500) -> np.ndarray:
    return np.random.default_rng(1).uniform(-3, 3, (n, desc.obs_dim)).astype(np.float32)


@pytest.mark.parametrize(("cls", "env_id", "activation"), POLICY_CASES, ids=POLICY_CASE_IDS)
def test_description_reproduces_sb3_predict(cls: type, env_id: str, activation: type) -> None:
    model = cls(
        "MlpPolicy", env_id, seed=0, device="cpu", policy_kwargs={"activation_fn": activation}
    )
    desc = describe_policy(model)
    obs = _obs(desc)
    expected, _ = model.predict(obs, deterministic=True)
    got = evaluate(desc, obs)[ACTION]
    if desc.action_transform == ACTION_ARGMAX:
        np.testing.assert_array_equal(got.reshape(-1), expected)
    else:
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_actor_critic_description_has_value_head_and_logits() -> None:
    model = PPO("MlpPolicy", "CartPole-v1", seed=0, device="cpu", policy_kwargs={"net_arch": [16]})
    desc = describe_policy(model)
    assert desc.value is not None and desc.value[-1].out_features == 1
    assert [layer.activation for layer in desc.actor] == ["tanh", "identity"]
    assert desc.extra_output == "logits" and desc.n_actions == 2 and desc.obs_dim == 4


def test_sac_head_carries_the_tanh_and_scales_to_bounds() -> None:
    desc = describe_policy(SAC("MlpPolicy", "Pendulum-v1", seed=0, device="cpu"))
    assert desc.actor[-1].activation == "tanh"
    assert desc.action_transform == ACTION_SCALE
    np.testing.assert_array_equal(desc.action_low, np.array([-2.0], np.float32))
    assert desc.value is None and desc.extra_output is None


def test_ppo_box_policy_clips_to_bounds() -> None:
    desc = describe_policy(PPO("MlpPolicy", "Pendulum-v1", seed=0, device="cpu"))
    assert desc.action_transform == ACTION_CLIP and desc.action_dim == 1


def test_obs_normalization_matches_vecnormalize() -> None:
    venv = VecNormalize(make_vec_env("CartPole-v1", n_envs=2, seed=0), clip_obs=3.0)
    venv.reset()
    for _ in range(30):
        venv.step(np.array([venv.action_space.sample() for _ in range(2)]))
    norm = obs_normalization_from(venv)
    assert norm is not None and norm.clip == 3.0
    obs = np.random.default_rng(0).uniform(-5, 5, (100, 4)).astype(np.float32)
    np.testing.assert_array_equal(norm.apply(obs), venv.normalize_obs(obs))


def test_vecnormalize_without_obs_normalisation_gives_none() -> None:
    venv = VecNormalize(make_vec_env("CartPole-v1", n_envs=1, seed=0), norm_obs=False)
    assert obs_normalization_from(venv) is None


def test_cnn_policy_is_refused_naming_the_extractor() -> None:
    env = SpacesEnv(gym.spaces.Box(0, 255, (36, 36, 3), np.uint8), gym.spaces.Discrete(2))
    model = PPO("CnnPolicy", env, device="cpu", n_steps=16, batch_size=16)
    with pytest.raises(ExportError, match=r"NatureCNN.*FlattenExtractor"):
        describe_policy(model)


def test_multidiscrete_actions_are_refused() -> None:
    env = SpacesEnv(gym.spaces.Box(-1, 1, (3,), np.float32), gym.spaces.MultiDiscrete([2, 3]))
    model = PPO("MlpPolicy", env, device="cpu", n_steps=16, batch_size=16)
    with pytest.raises(ExportError, match="MultiDiscrete"):
        describe_policy(model)


def test_discrete_observations_are_refused() -> None:
    env = SpacesEnv(gym.spaces.Discrete(5), gym.spaces.Discrete(2))
    model = DQN("MlpPolicy", env, device="cpu")
    with pytest.raises(ExportError, match="observation space Discrete"):
        describe_policy(model)


def test_state_dependent_exploration_is_refused() -> None:
    model = PPO("MlpPolicy", "Pendulum-v1", use_sde=True, device="cpu")
    with pytest.raises(ExportError, match="use_sde"):
        describe_policy(model)


def test_unknown_activation_is_refused() -> None:
    kwargs = {"activation_fn": torch.nn.Softplus}
    model = PPO("MlpPolicy", "CartPole-v1", device="cpu", policy_kwargs=kwargs)
    with pytest.raises(ExportError, match="Softplus is not exportable"):
        describe_policy(model)


def test_non_default_leaky_relu_is_refused() -> None:
    class SteepLeakyReLU(torch.nn.LeakyReLU):
        def __init__(self) -> None:
            super().__init__(negative_slope=0.2)

    model = DQN(
        "MlpPolicy", "CartPole-v1", device="cpu", policy_kwargs={"activation_fn": SteepLeakyReLU}
    )
    with pytest.raises(ExportError, match=r"negative_slope=0.2"):
        describe_policy(model)


def _layer(n_in: int, n_out: int, activation: str = "identity") -> DenseLayer:
    return DenseLayer(np.zeros((n_out, n_in), np.float32), np.zeros(n_out, np.float32), activation)


def _discrete(actor: tuple[DenseLayer, ...], **changes: Any) -> PolicyDescription:
    fields: dict[str, Any] = dict(
        algorithm="DQN",
        obs_dim=4,
        action_space="discrete",
        n_actions=2,
        action_dim=None,
        action_low=None,
        action_high=None,
        action_transform=ACTION_ARGMAX,
        obs_normalization=None,
        actor=actor,
        value=None,
        extra_output="q_values",
    )
    fields.update(changes)
    return PolicyDescription(**fields)


def test_layers_that_do_not_chain_are_rejected() -> None:
    with pytest.raises(ExportError, match="actor layer 1"):
        _discrete((_layer(4, 8, "relu"), _layer(7, 2)))


def test_head_size_must_match_the_action_count() -> None:
    with pytest.raises(ExportError, match="3 outputs for 2 actions"):
        _discrete((_layer(4, 3),))


def test_normalization_statistics_must_match_obs_dim() -> None:
    norm = ObsNormalization(np.zeros(3), np.ones(3), 1e-8, 10.0)
    with pytest.raises(ExportError, match="obs_dim 4"):
        _discrete((_layer(4, 2),), obs_normalization=norm)


def test_outputs_of_a_discrete_actor_critic() -> None:
    desc = describe_policy(A2C("MlpPolicy", "CartPole-v1", seed=0, device="cpu"))
    assert policy_outputs(desc) == [
        IOSpec("action", "TYPE_INT64", (1,)),
        IOSpec("value", "TYPE_FP32", (1,)),
        IOSpec("logits", "TYPE_FP32", (2,)),
    ]


def test_outputs_of_a_box_policy() -> None:
    desc = describe_policy(TD3("MlpPolicy", "Pendulum-v1", seed=0, device="cpu"))
    assert policy_outputs(desc) == [IOSpec("action", "TYPE_FP32", (1,))]
