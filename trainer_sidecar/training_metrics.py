"""The sidecar's training metrics: a `SidecarMetrics` (its own Prometheus registry and the
latest figures) and the HTTP endpoint that serves it. `monitoring` feeds it while training; the
orchestrator records gate decisions and promotions in it."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import start_http_server

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
