"""Training monitoring: real SB3 runs report to the sidecar's own /metrics, log lines and bar."""

from __future__ import annotations

import io
import logging
import math
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from stable_baselines3 import DQN, PPO, SAC
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.env_util import make_vec_env

from forseti.trainer_sidecar.monitoring import PrometheusKVWriter, TrainingMonitor, attach_logger
from forseti.trainer_sidecar.training_metrics import (
    MetricsServer,
    SidecarMetrics,
    start_metrics_server,
)

CHUNK = 256  # PPO: two learn() calls of two rollouts each (2 envs x 64 steps)


class Scrape:
    """One scrape of /metrics, parsed by prometheus_client's own parser."""

    def __init__(self, port: int) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.status == 200
            text = response.read().decode()
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                self.samples[key] = sample.value

    def value(self, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        assert key in self.samples, f"no sample {name}{labels}; have {sorted(self.samples)}"
        return self.samples[key]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """These networks are tiny: one thread is as fast, and does not fight other processes
    for the cores (two threads on a loaded 2-core machine ran SAC 30x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def metrics_server() -> Iterator[tuple[SidecarMetrics, int]]:
    metrics = SidecarMetrics()
    server, port = start_metrics_server(metrics, "127.0.0.1", 0)
    yield metrics, port
    server.stop()


def ppo_cartpole(seed: int = 0) -> PPO:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=seed)
    return PPO("MlpPolicy", env, n_steps=64, batch_size=64, n_epochs=2, seed=seed, device="cpu")


def sac_pendulum(learning_starts: int = 100) -> SAC:
    env = make_vec_env("Pendulum-v1", n_envs=1, seed=0)
    return SAC(
        "MlpPolicy",
        env,
        learning_starts=learning_starts,
        batch_size=64,
        policy_kwargs={"net_arch": [32, 32]},
        seed=0,
        device="cpu",
    )


@dataclass
class ChunkedRun:
    model: PPO
    monitor: TrainingMonitor
    after_first: Scrape
    after_second: Scrape
    bar_output: str


@pytest.fixture(scope="module")
def ppo_run() -> Iterator[ChunkedRun]:
    """PPO on CartPole in two learn() calls with one monitor, its bar and endpoint up."""
    metrics = SidecarMetrics()
    server, port = start_metrics_server(metrics)
    try:
        model = ppo_cartpole()
        attach_logger(model, metrics)
        bar = io.StringIO()
        monitor = TrainingMonitor(metrics, 2 * CHUNK, progress=True, progress_file=bar)
        model.learn(CHUNK, callback=monitor)
        first = Scrape(port)
        model.learn(CHUNK, callback=monitor, reset_num_timesteps=False)
        second = Scrape(port)
        yield ChunkedRun(model, monitor, first, second, bar.getvalue())
    finally:
        server.stop()


def test_ppo_run_serves_returns_rates_and_counts(ppo_run: ChunkedRun) -> None:
    s = ppo_run.after_second
    assert s.value("forseti_train_timesteps") == ppo_run.model.num_timesteps == 2 * CHUNK
    assert s.value("forseti_train_episodes_total") > 0
    assert s.value("forseti_train_episode_return_mean") > 0
    assert s.value("forseti_train_episode_length_mean") > 0
    assert s.value("forseti_train_env_steps_per_second") > 0
    assert s.value("forseti_train_episodes_per_second") > 0
    assert s.value("forseti_train_run_info", algorithm="PPO") == 1


def test_ppo_run_serves_losses_learning_rate_and_updates_from_sb3_logger(
    ppo_run: ChunkedRun,
) -> None:
    s = ppo_run.after_second
    for kind in ("policy", "value", "entropy", "total"):
        assert math.isfinite(s.value("forseti_train_loss", kind=kind)), kind
    assert s.value("forseti_train_loss", kind="value") > 0
    assert s.value("forseti_train_learning_rate") == pytest.approx(3e-4)
    assert s.value("forseti_train_updates") > 0
    assert math.isfinite(s.value("forseti_train_sb3_value", key="train/approx_kl"))


def test_ppo_run_serves_entropy_value_estimate_and_grad_norm(ppo_run: ChunkedRun) -> None:
    s = ppo_run.after_second
    # Two actions: entropy lies in (0, ln 2].
    assert 0 < s.value("forseti_train_policy_entropy") <= math.log(2) + 1e-6
    value = s.value("forseti_train_value_estimate")
    assert math.isfinite(value)
    assert value == pytest.approx(float(np.mean(ppo_run.model.rollout_buffer.values)), abs=1e-5)
    # PPO clips at max_grad_norm 0.5, and the norm is read after clipping.
    assert 0 < s.value("forseti_train_grad_norm", network="policy") <= 0.5 + 1e-4


def test_counters_carry_on_across_learn_calls(ppo_run: ChunkedRun) -> None:
    first, second = ppo_run.after_first, ppo_run.after_second
    assert first.value("forseti_train_timesteps") == CHUNK
    assert second.value("forseti_train_env_steps_total") == 2 * CHUNK
    assert second.value("forseti_train_episodes_total") > first.value(
        "forseti_train_episodes_total"
    )
    assert second.value("forseti_train_episode_return_count") == second.value(
        "forseti_train_episodes_total"
    )


def test_progress_bar_runs_across_learn_calls_to_the_run_total(ppo_run: ChunkedRun) -> None:
    assert f"{2 * CHUNK}/{2 * CHUNK}" in ppo_run.bar_output
    assert "return=" in ppo_run.bar_output
    assert ppo_run.monitor._bar is None  # closed once the run's total was reached


def test_dqn_run_with_default_logger_serves_exploration_rate_and_q_loss(
    metrics_server: tuple[SidecarMetrics, int],
) -> None:
    metrics, port = metrics_server
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = DQN(
        "MlpPolicy", env, learning_starts=50, train_freq=4, batch_size=32, seed=0, device="cpu"
    )
    # No attach_logger: the monitor adds its output to SB3's default logger itself.
    model.learn(300, callback=TrainingMonitor(metrics, 300, progress=False))
    s = Scrape(port)
    assert 0.05 <= s.value("forseti_train_exploration_rate") <= 1.0
    assert s.value("forseti_train_loss", kind="q") >= 0
    assert math.isfinite(s.value("forseti_train_value_estimate"))
    assert s.value("forseti_train_grad_norm", network="policy") > 0
    assert s.value("forseti_train_episode_return_mean") > 0
    # A greedy policy has no entropy to report.
    assert math.isnan(s.value("forseti_train_policy_entropy"))


def test_sac_run_serves_actor_critic_losses_entropy_coef_and_q_estimate(
    metrics_server: tuple[SidecarMetrics, int],
) -> None:
    metrics, port = metrics_server
    model = sac_pendulum()
    attach_logger(model, metrics)
    model.learn(250, callback=TrainingMonitor(metrics, 250, progress=False))
    s = Scrape(port)
    for kind in ("actor", "critic", "ent_coef"):
        assert math.isfinite(s.value("forseti_train_loss", kind=kind)), kind
    assert 0 < s.value("forseti_train_entropy_coef") <= 1.0
    assert math.isfinite(s.value("forseti_train_policy_entropy"))
    assert math.isfinite(s.value("forseti_train_value_estimate"))
    assert s.value("forseti_train_grad_norm", network="actor") > 0
    assert s.value("forseti_train_grad_norm", network="critic") > 0
    assert s.value("forseti_train_episodes_total") == 1  # Pendulum episodes are 200 steps
    assert s.value("forseti_train_episode_return_mean") < 0


def _parameters(model: BaseAlgorithm) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.policy.parameters()]


@pytest.mark.parametrize("algorithm", ["PPO", "SAC"])
def test_monitor_leaves_the_training_run_unchanged(algorithm: str) -> None:
    def train(monitored: bool) -> list[torch.Tensor]:
        model = ppo_cartpole() if algorithm == "PPO" else sac_pendulum(learning_starts=50)
        # Flush at every step so the monitor's statistics run between SB3's own steps.
        callback = (
            TrainingMonitor(SidecarMetrics(), 200, progress=False, flush_every_s=0.0)
            if monitored
            else None
        )
        model.learn(200, callback=callback)
        return _parameters(model)

    plain, monitored = train(False), train(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, monitored, strict=True))


def test_progress_lines_are_logged_when_stderr_is_not_a_terminal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="forseti.trainer_sidecar.monitoring")
    model = ppo_cartpole()
    monitor = TrainingMonitor(SidecarMetrics(), CHUNK, log_every_s=0.0)  # progress: auto
    model.learn(CHUNK, callback=monitor)
    assert monitor.show_progress is False  # pytest captures stderr: not a terminal
    lines = [r for r in caplog.records if r.getMessage() == "training progress"]
    assert lines
    last = lines[-1]
    assert last.levelno == logging.INFO
    assert last.timesteps == CHUNK
    assert last.steps_per_s > 0
    assert last.mean_return > 0
    assert "loss_value" in vars(last)


def test_progress_lines_follow_the_interval_not_each_learn_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="forseti.trainer_sidecar.monitoring")
    model = ppo_cartpole()
    monitor = TrainingMonitor(SidecarMetrics(), 2 * CHUNK, log_every_s=3600.0, progress=False)
    for _ in range(4):  # the orchestrator learns in short chunks
        model.learn(CHUNK // 2, callback=monitor, reset_num_timesteps=False)
    lines = [r for r in caplog.records if r.getMessage() == "training progress"]
    assert [r.timesteps for r in lines] == [2 * CHUNK]  # only the run's end


def test_gate_decisions_are_counted_and_the_last_one_served(
    metrics_server: tuple[SidecarMetrics, int],
) -> None:
    metrics, port = metrics_server
    metrics.record_gate(480.0, 400.0, promoted=True, reason="beats live by 80.0 >= margin 5.0")
    metrics.record_gate(390.0, 480.0, promoted=False, reason="worse than live by 90.0")
    s = Scrape(port)
    assert s.value("forseti_gate_decisions_total", decision="promoted") == 1
    assert s.value("forseti_gate_decisions_total", decision="not_promoted") == 1
    assert s.value("forseti_gate_candidate_return") == 390.0
    assert s.value("forseti_gate_live_return") == 480.0
    assert s.value("forseti_gate_last_promoted") == 0
    last = s.value(
        "forseti_gate_last_decision_info",
        decision="not_promoted",
        reason="worse than live by 90.0",
    )
    assert last == 1


def test_gate_without_live_version_serves_nan_live_return(
    metrics_server: tuple[SidecarMetrics, int],
) -> None:
    metrics, port = metrics_server
    metrics.record_gate(120.0, None, promoted=True, reason="no live version")
    s = Scrape(port)
    assert math.isnan(s.value("forseti_gate_live_return"))
    assert s.value("forseti_gate_last_promoted") == 1


def test_gate_decision_is_logged_with_both_returns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="forseti.trainer_sidecar.training_metrics")
    SidecarMetrics().record_gate(300.0, 310.0, promoted=False, reason="below margin")
    (record,) = [r for r in caplog.records if r.getMessage() == "gate decision"]
    assert (record.candidate_return, record.live_return) == (300.0, 310.0)
    assert record.decision == "not_promoted"


def test_promotions_are_counted_with_version_and_duration(
    metrics_server: tuple[SidecarMetrics, int],
) -> None:
    metrics, port = metrics_server
    metrics.record_promotion(3, 0.8)
    metrics.record_promotion(4, 1.2)
    s = Scrape(port)
    assert s.value("forseti_promotions_total") == 2
    assert s.value("forseti_promoted_version") == 4
    assert s.value("forseti_promotion_duration_seconds_count") == 2
    assert s.value("forseti_promotion_duration_seconds_sum") == pytest.approx(2.0)
    assert s.value("forseti_promotion_duration_seconds_bucket", le="1.0") == 1


def test_logger_output_forwards_numbers_and_skips_text() -> None:
    metrics = SidecarMetrics()
    writer = PrometheusKVWriter(metrics, total_loss_kind="q")
    writer.write(
        {
            "train/loss": np.float32(0.25),
            "train/n_updates": 7,
            "train/learning_rate": 1e-3,
            "rollout/exploration_rate": np.array(0.5),
            "custom/note": "text is not a metric",
        },
        {},
        step=10,
    )
    snapshot = metrics.snapshot()
    assert snapshot.losses == {"q": 0.25}
    assert (snapshot.updates, snapshot.learning_rate, snapshot.exploration_rate) == (7, 1e-3, 0.5)


def test_metrics_server_on_port_zero_reports_its_port_and_stops() -> None:
    server, port = start_metrics_server(SidecarMetrics(), "127.0.0.1", 0)
    assert port > 0
    assert server.url == f"http://127.0.0.1:{port}/metrics"
    Scrape(port)
    server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_metrics_server_on_a_busy_port_says_what_to_do() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match="pick another port"):
            MetricsServer(SidecarMetrics(), "127.0.0.1", port)
