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
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import start_http_server
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import ReplayBuffer, RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter, Logger
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.utils import obs_as_tensor
from tqdm import tqdm

log = logging.getLogger(__name__)

# Episode returns differ by env (CartPole 0..500, Pendulum -1600..0): buckets both ways.
DEFAULT_RETURN_BUCKETS: tuple[float, ...] = (
    -2000.0, -1000.0, -500.0, -200.0, -100.0, -50.0, -20.0, -10.0, -1.0, 0.0,
    1.0, 10.0, 20.0, 50.0, 100.0, 200.0, 300.0, 400.0, 475.0, 500.0, 1000.0, 2000.0,
)  # fmt: skip
DEFAULT_LENGTH_BUCKETS: tuple[float, ...] = (
    1.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 300.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
)  # fmt: skip
PROMOTION_BUCKETS_S: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# SB3 logger key -> the `kind` label of forseti_train_loss. "train/loss" depends on the
# algorithm: PPO's total loss, DQN's Q (Huber) loss.
_LOSS_KINDS: dict[str, str] = {
    "train/policy_gradient_loss": "policy",
    "train/policy_loss": "policy",
    "train/value_loss": "value",
    "train/entropy_loss": "entropy",
    "train/actor_loss": "actor",
    "train/critic_loss": "critic",
    "train/ent_coef_loss": "ent_coef",
}

_NAN = float("nan")


@dataclass
class TrainingSnapshot:
    """The latest training figures, as the log lines and the progress bar show them."""

    timesteps: int = 0
    env_steps: int = 0
    episodes: int = 0
    mean_return: float | None = None
    mean_length: float | None = None
    steps_per_s: float | None = None
    episodes_per_s: float | None = None
    policy_entropy: float | None = None
    value_estimate: float | None = None
    grad_norm: dict[str, float] = field(default_factory=dict)
    learning_rate: float | None = None
    exploration_rate: float | None = None
    entropy_coef: float | None = None
    updates: int | None = None
    losses: dict[str, float] = field(default_factory=dict)

    def log_fields(self) -> dict[str, Any]:
        """The snapshot as flat key=value fields for a log record (unknown values left out)."""
        fields: dict[str, Any] = {"timesteps": self.timesteps, "episodes": self.episodes}
        optional: dict[str, float | int | None] = {
            "mean_return": self.mean_return,
            "mean_length": self.mean_length,
            "steps_per_s": self.steps_per_s,
            "episodes_per_s": self.episodes_per_s,
            "entropy": self.policy_entropy,
            "value": self.value_estimate,
            "lr": self.learning_rate,
            "exploration_rate": self.exploration_rate,
            "ent_coef": self.entropy_coef,
            "updates": self.updates,
        }
        optional.update({f"loss_{kind}": v for kind, v in self.losses.items()})
        optional.update({f"grad_norm_{net}": v for net, v in self.grad_norm.items()})
        for key, value in optional.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                fields[key] = float(f"{value:.4g}") if isinstance(value, float) else value
        return fields


class SidecarMetrics:
    """The sidecar's Prometheus metrics (in their own registry) and the latest figures.

    Written by the training thread (monitor, SB3 logger output) and the orchestrator; read by
    the scrape thread through prometheus_client, whose metrics are thread-safe.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        episode_window: int = 100,
        return_buckets: Iterable[float] = DEFAULT_RETURN_BUCKETS,
        length_buckets: Iterable[float] = DEFAULT_LENGTH_BUCKETS,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._snapshot = TrainingSnapshot()
        self._recent_returns: deque[float] = deque(maxlen=episode_window)
        self._recent_lengths: deque[float] = deque(maxlen=episode_window)
        self._run_info: dict[str, str] = {}
        r = self.registry

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            g = Gauge(name, doc, labelnames=labels, registry=r)
            if not labels:
                g.set(_NAN)  # "not known yet" rather than a misleading 0
            return g

        self.timesteps = Gauge(
            "forseti_train_timesteps",
            "Environment timesteps of the model (SB3 num_timesteps, resumed ones included)",
            registry=r,
        )
        self.env_steps = Counter(
            "forseti_train_env_steps", "Environment steps taken by this process", registry=r
        )
        self.episodes = Counter(
            "forseti_train_episodes", "Training episodes finished by this process", registry=r
        )
        self.episode_return = Histogram(
            "forseti_train_episode_return",
            "Return of each finished training episode",
            buckets=tuple(return_buckets),
            registry=r,
        )
        self.episode_length = Histogram(
            "forseti_train_episode_length",
            "Length (steps) of each finished training episode",
            buckets=tuple(length_buckets),
            registry=r,
        )
        self.episode_return_mean = gauge(
            "forseti_train_episode_return_mean",
            f"Mean return over the last {episode_window} training episodes",
        )
        self.episode_length_mean = gauge(
            "forseti_train_episode_length_mean",
            f"Mean length over the last {episode_window} training episodes",
        )
        self.steps_per_second = gauge(
            "forseti_train_env_steps_per_second",
            "Environment steps per second while training (policy updates included)",
        )
        self.episodes_per_second = gauge(
            "forseti_train_episodes_per_second", "Episodes finished per second while training"
        )
        self.policy_entropy = gauge(
            "forseti_train_policy_entropy",
            "Policy entropy (nats) on recent observations; SAC: -mean log-prob of sampled actions",
        )
        self.value_estimate = gauge(
            "forseti_train_value_estimate",
            "On-policy: mean V(s) over the last rollout; off-policy: mean Q(s, pi(s)) "
            "(DQN: max_a Q) over replay observations",
        )
        self.loss = gauge(
            "forseti_train_loss",
            "Last logged training loss by kind (policy, value, entropy, total, q, actor, "
            "critic, ent_coef)",
            ("kind",),
        )
        self.grad_norm = gauge(
            "forseti_train_grad_norm",
            "L2 norm of the gradients of the last minibatch of the last update (after clipping)",
            ("network",),
        )
        self.learning_rate = gauge("forseti_train_learning_rate", "Current learning rate")
        self.exploration_rate = gauge(
            "forseti_train_exploration_rate", "Epsilon of epsilon-greedy exploration (DQN)"
        )
        self.entropy_coef = gauge(
            "forseti_train_entropy_coef", "Entropy coefficient (SAC, possibly learned)"
        )
        self.updates = gauge(
            "forseti_train_updates", "Gradient updates so far (SB3's train/n_updates)"
        )
        self.sb3_value = gauge(
            "forseti_train_sb3_value", "Every numeric value SB3's logger dumped, by key", ("key",)
        )
        self.run_info = Info("forseti_train_run", "The training run", registry=r)

        self.gate_candidate_return = gauge(
            "forseti_gate_candidate_return", "Candidate's mean evaluation return at the last gate"
        )
        self.gate_live_return = gauge(
            "forseti_gate_live_return",
            "Live version's mean evaluation return at the last gate (NaN: no live version)",
        )
        self.gate_decisions = Counter(
            "forseti_gate_decisions", "Gate decisions by outcome", ["decision"], registry=r
        )
        for decision in ("promoted", "not_promoted"):
            self.gate_decisions.labels(decision=decision)
        self.gate_last_promoted = gauge(
            "forseti_gate_last_promoted", "1 if the last gate promoted its candidate, else 0"
        )
        self.gate_last_decision = Info(
            "forseti_gate_last_decision", "The last gate decision and its reason", registry=r
        )
        self.gate_last_timestamp = gauge(
            "forseti_gate_last_decision_timestamp_seconds", "Unix time of the last gate decision"
        )
        self.promotions = Counter(
            "forseti_promotions", "Versions promoted into the server", registry=r
        )
        self.promotion_seconds = Histogram(
            "forseti_promotion_duration_seconds",
            "Time from publishing a version to the server answering from it",
            buckets=PROMOTION_BUCKETS_S,
            registry=r,
        )
        self.promoted_version = gauge(
            "forseti_promoted_version", "Version number of the last promotion"
        )
        self.promotion_last_timestamp = gauge(
            "forseti_promotion_last_timestamp_seconds", "Unix time of the last promotion"
        )

    # -- read -------------------------------------------------------------------------------

    def snapshot(self) -> TrainingSnapshot:
        """A copy of the latest figures."""
        with self._lock:
            s = self._snapshot
            return TrainingSnapshot(
                **{**vars(s), "grad_norm": dict(s.grad_norm), "losses": dict(s.losses)}
            )

    # -- written by the monitor and the SB3 logger output ---------------------------------------

    def set_run_info(self, **fields: object) -> None:
        """Describe the run (model, env id, algorithm, ...) in forseti_train_run_info; fields
        given earlier and not named again are kept."""
        with self._lock:
            self._run_info.update({k: str(v) for k, v in fields.items()})
            self.run_info.info(dict(self._run_info))

    def run_info_fields(self) -> dict[str, str]:
        """The fields of forseti_train_run_info so far."""
        with self._lock:
            return dict(self._run_info)

    def record_episodes(self, returns: list[float], lengths: list[float]) -> None:
        """Finished episodes: histograms, counter, and the recent-episode means."""
        for ret, length in zip(returns, lengths, strict=True):
            self.episode_return.observe(ret)
            self.episode_length.observe(length)
        self.episodes.inc(len(returns))
        with self._lock:
            self._recent_returns.extend(returns)
            self._recent_lengths.extend(lengths)
            mean_return = float(np.mean(self._recent_returns))
            mean_length = float(np.mean(self._recent_lengths))
            self._snapshot.episodes += len(returns)
            self._snapshot.mean_return = mean_return
            self._snapshot.mean_length = mean_length
        self.episode_return_mean.set(mean_return)
        self.episode_length_mean.set(mean_length)

    def record_steps(self, timesteps: int, new_env_steps: int) -> None:
        """The model's timestep count, and env steps taken since the last call."""
        self.timesteps.set(timesteps)
        if new_env_steps > 0:
            self.env_steps.inc(new_env_steps)
        with self._lock:
            self._snapshot.timesteps = timesteps
            self._snapshot.env_steps += max(new_env_steps, 0)

    def record_rates(self, steps_per_s: float, episodes_per_s: float) -> None:
        """Env steps and episodes per second over the recent window."""
        self.steps_per_second.set(steps_per_s)
        self.episodes_per_second.set(episodes_per_s)
        with self._lock:
            self._snapshot.steps_per_s = steps_per_s
            self._snapshot.episodes_per_s = episodes_per_s

    def record_policy_stats(
        self,
        *,
        entropy: float | None = None,
        value_estimate: float | None = None,
        grad_norm: Mapping[str, float] | None = None,
        exploration_rate: float | None = None,
    ) -> None:
        """Statistics the monitor computes itself (SB3 does not log them)."""
        with self._lock:
            if entropy is not None:
                self.policy_entropy.set(entropy)
                self._snapshot.policy_entropy = entropy
            if value_estimate is not None:
                self.value_estimate.set(value_estimate)
                self._snapshot.value_estimate = value_estimate
            for network, norm in (grad_norm or {}).items():
                self.grad_norm.labels(network=network).set(norm)
                self._snapshot.grad_norm[network] = norm
            if exploration_rate is not None:
                self.exploration_rate.set(exploration_rate)
                self._snapshot.exploration_rate = exploration_rate

    def record_sb3_values(
        self, values: Mapping[str, float], total_loss_kind: str = "total"
    ) -> None:
        """Numeric values from SB3's logger (``train/*``, ``rollout/*``, ``time/*``)."""
        with self._lock:
            for key, value in values.items():
                self.sb3_value.labels(key=key).set(value)
                kind = _LOSS_KINDS.get(key) or (total_loss_kind if key == "train/loss" else None)
                if kind is not None:
                    self.loss.labels(kind=kind).set(value)
                    self._snapshot.losses[kind] = value
                elif key == "train/learning_rate":
                    self.learning_rate.set(value)
                    self._snapshot.learning_rate = value
                elif key == "rollout/exploration_rate":
                    self.exploration_rate.set(value)
                    self._snapshot.exploration_rate = value
                elif key == "train/ent_coef":
                    self.entropy_coef.set(value)
                    self._snapshot.entropy_coef = value
                elif key == "train/n_updates":
                    self.updates.set(value)
                    self._snapshot.updates = int(value)

    # -- written by the orchestrator --------------------------------------------------------------

    def record_gate(
        self, candidate_return: float, live_return: float | None, promoted: bool, reason: str
    ) -> None:
        """One evaluation-gate decision (``live_return`` None: there was no live version)."""
        self.gate_candidate_return.set(candidate_return)
        self.gate_live_return.set(_NAN if live_return is None else live_return)
        decision = "promoted" if promoted else "not_promoted"
        self.gate_decisions.labels(decision=decision).inc()
        self.gate_last_promoted.set(1 if promoted else 0)
        self.gate_last_decision.info({"decision": decision, "reason": reason})
        self.gate_last_timestamp.set(time.time())
        log.info(
            "gate decision",
            extra={
                "decision": decision,
                "candidate_return": candidate_return,
                "live_return": live_return,
                "reason": reason,
            },
        )

    def record_promotion(self, version: int, seconds: float) -> None:
        """A version now served; ``seconds`` from publishing it to the server answering from it."""
        self.promotions.inc()
        self.promotion_seconds.observe(seconds)
        self.promoted_version.set(version)
        self.promotion_last_timestamp.set(time.time())
        log.info("version promoted", extra={"version": version, "seconds": round(seconds, 3)})


# -- Prometheus endpoint ---------------------------------------------------------------------------


class MetricsServer:
    """The sidecar's /metrics endpoint (prometheus_client's HTTP server on its own thread)."""

    def __init__(self, metrics: SidecarMetrics, host: str = "127.0.0.1", port: int = 0) -> None:
        try:
            self._server, self._thread = start_http_server(
                port, addr=host, registry=metrics.registry
            )
        except OSError as exc:
            raise OSError(
                f"cannot serve training metrics on {host}:{port}: {exc}; "
                "pick another port (0 picks a free one)"
            ) from exc
        self.host = host
        self.port: int = self._server.server_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_metrics_server(
    metrics: SidecarMetrics, host: str = "127.0.0.1", port: int = 0
) -> tuple[MetricsServer, int]:
    """Serve ``metrics`` on http://host:port/metrics; port 0 picks a free port.

    Returns the server (``stop()`` it) and the port it listens on.
    """
    server = MetricsServer(metrics, host, port)
    log.info("training metrics listening", extra={"address": host, "port": server.port})
    return server, server.port


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
        distribution = model.policy.get_distribution(obs_as_tensor(obs_np, model.device))
        entropy = distribution.entropy()
        if entropy is not None:  # None: a squashed Gaussian has no closed form
            self.metrics.record_policy_stats(entropy=float(entropy.mean()))

    def _replay_stats(self) -> None:
        model = self.model
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
        elif hasattr(model.actor, "action_log_prob"):  # SAC: stochastic actor
            actions, log_prob = model.actor.action_log_prob(obs)
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
