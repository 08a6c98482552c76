"""Output parity: an exported ONNX policy against the SB3 policy it came from.

ONNX Runtime gets raw observations (the graph normalises them itself); SB3 gets them normalised
the way VecNormalize does, through ``model.predict(deterministic=True)``, and its own torch
modules for the value and the logits / Q-values. Nothing is published unless they agree.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from .errors import ParityError
from .policy_description import (
    ACTION,
    EXTRA_LOGITS,
    EXTRA_Q_VALUES,
    VALUE,
    ObsNormalization,
    obs_normalization_from,
)

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm

log = logging.getLogger(__name__)

# Observation-space bounds beyond HUGE_BOUND (CartPole's velocities are +-3.4e38, many MuJoCo
# spaces are +-inf) are replaced by +-SANE_BOUND when sampling: uniform draws over +-3.4e38 are
# states no env produces and overflow the MLP to inf/NaN, where agreement means nothing.
SANE_BOUND = 10.0
HUGE_BOUND = 1e4
ACTION_ATOL = 1e-5
# Values, logits and Q-values are unbounded: the tolerance is ATOL * max(1, |reference|), since
# float32 carries ~7 significant digits (one ulp at 100 is already 7.6e-6).
OUTPUT_ATOL = 1e-5


@dataclass(frozen=True)
class ParityReport:
    """What the parity check compared and how close it was."""

    n: int  # observations compared
    n_sampled: int  # drawn from the observation space
    n_visited: int  # from states an env rollout visited
    mismatches: int  # observations where any output is outside its tolerance
    max_abs_error: float  # largest abs error over the float outputs (0.0 if none)
    errors: dict[str, float] = field(default_factory=dict)  # max abs error per float output
    seconds: float = 0.0
    ties: int = 0  # discrete actions that differ only where SB3's scores tie within float error


def sample_observations(space: Any, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` observations uniform in the space's box, with huge or infinite bounds replaced by
    +-SANE_BOUND (see above); returns float32 [n, obs_dim]."""
    low = np.asarray(space.low, dtype=np.float64).reshape(-1)
    high = np.asarray(space.high, dtype=np.float64).reshape(-1)
    low_huge = ~(np.abs(low) <= HUGE_BOUND)
    high_huge = ~(np.abs(high) <= HUGE_BOUND)
    lo = np.where(low_huge, -SANE_BOUND, low)
    hi = np.where(high_huge, SANE_BOUND, high)
    # One finite bound beyond the sane box on the same side: keep a 2*SANE_BOUND-wide box by it.
    lo = np.where(low_huge & (lo >= hi), hi - 2 * SANE_BOUND, lo)
    hi = np.where(high_huge & (hi <= lo), lo + 2 * SANE_BOUND, hi)
    obs = rng.uniform(lo, hi, size=(n, lo.size))
    if np.issubdtype(np.dtype(space.dtype), np.integer):
        obs = np.round(obs)
    return obs.astype(np.float32)


def rollout_observations(
    env_id: str, n: int, seed: int, env_kwargs: Mapping[str, Any] | None = None
) -> np.ndarray:
    """``n`` observations a uniformly random policy visits in ``env_id`` (reset on episode end);
    float32 [n, obs_dim]."""
    import gymnasium as gym

    env = gym.make(env_id, **dict(env_kwargs or {}))
    try:
        env.action_space.seed(seed)
        obs, _ = env.reset(seed=seed)
        visited: list[np.ndarray] = []
        while len(visited) < n:
            visited.append(np.asarray(obs, dtype=np.float32).reshape(-1))
            obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
            if terminated or truncated:
                obs, _ = env.reset()
    finally:
        env.close()
    return np.stack(visited)


def _reference(
    model: BaseAlgorithm, norm_obs: np.ndarray, wanted: set[str]
) -> dict[str, np.ndarray]:
    """SB3's own answers on normalised observations."""
    import torch
    from stable_baselines3.common.policies import ActorCriticPolicy
    from stable_baselines3.dqn.policies import DQNPolicy

    # predict() wants the env's own observation shape; the artifacts take it flattened.
    obs_shape = model.observation_space.shape
    assert obs_shape is not None, "the observation space has no shape"
    shaped = norm_obs.reshape(len(norm_obs), *obs_shape)
    actions, _ = model.predict(shaped, deterministic=True)
    out = {ACTION: np.asarray(actions)}
    policy = model.policy
    obs_t = torch.as_tensor(norm_obs, dtype=torch.float32, device=policy.device)
    with torch.no_grad():
        if VALUE in wanted or EXTRA_LOGITS in wanted:
            if not isinstance(policy, ActorCriticPolicy):
                raise ParityError(
                    f"exported model has a value or logits output; policy "
                    f"{type(policy).__name__} is not an ActorCriticPolicy"
                )
            if VALUE in wanted:
                out[VALUE] = policy.predict_values(obs_t).cpu().numpy()
            if EXTRA_LOGITS in wanted:
                latent = policy.mlp_extractor.forward_actor(policy.pi_features_extractor(obs_t))
                out[EXTRA_LOGITS] = policy.action_net(latent).cpu().numpy()
        if EXTRA_Q_VALUES in wanted:
            if not isinstance(policy, DQNPolicy):
                raise ParityError(
                    f"exported model has a q_values output; policy {type(policy).__name__} "
                    "is not a DQNPolicy"
                )
            out[EXTRA_Q_VALUES] = policy.q_net(obs_t).cpu().numpy()
    return out


def _near_ties(actions: np.ndarray, scores: np.ndarray, atol: float) -> np.ndarray:
    """Rows where the exported action's reference score equals the best one within ``atol``
    (relative to the score's size): argmax over near-equal floats may go either way."""
    s = np.asarray(scores, dtype=np.float64).reshape(len(actions), -1)
    chosen = np.clip(actions.reshape(len(actions), -1)[:, 0], 0, s.shape[1] - 1)
    best = s.max(axis=1)
    gap = best - s[np.arange(len(s)), chosen]
    return gap <= atol * np.maximum(1.0, np.abs(best))


def _normalization(normalization: Any) -> ObsNormalization | None:
    if normalization is None or isinstance(normalization, ObsNormalization):
        return normalization
    return obs_normalization_from(normalization)


def _observations(
    model: BaseAlgorithm,
    n: int,
    seed: int,
    env_id: str | None,
    env_kwargs: Mapping[str, Any] | None,
    visited: np.ndarray | None,
) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(seed)
    obs_shape = model.observation_space.shape
    assert obs_shape is not None, "the observation space has no shape"
    obs_dim = int(np.prod(obs_shape))
    n_visited = n // 2
    if visited is None and env_id is not None:
        visited = rollout_observations(env_id, n_visited, seed, env_kwargs)
    if visited is None:
        visited = np.empty((0, obs_dim), np.float32)
    visited = np.asarray(visited, dtype=np.float32).reshape(-1, obs_dim)
    if len(visited) > n_visited:
        visited = visited[rng.choice(len(visited), n_visited, replace=False)]
    sampled = sample_observations(model.observation_space, n - len(visited), rng)
    return np.concatenate([sampled, visited]), len(visited)


def check_parity(
    onnx_bytes: bytes,
    model: BaseAlgorithm,
    normalization: Any = None,
    *,
    env_id: str | None = None,
    env_kwargs: Mapping[str, Any] | None = None,
    visited: np.ndarray | None = None,
    n: int = 1000,
    seed: int = 0,
    action_atol: float = ACTION_ATOL,
    output_atol: float = OUTPUT_ATOL,
) -> ParityReport:
    """Compare ONNX Runtime with SB3 on ``n`` observations: half sampled from the observation
    space, half visited states (``visited``, or a random-policy rollout of ``env_id``; without
    either, all sampled). ``normalization`` is the VecNormalize (or its ObsNormalization) the
    model was trained behind, or None. Discrete actions must be identical, Box actions within
    ``action_atol``, value / logits / Q-values within ``output_atol * max(1, |ref|)``.
    Raises ParityError on any mismatch; returns the report otherwise."""
    started = time.perf_counter()
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    norm = _normalization(normalization)
    obs, n_visited = _observations(model, n, seed, env_id, env_kwargs, visited)
    try:
        session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad models
        raise ParityError(f"onnxruntime cannot load the exported model: {exc}") from exc
    names = [o.name for o in session.get_outputs()]
    known = {ACTION, VALUE, EXTRA_LOGITS, EXTRA_Q_VALUES}
    if ACTION not in names or not set(names) <= known:
        raise ParityError(
            f"exported model has outputs {names}; expected '{ACTION}' and only {sorted(known)}"
        )
    got = dict(zip(names, session.run(None, {"obs": obs}), strict=True))
    norm_obs = obs if norm is None else norm.apply(obs)
    ref = _reference(model, norm_obs, set(names))

    # A discrete action may differ where SB3's own scores for the two actions are equal within
    # float error; the scores themselves are still compared below, so a wrong export fails there.
    scores = EXTRA_LOGITS if EXTRA_LOGITS in ref else EXTRA_Q_VALUES
    ties = 0
    bad = np.zeros(n, dtype=bool)
    errors: dict[str, float] = {}
    first_bad: dict[str, int] = {}
    for name in names:
        g = np.asarray(got[name]).reshape(n, -1)
        r = np.asarray(ref[name]).reshape(n, -1)
        if g.shape != r.shape:
            raise ParityError(f"output '{name}' has shape {list(g.shape)}, SB3 {list(r.shape)}")
        if name == ACTION and np.issubdtype(g.dtype, np.integer):
            row_bad = (g != r).any(axis=1)
            if row_bad.any() and scores in ref:
                tie = _near_ties(g, ref[scores], output_atol) & row_bad
                ties = int(tie.sum())
                row_bad &= ~tie
        else:
            err = np.abs(g.astype(np.float64) - r.astype(np.float64))
            both_nan = np.isnan(g) & np.isnan(r)
            err = np.where(both_nan, 0.0, err)
            tol = action_atol if name == ACTION else output_atol * np.maximum(1.0, np.abs(r))
            row_bad = (~(err <= tol)).any(axis=1)
            errors[name] = float(np.nanmax(np.where(np.isnan(err), np.inf, err)))
        if row_bad.any():
            first_bad[name] = int(np.argmax(row_bad))
        bad |= row_bad
    seconds = time.perf_counter() - started
    report = ParityReport(
        n=n,
        n_sampled=n - n_visited,
        n_visited=n_visited,
        mismatches=int(bad.sum()),
        max_abs_error=max(errors.values(), default=0.0),
        errors=errors,
        seconds=seconds,
        ties=ties,
    )
    if report.mismatches:
        name, index = next(iter(first_bad.items()))
        shown = np.array2string(obs[index], precision=4, max_line_width=200, threshold=16)
        raise ParityError(
            f"parity check failed: {report.mismatches} of {n} observations differ "
            f"(max abs error per float output: "
            + (", ".join(f"{k}={v:.3g}" for k, v in errors.items()) or "none")
            + f"); first: output '{name}' at index {index}, obs {shown}: "
            f"onnx {np.asarray(got[name])[index].tolist()} vs sb3 "
            f"{np.asarray(ref[name]).reshape(n, -1)[index].tolist()}. "
            "The export does not reproduce the policy; do not publish it."
        )
    log.info(
        "parity ok algorithm=%s n=%d sampled=%d visited=%d max_abs_error=%.3g ties=%d seconds=%.3f",
        type(model).__name__,
        n,
        report.n_sampled,
        report.n_visited,
        report.max_abs_error,
        report.ties,
        report.seconds,
    )
    return report
