"""Server-wide bounds: calls open at once (gRPC's maximum_concurrent_rpcs) and idle /metrics
connections."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from forseti.core.sealing.keyring import Keyring
from forseti.server.app import assemble
from forseti.server.metrics import start_metrics_server
from testkit.model_builders import publish_sealed, write_config
from testkit.server_process import free_port
from tests.test_shutdown import SLOW_CONFIG, WIDTH, slow_onnx


def test_calls_over_max_concurrent_rpcs_are_refused_by_grpc(
    tmp_path: Path, keyring: Keyring, start_server
) -> None:
    repo = tmp_path / "repo"
    write_config(repo, "slow", SLOW_CONFIG)
    publish_sealed(repo, "slow", slow_onnx(), keyring, version=1)
    server = start_server(repo, "--max-concurrent-rpcs", "1")
    start = threading.Barrier(3)
    outcomes: list[str] = []

    def call() -> None:
        client = grpcclient.InferenceServerClient(server.url)
        x = grpcclient.InferInput("x", [256, WIDTH], "FP32")
        x.set_data_from_numpy(np.ones((256, WIDTH), np.float32))
        start.wait()
        try:
            client.infer("slow", [x], client_timeout=60)
            outcomes.append("ok")
        except InferenceServerException as exc:
            outcomes.append(str(exc.status()))
        finally:
            client.close()

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert "ok" in outcomes, outcomes
    assert "StatusCode.RESOURCE_EXHAUSTED" in outcomes, outcomes


def test_an_idle_metrics_connection_is_closed_after_the_client_timeout(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    service = assemble(repo, None)
    port = free_port()
    httpd = start_metrics_server(service.registry, "127.0.0.1", port, client_timeout_s=0.3)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            started = time.monotonic()
            assert conn.recv(1) == b""  # the server closed it; it sent nothing
            assert time.monotonic() - started < 3
    finally:
        httpd.shutdown()
        httpd.server_close()
