"""The metrics a fleet needs on /metrics: Triton's nv_inference_pending_request_count and the
version each model serves on this replica, from a real server."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper

from forseti.core.sealing.keyring import Keyring
from testkit.model_builders import (
    build_repository,
    onnx_model_bytes,
    policy_onnx,
    publish_sealed,
    write_config,
)
from testkit.server_process import ServerProcess

WIDTH = 512
LAYERS = 16
BATCH = 64

# No dynamic batching and a warm-up over a millisecond: one instance thread runs one request
# at a time, the others wait for it (pending, in Triton's words).
SLOW_CONFIG = f"""
name: "slow"
backend: "onnxruntime"
max_batch_size: {BATCH}
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]
parameters {{ key: "forseti.execution" value: {{ string_value: "threaded" }} }}
"""


# The same model behind the dynamic batcher: a request fills a batch on its own, so the others
# wait in the batcher's queue.
BATCHED_CONFIG = f"""
name: "slow_batched"
backend: "onnxruntime"
max_batch_size: {BATCH}
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]
dynamic_batching {{ }}
"""


def slow_onnx() -> bytes:
    w = (np.eye(WIDTH, dtype=np.float32) * 0.5).astype(np.float32)
    nodes, prev = [], "x"
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


def scrape(server: ServerProcess) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def sample(text: str, name: str, labels: str) -> float | None:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return None if match is None else float(match.group(1))


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, keyring: Keyring, keyring_path: Path
) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("fleet-metrics") / "repo"
    repo.mkdir()
    build_repository(repo, keyring)
    write_config(repo, "slow", SLOW_CONFIG)
    publish_sealed(repo, "slow", slow_onnx(), keyring, version=1)
    write_config(repo, "slow_batched", BATCHED_CONFIG)
    publish_sealed(repo, "slow_batched", slow_onnx(), keyring, version=1)
    proc = ServerProcess(
        repo,
        keyring_path,
        [
            "--model-control-mode",
            "explicit",
            "--load-model",
            "policy",
            "--load-model",
            "slow",
            "--load-model",
            "slow_batched",
        ],
    ).start()
    yield proc
    proc.stop()


@pytest.mark.parametrize("model", ["slow", "slow_batched"])
def test_pending_request_count_counts_requests_waiting_for_the_model(
    server: ServerProcess, model: str
) -> None:
    labels = f'{{model="{model}",version="1"}}'
    assert sample(scrape(server), "nv_inference_pending_request_count", labels) == 0

    def call() -> None:
        with server.client() as client:
            x = grpcclient.InferInput("x", [BATCH, WIDTH], "FP32")
            x.set_data_from_numpy(np.ones((BATCH, WIDTH), np.float32))
            client.infer(model, [x], client_timeout=120)

    calls = [threading.Thread(target=call) for _ in range(8)]
    for t in calls:
        t.start()
    seen: list[float] = []
    while any(t.is_alive() for t in calls):
        value = sample(scrape(server), "nv_inference_pending_request_count", labels)
        assert value is not None
        seen.append(value)
        time.sleep(0.01)
    for t in calls:
        t.join()
    # One instance: while one call computes, others waited (at most the 7 others).
    assert 1 <= max(seen) <= 7, seen
    assert sample(scrape(server), "nv_inference_pending_request_count", labels) == 0


def test_serving_version_follows_a_swap(server: ServerProcess, keyring: Keyring) -> None:
    name = "forseti_model_serving_version"
    assert sample(scrape(server), name, '{model="policy"}') == 1
    assert sample(scrape(server), name, '{model="simple"}') is None  # not loaded
    version = publish_sealed(server.repository, "policy", policy_onnx(2), keyring)
    with server.client() as client:
        client.load_model("policy")
    assert sample(scrape(server), name, '{model="policy"}') == version
