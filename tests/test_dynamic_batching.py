"""Dynamic batching, back-pressure and timeouts over the real server."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg
from tritonclient.utils import InferenceServerException

from forseti.core.sealing.keyring import Keyring
from testkit.model_builders import SIMPLE_CONFIG, publish_sealed, simple_onnx, write_config
from tests.test_shutdown import SLOW_CONFIG, WIDTH, slow_onnx

BATCHED_SIMPLE = SIMPLE_CONFIG.replace("max_batch_size: 8", "max_batch_size: 64") + (
    "dynamic_batching { max_queue_delay_microseconds: 5000 }\n"
)


def slow_config(batching: str) -> str:
    return SLOW_CONFIG.replace("max_batch_size: 256", "max_batch_size: 64") + batching


@pytest.fixture
def batching_repo(tmp_path: Path, keyring: Keyring) -> Path:
    repo = tmp_path / "repo"
    write_config(repo, "simple", BATCHED_SIMPLE)
    publish_sealed(repo, "simple", simple_onnx(), keyring, version=1)
    return repo


def _simple_call(url: str, seed: int, calls: int) -> list[bool]:
    client = grpcclient.InferenceServerClient(url)
    ok = []
    rng = np.random.default_rng(seed)
    for _ in range(calls):
        a = rng.integers(-1000, 1000, (1, 16), dtype=np.int32)
        b = rng.integers(-1000, 1000, (1, 16), dtype=np.int32)
        i0 = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
        i0.set_data_from_numpy(a)
        i1 = grpcclient.InferInput("INPUT1", [1, 16], "INT32")
        i1.set_data_from_numpy(b)
        r = client.infer("simple", [i0, i1])
        ok.append(
            np.array_equal(r.as_numpy("OUTPUT0"), a + b)
            and np.array_equal(r.as_numpy("OUTPUT1"), a - b)
        )
    client.close()
    return ok


def test_concurrent_requests_form_batches_and_each_gets_its_own_answer(
    batching_repo: Path, start_server
) -> None:
    server = start_server(batching_repo)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda s: _simple_call(server.url, s, 20), range(16)))
    assert all(all(r) for r in results)
    stats = grpcclient.InferenceServerClient(server.url).get_inference_statistics("simple")
    s = stats.model_stats[0]
    assert s.inference_count == 16 * 20
    assert s.inference_stats.success.count == 16 * 20
    assert s.execution_count < s.inference_count / 2, (s.execution_count, s.inference_count)
    assert max(b.batch_size for b in s.batch_stats) > 1
    assert s.inference_stats.queue.ns > 0


def _slow_repo(tmp_path: Path, keyring: Keyring, batching: str) -> Path:
    repo = tmp_path / "repo"
    write_config(repo, "slow", slow_config(batching))
    publish_sealed(repo, "slow", slow_onnx(), keyring, version=1)
    return repo


def _slow_call(url: str, results: list, **kwargs) -> None:
    client = grpcclient.InferenceServerClient(url)
    x = grpcclient.InferInput("x", [64, WIDTH], "FP32")
    x.set_data_from_numpy(np.ones((64, WIDTH), np.float32))
    started = time.monotonic()
    try:
        client.infer("slow", [x], **kwargs)
        results.append(("ok", time.monotonic() - started))
    except InferenceServerException as exc:
        results.append((exc.status(), exc.message()))
    finally:
        client.close()


def _run_concurrently(url: str, n: int, **kwargs) -> list:
    results: list = []
    threads = [
        threading.Thread(target=_slow_call, args=(url, results), kwargs=kwargs) for _ in range(n)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_full_queue_answers_resource_exhausted_at_once(
    tmp_path: Path, keyring: Keyring, start_server
) -> None:
    repo = _slow_repo(
        tmp_path, keyring, "dynamic_batching { default_queue_policy { max_queue_size: 1 } }"
    )
    server = start_server(repo)
    results = _run_concurrently(server.url, 8)
    refused = [r for r in results if r[0] == "StatusCode.RESOURCE_EXHAUSTED"]
    assert refused, results
    assert all("queue" in r[1] and "full" in r[1] for r in refused)
    assert any(r[0] == "ok" for r in results)
    assert len(refused) + sum(r[0] == "ok" for r in results) == 8


def test_request_timeout_drops_a_queued_request_without_computing_it(
    tmp_path: Path, keyring: Keyring, start_server
) -> None:
    repo = _slow_repo(tmp_path, keyring, "dynamic_batching { }")
    server = start_server(repo)
    client = grpcclient.InferenceServerClient(server.url)
    before = client.get_inference_statistics("slow").model_stats[0]
    busy: list = []
    blocker = threading.Thread(target=_slow_call, args=(server.url, busy))
    blocker.start()
    time.sleep(0.05)  # the first request is running; the next ones queue behind it
    results = _run_concurrently(server.url, 3, timeout=1000)  # 1 ms, in microseconds
    blocker.join(60)
    after = client.get_inference_statistics("slow").model_stats[0]
    expired = [r for r in results if r[0] == "StatusCode.UNAVAILABLE"]
    assert expired, results
    assert all("timeout expired" in r[1] for r in expired)
    computed = after.inference_count - before.inference_count
    assert computed == 64 * (1 + len(results) - len(expired))
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == len(expired)


def test_grpc_deadline_drops_a_queued_request_without_computing_it(
    tmp_path: Path, keyring: Keyring, start_server
) -> None:
    repo = _slow_repo(tmp_path, keyring, "dynamic_batching { }")
    server = start_server(repo)
    client = grpcclient.InferenceServerClient(server.url)
    busy: list = []
    blockers = [threading.Thread(target=_slow_call, args=(server.url, busy)) for _ in range(2)]
    for b in blockers:
        b.start()
    time.sleep(0.05)
    results = _run_concurrently(server.url, 2, client_timeout=0.01)
    for b in blockers:
        b.join(60)
    assert [r[0] for r in results] == ["StatusCode.DEADLINE_EXCEEDED"] * 2
    time.sleep(0.5)
    after = client.get_inference_statistics("slow").model_stats[0]
    assert after.inference_count == 64 * 2


def test_server_wide_inflight_limit_answers_resource_exhausted(
    tmp_path: Path, keyring: Keyring, start_server
) -> None:
    repo = _slow_repo(tmp_path, keyring, "dynamic_batching { }")
    server = start_server(repo, "--max-inflight-requests", "2")
    results = _run_concurrently(server.url, 8)
    refused = [r for r in results if r[0] == "StatusCode.RESOURCE_EXHAUSTED"]
    assert refused, results
    assert all("in-flight" in r[1] for r in refused)
    assert any(r[0] == "ok" for r in results)


def test_non_integer_timeout_parameter_is_invalid_argument(
    batching_repo: Path, start_server
) -> None:
    server = start_server(batching_repo)
    request = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        request.raw_input_contents.append(np.zeros((1, 16), np.int32).tobytes())
    request.parameters["timeout"].string_param = "soon"
    with grpc.insecure_channel(server.url) as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'timeout' must be an integer" in info.value.details()


def test_higher_priority_request_runs_before_an_earlier_lower_priority_one(
    tmp_path: Path, keyring: Keyring, start_server
) -> None:
    repo = _slow_repo(tmp_path, keyring, "dynamic_batching { priority_levels: 2 }")
    server = start_server(repo)
    finished: list[str] = []

    def call(tag: str, priority: int) -> None:
        results: list = []
        _slow_call(server.url, results, priority=priority)
        assert results[0][0] == "ok", results
        finished.append(tag)

    # Every call fills the model's max_batch_size (64 rows), so no two share a batch. Two
    # blockers (~25 ms each on a fast 2-core machine) keep the model busy while the low- and
    # then the high-priority call arrive and queue.
    blockers = [threading.Thread(target=call, args=(f"blocker{i}", 1)) for i in (1, 2)]
    low = threading.Thread(target=call, args=("low", 2))
    high = threading.Thread(target=call, args=("high", 1))
    for b in blockers:
        b.start()
        time.sleep(0.005)
    time.sleep(0.01)
    low.start()
    time.sleep(0.005)
    high.start()
    for t in (*blockers, low, high):
        t.join(60)
    assert finished[-2:] == ["high", "low"], finished


def test_cancelled_queued_requests_give_their_queue_slots_back(
    tmp_path: Path, keyring: Keyring, start_server
) -> None:
    repo = tmp_path / "repo"
    batching = "dynamic_batching { default_queue_policy { max_queue_size: 4 } }"
    write_config(repo, "slow", SLOW_CONFIG + batching)  # max_batch_size 256
    publish_sealed(repo, "slow", slow_onnx(), keyring, version=1)
    server = start_server(repo)
    client = grpcclient.InferenceServerClient(server.url)

    def rows(n: int) -> list:
        x = grpcclient.InferInput("x", [n, WIDTH], "FP32")
        x.set_data_from_numpy(np.ones((n, WIDTH), np.float32))
        return [x]

    client.async_infer("slow", rows(256), lambda result, error: None)
    time.sleep(0.03)  # the executor is busy with 256 rows for a good while
    queued = [client.async_infer("slow", rows(1), lambda r, e: None) for _ in range(4)]
    time.sleep(0.02)
    for call in queued:
        call.cancel()
    time.sleep(0.02)
    result = client.infer("slow", rows(1))  # refused if the cancelled ones still held slots
    assert result.as_numpy("y").shape == (1, WIDTH)
    client.close()
