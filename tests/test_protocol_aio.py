"""The same protocol through `tritonclient.grpc.aio`, the asyncio client, over loopback.

Each test runs its coroutine with `asyncio.run`; no pytest plugin is involved.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from testkit.model_builders import OBS_DIM

POLICY_ACTION = 1  # policy v1 in the standard repository answers action == 1 % 4


def obs(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (batch, OBS_DIM)).astype(np.float32)


def policy_inputs(x: np.ndarray, name: str = "obs") -> list[InferInput]:
    tensor = InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


def run_with_client(url: str, body):
    """Run `body(client)` on a fresh aio client inside its own event loop."""

    async def main():
        async with aioclient.InferenceServerClient(url) as client:
            return await body(client)

    return asyncio.run(main())


def test_aio_server_is_live_and_ready(shared_server):
    async def body(client):
        return await client.is_server_live(), await client.is_server_ready()

    assert run_with_client(shared_server.url, body) == (True, True)


def test_aio_model_ready_is_true_for_policy_and_false_for_unknown(shared_server):
    async def body(client):
        return await client.is_model_ready("policy"), await client.is_model_ready("nope")

    assert run_with_client(shared_server.url, body) == (True, False)


def test_aio_server_metadata_names_forseti(shared_server):
    async def body(client):
        return await client.get_server_metadata()

    meta = run_with_client(shared_server.url, body)
    assert meta.name == "forseti"
    assert "model_repository" in meta.extensions


def test_aio_model_metadata_describes_policy_tensors(shared_server):
    async def body(client):
        return await client.get_model_metadata("policy", as_json=True)

    meta = run_with_client(shared_server.url, body)
    assert meta["name"] == "policy"
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "obs", "datatype": "FP32", "shape": ["-1", "8"]}]
    assert [o["name"] for o in meta["outputs"]] == ["action", "logits"]


def test_aio_infer_policy_with_raw_input_returns_actions(shared_server):
    async def body(client):
        return await client.infer("policy", policy_inputs(obs(4)), request_id="aio-1")

    result = run_with_client(shared_server.url, body)
    assert result.get_response().id == "aio-1"
    action = result.as_numpy("action")
    assert action.shape == (4, 1) and action.dtype == np.int64
    assert (action == POLICY_ACTION).all()


def test_aio_stream_infer_answers_each_request_with_its_id(shared_server):
    async def requests():
        for i in range(4):
            yield {
                "model_name": "policy",
                "inputs": policy_inputs(obs(i + 1, i)),
                "request_id": f"a{i}",
            }

    async def body(client):
        answers = []
        async for result, error in client.stream_infer(requests()):
            answers.append((result, error))
            if len(answers) == 4:
                break
        return answers

    answers = run_with_client(shared_server.url, body)
    assert [error for _, error in answers] == [None] * 4
    assert [r.get_response().id for r, _ in answers] == ["a0", "a1", "a2", "a3"]
    assert [r.as_numpy("action").shape for r, _ in answers] == [(1, 1), (2, 1), (3, 1), (4, 1)]
    assert all((r.as_numpy("action") == POLICY_ACTION).all() for r, _ in answers)


def test_aio_stream_infer_reports_an_error_and_keeps_going(shared_server):
    async def requests():
        yield {"model_name": "policy", "inputs": policy_inputs(obs(65)), "request_id": "big"}
        yield {"model_name": "policy", "inputs": policy_inputs(obs(1)), "request_id": "ok"}

    async def body(client):
        answers = []
        async for answer in client.stream_infer(requests()):
            answers.append(answer)
            if len(answers) == 2:
                break
        return answers

    (bad, bad_error), (good, good_error) = run_with_client(shared_server.url, body)
    assert bad is None and "batch-size must be <= 64" in bad_error.message()
    assert good_error is None and good.get_response().id == "ok"


def test_aio_infer_on_an_unknown_model_is_not_found(shared_server):
    async def body(client):
        return await client.infer("no_such_model", policy_inputs(obs(1)))

    with pytest.raises(InferenceServerException) as info:
        run_with_client(shared_server.url, body)
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in info.value.message()


def test_aio_wrong_input_name_is_invalid_argument(shared_server):
    async def body(client):
        return await client.infer("policy", policy_inputs(obs(1), name="observation"))

    with pytest.raises(InferenceServerException) as info:
        run_with_client(shared_server.url, body)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'observation'" in info.value.message()
