"""The decision client over several real replicas: hedging around a slow one, and a kill -9
of one of three under a steady decision loop."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from forseti.client import AsyncDecisionClient, ClientMetrics, Decision, DecisionClient, Hedging
from forseti.core.sealing.keyring import Keyring
from testkit.delay_proxy import DelayProxy
from testkit.model_builders import build_repository
from testkit.server_process import ServerProcess

OBS = np.full(8, 0.1, np.float32)
SLOW_S = 0.2  # the slow replica's added delay
DEADLINE_MS = 1000  # generous: a busy 2-core machine also starts a server during the loop
SLACK_S = 0.2


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, keyring: Keyring, keyring_path: Path
) -> Iterator[list[ServerProcess]]:
    repo = tmp_path_factory.mktemp("replicas") / "repo"
    repo.mkdir()
    build_repository(repo, keyring)
    args = ["--model-control-mode", "explicit", "--load-model", "policy"]
    servers = [ServerProcess(repo, keyring_path, args) for _ in range(3)]
    with ThreadPoolExecutor(3) as pool:  # started side by side: each waits for its port
        started = list(pool.map(lambda s: s.start(), servers))
    yield started
    for server in started:
        server.stop()


def _p99(client: DecisionClient, calls: int) -> float:
    latencies = [client.decide(OBS).latency_s for _ in range(calls)]
    return float(np.percentile(latencies, 99))


def _count(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, {"model": "policy", **labels}) or 0.0


def test_hedging_cuts_the_tail_that_a_slow_replica_makes(
    replicas: list[ServerProcess],
) -> None:
    registry = CollectorRegistry()
    with DelayProxy(replicas[1].url) as slow:
        endpoints = [replicas[0].url, slow.address]
        with (
            DecisionClient(endpoints, "policy", deadline_ms=5000) as plain,
            DecisionClient(
                endpoints,
                "policy",
                deadline_ms=5000,
                hedging=Hedging(after_ms=20),
                metrics=ClientMetrics(registry),
            ) as hedged,
        ):
            for client in (plain, hedged):  # both connected to both replicas while fast
                client.decide(OBS)
                client.decide(OBS)
            slow.delay_s = SLOW_S
            unhedged_p99 = _p99(plain, 12)
            hedged_p99 = _p99(hedged, 12)
    assert unhedged_p99 >= SLOW_S  # half the calls went to the slow replica
    assert hedged_p99 < SLOW_S
    assert _count(registry, "forseti_client_hedges_total", result="sent") >= 1
    assert _count(registry, "forseti_client_hedges_total", result="won") >= 1


def test_the_async_client_hedges_too(replicas: list[ServerProcess]) -> None:
    async def scenario(slow: DelayProxy) -> list[float]:
        async with AsyncDecisionClient(
            [replicas[0].url, slow.address],
            "policy",
            deadline_ms=5000,
            hedging=Hedging(after_ms=20),
        ) as client:
            for _ in range(2):
                await client.decide(OBS)
            slow.delay_s = SLOW_S
            return [(await client.decide(OBS)).latency_s for _ in range(8)]

    with DelayProxy(replicas[1].url) as slow:
        latencies = asyncio.run(scenario(slow))
    assert max(latencies) < SLOW_S


def test_a_paused_replica_costs_a_deadline_or_two_then_is_ejected_and_probed_back(
    replicas: list[ServerProcess],
) -> None:
    paused = replicas[1]
    deadline_s = 0.3
    with DecisionClient(
        [replicas[0].url, paused.url],
        "policy",
        deadline_ms=deadline_s * 1000,
        fallback=-1,
        eject_after_timeouts=2,
        probe_every_s=0.2,
        probe_timeout_s=0.5,
    ) as client:
        for _ in range(4):
            client.decide(OBS, deadline_ms=5000)  # both connected
        os.kill(paused.pid, signal.SIGSTOP)
        try:
            timed = []
            for _ in range(10):
                started = time.monotonic()
                timed.append((client.decide(OBS), time.monotonic() - started))
        finally:
            os.kill(paused.pid, signal.SIGCONT)
        end = time.monotonic() + 15
        back = False
        while not back and time.monotonic() < end:
            back = client.decide(OBS, deadline_ms=5000).endpoint == paused.url
    assert all(elapsed <= deadline_s + SLACK_S for _, elapsed in timed)
    fallbacks = [d for d, _ in timed if d.fallback_used]
    assert 1 <= len(fallbacks) <= 2  # its calls until two deadline misses ejected it
    assert all(d.fallback_reason == "deadline" for d in fallbacks)
    assert back, "the resumed replica was never probed back into rotation"


def test_kill_9_of_one_replica_loses_no_decision_and_it_is_probed_back(
    replicas: list[ServerProcess],
) -> None:
    registry = CollectorRegistry()
    victim = replicas[2]
    decisions: list[tuple[Decision, float]] = []
    failures: list[BaseException] = []
    stop = threading.Event()
    client = DecisionClient(
        [s.url for s in replicas],
        "policy",
        deadline_ms=DEADLINE_MS,
        fallback=-1,
        metrics=ClientMetrics(registry),
        probe_every_s=0.2,
        check_every_s=0.5,
    )

    def loop() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                decision = client.decide(OBS)
            except BaseException as exc:  # a lost decision: the test fails on it
                failures.append(exc)
                return
            decisions.append((decision, time.monotonic() - started))
            time.sleep(0.005)

    def wait_for(condition, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if condition():
                return True
            time.sleep(0.02)
        return False

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        assert wait_for(lambda: {d.endpoint for d, _ in decisions} >= {victim.url}, 10)
        victim.kill()
        killed_at = len(decisions)
        victim_ep = next(e for e in client.replicas.endpoints if e.address == victim.url)
        assert wait_for(lambda: not victim_ep.healthy, 10)
        assert wait_for(lambda: len(decisions) >= killed_at + 30, 20)
        errors_while_dead = sum(
            _count(registry, "forseti_client_replica_errors_total", endpoint=victim.url, code=c)
            for c in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
        )
        after_kill = [d for d, _ in decisions[killed_at + 5 :]]
        victim.restart()
        back_at = len(decisions)
        assert wait_for(
            lambda: any(d.endpoint == victim.url for d, _ in decisions[back_at:]), 20
        ), "the restarted replica was never probed back into rotation"
    finally:
        stop.set()
        thread.join(30)
        client.close()
    assert not failures, failures
    assert all(elapsed <= DEADLINE_MS / 1000 + SLACK_S for _, elapsed in decisions)
    answered = [d for d, _ in decisions if not d.fallback_used]
    assert len(answered) >= 0.95 * len(decisions)  # a retry on another replica answers
    assert errors_while_dead <= 1  # skipped after its first failure (or its health check)
    assert victim.url not in {d.endpoint for d in after_kill}
