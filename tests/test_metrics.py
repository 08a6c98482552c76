"""The Prometheus endpoint speaks Triton's metric names, counted from real inferences."""

from __future__ import annotations

import re
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from testkit.model_builders import OBS_DIM

POLICY = '{model="policy",version="1"}'
TRITON_METRICS = [
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
]


def scrape(server) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def value(text: str, name: str, labels: str = POLICY) -> float:
    """The sample `name{labels}`, spelled exactly as Triton spells it."""
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert match, f"no sample {name}{labels} in:\n{text}"
    return float(match.group(1))


def infer(client, batch: int) -> None:
    x = np.random.default_rng(batch).uniform(-1, 1, (batch, OBS_DIM)).astype(np.float32)
    tensor = grpcclient.InferInput("obs", [batch, OBS_DIM], "FP32")
    tensor.set_data_from_numpy(x)
    client.infer("policy", [tensor])


@pytest.fixture(scope="module")
def client(shared_server):
    c = grpcclient.InferenceServerClient(shared_server.url)
    yield c
    c.close()


def test_request_success_counts_each_successful_inference(shared_server, client):
    before = value(scrape(shared_server), "nv_inference_request_success")
    for _ in range(7):
        infer(client, 1)
    after = value(scrape(shared_server), "nv_inference_request_success")
    assert after - before == 7


def test_every_triton_metric_name_is_exposed_for_the_policy(shared_server, client):
    infer(client, 2)
    text = scrape(shared_server)
    for name in TRITON_METRICS:
        value(text, name)
        assert f"# TYPE {name} counter" in text


def test_inference_count_counts_batch_items_and_exec_count_executions(shared_server, client):
    before = scrape(shared_server)
    infer(client, 5)
    infer(client, 3)
    after = scrape(shared_server)
    assert value(after, "nv_inference_count") - value(before, "nv_inference_count") == 8
    assert value(after, "nv_inference_exec_count") - value(before, "nv_inference_exec_count") == 2


def test_request_failure_counts_a_rejected_request(shared_server, client):
    before = scrape(shared_server)
    tensor = grpcclient.InferInput("obs", [1, 7], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 7), np.float32))
    with pytest.raises(InferenceServerException):
        client.infer("policy", [tensor])
    after = scrape(shared_server)
    failure = "nv_inference_request_failure"
    assert value(after, failure) - value(before, failure) == 1
    success = "nv_inference_request_success"
    assert value(after, success) == value(before, success)


def test_durations_grow_with_inferences(shared_server, client):
    before = scrape(shared_server)
    for _ in range(20):
        infer(client, 64)
    after = scrape(shared_server)
    for name in ("nv_inference_request_duration_us", "nv_inference_compute_infer_duration_us"):
        assert value(after, name) > value(before, name)
    assert value(after, "nv_inference_request_duration_us") >= value(
        after, "nv_inference_compute_infer_duration_us"
    )


def test_models_without_requests_are_listed_at_zero(shared_server):
    text = scrape(shared_server)
    assert value(text, "nv_inference_request_success", '{model="simple",version="1"}') == 0
