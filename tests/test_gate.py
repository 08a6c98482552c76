"""The gate's episode player: lockstep batches give the returns of one-by-one play."""

from __future__ import annotations

import numpy as np
import pytest
from stable_baselines3 import PPO, SAC

from forseti.exporters.onnx_export import export_onnx
from forseti.exporters.policy_description import describe_policy
from forseti.trainer_sidecar.gate import Actor, onnx_actor, play_episodes


class Counting:
    """Counts the batched calls an actor receives."""

    def __init__(self, act: Actor) -> None:
        self.act, self.calls = act, 0

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        self.calls += 1
        return self.act(obs)


@pytest.fixture(scope="module")
def cartpole_actor() -> Actor:
    model = PPO("MlpPolicy", "CartPole-v1", device="cpu", seed=3)
    return onnx_actor(export_onnx(describe_policy(model)))


def test_lockstep_returns_equal_one_by_one_returns(cartpole_actor: Actor) -> None:
    one_by_one = play_episodes(cartpole_actor, "CartPole-v1", episodes=12, seed=50, batch=1)
    lockstep = play_episodes(cartpole_actor, "CartPole-v1", episodes=12, seed=50, batch=64)
    assert lockstep == one_by_one
    assert len(set(lockstep)) > 1  # different seeds, different episodes: a real comparison


def test_batches_smaller_than_the_episode_count_keep_seeds_in_order(cartpole_actor: Actor) -> None:
    whole = play_episodes(cartpole_actor, "CartPole-v1", episodes=10, seed=7, batch=64)
    split = play_episodes(cartpole_actor, "CartPole-v1", episodes=10, seed=7, batch=3)
    assert split == whole


def test_lockstep_makes_one_call_per_step_of_the_longest_episode(cartpole_actor: Actor) -> None:
    counted = Counting(cartpole_actor)
    returns = play_episodes(counted, "CartPole-v1", episodes=8, seed=0, batch=64)
    assert counted.calls == max(returns)  # CartPole pays 1 per step


def test_box_actions_play_pendulum_alike_in_both_modes() -> None:
    actor = onnx_actor(export_onnx(describe_policy(SAC("MlpPolicy", "Pendulum-v1", seed=1))))
    one_by_one = play_episodes(actor, "Pendulum-v1", episodes=3, seed=5, batch=1)
    lockstep = play_episodes(actor, "Pendulum-v1", episodes=3, seed=5, batch=64)
    assert np.allclose(lockstep, one_by_one)
