"""Every SB3 algorithm the exporters handle, each with another activation, as test cases."""

from __future__ import annotations

import torch
from stable_baselines3 import A2C, DQN, PPO, SAC, TD3

# (algorithm, env id, activation): discrete and Box actions, all five algorithms, six activations.
POLICY_CASES = [
    (PPO, "CartPole-v1", torch.nn.Tanh),
    (PPO, "Pendulum-v1", torch.nn.ReLU),
    (A2C, "CartPole-v1", torch.nn.ELU),
    (DQN, "CartPole-v1", torch.nn.LeakyReLU),
    (SAC, "Pendulum-v1", torch.nn.SiLU),
    (TD3, "Pendulum-v1", torch.nn.GELU),
]
POLICY_CASE_IDS = [f"{cls.__name__}-{env}-{act.__name__}" for cls, env, act in POLICY_CASES]
