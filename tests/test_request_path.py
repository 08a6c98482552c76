"""The request path in-process: servicer, inference handler, tensor checks and the registry,
over the wire with tritonclient, against real sealed onnxruntime models.

No subprocess: each test starts the gRPC server on its own event loop (tests/inprocess_server.py)
on 127.0.0.1 and a free port, calls it with `tritonclient.grpc.aio` in the same loop and stops
it at the end. The tests look only at what a client sees: answers, statuses and messages.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg
from tritonclient.utils import InferenceServerException

from forseti.core.sealing.keyring import Keyring
from testkit.model_builders import (
    OBS_DIM,
    POLICY_CONFIG,
    SIMPLE_CONFIG,
    policy_onnx,
    publish_sealed,
    simple_onnx,
    write_config,
)
from tests.inprocess_server import run_inprocess

# policy_onnx(tag) answers action == tag % 4; each version N here is built with tag N.
POLICY_V1_ACTION = 1

THREADED = 'parameters { key: "forseti.execution" value: { string_value: "threaded" } }\n'
# Four batch-1 requests fill the preferred size long before the 1 s delay runs out.
BATCHED = "dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 1000000 }\n"
# A lone request waits 200 ms in the queue: it stays in flight for that long.
QUEUED = "dynamic_batching { max_queue_delay_microseconds: 200000 }\n"

REQUEST_ID_SUFFIX = re.compile(r" \(request id [0-9a-f]{12}\)$")


def policy_config(name: str, extra: str = "") -> str:
    return POLICY_CONFIG.replace('name: "policy"', f'name: "{name}"') + extra


def build_request_path_repo(repo: Path, keyring: Keyring) -> Path:
    """policy v1 (runs inline), policy_threaded v1 (instance thread), policy_batched v1 and
    policy_queued v1 (dynamic batching), simple v1, policy_broken v1 (does not load); all
    sealed with `keyring`."""
    for name, extra in [
        ("policy", ""),
        ("policy_threaded", THREADED),
        ("policy_batched", BATCHED),
        ("policy_queued", QUEUED),
    ]:
        write_config(repo, name, policy_config(name, extra))
        publish_sealed(repo, name, policy_onnx(1), keyring, version=1)
    write_config(repo, "simple", SIMPLE_CONFIG)
    publish_sealed(repo, "simple", simple_onnx(), keyring, version=1)
    # Sealed correctly, but not an ONNX model: its only version fails to load.
    write_config(repo, "policy_broken", policy_config("policy_broken"))
    publish_sealed(repo, "policy_broken", b"not an onnx model", keyring, version=1)
    return repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, keyring: Keyring) -> Path:
    """Read-only for the tests that use it: nothing here publishes into it."""
    return build_request_path_repo(tmp_path_factory.mktemp("request_path") / "repo", keyring)


def obs(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (batch, OBS_DIM)).astype(np.float32)


def obs_input(x: np.ndarray, name: str = "obs", datatype: str = "FP32") -> InferInput:
    tensor = InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def reference(x: np.ndarray, tag: int = 1) -> dict[str, np.ndarray]:
    """What the policy built with `tag` answers, computed by onnxruntime directly."""
    session = ort.InferenceSession(policy_onnx(tag), providers=["CPUExecutionProvider"])
    action, logits = session.run(["action", "logits"], {"obs": x})
    return {"action": action, "logits": logits}


def refusal(exc: BaseException) -> tuple[str, str]:
    """(status name, message) of a refused call, from tritonclient or a raw grpc stub."""
    if isinstance(exc, InferenceServerException):
        return exc.status().removeprefix("StatusCode."), exc.message()
    assert isinstance(exc, grpc.aio.AioRpcError), exc
    return exc.code().name, exc.details()


def assert_refused(exc: BaseException, status: str, fragment: str) -> None:
    """The call got `status`, a message holding `fragment`, ending with its request id."""
    got_status, message = refusal(exc)
    assert got_status == status, (got_status, message)
    assert fragment in message, message
    assert REQUEST_ID_SUFFIX.search(message), message


def refused_infer(repo: Path, keyring: Keyring, model: str, inputs, **kwargs) -> BaseException:
    """Make one ModelInfer call that must be refused; return the exception it raised."""

    async def body(client, srv):
        with pytest.raises(InferenceServerException) as caught:
            await client.infer(model, inputs, **kwargs)
        return caught.value

    return run_inprocess(repo, keyring, body, load=["policy", "simple"])


def refused_raw(repo: Path, keyring: Keyring, request: pb.ModelInferRequest) -> BaseException:
    """Send a ModelInferRequest as built, through the generated stub, for requests that
    tritonclient's helpers will not build; return the refusal."""

    async def body(client, srv):
        async with grpc.aio.insecure_channel(srv.url) as channel:
            stub = pbg.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ModelInfer(request)
        return caught.value

    return run_inprocess(repo, keyring, body, load=["policy", "simple"])


# ---- answers ----------------------------------------------------------------------------


def test_batch_one_decision_answers_action_logits_and_model_version(repo, keyring) -> None:
    x = obs(1)

    async def body(client, srv):
        return await client.infer("policy", [obs_input(x)], request_id="decide-1")

    result = run_inprocess(repo, keyring, body, load=["policy"])
    response = result.get_response()
    assert response.model_name == "policy"
    assert response.model_version == "1"
    assert response.id == "decide-1"
    want = reference(x)
    assert result.as_numpy("action").tolist() == [[POLICY_V1_ACTION]]
    np.testing.assert_array_equal(result.as_numpy("action"), want["action"])
    np.testing.assert_allclose(result.as_numpy("logits"), want["logits"], rtol=1e-5, atol=1e-5)


def test_batch_of_sixteen_answers_one_row_per_observation(repo, keyring) -> None:
    x = obs(16, seed=3)

    async def body(client, srv):
        return await client.infer("policy", [obs_input(x)])

    result = run_inprocess(repo, keyring, body, load=["policy"])
    want = reference(x)
    assert result.as_numpy("action").shape == (16, 1)
    assert result.as_numpy("logits").shape == (16, 4)
    np.testing.assert_array_equal(result.as_numpy("action"), want["action"])
    np.testing.assert_allclose(result.as_numpy("logits"), want["logits"], rtol=1e-5, atol=1e-5)


def test_requested_output_subset_answers_only_those_outputs(repo, keyring) -> None:
    x = obs(2)

    async def body(client, srv):
        return await client.infer(
            "policy", [obs_input(x)], outputs=[InferRequestedOutput("logits")]
        )

    result = run_inprocess(repo, keyring, body, load=["policy"])
    assert [o.name for o in result.get_response().outputs] == ["logits"]
    assert result.as_numpy("action") is None
    np.testing.assert_allclose(result.as_numpy("logits"), reference(x)["logits"], atol=1e-5)


def test_threaded_model_answers_like_the_inline_one(repo, keyring) -> None:
    x = obs(4, seed=5)

    async def body(client, srv):
        return await client.infer("policy_threaded", [obs_input(x)])

    result = run_inprocess(repo, keyring, body, load=["policy_threaded"])
    assert result.get_response().model_version == "1"
    np.testing.assert_array_equal(result.as_numpy("action"), reference(x)["action"])


def test_dynamically_batched_requests_each_get_their_own_rows(repo, keyring) -> None:
    xs = [obs(1, seed=s) for s in range(4)]

    async def body(client, srv):
        return await asyncio.gather(*(client.infer("policy_batched", [obs_input(x)]) for x in xs))

    results = run_inprocess(repo, keyring, body, load=["policy_batched"])
    for x, result in zip(xs, results, strict=True):
        np.testing.assert_allclose(result.as_numpy("logits"), reference(x)["logits"], atol=1e-5)


# ---- routing errors ---------------------------------------------------------------------


def test_unknown_model_is_not_found(repo, keyring) -> None:
    exc = refused_infer(repo, keyring, "no_such_model", [obs_input(obs(1))])
    assert_refused(exc, "NOT_FOUND", "Request for unknown model: 'no_such_model' is not found")


@pytest.mark.parametrize(
    ("version", "fragment"),
    [
        ("7", "Request for unknown model: 'policy' version 7 is not found"),
        ("latest", "failed to get model version from specified version string 'latest'"),
    ],
)
def test_unknown_version_is_not_found(repo, keyring, version: str, fragment: str) -> None:
    exc = refused_infer(repo, keyring, "policy", [obs_input(obs(1))], model_version=version)
    assert_refused(exc, "NOT_FOUND", fragment)


def test_model_in_repository_but_not_loaded_is_unavailable(repo, keyring) -> None:
    exc = refused_infer(repo, keyring, "policy_threaded", [obs_input(obs(1))])
    assert_refused(exc, "UNAVAILABLE", "Request for unknown model: 'policy_threaded' is not found")


@pytest.mark.parametrize(
    ("version", "fragment"),
    [
        ("", "Request for unknown model: 'policy_broken' has no available versions: version 1:"),
        ("1", "'policy_broken' version 1 is not at ready state (UNAVAILABLE)"),
    ],
    ids=["latest", "version-1"],
)
def test_model_whose_only_version_failed_to_load_is_unavailable(
    repo, keyring, version: str, fragment: str
) -> None:
    async def body(client, srv):
        with pytest.raises(InferenceServerException) as load_failure:
            await client.load_model("policy_broken")
        with pytest.raises(InferenceServerException) as caught:
            await client.infer("policy_broken", [obs_input(obs(1))], model_version=version)
        return load_failure.value, caught.value

    load_failure, exc = run_inprocess(repo, keyring, body, load=["policy"])
    assert_refused(load_failure, "INVALID_ARGUMENT", "failed to load 'policy_broken'")
    assert_refused(exc, "UNAVAILABLE", fragment)


# ---- tensor checks ----------------------------------------------------------------------


def test_wrong_input_name_is_invalid_argument(repo, keyring) -> None:
    exc = refused_infer(repo, keyring, "policy", [obs_input(obs(1), name="observation")])
    assert_refused(
        exc, "INVALID_ARGUMENT", "unexpected inference input 'observation' for model 'policy'"
    )


def test_missing_input_is_invalid_argument(repo, keyring) -> None:
    only_first = InferInput("INPUT0", [1, 16], "INT32")
    only_first.set_data_from_numpy(np.zeros((1, 16), np.int32))
    exc = refused_infer(repo, keyring, "simple", [only_first])
    assert_refused(
        exc,
        "INVALID_ARGUMENT",
        "expected 2 inputs but got 1 inputs for model 'simple'. Got input(s) ['INPUT0'], "
        "but missing required input(s) ['INPUT1']. Please provide all required input(s).",
    )


def test_wrong_datatype_is_invalid_argument(repo, keyring) -> None:
    x = obs(1).astype(np.float64)
    exc = refused_infer(repo, keyring, "policy", [obs_input(x, datatype="FP64")])
    assert_refused(
        exc,
        "INVALID_ARGUMENT",
        "inference input 'obs' data-type is 'FP64', but model 'policy' expects 'FP32'",
    )


def test_wrong_shape_is_invalid_argument(repo, keyring) -> None:
    x = np.zeros((1, OBS_DIM - 1), np.float32)
    exc = refused_infer(repo, keyring, "policy", [obs_input(x)])
    assert_refused(
        exc,
        "INVALID_ARGUMENT",
        "unexpected shape for input 'obs' for model 'policy'. Expected [-1,8], got [1,7]",
    )


def test_raw_byte_size_that_does_not_match_the_shape_is_invalid_argument(repo, keyring) -> None:
    tensor = obs_input(obs(2)).set_shape([1, OBS_DIM])  # 64 bytes sent for a [1, 8] shape
    exc = refused_infer(repo, keyring, "policy", [tensor])
    assert_refused(
        exc,
        "INVALID_ARGUMENT",
        "input byte size mismatch for input 'obs' for model 'policy'. Expected 32, got 64",
    )


def test_batch_over_max_batch_size_is_invalid_argument(repo, keyring) -> None:
    exc = refused_infer(repo, keyring, "policy", [obs_input(obs(65))])
    assert_refused(
        exc, "INVALID_ARGUMENT", "inference request batch-size must be <= 64 for 'policy'"
    )


def test_raw_and_typed_contents_together_are_invalid_argument(repo, keyring) -> None:
    values = obs(1)
    request = pb.ModelInferRequest(
        model_name="policy",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="obs",
                datatype="FP32",
                shape=[1, OBS_DIM],
                contents=pb.InferTensorContents(fp32_contents=values.ravel().tolist()),
            )
        ],
        raw_input_contents=[values.tobytes()],
    )
    exc = refused_raw(repo, keyring, request)
    assert_refused(
        exc,
        "INVALID_ARGUMENT",
        "contents field must not be specified when using raw_input_contents for 'obs' for "
        "model 'policy'",
    )


def test_unexpected_requested_output_is_invalid_argument(repo, keyring) -> None:
    exc = refused_infer(
        repo, keyring, "policy", [obs_input(obs(1))], outputs=[InferRequestedOutput("value")]
    )
    assert_refused(exc, "INVALID_ARGUMENT", "unexpected inference output 'value' for model")


def test_typed_contents_are_answered_like_raw_ones(repo, keyring) -> None:
    x = obs(1)

    async def body(client, srv):
        async with grpc.aio.insecure_channel(srv.url) as channel:
            stub = pbg.GRPCInferenceServiceStub(channel)
            request = pb.ModelInferRequest(
                model_name="policy",
                inputs=[
                    pb.ModelInferRequest.InferInputTensor(
                        name="obs",
                        datatype="FP32",
                        shape=[1, OBS_DIM],
                        contents=pb.InferTensorContents(fp32_contents=x.ravel().tolist()),
                    )
                ],
            )
            return await stub.ModelInfer(request)

    response = run_inprocess(repo, keyring, body, load=["policy"])
    names = [o.name for o in response.outputs]
    action = np.frombuffer(response.raw_output_contents[names.index("action")], np.int64)
    assert action.tolist() == [POLICY_V1_ACTION]


# ---- limits and control -----------------------------------------------------------------


def test_request_over_the_inflight_limit_is_resource_exhausted(repo, keyring) -> None:
    """With a limit of one, two simultaneous calls to a model whose lone request waits
    200 ms in the batch queue: exactly one is answered, the other refused at once; once the
    first is done, the next call is admitted again."""

    async def body(client, srv):
        calls = [client.infer("policy_queued", [obs_input(obs(1, seed=s))]) for s in range(2)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        after = await client.infer("policy_queued", [obs_input(obs(1))])
        return outcomes, after

    outcomes, after = run_inprocess(repo, keyring, body, load=["policy_queued"], max_inflight=1)
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    answered = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(refused) == 1 and len(answered) == 1, outcomes
    assert_refused(refused[0], "RESOURCE_EXHAUSTED", "at its limit of 1 in-flight requests")
    assert answered[0].as_numpy("action").tolist() == [[POLICY_V1_ACTION]]
    assert after.as_numpy("action").tolist() == [[POLICY_V1_ACTION]]


def test_request_over_the_max_message_size_is_resource_exhausted(repo, keyring) -> None:
    async def body(client, srv):
        small = await client.infer("policy", [obs_input(obs(1))])  # ~100 bytes: admitted
        with pytest.raises(InferenceServerException) as caught:
            await client.infer("policy", [obs_input(obs(64))])  # 2 KiB of raw data
        return small, caught.value

    small, exc = run_inprocess(repo, keyring, body, load=["policy"], max_request_bytes=1024)
    assert small.as_numpy("action").tolist() == [[POLICY_V1_ACTION]]
    status, message = refusal(exc)
    assert status == "RESOURCE_EXHAUSTED", (status, message)
    assert "larger than max" in message, message


@pytest.mark.parametrize("call", ["load_model", "unload_model"])
def test_load_or_unload_outside_explicit_mode_is_unavailable(repo, keyring, call: str) -> None:
    async def body(client, srv):
        with pytest.raises(InferenceServerException) as caught:
            await getattr(client, call)("policy")
        # The refused control call changed nothing: the model still answers.
        still = await client.infer("policy", [obs_input(obs(1))])
        return caught.value, still

    exc, still = run_inprocess(repo, keyring, body, control_mode="none")
    assert_refused(exc, "UNAVAILABLE", "not allowed in model control mode 'none'")
    assert still.get_response().model_version == "1"


def test_explicit_load_then_unload_moves_a_model_in_and_out_of_service(repo, keyring) -> None:
    async def body(client, srv):
        await client.load_model("simple")
        ready_after_load = await client.is_model_ready("simple")
        await client.unload_model("simple")
        ready_after_unload = await client.is_model_ready("simple")
        a = InferInput("INPUT0", [1, 16], "INT32").set_data_from_numpy(np.ones((1, 16), np.int32))
        b = InferInput("INPUT1", [1, 16], "INT32").set_data_from_numpy(np.ones((1, 16), np.int32))
        with pytest.raises(InferenceServerException) as caught:
            await client.infer("simple", [a, b])
        return ready_after_load, ready_after_unload, caught.value

    loaded, unloaded, exc = run_inprocess(repo, keyring, body, load=["policy"])
    assert (loaded, unloaded) == (True, False)
    assert_refused(
        exc, "UNAVAILABLE", "Request for unknown model: 'simple' has no available versions"
    )


def test_unload_lets_a_queued_request_finish_and_refuses_the_next(repo, keyring) -> None:
    """A request waiting its 200 ms in the batch queue when the model is unloaded is still
    answered (the version drains before it is released); a call after the unload is not."""

    async def body(client, srv):
        queued = asyncio.create_task(client.infer("policy_queued", [obs_input(obs(1))]))
        await asyncio.sleep(0.05)  # the request is in the queue, its 200 ms not yet over
        await client.unload_model("policy_queued")
        with pytest.raises(InferenceServerException) as caught:
            await client.infer("policy_queued", [obs_input(obs(1))])
        return await queued, caught.value

    answered, exc = run_inprocess(repo, keyring, body, load=["policy_queued"])
    assert answered.as_numpy("action").tolist() == [[POLICY_V1_ACTION]]
    assert_refused(
        exc, "UNAVAILABLE", "Request for unknown model: 'policy_queued' has no available versions"
    )


# ---- streaming --------------------------------------------------------------------------


async def _stream(client, requests: list[dict]) -> list[tuple]:
    """Send `requests` on one ModelStreamInfer stream; collect one (result, error) each."""

    async def feed():
        for r in requests:
            yield r

    responses = client.stream_infer(feed())
    collected = []
    async for item in responses:
        collected.append(item)
        if len(collected) == len(requests):
            break
    responses.cancel()
    return collected


def test_stream_answers_every_request_in_order_with_its_id(repo, keyring) -> None:
    xs = [obs(1 + i % 3, seed=i) for i in range(5)]
    requests = [
        {"model_name": "policy", "inputs": [obs_input(x)], "request_id": f"s{i}"}
        for i, x in enumerate(xs)
    ]

    async def body(client, srv):
        return await _stream(client, requests)

    answers = run_inprocess(repo, keyring, body, load=["policy"])
    assert [error for _, error in answers] == [None] * 5
    assert [r.get_response().id for r, _ in answers] == [f"s{i}" for i in range(5)]
    for x, (result, _) in zip(xs, answers, strict=True):
        assert result.get_response().model_version == "1"
        np.testing.assert_allclose(result.as_numpy("logits"), reference(x)["logits"], atol=1e-5)


def test_stream_error_is_answered_in_stream_and_the_stream_goes_on(repo, keyring) -> None:
    requests = [
        {"model_name": "policy", "inputs": [obs_input(obs(1))], "request_id": "ok-1"},
        {"model_name": "policy", "inputs": [obs_input(obs(65))], "request_id": "too-big"},
        {"model_name": "nope", "inputs": [obs_input(obs(1))], "request_id": "unknown"},
        {"model_name": "policy", "inputs": [obs_input(obs(1))], "request_id": "ok-2"},
    ]

    async def body(client, srv):
        return await _stream(client, requests)

    (ok1, e1), (bad, e2), (unknown, e3), (ok2, e4) = run_inprocess(
        repo, keyring, body, load=["policy"]
    )
    assert e1 is None and e4 is None
    assert ok1.get_response().id == "ok-1" and ok2.get_response().id == "ok-2"
    assert ok2.as_numpy("action").tolist() == [[POLICY_V1_ACTION]]
    assert bad is None and unknown is None
    assert "inference request batch-size must be <= 64 for 'policy'" in e2.message()
    assert REQUEST_ID_SUFFIX.search(e2.message()), e2.message()
    assert "Request for unknown model: 'nope' is not found" in e3.message()
    assert REQUEST_ID_SUFFIX.search(e3.message()), e3.message()


# ---- swap -------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", ["", THREADED], ids=["inline", "threaded"])
def test_loading_a_new_version_during_calls_fails_no_call_and_moves_calls_to_it(
    tmp_path: Path, keyring: Keyring, extra: str
) -> None:
    """Four callers make version-less decision calls without pause; v2 is published and
    loaded meanwhile. No call fails, every answer is consistent with the version that gave
    it, and every call started after the load returned is answered by v2."""
    repo = tmp_path / "repo"
    write_config(repo, "policy", policy_config("policy", extra))
    publish_sealed(repo, "policy", policy_onnx(1), keyring, version=1)
    x = obs(1, seed=11)

    async def body(client, srv):
        phase = "before"
        answers: list[tuple[str, int, int]] = []  # (phase at call start, version, action)
        failures: list[BaseException] = []
        stop = asyncio.Event()

        async def caller():
            while not stop.is_set():
                started_in = phase
                try:
                    r = await client.infer(
                        "policy", [obs_input(x)], outputs=[InferRequestedOutput("action")]
                    )
                except Exception as exc:
                    failures.append(exc)
                    continue
                version = int(r.get_response().model_version)
                answers.append((started_in, version, int(r.as_numpy("action")[0, 0])))

        async def count_reaches(n: int, timeout: float = 10.0) -> None:
            async def wait():
                while len(answers) < n:
                    await asyncio.sleep(0.001)

            await asyncio.wait_for(wait(), timeout)

        callers = [asyncio.create_task(caller()) for _ in range(4)]
        await count_reaches(20)
        await asyncio.to_thread(publish_sealed, repo, "policy", policy_onnx(2), keyring, 2)
        phase = "during"
        await client.load_model("policy")
        phase = "after"
        await count_reaches(len(answers) + 20)
        stop.set()
        await asyncio.gather(*callers)
        return answers, failures

    answers, failures = run_inprocess(repo, keyring, body, load=["policy"])
    assert failures == []
    assert all(action == version % 4 for _, version, action in answers), answers
    # A call started before the load may reach the server after the swap: v1 or v2.
    assert 1 in {v for phase, v, _ in answers if phase == "before"}
    assert any(phase == "during" for phase, _, _ in answers)  # calls ran while it loaded
    after = [v for phase, v, _ in answers if phase == "after"]
    assert len(after) >= 20 and set(after) == {2}, after
