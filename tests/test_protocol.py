"""Triton's gRPC protocol against a real `forseti serve` over loopback, with `tritonclient.grpc`.

Read-only tests share one server per module (`shared_server`); tests that load, unload or need
other start flags get a server of their own.
"""

from __future__ import annotations

import queue
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from onnx import helper
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

import forseti
from forseti.core.sealing.keyring import Keyring
from testkit.model_builders import (
    ALL_TYPES,
    OBS_DIM,
    POLICY_CONFIG,
    build_repository,
    onnx_model_bytes,
    policy_onnx,
    publish_sealed,
    write_config,
)
from testkit.server_process import ServerProcess

POLICY_ACTION = 1  # policy v1 in the standard repository answers action == 1 % 4
TYPE_NAMES = [name for name, _, _ in ALL_TYPES]
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
TYPED_NAMES = [n for n in TYPE_NAMES if n in CONTENTS_FIELD]  # every type but FP16


# ---- helpers ------------------------------------------------------------------------------


def obs(batch: int, seed: int = 0) -> np.ndarray:
    """Observations in [-1, 1], where the test policies' answers are fixed by their tag."""
    return np.random.default_rng(seed).uniform(-1, 1, (batch, OBS_DIM)).astype(np.float32)


def policy_inputs(x: np.ndarray, name: str = "obs", datatype: str = "FP32") -> list:
    tensor = grpcclient.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return [tensor]


def expect_error(status: str, call, *args, **kwargs) -> str:
    """Run a tritonclient call that must fail with `status`; return the error message."""
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    assert info.value.status() == f"StatusCode.{status}", info.value.message()
    return info.value.message()


def extreme_values(type_name: str) -> np.ndarray:
    """A [2, 3] tensor holding the edge values of a type."""
    dtype = np.dtype(triton_to_np_dtype(type_name))
    if type_name == "BOOL":
        values = [True, False, True, False, False, True]
    elif dtype.kind in "ui":
        info = np.iinfo(dtype)
        values = [info.min, info.max, 0, 1, info.max - 1, info.min + 1]
    else:
        info = np.finfo(dtype)
        values = [info.min, info.max, info.tiny, -0.0, np.inf, 1.5]
    return np.array(values, dtype=dtype).reshape(2, 3)


def identity_repository_model(repo: Path, name: str, type_names: list[str], keyring) -> None:
    """An identity model IN_<T> -> OUT_<T> ([-1, 3]) for each of `type_names`."""
    onnx_type = {n: o for n, _, o in ALL_TYPES}
    config_type = {n: c for n, c, _ in ALL_TYPES}
    nodes, inputs, outputs = [], [], []
    for t in type_names:
        nodes.append(helper.make_node("Identity", [f"IN_{t}"], [f"OUT_{t}"]))
        inputs.append(helper.make_tensor_value_info(f"IN_{t}", onnx_type[t], ["batch", 3]))
        outputs.append(helper.make_tensor_value_info(f"OUT_{t}", onnx_type[t], ["batch", 3]))
    model = onnx_model_bytes(helper.make_graph(nodes, name, inputs, outputs))
    ins = ", ".join(
        f'{{ name: "IN_{t}" data_type: {config_type[t]} dims: [ 3 ] }}' for t in type_names
    )
    outs = ", ".join(
        f'{{ name: "OUT_{t}" data_type: {config_type[t]} dims: [ 3 ] }}' for t in type_names
    )
    config = (
        f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: 4\n'
        f"input [ {ins} ]\noutput [ {outs} ]\n"
    )
    write_config(repo, name, config)
    publish_sealed(repo, name, model, keyring, version=1)


def stub_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    return info.value


def typed_request(model: str, tensors: dict[str, tuple[str, np.ndarray]]) -> pb.ModelInferRequest:
    """A request whose inputs travel in typed `contents`, not raw bytes."""
    request = pb.ModelInferRequest(model_name=model)
    for name, (datatype, value) in tensors.items():
        tensor = request.inputs.add(name=name, datatype=datatype, shape=list(value.shape))
        getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(value.ravel().tolist())
    return request


def output_array(response: pb.ModelInferResponse, name: str) -> np.ndarray:
    for i, out in enumerate(response.outputs):
        if out.name == name:
            dtype = np.dtype(triton_to_np_dtype(out.datatype))
            return np.frombuffer(response.raw_output_contents[i], dtype=dtype).reshape(
                list(out.shape)
            )
    raise AssertionError(f"no output {name} in {[o.name for o in response.outputs]}")


# ---- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(shared_server):
    c = grpcclient.InferenceServerClient(shared_server.url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(shared_server):
    """The raw generated stub, for requests tritonclient cannot build (typed contents)."""
    channel = grpc.insecure_channel(shared_server.url)
    yield pbg.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def extras_server(tmp_path_factory, keyring: Keyring, keyring_path: Path):
    """A server with `typed` (identity for every type that has a contents field) and
    `versioned` (policy versions 1 and 2, both served; v1 answers 1, v2 answers 2)."""
    repo = tmp_path_factory.mktemp("extras") / "repo"
    repo.mkdir()
    identity_repository_model(repo, "typed", TYPED_NAMES, keyring)
    config = POLICY_CONFIG.replace('name: "policy"', 'name: "versioned"')
    write_config(repo, "versioned", config + "version_policy: { all { } }\n")
    publish_sealed(repo, "versioned", policy_onnx(1), keyring, version=1)
    publish_sealed(repo, "versioned", policy_onnx(2), keyring, version=2)
    server = ServerProcess(
        repo, keyring_path, ["--model-control-mode", "explicit", "--load-model", "*"]
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory, keyring: Keyring, keyring_path: Path):
    """Explicit mode with nothing loaded; tests on it must not load anything."""
    repo = tmp_path_factory.mktemp("idle") / "repo"
    repo.mkdir()
    build_repository(repo, keyring)
    server = ServerProcess(repo, keyring_path, ["--model-control-mode", "explicit"]).start()
    yield server
    server.stop()


# ---- health and metadata ------------------------------------------------------------------


def test_server_live_answers_true(client):
    assert client.is_server_live() is True


def test_server_ready_answers_true_with_all_models_loaded(client):
    assert client.is_server_ready() is True


def test_server_metadata_names_forseti_with_version_and_extensions(client):
    meta = client.get_server_metadata()
    assert meta.name == "forseti"
    assert meta.version == forseti.__version__
    assert {"model_repository", "model_configuration", "statistics"} <= set(meta.extensions)


def test_model_ready_is_true_for_a_loaded_model(client):
    assert client.is_model_ready("policy") is True
    assert client.is_model_ready("policy", "1") is True


def test_model_ready_is_false_for_an_unknown_model(client):
    assert client.is_model_ready("no_such_model") is False


def test_model_ready_is_false_for_an_unknown_version(client):
    assert client.is_model_ready("policy", "7") is False


def test_model_metadata_lists_tensors_with_batch_dimension(client):
    meta = client.get_model_metadata("policy")
    assert meta.name == "policy"
    assert list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("obs", "FP32", [-1, 8])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("action", "INT64", [-1, 1]),
        ("logits", "FP32", [-1, 4]),
    ]


def test_model_metadata_of_an_unknown_model_is_not_found(client):
    message = expect_error("NOT_FOUND", client.get_model_metadata, "no_such_model")
    assert "no_such_model" in message


def test_model_config_returns_the_repository_config(client):
    config = client.get_model_config("policy").config
    assert config.name == "policy"
    assert config.max_batch_size == 64
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("obs", 11, [8])  # TYPE_FP32
    ]
    assert [o.name for o in config.output] == ["action", "logits"]
    assert config.parameters["env_id"].string_value == "Test-v0"


# ---- ModelInfer ---------------------------------------------------------------------------


def test_infer_policy_with_raw_input_returns_actions_and_logits(client):
    result = client.infer("policy", policy_inputs(obs(3)))
    action = result.as_numpy("action")
    logits = result.as_numpy("logits")
    assert action.dtype == np.int64 and action.shape == (3, 1)
    assert (action == POLICY_ACTION).all()
    assert logits.dtype == np.float32 and logits.shape == (3, 4)
    np.testing.assert_array_equal(logits.argmax(axis=1), action[:, 0])


def test_infer_simple_returns_sum_and_difference(client):
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    inputs = [
        grpcclient.InferInput("INPUT0", [1, 16], "INT32"),
        grpcclient.InferInput("INPUT1", [1, 16], "INT32"),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("simple", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_infer_policy_with_typed_fp32_contents(stub):
    request = typed_request("policy", {"obs": ("FP32", obs(2))})
    response = stub.ModelInfer(request)
    assert output_array(response, "action").tolist() == [[POLICY_ACTION], [POLICY_ACTION]]


def test_infer_simple_with_typed_int_contents(stub):
    a = np.arange(32, dtype=np.int32).reshape(2, 16) - 10
    b = np.arange(32, dtype=np.int32).reshape(2, 16) * 2
    response = stub.ModelInfer(
        typed_request("simple", {"INPUT0": ("INT32", a), "INPUT1": ("INT32", b)})
    )
    np.testing.assert_array_equal(output_array(response, "OUTPUT0"), a + b)
    np.testing.assert_array_equal(output_array(response, "OUTPUT1"), a - b)


@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_all_types_round_trip_raw(client, type_name):
    inputs = []
    for t in TYPE_NAMES:
        value = extreme_values(t)
        tensor = grpcclient.InferInput(f"IN_{t}", list(value.shape), t)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    result = client.infer("all_types", inputs)
    out = result.as_numpy(f"OUT_{type_name}")
    sent = extreme_values(type_name)
    assert out.dtype == sent.dtype
    np.testing.assert_array_equal(out, sent)
    datatypes = {o.name: o.datatype for o in result.get_response().outputs}
    assert datatypes[f"OUT_{type_name}"] == type_name


@pytest.mark.parametrize("type_name", TYPED_NAMES)
def test_typed_contents_round_trip_for_every_type_with_a_contents_field(extras_server, type_name):
    channel = grpc.insecure_channel(extras_server.url)
    try:
        stub = pbg.GRPCInferenceServiceStub(channel)
        request = typed_request("typed", {f"IN_{t}": (t, extreme_values(t)) for t in TYPED_NAMES})
        response = stub.ModelInfer(request)
    finally:
        channel.close()
    sent = extreme_values(type_name)
    out = output_array(response, f"OUT_{type_name}")
    assert out.dtype == sent.dtype
    np.testing.assert_array_equal(out, sent)


def test_fp16_in_typed_contents_is_invalid_argument_naming_raw_input_contents(stub):
    tensors = {}
    for t in TYPE_NAMES:
        tensors[f"IN_{t}"] = (t, extreme_values(t))
    request = typed_request("all_types", {k: v for k, v in tensors.items() if v[0] != "FP16"})
    request.inputs.add(name="IN_FP16", datatype="FP16", shape=[2, 3])  # no field can carry it
    error = stub_error(stub.ModelInfer, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "IN_FP16" in error.details()
    assert "raw_input_contents" in error.details()


def test_typed_contents_out_of_range_for_the_type_is_invalid_argument(stub):
    request = typed_request("all_types", {})
    for t in TYPED_NAMES:
        tensor = request.inputs.add(name=f"IN_{t}", datatype=t, shape=[1, 3])
        values = [1, 0, 1] if t == "BOOL" else [1, 2, 3]
        if t == "INT8":
            values = [1, 2, 300]
        getattr(tensor.contents, CONTENTS_FIELD[t]).extend(values)
    request.inputs.add(name="IN_FP16", datatype="FP16", shape=[1, 3])
    error = stub_error(stub.ModelInfer, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "IN_INT8" in error.details()
    assert "INT8" in error.details() and "range" in error.details()


def test_typed_contents_with_too_few_values_is_invalid_argument(stub):
    request = pb.ModelInferRequest(model_name="policy")
    tensor = request.inputs.add(name="obs", datatype="FP32", shape=[1, 8])
    tensor.contents.fp32_contents.extend([0.5] * 7)
    error = stub_error(stub.ModelInfer, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'obs'" in error.details() and "Expected 32, got 28" in error.details()
    assert "7 values in contents.fp32_contents, the shape needs 8" in error.details()


def test_requested_output_subset_returns_only_that_output(client):
    result = client.infer(
        "policy", policy_inputs(obs(2)), outputs=[grpcclient.InferRequestedOutput("action")]
    )
    assert [o.name for o in result.get_response().outputs] == ["action"]
    assert result.as_numpy("logits") is None
    assert (result.as_numpy("action") == POLICY_ACTION).all()


def test_request_id_is_echoed_in_the_response(client):
    result = client.infer("policy", policy_inputs(obs(1)), request_id="decision-42")
    assert result.get_response().id == "decision-42"


def test_explicit_model_version_one_is_served(client):
    result = client.infer("policy", policy_inputs(obs(1)), model_version="1")
    assert result.get_response().model_version == "1"
    assert result.as_numpy("action").tolist() == [[POLICY_ACTION]]


def test_explicit_versions_route_to_that_version(extras_server):
    with grpcclient.InferenceServerClient(extras_server.url) as c:
        v1 = c.infer("versioned", policy_inputs(obs(2)), model_version="1")
        v2 = c.infer("versioned", policy_inputs(obs(2)), model_version="2")
    assert v1.get_response().model_version == "1"
    assert v1.as_numpy("action").tolist() == [[1], [1]]
    assert v2.get_response().model_version == "2"
    assert v2.as_numpy("action").tolist() == [[2], [2]]


def test_empty_model_version_routes_to_the_newest_version(extras_server):
    with grpcclient.InferenceServerClient(extras_server.url) as c:
        assert list(c.get_model_metadata("versioned").versions) == ["1", "2"]
        result = c.infer("versioned", policy_inputs(obs(2)), model_version="")
    assert result.get_response().model_version == "2"
    assert result.as_numpy("action").tolist() == [[2], [2]]


def test_batch_of_max_batch_size_64_is_served(client):
    result = client.infer("policy", policy_inputs(obs(64, seed=3)))
    action = result.as_numpy("action")
    assert action.shape == (64, 1)
    assert (action == POLICY_ACTION).all()


# ---- ModelStreamInfer ---------------------------------------------------------------------


def _stream(url: str, requests: list[tuple[str, list, str]]) -> list:
    """Send (model, inputs, id) over one stream; return the (result, error) pairs in order."""
    answers: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(url) as c:
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            for model, inputs, rid in requests:
                c.async_stream_infer(model, inputs, request_id=rid)
            got = [answers.get(timeout=10) for _ in requests]
        finally:
            c.stop_stream()
    return got


def test_stream_answers_every_request_with_its_id(shared_server):
    requests = [("policy", policy_inputs(obs(i + 1, seed=i)), f"s{i}") for i in range(5)]
    got = _stream(shared_server.url, requests)
    assert [error for _, error in got] == [None] * 5
    assert [r.get_response().id for r, _ in got] == [f"s{i}" for i in range(5)]
    for i, (result, _) in enumerate(got):
        assert result.as_numpy("action").shape == (i + 1, 1)
        assert (result.as_numpy("action") == POLICY_ACTION).all()


def test_stream_reports_an_invalid_request_and_keeps_serving(shared_server):
    bad = policy_inputs(obs(1), name="observation")
    got = _stream(
        shared_server.url,
        [("policy", bad, "bad"), ("policy", policy_inputs(obs(1)), "good")],
    )
    (bad_result, bad_error), (good_result, good_error) = got
    assert bad_result is None
    assert isinstance(bad_error, InferenceServerException)
    assert "observation" in bad_error.message()
    assert good_error is None
    assert good_result.get_response().id == "good"
    assert good_result.as_numpy("action").tolist() == [[POLICY_ACTION]]


# ---- ModelStatistics and RepositoryIndex --------------------------------------------------


def _policy_stats(client) -> pb.ModelStatistics:
    (stats,) = client.get_inference_statistics("policy", "1").model_stats
    assert (stats.name, stats.version) == ("policy", "1")
    return stats


def test_statistics_count_requests_items_and_executions_exactly(client):
    before = _policy_stats(client)
    batches = [1, 3, 2, 5]
    for i, b in enumerate(batches):
        client.infer("policy", policy_inputs(obs(b, seed=i)))
    after = _policy_stats(client)
    assert after.inference_count - before.inference_count == sum(batches)
    assert after.execution_count - before.execution_count == len(batches)
    s0, s1 = before.inference_stats, after.inference_stats
    assert s1.success.count - s0.success.count == len(batches)
    assert s1.success.ns > s0.success.ns
    assert s1.compute_infer.count - s0.compute_infer.count == len(batches)
    assert s1.compute_infer.ns > s0.compute_infer.ns
    assert s1.fail.count == s0.fail.count
    assert after.last_inference > 0


def test_statistics_count_a_failed_request_as_failure_not_success(client):
    before = _policy_stats(client)
    expect_error("INVALID_ARGUMENT", client.infer, "policy", policy_inputs(obs(1)[:, :7]))
    after = _policy_stats(client)
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1
    assert after.inference_stats.success.count == before.inference_stats.success.count
    assert after.inference_count == before.inference_count


def test_statistics_of_an_unknown_model_is_not_found(client):
    expect_error("NOT_FOUND", client.get_inference_statistics, "no_such_model")


def test_repository_index_lists_every_model_ready_at_version_one(client):
    index = client.get_model_repository_index()
    rows = {(m.name, m.version, m.state) for m in index.models}
    assert rows == {
        ("all_types", "1", "READY"),
        ("policy", "1", "READY"),
        ("simple", "1", "READY"),
    }


# ---- error statuses -----------------------------------------------------------------------


def test_infer_on_an_unknown_model_is_not_found(client):
    message = expect_error("NOT_FOUND", client.infer, "no_such_model", policy_inputs(obs(1)))
    assert "no_such_model" in message


def test_infer_on_an_unknown_version_is_not_found(client):
    message = expect_error(
        "NOT_FOUND", client.infer, "policy", policy_inputs(obs(1)), model_version="9"
    )
    assert "policy" in message and "9" in message


def test_wrong_input_name_is_invalid_argument_naming_both_names(client):
    message = expect_error(
        "INVALID_ARGUMENT", client.infer, "policy", policy_inputs(obs(1), name="observation")
    )
    assert "'observation'" in message and "'obs'" in message


def test_wrong_datatype_is_invalid_argument_naming_sent_and_expected(client):
    x = obs(1).astype(np.float64)
    message = expect_error(
        "INVALID_ARGUMENT", client.infer, "policy", policy_inputs(x, datatype="FP64")
    )
    assert "'obs' data-type is 'FP64', but model 'policy' expects 'FP32'" in message


def test_wrong_inner_dimension_is_invalid_argument_with_expected_shape(client):
    message = expect_error("INVALID_ARGUMENT", client.infer, "policy", policy_inputs(obs(2)[:, :7]))
    assert "input 'obs' for model 'policy'. Expected [-1,8], got [2,7]" in message


def test_wrong_rank_is_invalid_argument_with_expected_shape(client):
    message = expect_error("INVALID_ARGUMENT", client.infer, "policy", policy_inputs(obs(1)[0]))
    assert "input 'obs' for model 'policy'. Expected [-1,8], got [8]" in message


def test_raw_byte_size_mismatch_is_invalid_argument(stub):
    request = pb.ModelInferRequest(model_name="policy")
    request.inputs.add(name="obs", datatype="FP32", shape=[1, 8])
    request.raw_input_contents.append(obs(1).tobytes()[:28])
    error = stub_error(stub.ModelInfer, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'obs'" in error.details()
    assert "byte size mismatch" in error.details() and "Expected 32, got 28" in error.details()


def test_raw_contents_count_not_matching_inputs_is_invalid_argument(stub):
    request = pb.ModelInferRequest(model_name="policy")
    request.inputs.add(name="obs", datatype="FP32", shape=[1, 8])
    request.raw_input_contents.extend([obs(1).tobytes(), obs(1).tobytes()])
    error = stub_error(stub.ModelInfer, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents" in error.details()


def test_batch_above_max_batch_size_is_invalid_argument(client):
    message = expect_error("INVALID_ARGUMENT", client.infer, "policy", policy_inputs(obs(65)))
    assert "batch-size must be <= 64 for 'policy' (the request's is 65)" in message


def test_missing_input_is_invalid_argument_naming_it(client):
    tensor = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
    tensor.set_data_from_numpy(np.zeros((1, 16), np.int32))
    message = expect_error("INVALID_ARGUMENT", client.infer, "simple", [tensor])
    assert "missing" in message and "INPUT1" in message


def test_unknown_requested_output_is_invalid_argument_naming_it(client):
    message = expect_error(
        "INVALID_ARGUMENT",
        client.infer,
        "policy",
        policy_inputs(obs(1)),
        outputs=[grpcclient.InferRequestedOutput("value")],
    )
    assert "'value'" in message and "'action'" in message


def test_system_shared_memory_register_is_unimplemented(client):
    message = expect_error(
        "UNIMPLEMENTED", client.register_system_shared_memory, "region", "/key", 64
    )
    assert "shared memory" in message and "not support" in message


def test_system_shared_memory_status_is_unimplemented(client):
    message = expect_error("UNIMPLEMENTED", client.get_system_shared_memory_status)
    assert "shared memory" in message


def test_server_still_serves_after_errors(client):
    for _ in range(3):
        expect_error("INVALID_ARGUMENT", client.infer, "policy", policy_inputs(obs(65)))
    assert client.infer("policy", policy_inputs(obs(1))).as_numpy("action").tolist() == [
        [POLICY_ACTION]
    ]


def test_request_over_max_request_bytes_is_resource_exhausted_and_server_survives(
    repository, start_server
):
    server = start_server(repository, "--max-request-bytes", "65536")
    with grpcclient.InferenceServerClient(server.url) as c:
        big = np.zeros((4096, OBS_DIM), np.float32)  # 128 KiB of raw input
        message = expect_error("RESOURCE_EXHAUSTED", c.infer, "policy", policy_inputs(big))
        assert "65536" in message
        assert c.is_server_live()
        result = c.infer("policy", policy_inputs(obs(4)))
    assert (result.as_numpy("action") == POLICY_ACTION).all()


# ---- repository control -------------------------------------------------------------------


def test_model_not_loaded_in_explicit_mode_is_unavailable(idle_server):
    with grpcclient.InferenceServerClient(idle_server.url) as c:
        message = expect_error("UNAVAILABLE", c.infer, "policy", policy_inputs(obs(1)))
        assert c.is_model_ready("policy") is False
    assert "policy" in message and "not loaded" in message


def test_repository_index_shows_models_not_loaded_in_explicit_mode(idle_server):
    with grpcclient.InferenceServerClient(idle_server.url) as c:
        index = c.get_model_repository_index()
    states = {m.name: (m.version, m.state, m.reason) for m in index.models}
    assert set(states) == {"all_types", "policy", "simple"}
    assert states["policy"] == ("", "UNAVAILABLE", "unloaded")


def test_load_of_a_model_folder_that_does_not_exist_is_not_found(idle_server):
    with grpcclient.InferenceServerClient(idle_server.url) as c:
        message = expect_error("NOT_FOUND", c.load_model, "no_such_model")
    assert "no_such_model" in message


def test_load_model_makes_the_model_ready_and_servable(repository, start_server):
    server = start_server(repository, "--model-control-mode", "explicit")
    with grpcclient.InferenceServerClient(server.url) as c:
        assert c.is_model_ready("policy") is False
        c.load_model("policy")
        assert c.is_model_ready("policy") is True
        assert c.is_model_ready("simple") is False
        result = c.infer("policy", policy_inputs(obs(2)))
        index = {m.name: m.state for m in c.get_model_repository_index().models}
    assert (result.as_numpy("action") == POLICY_ACTION).all()
    assert index["policy"] == "READY"


def test_unload_model_makes_the_model_not_ready(repository, start_server):
    server = start_server(repository, "--model-control-mode", "explicit", "--load-model", "policy")
    with grpcclient.InferenceServerClient(server.url) as c:
        assert c.is_model_ready("policy") is True
        c.unload_model("policy")
        assert c.is_model_ready("policy") is False
        expect_error("UNAVAILABLE", c.infer, "policy", policy_inputs(obs(1)))


def test_load_model_in_control_mode_none_is_unavailable_as_in_triton(repository, start_server):
    server = start_server(repository, "--model-control-mode", "none")
    with grpcclient.InferenceServerClient(server.url) as c:
        message = expect_error("UNAVAILABLE", c.load_model, "policy")
        unload_message = expect_error("UNAVAILABLE", c.unload_model, "policy")
        assert c.is_model_ready("policy") is True
    assert (
        message.startswith("explicit model load / unload is not allowed if polling is enabled")
        and "'none'" in message
    )
    assert "explicit" in unload_message
