"""What the trainer reports while it trains: a Prometheus endpoint, key=value log lines and a
progress bar.

Three parts feed one `SidecarMetrics`:

- `TrainingMonitor`, an SB3 callback: episodes (from the Monitor wrapper's ``info["episode"]``),
  env steps, rates, and statistics SB3 does not log (gradient norm, value estimates, policy
  entropy). Its per-step work is a loop over ``infos`` and one clock read; everything else runs
  at most once per ``flush_every_s``.
- `PrometheusKVWriter`, an SB3 logger output: every ``train/*``, ``rollout/*`` and ``time/*``
  value SB3 dumps (losses, learning rate, exploration rate, entropy coefficient, updates).
- The orchestrator, through `SidecarMetrics.record_gate` and `SidecarMetrics.record_promotion`.

The monitor survives several ``model.learn(...)`` calls (training in chunks between checkpoints):
counters, the recent-episode window and the progress bar carry on (the bar follows the model's
``num_timesteps``, so chunks are learned with ``reset_num_timesteps=False``); time between
chunks is not counted in the rates. Call `TrainingMonitor.close` when a run stops early.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import ReplayBuffer, RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter, Logger
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.utils import obs_as_tensor
from tqdm import tqdm

from .training_metrics import SidecarMetrics, TrainingSnapshot

log = logging.getLogger(__name__)


# -- SB3 logger output -----------------------------------------------------------------------------


def _as_float(value: object) -> float | None:
    """A logged value as a float, or None for what is not a number (text, videos, figures)."""
    if isinstance(value, bool | int | float | np.integer | np.floating):
        return float(value)
    if isinstance(value, np.ndarray) and value.size == 1:
        return float(value.item())
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    return None


class PrometheusKVWriter(KVWriter):
    """An SB3 logger output that forwards every numeric value SB3 dumps into `SidecarMetrics`.

    This is SB3's supported way to see its losses, learning rate and exploration rate.
    """

    def __init__(self, metrics: SidecarMetrics, total_loss_kind: str = "total") -> None:
        self.metrics = metrics
        self.total_loss_kind = total_loss_kind

    def write(
        self,
        key_values: dict[str, Any],
        key_excluded: dict[str, tuple[str, ...]],
        step: int = 0,
    ) -> None:
        numeric = {k: f for k, v in key_values.items() if (f := _as_float(v)) is not None}
        self.metrics.record_sb3_values(numeric, self.total_loss_kind)

    def close(self) -> None:
        pass


def _total_loss_kind(model: BaseAlgorithm) -> str:
    # Among SB3's algorithms only DQN logs train/loss off-policy, and there it is the Q loss.
    return "q" if isinstance(model, OffPolicyAlgorithm) else "total"


def _writer_for(model: BaseAlgorithm, metrics: SidecarMetrics) -> PrometheusKVWriter | None:
    logger = getattr(model, "_logger", None)
    if logger is None:
        return None
    for output in logger.output_formats:
        if isinstance(output, PrometheusKVWriter) and output.metrics is metrics:
            return output
    return None


def attach_logger(
    model: BaseAlgorithm, metrics: SidecarMetrics, *extra_outputs: KVWriter
) -> PrometheusKVWriter:
    """Give ``model`` a logger whose outputs are a `PrometheusKVWriter` (plus ``extra_outputs``).

    A custom logger persists across ``learn()`` calls (SB3 keeps it instead of making a new one).
    """
    writer = PrometheusKVWriter(metrics, _total_loss_kind(model))
    model.set_logger(Logger(folder=None, output_formats=[writer, *extra_outputs]))
    return writer


# -- the callback ----------------------------------------------------------------------------------


@dataclass
class _RateWindow:
    """(time, steps, episodes) samples over the last ``span_s`` seconds of training."""

    span_s: float
    samples: deque[tuple[float, int, int]] = field(default_factory=deque)

    def restart(self, now: float, steps: int, episodes: int) -> None:
        self.samples.clear()
        self.samples.append((now, steps, episodes))

    def add(self, now: float, steps: int, episodes: int) -> tuple[float, float] | None:
        self.samples.append((now, steps, episodes))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.span_s:
            self.samples.popleft()
        t0, s0, e0 = self.samples[0]
        if now - t0 <= 0:
            return None
        return (steps - s0) / (now - t0), (episodes - e0) / (now - t0)


class TrainingMonitor(BaseCallback):
    """SB3 callback that reports training progress to `SidecarMetrics`, log lines and a bar.

    ``total_timesteps`` is the run's target (the bar's end), not one ``learn()`` call's.
    ``progress``: a tqdm bar (timesteps, episodes/s, mean return); None shows it when stderr is
    a terminal. Without a bar a ``training progress`` line is logged at INFO every
    ``log_every_s`` and when the run reaches ``total_timesteps``; with one, at DEBUG. Figures
    are pushed at most every ``flush_every_s`` and at the end of every ``learn()`` call.

    Statistics SB3 does not log, and where they come from:

    - gradient norm: the last minibatch's of the last update, after clipping (so PPO/A2C show
      at most ``max_grad_norm`` while clipping is active). SB3 keeps the parameters' ``.grad``
      from its last optimiser step until the next update; the norm is read there, per network
      (``policy``; SAC/TD3: ``actor`` and ``critic``).
    - value estimate: on-policy, the mean of the rollout buffer's V(s) at each rollout's end;
      off-policy, mean Q(s, pi(s)) (DQN: max_a Q) on ``stats_sample_size`` replay observations.
    - policy entropy: on-policy, the action distribution's entropy on ``stats_sample_size``
      rollout observations (at most once per ``flush_every_s``); SAC, -mean log-prob of
      sampled actions; none for DQN (greedy) and TD3 (deterministic).

    They run under ``torch.no_grad``, with the torch RNG state restored and the monitor's own
    numpy generator, so monitoring never changes the training run.
    """

    def __init__(
        self,
        metrics: SidecarMetrics,
        total_timesteps: int,
        log_every_s: float = 10.0,
        progress: bool | None = None,
        *,
        flush_every_s: float = 1.0,
        rate_window_s: float = 10.0,
        stats_sample_size: int = 256,
        progress_file: TextIO | None = None,
    ) -> None:
        super().__init__(verbose=0)
        self.metrics = metrics
        self.total_timesteps = total_timesteps
        self.log_every_s = log_every_s
        self.flush_every_s = flush_every_s
        self.stats_sample_size = stats_sample_size
        self.show_progress = sys.stderr.isatty() if progress is None else progress
        self._progress_file = progress_file
        self._bar: tqdm | None = None
        self._rates = _RateWindow(rate_window_s)
        self._rng = np.random.default_rng(0)
        self._steps = 0  # env steps this monitor has seen, across learn() calls
        self._episodes = 0
        self._last_model_steps = 0
        self._pending_returns: list[float] = []
        self._pending_lengths: list[float] = []
        self._next_flush = 0.0
        self._next_log = 0.0
        self._next_entropy = 0.0
        self._disabled_stats: set[str] = set()

    # -- SB3 hooks ------------------------------------------------------------------------------

    def _on_training_start(self) -> None:
        model = self.model
        if _writer_for(model, self.metrics) is None:
            # The model has SB3's default logger (rebuilt by every learn()): add our output.
            model.logger.output_formats.append(
                PrometheusKVWriter(self.metrics, _total_loss_kind(model))
            )
        if "algorithm" not in self.metrics.run_info_fields():
            self.metrics.set_run_info(algorithm=type(model).__name__)
        now = time.monotonic()
        self._last_model_steps = model.num_timesteps
        self._rates.restart(now, self._steps, self._episodes)
        self._next_flush = now + self.flush_every_s
        if self._next_log == 0.0:
            self._next_log = now + self.log_every_s
        if self.show_progress and self._bar is None:
            self._bar = tqdm(
                total=self.total_timesteps,
                initial=model.num_timesteps,
                unit="step",
                unit_scale=True,
                dynamic_ncols=True,
                desc="training",
                file=self._progress_file or sys.stderr,
            )
        self.metrics.record_steps(model.num_timesteps, 0)

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            episode = info.get("episode")
            if episode is not None:
                self._pending_returns.append(float(episode["r"]))
                self._pending_lengths.append(float(episode["l"]))
        now = time.monotonic()
        if now >= self._next_flush:
            self._flush(now)
        return True

    def _on_rollout_end(self) -> None:
        buffer = getattr(self.model, "rollout_buffer", None)
        if isinstance(buffer, RolloutBuffer) and buffer.full:
            # The whole rollout is in the buffer now; train() flattens it next.
            self.metrics.record_policy_stats(value_estimate=float(np.mean(buffer.values)))
            now = time.monotonic()
            # Rollouts can be a few ms apart (n_steps 32): the entropy's forward pass runs at
            # most once per flush interval.
            if now >= self._next_entropy:
                self._next_entropy = now + self.flush_every_s
                self._run_stat("entropy", lambda: self._rollout_entropy(buffer))

    def _on_training_end(self) -> None:
        now = time.monotonic()
        self._flush(now, final=True)

    def close(self) -> None:
        """Close the progress bar (at the end of the run)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -- flushing ------------------------------------------------------------------------------

    def _flush(self, now: float, final: bool = False) -> None:
        self._next_flush = now + self.flush_every_s
        model = self.model
        model_steps = model.num_timesteps
        new_steps = model_steps - self._last_model_steps
        self._last_model_steps = model_steps
        self._steps += max(new_steps, 0)
        self.metrics.record_steps(model_steps, new_steps)
        if self._pending_returns:
            self._episodes += len(self._pending_returns)
            self.metrics.record_episodes(self._pending_returns, self._pending_lengths)
            self._pending_returns = []
            self._pending_lengths = []
        rates = self._rates.add(now, self._steps, self._episodes)
        if rates is not None:
            self.metrics.record_rates(*rates)
        # Values recorded since SB3's last dump, so they need not wait for log_interval.
        writer = _writer_for(model, self.metrics)
        if writer is not None:
            writer.write(dict(model.logger.name_to_value), {}, model_steps)
        self._run_stat("grad_norm", self._grad_norms)
        if isinstance(model, OffPolicyAlgorithm):
            self._run_stat("replay", self._replay_stats)
        exploration = getattr(model, "exploration_rate", None)
        if isinstance(exploration, float):
            self.metrics.record_policy_stats(exploration_rate=exploration)
        snapshot = self.metrics.snapshot()
        if self._bar is not None:
            self._update_bar(snapshot, model_steps)
            if final and model_steps >= self.total_timesteps:
                self.close()
        # learn() calls can be one rollout long: a chunk's end alone is no reason to log,
        # the end of the run is.
        if now >= self._next_log or (final and model_steps >= self.total_timesteps):
            self._next_log = now + self.log_every_s
            level = logging.DEBUG if self.show_progress else logging.INFO
            log.log(level, "training progress", extra=snapshot.log_fields())

    def _update_bar(self, snapshot: TrainingSnapshot, model_steps: int) -> None:
        assert self._bar is not None
        postfix: dict[str, str] = {}
        if snapshot.episodes_per_s is not None:
            postfix["ep/s"] = f"{snapshot.episodes_per_s:.1f}"
        if snapshot.mean_return is not None:
            postfix["return"] = f"{snapshot.mean_return:.1f}"
        self._bar.set_postfix(postfix, refresh=False)
        # Follow the model's count (it may have been resumed, or reset by learn()).
        self._bar.update(model_steps - self._bar.n)

    # -- statistics SB3 does not log ---------------------------------------------------------------

    def _run_stat(self, name: str, compute: Any) -> None:
        if name in self._disabled_stats:
            return
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                compute()
        except Exception as exc:
            # An unusual policy or observation space: report once and stop trying.
            self._disabled_stats.add(name)
            log.warning(
                "training statistic unavailable; no longer computed",
                extra={"statistic": name, "error": repr(exc)},
            )

    def _grad_norms(self) -> None:
        model = self.model
        networks: dict[str, torch.nn.Module]
        if hasattr(model, "actor") and hasattr(model, "critic"):
            networks = {"actor": model.actor, "critic": model.critic}
        else:
            networks = {"policy": model.policy}
        norms: dict[str, float] = {}
        for name, module in networks.items():
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            if grads:
                per_tensor = torch.stack([torch.linalg.vector_norm(g) for g in grads])
                norms[name] = float(torch.linalg.vector_norm(per_tensor))
        if norms:
            self.metrics.record_policy_stats(grad_norm=norms)

    def _sample_indices(self, n_filled: int, n_envs: int) -> tuple[np.ndarray, np.ndarray]:
        size = min(self.stats_sample_size, n_filled * n_envs)
        return self._rng.integers(0, n_filled, size), self._rng.integers(0, n_envs, size)

    def _rollout_entropy(self, buffer: RolloutBuffer) -> None:
        model = self.model
        steps, envs = self._sample_indices(buffer.buffer_size, buffer.n_envs)
        obs_np = _index_observations(buffer.observations, steps, envs)
        policy = model.policy
        if not isinstance(policy, ActorCriticPolicy):
            raise TypeError(f"policy of type {type(policy).__name__}")
        distribution = policy.get_distribution(obs_as_tensor(obs_np, model.device))
        entropy = distribution.entropy()
        if entropy is not None:  # None: a squashed Gaussian has no closed form
            self.metrics.record_policy_stats(entropy=float(entropy.mean()))

    def _replay_stats(self) -> None:
        model = self.model
        if not isinstance(model, OffPolicyAlgorithm):
            raise TypeError(f"model of type {type(model).__name__}")
        buffer = model.replay_buffer
        if not isinstance(buffer, ReplayBuffer):
            raise TypeError(f"replay buffer of type {type(buffer).__name__}")
        filled = buffer.buffer_size if buffer.full else buffer.pos
        if filled == 0:
            return
        steps, envs = self._sample_indices(filled, buffer.n_envs)
        obs_np = _index_observations(buffer.observations, steps, envs)
        vec_normalize = model.get_vec_normalize_env()
        if vec_normalize is not None:
            obs_np = vec_normalize.normalize_obs(obs_np)
        obs = obs_as_tensor(obs_np, model.device)
        entropy: float | None = None
        if hasattr(model, "q_net"):  # DQN: greedy policy, value = max_a Q(s, a)
            value = float(model.q_net(obs).max(dim=1).values.mean())
        elif not hasattr(model, "critic"):
            raise TypeError(f"{type(model).__name__} has neither a q_net nor a critic")
        # SAC: stochastic actor (looked up by name: torch types a module's attributes loosely)
        elif (action_log_prob := getattr(model.actor, "action_log_prob", None)) is not None:
            actions, log_prob = action_log_prob(obs)
            value = float(model.critic.q1_forward(obs, actions).mean())
            entropy = float(-log_prob.mean())
        else:  # TD3 / DDPG: deterministic actor
            value = float(model.critic.q1_forward(obs, model.actor(obs)).mean())
        self.metrics.record_policy_stats(value_estimate=value, entropy=entropy)


def _index_observations(
    observations: np.ndarray | dict[str, np.ndarray], steps: np.ndarray, envs: np.ndarray
) -> np.ndarray | dict[str, np.ndarray]:
    if isinstance(observations, dict):
        return {k: v[steps, envs] for k, v in observations.items()}
    return observations[steps, envs]
