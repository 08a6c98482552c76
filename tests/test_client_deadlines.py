"""The decision client against real servers on loopback: deadlines met with a fallback when a
server is slow, the late call dropped, retries only where they can help, batches and options."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client import CollectorRegistry

from forseti.client import (
    AsyncDecisionClient,
    ClientMetrics,
    DecisionClient,
    DecisionRejected,
    FixedAction,
    Hedging,
    LastGoodAction,
)
from forseti.core.sealing.keyring import Keyring
from testkit.delay_proxy import DelayProxy
from testkit.model_builders import (
    POLICY_CONFIG,
    build_repository,
    policy_onnx,
    publish_sealed,
    write_config,
)
from testkit.server_process import ServerProcess, free_port

OBS = np.full(8, 0.1, np.float32)
# A deadline with room for a busy 2-core machine, and how late a fallback may come there: the
# client ends the call at the deadline; the slack is for the test's own scheduling.
DEADLINE_MS = 150
SLACK_S = 0.1
# "queued" waits up to a second for a batch of 64 that never comes.
QUEUED_CONFIG = POLICY_CONFIG.replace('name: "policy"', 'name: "queued"') + (
    "dynamic_batching { preferred_batch_size: [ 64 ] max_queue_delay_microseconds: 1000000 }\n"
)

# "bounded" holds one queued request at most: a second one is RESOURCE_EXHAUSTED at once.
BOUNDED_CONFIG = POLICY_CONFIG.replace('name: "policy"', 'name: "bounded"') + (
    "dynamic_batching { preferred_batch_size: [ 64 ] max_queue_delay_microseconds: 300000 "
    "default_queue_policy { max_queue_size: 1 } }\n"
)


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory, keyring: Keyring, keyring_path: Path
) -> Iterator[list[ServerProcess]]:
    repo = tmp_path_factory.mktemp("client") / "repo"
    repo.mkdir()
    build_repository(repo, keyring)
    write_config(repo, "queued", QUEUED_CONFIG)
    publish_sealed(repo, "queued", policy_onnx(1), keyring, version=1)
    write_config(repo, "bounded", BOUNDED_CONFIG)
    publish_sealed(repo, "bounded", policy_onnx(1), keyring, version=1)
    args = ["--model-control-mode", "explicit", "--load-model", "*"]
    servers = [ServerProcess(repo, keyring_path, args) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:  # started side by side: each waits for its port
        started = list(pool.map(lambda s: s.start(), servers))
    yield started
    for server in started:
        server.stop()


def _failures(server: ServerProcess, model: str) -> int:
    with server.client() as client:
        (stats,) = client.get_inference_statistics(model, "1").model_stats
    return int(stats.inference_stats.fail.count)


def _queued(server: ServerProcess, model: str) -> int:
    """Requests the server has taken for `model` and not finished (pending)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as page:
        text = page.read().decode()
    for line in text.splitlines():
        if line.startswith("nv_inference_pending_request_count") and f'model="{model}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def _executions(server: ServerProcess, model: str) -> int:
    with server.client() as client:
        (stats,) = client.get_inference_statistics(model, "1").model_stats
    return int(stats.execution_count)


def _replica_errors(registry: CollectorRegistry, endpoint: str) -> float:
    return sum(
        sample.value
        for metric in registry.collect()
        if metric.name == "forseti_client_replica_errors"
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels.get("endpoint") == endpoint
    )


def test_a_slow_server_gets_the_fallback_at_the_deadline(servers: list[ServerProcess]) -> None:
    registry = CollectorRegistry()
    with (
        DelayProxy(servers[0].url) as proxy,
        DecisionClient(
            [proxy.address],
            "policy",
            deadline_ms=DEADLINE_MS,
            fallback=FixedAction(-1),
            metrics=ClientMetrics(registry),
        ) as client,
    ):
        assert not client.decide(OBS, deadline_ms=2000).fallback_used  # answered while fast
        proxy.delay_s = 2.0
        started = time.monotonic()
        decision = client.decide(OBS)
        elapsed = time.monotonic() - started
    assert decision.fallback_used and decision.fallback_reason == "deadline"
    assert decision.action == -1 and decision.model_version is None
    assert elapsed <= DEADLINE_MS / 1000 + SLACK_S
    assert decision.latency_s <= DEADLINE_MS / 1000 + SLACK_S
    fallbacks = registry.get_sample_value(
        "forseti_client_fallbacks_total", {"model": "policy", "reason": "deadline"}
    )
    assert fallbacks == 1


def test_calls_left_behind_at_the_deadline_are_dropped_by_the_server(
    servers: list[ServerProcess],
) -> None:
    """A plain call, and a hedged call with its hedge: none is computed after the fallback."""
    before = [_executions(s, "queued") for s in servers]
    registry = CollectorRegistry()
    with (
        DecisionClient([servers[0].url], "queued", deadline_ms=DEADLINE_MS, fallback=-1) as a,
        DecisionClient(
            [s.url for s in servers],
            "queued",
            deadline_ms=DEADLINE_MS,
            fallback=-1,
            hedging=Hedging(after_ms=30),
            metrics=ClientMetrics(registry),
        ) as hedged,
    ):
        plain = a.decide(OBS)
        both = hedged.decide(OBS)  # the first attempt and its hedge, one on each replica
        time.sleep(1.3)  # past the model's queue delay: a call still queued would have run
    assert plain.fallback_used and plain.fallback_reason == "deadline"
    assert both.fallback_used and both.fallback_reason == "deadline"
    assert both.latency_s <= DEADLINE_MS / 1000 + SLACK_S
    assert [_executions(s, "queued") for s in servers] == before
    sent = {"model": "queued", "result": "sent"}
    assert registry.get_sample_value("forseti_client_hedges_total", sent) == 1


def test_bad_input_is_rejected_once_and_never_retried(servers: list[ServerProcess]) -> None:
    registry = CollectorRegistry()
    before = sum(_failures(s, "policy") for s in servers)
    with (
        DecisionClient(
            [s.url for s in servers],
            "policy",
            deadline_ms=1000,
            fallback=-1,
            max_attempts=3,
            metrics=ClientMetrics(registry),
        ) as client,
        pytest.raises(DecisionRejected) as rejected,
    ):
        client.decide(np.zeros(5, np.float32))  # the model takes 8 values
    assert rejected.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "obs" in rejected.value.message
    assert sum(_failures(s, "policy") for s in servers) - before == 1
    assert registry.get_sample_value("forseti_client_retries_total", {"model": "policy"}) is None


def test_an_overloaded_replica_is_retried_elsewhere_and_kept_in_rotation(
    servers: list[ServerProcess],
) -> None:
    registry = CollectorRegistry()
    with (
        servers[0].client() as blocker_client,
        DecisionClient(
            [s.url for s in servers],
            "bounded",
            deadline_ms=3000,
            metrics=ClientMetrics(registry),
        ) as client,
    ):
        blocker = grpcclient.InferInput("obs", [1, 8], "FP32")
        blocker.set_data_from_numpy(OBS[None])
        done = threading.Event()
        blocker_client.async_infer("bounded", [blocker], lambda result, error: done.set())
        end = time.monotonic() + 5  # until the blocker sits in the first replica's queue
        while time.monotonic() < end and _queued(servers[0], "bounded") < 1:
            time.sleep(0.01)
        decision = client.decide(OBS)  # round robin starts with the first replica
        healthy = client.replicas.healthy_count()
        done.wait(10)
    assert not decision.fallback_used and decision.endpoint == servers[1].url
    assert registry.get_sample_value(
        "forseti_client_retries_total", {"model": "bounded", "code": "RESOURCE_EXHAUSTED"}
    )
    assert healthy == 2  # overload is not a reason to eject


def test_a_rejection_can_be_answered_with_the_fallback_instead(
    servers: list[ServerProcess],
) -> None:
    with DecisionClient(
        [servers[0].url], "policy", deadline_ms=2000, fallback=-1, fallback_on_rejection=True
    ) as client:
        decision = client.decide(np.zeros(5, np.float32))
    assert decision.fallback_used and decision.fallback_reason == "rejected:INVALID_ARGUMENT"


def test_an_unreachable_replica_is_skipped_and_ejected_after_its_first_failure(
    servers: list[ServerProcess],
) -> None:
    registry = CollectorRegistry()
    dead = f"127.0.0.1:{free_port()}"
    with DecisionClient(
        [dead, servers[0].url],
        "policy",
        deadline_ms=1000,
        fallback=-1,
        metrics=ClientMetrics(registry),
        probe_every_s=60,
    ) as client:
        decisions = [client.decide(OBS) for _ in range(6)]
    assert all(not d.fallback_used for d in decisions)
    assert {d.endpoint for d in decisions} == {servers[0].url}
    # At most one call went there (none when the first health check was quicker).
    assert _replica_errors(registry, dead) <= 1
    assert registry.get_sample_value(
        "forseti_client_replica_ejections_total", {"model": "policy", "endpoint": dead}
    )


def test_a_replica_that_accepts_but_never_answers_costs_one_connect_timeout(
    servers: list[ServerProcess],
) -> None:
    silent = socket.socket()  # takes connections, never speaks HTTP/2
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    address = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        with DecisionClient(
            [address, servers[0].url],
            "policy",
            deadline_ms=2000,
            fallback=-1,
            connect_timeout_ms=50,
            probe_every_s=60,
        ) as client:
            timed = []
            for _ in range(4):
                started = time.monotonic()
                decision = client.decide(OBS)
                timed.append((decision, time.monotonic() - started))
    finally:
        silent.close()
    assert all(d.endpoint == servers[0].url for d, _ in timed)
    assert all(elapsed < 1.0 for _, elapsed in timed)  # far from the 2 s deadline


def test_a_dns_name_stands_for_every_replica_behind_it(servers: list[ServerProcess]) -> None:
    port = servers[0].url.rpartition(":")[2]
    with DecisionClient(f"dns:///localhost:{port}", "policy", deadline_ms=2000) as client:
        decisions = [client.decide(OBS) for _ in range(4)]
        addresses = {e.address for e in client.replicas.endpoints}
    assert f"127.0.0.1:{port}" in addresses  # and [::1] where localhost has it too
    assert all(not d.fallback_used for d in decisions)


def test_batches_keys_versions_and_parameters(servers: list[ServerProcess]) -> None:
    fallback = LastGoodAction(default=-1)
    with DecisionClient([servers[1].url], "policy", deadline_ms=2000, fallback=fallback) as client:
        batch = client.decide_batch(np.zeros((3, 8), np.float32), keys=["a", "b", "c"])
        pinned = client.decide(OBS, version=1, parameters={"priority": 1}, key="d")
        with pytest.raises(DecisionRejected) as missing:
            client.decide(OBS, version=7)
    assert batch.action.shape == (3, 1) and batch.outputs["logits"].shape == (3, 4)
    assert batch.model_version == "1" and batch.endpoint == servers[1].url
    assert pinned.model_version == "1" and pinned.action.shape == (1,)
    assert [fallback.get(k) for k in "abcd"] == [1, 1, 1, 1]  # policy v1 answers 1
    assert missing.value.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)


def test_async_client_answers_then_falls_back_at_the_deadline(
    servers: list[ServerProcess],
) -> None:
    async def scenario(proxy: DelayProxy) -> tuple[bool, bool, float]:
        async with AsyncDecisionClient(
            [proxy.address], "policy", deadline_ms=DEADLINE_MS, fallback=-1
        ) as client:
            answered = await client.decide(OBS, deadline_ms=2000)
            proxy.delay_s = 2.0
            started = time.monotonic()
            late = await client.decide(OBS)
            return answered.fallback_used, late.fallback_used, time.monotonic() - started

    with DelayProxy(servers[1].url) as proxy:
        first, second, elapsed = asyncio.run(scenario(proxy))
    assert (first, second) == (False, True)
    assert elapsed <= DEADLINE_MS / 1000 + SLACK_S
