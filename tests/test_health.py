"""grpc.health.v1.Health on the server's gRPC port: SERVING once the models meant to be served
are ready, never NOT_SERVING during a swap, NOT_SERVING first on SIGTERM and still answering
during the drain, then exit 0. Real `forseti serve` processes and real signals."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from forseti.core.sealing.keyring import Keyring
from testkit.model_builders import OBS_DIM, build_repository, policy_onnx, publish_sealed
from testkit.server_process import ServerProcess

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def check(url: str, service: str = "") -> int:
    with grpc.insecure_channel(url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


class Watcher:
    """Watch one service in a thread, keeping every status the stream sends."""

    def __init__(self, url: str, service: str = "") -> None:
        self.channel = grpc.insecure_channel(url)
        stub = health_pb2_grpc.HealthStub(self.channel)
        self.call = stub.Watch(health_pb2.HealthCheckRequest(service=service))
        self.statuses: list[int] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self.statuses.append(response.status)
        except grpc.RpcError:
            pass  # cancelled, or the server went away

    def wait_for(self, status: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while status not in self.statuses:
            assert time.monotonic() < deadline, f"never saw {status}: {self.statuses}"
            time.sleep(0.02)

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(10)
        self.channel.close()


def infer_policy(client: grpcclient.InferenceServerClient) -> str:
    obs = grpcclient.InferInput("obs", [1, OBS_DIM], "FP32")
    obs.set_data_from_numpy(np.ones((1, OBS_DIM), np.float32))
    result = client.infer("policy", [obs], client_timeout=30)
    return str(result.get_response().model_version)


@pytest.fixture(scope="module")
def explicit_server(
    tmp_path_factory: pytest.TempPathFactory, keyring: Keyring, keyring_path: Path
) -> Iterator[ServerProcess]:
    """Explicit mode, `policy` loaded at start (and `simple` left unloaded); tests may swap
    new versions of `policy` in."""
    repo = tmp_path_factory.mktemp("health") / "repo"
    repo.mkdir()
    build_repository(repo, keyring)
    server = ServerProcess(
        repo, keyring_path, ["--model-control-mode", "explicit", "--load-model", "policy"]
    ).start()
    yield server
    server.stop()


def test_overall_and_model_services_serving_once_startup_models_are_ready(
    explicit_server: ServerProcess,
) -> None:
    assert check(explicit_server.url) == SERVING
    assert check(explicit_server.url, "policy") == SERVING


def test_unknown_service_is_not_found(explicit_server: ServerProcess) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        check(explicit_server.url, "no_such_model")
    assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND


def test_overall_not_serving_while_a_startup_model_cannot_load(
    repository: Path, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong-keyring.json"
    Keyring.generate().save(wrong)  # opens none of the repository's seals
    server = ServerProcess(repository, wrong, ["--model-control-mode", "none"])
    try:
        server.start(wait_ready=False)
        server.wait(lambda c: "server ready" in server.log(), 60)
        assert check(server.url) == NOT_SERVING
        assert check(server.url, "policy") == NOT_SERVING
        with server.client() as client:
            assert not client.is_server_ready()
    finally:
        server.stop()


def test_a_watch_keeps_hearing_changes_after_another_watch_of_its_service_ends(
    explicit_server: ServerProcess,
) -> None:
    leaving = Watcher(explicit_server.url, "simple")
    staying = Watcher(explicit_server.url, "simple")
    unknown = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    try:
        leaving.wait_for(unknown)
        staying.wait_for(unknown)
        leaving.close()
        with explicit_server.client() as control:
            control.load_model("simple")
        staying.wait_for(SERVING)
    finally:
        staying.close()


def test_a_model_removed_from_a_polled_repository_reports_not_serving(
    repository: Path, keyring_path: Path
) -> None:
    server = ServerProcess(
        repository,
        keyring_path,
        ["--model-control-mode", "poll", "--repository-poll-secs", "0.2"],
    ).start()
    try:
        assert check(server.url, "simple") == SERVING
        shutil.rmtree(repository / "simple")
        deadline = time.monotonic() + 30
        while check(server.url, "simple") != NOT_SERVING:
            assert time.monotonic() < deadline, "simple still SERVING after leaving the repository"
            time.sleep(0.05)
        assert check(server.url) == SERVING  # the others still serve
    finally:
        server.stop()


def test_swaps_under_load_never_show_not_serving(
    explicit_server: ServerProcess, keyring: Keyring
) -> None:
    overall = Watcher(explicit_server.url)
    model = Watcher(explicit_server.url, "policy")
    stop = threading.Event()
    failures: list[str] = []
    answered: list[str] = []
    readiness: list[bool] = []

    def load() -> None:
        with explicit_server.client() as client:
            while not stop.is_set():
                try:
                    answered.append(infer_policy(client))
                    readiness.append(client.is_server_ready())
                except Exception as exc:
                    failures.append(str(exc))

    clients = [threading.Thread(target=load) for _ in range(2)]
    try:
        overall.wait_for(SERVING)
        model.wait_for(SERVING)
        for t in clients:
            t.start()
        with explicit_server.client() as control:
            for tag in (2, 3, 4):
                version = publish_sealed(
                    explicit_server.repository, "policy", policy_onnx(tag), keyring
                )
                control.load_model("policy")
                deadline = time.monotonic() + 30
                while str(version) not in answered[-5:]:
                    assert time.monotonic() < deadline, "the new version never answered"
                    time.sleep(0.02)
    finally:
        stop.set()
        for t in clients:
            t.join(30)
        overall.close()
        model.close()
    assert failures == []
    assert set(answered) >= {"2", "3", "4"}
    assert all(readiness)
    assert overall.statuses == [SERVING]
    assert model.statuses == [SERVING]


def test_sigterm_reports_not_serving_then_answers_through_the_drain_and_exits_zero(
    repository: Path, keyring_path: Path
) -> None:
    server = ServerProcess(repository, keyring_path, ["--drain-seconds", "3"]).start()
    watcher = Watcher(server.url)
    try:
        watcher.wait_for(SERVING)
        with server.client() as client:
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            watcher.wait_for(NOT_SERVING)
            # Draining: the replica is not ready but still live and still answers decisions.
            assert infer_policy(client) == "1"
            assert not client.is_server_ready()
            assert client.is_server_live()
            assert check(server.url, "policy") == NOT_SERVING
        assert server.proc.wait(60) == 0, server.log()
        # It kept answering for the drain before it stopped (3 s; a loose lower bound).
        assert time.monotonic() - signalled > 2.5
        # The watch ended with the server (it did not hold the stop for its grace period).
        watcher.thread.join(10)
        assert watcher.statuses == [SERVING, NOT_SERVING]
    finally:
        watcher.close()
        server.stop()


def test_second_signal_ends_the_drain_early(repository: Path, keyring_path: Path) -> None:
    server = ServerProcess(repository, keyring_path, ["--drain-seconds", "600"]).start()
    try:
        server.proc.send_signal(signal.SIGTERM)
        server.wait(lambda c: "draining" in server.log(), 30)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0, server.log()
    finally:
        server.stop()
