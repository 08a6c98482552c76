"""SIGTERM / SIGINT: stop accepting, finish the running requests, exit 0."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper

from forseti.core.sealing.keyring import Keyring
from testkit.model_builders import onnx_model_bytes, publish_sealed, write_config

WIDTH = 1024
LAYERS = 24

SLOW_CONFIG = f"""
name: "slow"
backend: "onnxruntime"
max_batch_size: 256
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]
"""


def slow_onnx() -> bytes:
    """A deep square MLP: a batch of 256 takes a noticeable fraction of a second."""
    w = (np.eye(WIDTH, dtype=np.float32) * 0.5).astype(np.float32)
    nodes = []
    prev = "x"
    for i in range(LAYERS):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])],
        [numpy_helper.from_array(w, "w")],
    )
    return onnx_model_bytes(graph)


@pytest.fixture
def slow_repo(tmp_path: Path, keyring: Keyring) -> Path:
    repo = tmp_path / "repo"
    write_config(repo, "slow", SLOW_CONFIG)
    publish_sealed(repo, "slow", slow_onnx(), keyring, version=1)
    return repo


def _infer_slow(url: str, results: list) -> None:
    client = grpcclient.InferenceServerClient(url)
    x = grpcclient.InferInput("x", [256, WIDTH], "FP32")
    x.set_data_from_numpy(np.ones((256, WIDTH), np.float32))
    try:
        out = client.infer("slow", [x], client_timeout=60).as_numpy("y")
        results.append(("ok", float(out[0, 0]), time.monotonic()))
    except Exception as exc:
        results.append(("error", str(exc), time.monotonic()))
    finally:
        client.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_finishes_running_requests_and_exits_zero(
    slow_repo: Path, start_server, sig: int
) -> None:
    server = start_server(slow_repo)
    results: list = []
    calls = [threading.Thread(target=_infer_slow, args=(server.url, results)) for _ in range(3)]
    for t in calls:
        t.start()
    # Signal once the first call is answered: the model has one instance, so the other two
    # are still running or waiting for it (a fixed sleep raced a fast machine).
    deadline = time.monotonic() + 30
    while not results and time.monotonic() < deadline:
        time.sleep(0.005)
    started = time.monotonic()
    server.proc.send_signal(sig)
    for t in calls:
        t.join(60)
    code = server.proc.wait(60)
    assert code == 0, server.log()
    assert [r[0] for r in results] == ["ok", "ok", "ok"], results
    assert results[0][1] == pytest.approx(0.5**LAYERS)
    assert max(r[2] for r in results) > started, "no request was still running at the signal"
    assert "stopped" in server.log()
    assert time.monotonic() - started < 30


def test_server_refuses_new_calls_once_stopped(slow_repo: Path, start_server) -> None:
    server = start_server(slow_repo)
    server.stop()
    client = grpcclient.InferenceServerClient(server.url)
    with pytest.raises(grpcclient.InferenceServerException):
        client.is_server_live(client_timeout=2)


# HTTP/2's client preface and an empty SETTINGS frame, then the 9-byte header of a HEADERS
# frame (stream 1, END_HEADERS) announcing 100 bytes of which only 2 ever arrive: a request
# that never finishes arriving.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(3) + b"\x04\x00" + bytes(4)
PARTIAL_HEADERS = (100).to_bytes(3, "big") + b"\x01\x04" + (1).to_bytes(4, "big") + b"\x82\x86"
# An HTTP/1.1 request whose head is complete and whose body stops after 4 of 100 bytes.
PARTIAL_BODY = b'POST /v2/models/x/infer HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{"in'
DRAIN_S = 1.0


def _stop_time_with_a_stalled_connection(server, port: int, sent: bytes) -> float:
    """Seconds from SIGTERM to exit while a connection has sent `sent` and stalls."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:
        stalled.sendall(sent)
        time.sleep(0.3)  # the server has read what was sent
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0, server.log()
        took = time.monotonic() - started
        return took


@pytest.fixture
def idle_server(tmp_path: Path, start_server):
    """A server on an empty repository, draining DRAIN_S on a stop, with the default (long)
    --exit-timeout-secs that running requests may use."""
    repo = tmp_path / "empty"
    repo.mkdir()
    return start_server(repo, "--drain-seconds", str(DRAIN_S))


def test_a_stalled_grpc_connection_does_not_hold_the_stop(idle_server) -> None:
    # Held ~20 s before: gRPC waited for the stalled peer to answer its GOAWAY ping.
    took = _stop_time_with_a_stalled_connection(
        idle_server, idle_server.grpc_port, H2_PREFACE + PARTIAL_HEADERS
    )
    assert took < DRAIN_S + 5, took


def test_a_half_sent_http_request_does_not_hold_the_stop(idle_server) -> None:
    # Held until the body timeout (--http-request-timeout-secs, 30 s) before.
    took = _stop_time_with_a_stalled_connection(idle_server, idle_server.http_port, PARTIAL_BODY)
    assert took < DRAIN_S + 5, took
