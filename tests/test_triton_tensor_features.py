"""Triton's tensor features over real gRPC, on an in-process server with real onnxruntime:
BYTES tensors (raw and typed), the classification extension, `reshape`, rank-0 tensors
declared as dims [1], optional inputs, and Triton's texts for requests that get them wrong."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from onnx import TensorProto
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg
from tritonclient.grpc.aio import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from testkit.triton_models import add_sub_onnx, identity_onnx, sum_onnx, write_plain_model
from tests.inprocess_server import run_inprocess


def _config(name: str, body: str, max_batch_size: int = 0) -> str:
    return f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n{body}'


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("triton_features")
    write_plain_model(
        root,
        "strings",
        _config(
            "strings",
            'input [ { name: "INPUT0" data_type: TYPE_STRING dims: [ -1 ] } ]\n'
            'output [ { name: "OUTPUT0" data_type: TYPE_STRING dims: [ -1 ] } ]\n',
        ),
        identity_onnx([("INPUT0", "OUTPUT0", TensorProto.STRING, ["n"])]),
    )
    write_plain_model(
        root,
        "scores",
        _config(
            "scores",
            'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] },'
            ' { name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
            'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ]'
            ' label_filename: "labels.txt" },'
            ' { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]\n',
            max_batch_size=8,
        ),
        add_sub_onnx(TensorProto.FLOAT),
    )
    (root / "scores" / "labels.txt").write_text("".join(f"label{i}\n" for i in range(16)))
    write_plain_model(
        root, "no_config", None, identity_onnx([("x", "y", TensorProto.INT64, ["b", 3])])
    )
    write_plain_model(
        root,
        "reshaped",
        _config(
            "reshaped",
            'input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 4, 4 ]'
            " reshape: { shape: [ 16 ] } } ]\n"
            'output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 2, 8 ]'
            " reshape: { shape: [ 16 ] } } ]\n",
            max_batch_size=8,
        ),
        identity_onnx([("INPUT0", "OUTPUT0", TensorProto.INT32, ["b", 16])]),
    )
    write_plain_model(
        root,
        "scalar",
        _config(
            "scalar",
            'input [ { name: "INPUT" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
            'output [ { name: "OUTPUT" data_type: TYPE_FP32 dims: [ 1 ] } ]\n',
        ),
        identity_onnx([("INPUT", "OUTPUT", TensorProto.FLOAT, [])]),
    )
    for name, dims in (("scalar_2dim", "1, 1"), ("scalar_bad", "2")):
        write_plain_model(
            root,
            name,
            _config(
                name,
                f'input [ {{ name: "INPUT" data_type: TYPE_FP32 dims: [ {dims} ] }} ]\n'
                f'output [ {{ name: "OUTPUT" data_type: TYPE_FP32 dims: [ {dims} ] }} ]\n',
            ),
            identity_onnx([("INPUT", "OUTPUT", TensorProto.FLOAT, [])]),
        )
    optional_inputs = "".join(
        f'{{ name: "INPUT{i}" data_type: TYPE_FP32 dims: [ -1 ]{flag} }},'
        for i, flag in enumerate(["", "", "", " optional: true"])
    )
    write_plain_model(
        root,
        "optional",
        _config(
            "optional",
            f"input [ {optional_inputs.rstrip(',')} ]\n"
            'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 1 ] } ]\n',
        ),
        sum_onnx(["INPUT0", "INPUT1", "INPUT2", "INPUT3"], optional=["INPUT3"]),
    )
    return root


def _serve(repo: Path, body: Callable[..., Any]) -> Any:
    return run_inprocess(repo, None, body, load=["*"], allow_plaintext=True)


def _input(name: str, array: np.ndarray, datatype: str) -> InferInput:
    tensor = InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _refused(repo: Path, model: str, inputs: list, outputs: list | None = None) -> str:
    async def body(client, srv):
        with pytest.raises(InferenceServerException) as caught:
            await client.infer(model, inputs, outputs=outputs)
        return caught.value.message()

    return _serve(repo, body)


def _stub_call(repo: Path, request: pb.ModelInferRequest) -> pb.ModelInferResponse | grpc.RpcError:
    async def body(client, srv):
        async with grpc.aio.insecure_channel(srv.url) as channel:
            try:
                return await pbg.GRPCInferenceServiceStub(channel).ModelInfer(request)
            except grpc.aio.AioRpcError as exc:
                return exc

    return _serve(repo, body)


# ---- BYTES ---------------------------------------------------------------------------------


def test_bytes_tensors_travel_raw_both_ways(repo: Path) -> None:
    words = np.array([b"alpha", b"", "caf\u00e9".encode(), b"x" * 300], dtype=np.object_)

    async def body(client, srv):
        result = await client.infer("strings", [_input("INPUT0", words, "BYTES")])
        return result.as_numpy("OUTPUT0"), result.get_output("OUTPUT0").datatype

    answer, datatype = _serve(repo, body)
    assert datatype == "BYTES"
    assert answer.tolist() == words.tolist()


def test_bytes_tensors_travel_as_typed_contents(repo: Path) -> None:
    request = pb.ModelInferRequest(model_name="strings")
    tensor = request.inputs.add(name="INPUT0", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend([b"one", b"two"])
    response = _stub_call(repo, request)
    assert isinstance(response, pb.ModelInferResponse), response
    raw = response.raw_output_contents[0]
    assert raw == struct.pack("<I", 3) + b"one" + struct.pack("<I", 3) + b"two"


def test_too_few_string_elements_get_tritons_text(repo: Path) -> None:
    words = np.array([b"a", b"b"], dtype=np.object_)
    tensor = _input("INPUT0", words, "BYTES").set_shape([3])
    message = _refused(repo, "strings", [tensor])
    assert "expected 3 string elements for inference input 'INPUT0' for model 'strings', got 2" in (
        message
    )


def test_too_many_string_elements_get_tritons_text(repo: Path) -> None:
    words = np.array([b"a", b"b", b"c", b"d"], dtype=np.object_)
    tensor = _input("INPUT0", words, "BYTES").set_shape([2])
    message = _refused(repo, "strings", [tensor])
    assert (
        "unexpected number of string elements 3 for inference input 'INPUT0' for model "
        "'strings', expecting 2" in message
    )


def test_bytes_that_are_not_utf8_are_refused_naming_the_input(repo: Path) -> None:
    words = np.array([b"\xff\xfe"], dtype=np.object_)
    message = _refused(repo, "strings", [_input("INPUT0", words, "BYTES")])
    assert "'INPUT0'" in message and "not valid UTF-8" in message


# ---- classification ------------------------------------------------------------------------


def test_class_count_returns_the_top_values_with_their_indices(repo: Path) -> None:
    a = np.array([[0, 5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 11, 12, 13, 14, 15]], np.float32)
    b = np.zeros((1, 16), np.float32)

    async def body(client, srv):
        result = await client.infer(
            "scores",
            [_input("INPUT0", a, "FP32"), _input("INPUT1", b, "FP32")],
            outputs=[InferRequestedOutput("OUTPUT0", class_count=3)],
        )
        return result.as_numpy("OUTPUT0"), result.get_output("OUTPUT0")

    classes, meta = _serve(repo, body)
    assert meta.datatype == "BYTES" and list(meta.shape) == [1, 3]
    assert [c.decode() for c in classes[0]] == [
        "15.000000:15:label15",
        "14.000000:14:label14",
        "13.000000:13:label13",
    ]


def test_a_classified_and_a_plain_output_in_one_request(repo: Path) -> None:
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.ones((2, 16), np.float32)

    async def body(client, srv):
        result = await client.infer(
            "scores",
            [_input("INPUT0", a, "FP32"), _input("INPUT1", b, "FP32")],
            outputs=[
                InferRequestedOutput("OUTPUT0"),
                InferRequestedOutput("OUTPUT1", class_count=1),
            ],
        )
        return result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")

    plain, classes = _serve(repo, body)
    np.testing.assert_array_equal(plain, a + b)
    assert [row[0].decode() for row in classes] == ["14.000000:15", "30.000000:15"]


# ---- reshape, scalars, optional inputs -------------------------------------------------------


def test_reshape_feeds_the_model_its_shape_and_answers_in_the_configs(repo: Path) -> None:
    x = np.arange(32, dtype=np.int32).reshape(2, 4, 4)

    async def body(client, srv):
        result = await client.infer("reshaped", [_input("INPUT0", x, "INT32")])
        return result.as_numpy("OUTPUT0")

    answer = _serve(repo, body)
    assert answer.shape == (2, 2, 8)
    np.testing.assert_array_equal(answer.reshape(-1), x.reshape(-1))


def test_a_rank_0_model_tensor_declared_as_dims_1_is_served(repo: Path) -> None:
    x = np.array([2.5], np.float32)

    async def body(client, srv):
        result = await client.infer("scalar", [_input("INPUT", x, "FP32")])
        return result.as_numpy("OUTPUT")

    np.testing.assert_array_equal(_serve(repo, body), x)


def test_a_rank_0_model_tensor_declared_as_dims_1_1_is_served_and_2_is_refused(
    repo: Path,
) -> None:
    x = np.array([[4.0]], np.float32)

    async def body(client, srv):
        result = await client.infer("scalar_2dim", [_input("INPUT", x, "FP32")])
        bad = await client.is_model_ready("scalar_bad")
        index = await client.get_model_repository_index()
        return result.as_numpy("OUTPUT"), bad, index

    answer, bad_ready, index = _serve(repo, body)
    np.testing.assert_array_equal(answer, x)
    assert not bad_ready
    (reason,) = [m.reason for m in index.models if m.name == "scalar_bad"]
    assert "does not fit the model's []" in reason


def test_an_optional_input_may_be_left_out(repo: Path) -> None:
    ones = np.ones(2, np.float32)

    async def body(client, srv):
        inputs = [_input(f"INPUT{i}", ones * (i + 1), "FP32") for i in range(3)]
        without = (await client.infer("optional", inputs)).as_numpy("OUTPUT0")
        inputs.append(_input("INPUT3", ones * 10, "FP32"))
        with_it = (await client.infer("optional", inputs)).as_numpy("OUTPUT0")
        return without, with_it

    without, with_it = _serve(repo, body)
    assert without.tolist() == [12.0] and with_it.tolist() == [32.0]


def test_a_missing_required_input_gets_tritons_count_text(repo: Path) -> None:
    message = _refused(repo, "optional", [_input("INPUT0", np.ones(1, np.float32), "FP32")])
    assert (
        "expected number of inputs between 3 and 4 but got 1 inputs for model 'optional'. "
        "Got input(s) ['INPUT0'], but missing required input(s) ['INPUT1','INPUT2']. "
        "Please provide all required input(s)." in message
    )


def test_an_output_named_twice_is_refused(repo: Path) -> None:
    x = np.zeros((1, 16), np.float32)
    message = _refused(
        repo,
        "scores",
        [_input("INPUT0", x, "FP32"), _input("INPUT1", x, "FP32")],
        outputs=[InferRequestedOutput("OUTPUT0"), InferRequestedOutput("OUTPUT0")],
    )
    assert message.startswith("output 'OUTPUT0' already exists in request")


# ---- auto-complete -----------------------------------------------------------------------------


def test_a_model_folder_without_a_config_is_served_from_the_completed_config(repo: Path) -> None:
    x = np.arange(6, dtype=np.int64).reshape(2, 3)

    async def body(client, srv):
        config = (await client.get_model_config("no_config")).config
        answer = (await client.infer("no_config", [_input("x", x, "INT64")])).as_numpy("y")
        return config, answer

    config, answer = _serve(repo, body)
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 4
    assert [(t.name, list(t.dims)) for t in config.input] == [("x", [3])]
    np.testing.assert_array_equal(answer, x)


def test_contents_beside_raw_contents_get_tritons_text_before_the_count_check(repo: Path) -> None:
    # What Triton's grpc_explicit_int_content_client.py sends last: raw data for one of the two
    # inputs and typed contents on the first; it matches Triton's text.
    request = pb.ModelInferRequest(model_name="scores")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="FP32", shape=[1, 16])
    request.inputs[0].contents.fp32_contents.extend([1.0] * 8)
    request.raw_input_contents.append(np.zeros(8, np.float32).tobytes())
    refused = _stub_call(repo, request)
    assert isinstance(refused, grpc.aio.AioRpcError), refused
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "contents field must not be specified when using raw_input_contents for 'INPUT0' for "
        "model 'scores'" in (refused.details() or "")
    )
