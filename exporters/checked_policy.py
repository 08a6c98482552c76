"""An SB3 model as a checked policy: its description, its ONNX export, and the parity check
that the export reproduces the model; the first step of every export, from a training run or
a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm

from .onnx_export import export_onnx
from .parity import ParityReport, check_parity, sample_observations
from .policy_description import PolicyDescription, describe_policy, obs_normalization_from


@dataclass(frozen=True)
class CheckedPolicy:
    description: PolicyDescription
    onnx: bytes
    parity: ParityReport
    # Observations sampled from the observation space, to check the policy's other formats on.
    samples: np.ndarray


def export_checked_policy(
    model: BaseAlgorithm,
    normalizer: Any,
    *,
    env_id: str,
    env_kwargs: dict[str, Any],
    n: int,
    seed: int,
) -> CheckedPolicy:
    """Describe ``model`` (behind its VecNormalize ``normalizer``, or None), export it to ONNX
    and check parity on ``n`` observations; raises ParityError when the export is wrong."""
    description = describe_policy(model, obs_normalization_from(normalizer))
    onnx_bytes = export_onnx(description)
    report = check_parity(
        onnx_bytes, model, normalizer, env_id=env_id, env_kwargs=env_kwargs, n=n, seed=seed
    )
    samples = sample_observations(model.observation_space, n, np.random.default_rng(seed))
    return CheckedPolicy(description, onnx_bytes, report, samples)
