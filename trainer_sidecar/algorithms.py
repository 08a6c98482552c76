"""Turn a training spec into stable-baselines3 objects: the vectorised env and the model."""

from __future__ import annotations

import logging
from typing import Any

import stable_baselines3
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.utils import LinearSchedule
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecNormalize

from .spec import TrainingSpec

log = logging.getLogger(__name__)

_ACTIVATIONS: dict[str, type[torch.nn.Module]] = {
    "tanh": torch.nn.Tanh,
    "relu": torch.nn.ReLU,
    "elu": torch.nn.ELU,
    "leaky_relu": torch.nn.LeakyReLU,
    "silu": torch.nn.SiLU,
    "gelu": torch.nn.GELU,
}


def make_env(spec: TrainingSpec) -> VecEnv:
    """The vectorised training env (Monitor-wrapped, so episodes are counted), maybe normalised."""
    env_spec = spec.env
    vec_cls = SubprocVecEnv if env_spec.vectorization == "subprocess" else DummyVecEnv
    vec_kwargs = {"start_method": "forkserver"} if vec_cls is SubprocVecEnv else None
    env = make_vec_env(
        env_spec.id,
        n_envs=env_spec.n_envs,
        seed=spec.algorithm.seed,
        vec_env_cls=vec_cls,
        vec_env_kwargs=vec_kwargs,
        env_kwargs=dict(env_spec.kwargs),
    )
    if env_spec.normalize_observations:
        env = VecNormalize(env, norm_obs=True, norm_reward=False)
    return env


def vec_normalize_of(env: VecEnv) -> VecNormalize | None:
    """The VecNormalize wrapper in ``env``, if the spec asked for one."""
    return env if isinstance(env, VecNormalize) else None


def _policy_kwargs(spec: TrainingSpec) -> dict[str, Any]:
    algorithm = spec.algorithm
    kwargs: dict[str, Any] = {}
    if algorithm.net_arch is not None:
        kwargs["net_arch"] = list(algorithm.net_arch)
    if algorithm.activation is not None:
        kwargs["activation_fn"] = _ACTIVATIONS[algorithm.activation]
    return kwargs


def _hyperparameters(spec: TrainingSpec) -> dict[str, Any]:
    """SB3 keyword arguments; ``"lin_X"`` (the RL Zoo's notation) is a schedule from X to 0."""
    params: dict[str, Any] = {}
    for key, value in spec.algorithm.hyperparameters.items():
        if isinstance(value, str) and value.startswith("lin_"):
            value = LinearSchedule(float(value[4:]), 0.0, 1.0)
        elif isinstance(value, list):
            value = tuple(value)  # e.g. train_freq = [1, "episode"]
        params[key] = value
    return params


def build_model(spec: TrainingSpec, env: VecEnv) -> BaseAlgorithm:
    """A fresh SB3 model for ``spec`` on ``env`` (CPU, seeded)."""
    torch.set_num_threads(spec.algorithm.torch_threads)
    cls = getattr(stable_baselines3, spec.algorithm.name)
    model = cls(
        spec.algorithm.policy,
        env,
        seed=spec.algorithm.seed,
        device="cpu",
        verbose=0,
        policy_kwargs=_policy_kwargs(spec) or None,
        **_hyperparameters(spec),
    )
    log.info(
        "model built",
        extra={"algorithm": spec.algorithm.name, "env": spec.env.id, "n_envs": spec.env.n_envs},
    )
    return model


def pin_schedule(model: BaseAlgorithm, total_timesteps: int) -> None:
    """Keep learning-rate and exploration schedules relative to the whole run.

    Each chunked ``learn`` call would otherwise compute schedule progress against its own end.
    """
    original = model._update_current_progress_remaining
    run_total = total_timesteps

    # The same parameters as the method it replaces; the chunk's own total is not used.
    def update(num_timesteps: int, total_timesteps: int) -> None:
        original(num_timesteps, run_total)

    model._update_current_progress_remaining = update  # type: ignore[method-assign]
