"""Requests whose bytes do not parse get INVALID_ARGUMENT, and the server keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb

METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"

# Field 1 (model_name) holding bytes that are not UTF-8, and a truncated varint.
INVALID_UTF8_NAME = b"\x0a\x03\xff\xfe\xfd"
GARBAGE = b"\xff\xff\xff\xff"


@pytest.mark.parametrize("payload", [INVALID_UTF8_NAME, GARBAGE], ids=["utf8", "garbage"])
def test_unparsable_infer_request_is_invalid_argument(shared_server, payload: bytes) -> None:
    with grpc.insecure_channel(shared_server.url) as channel:
        call = channel.unary_unary(
            METHOD,
            request_serializer=lambda b: b,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            call(payload, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not parse" in info.value.details()


def test_unparsable_stream_message_gets_an_error_and_the_stream_goes_on(shared_server) -> None:
    good = pb.ModelInferRequest(model_name="policy", id="good")
    tensor = good.inputs.add(name="obs", datatype="FP32", shape=[1, 8])
    assert tensor.name == "obs"
    good.raw_input_contents.append(np.zeros((1, 8), np.float32).tobytes())
    with grpc.insecure_channel(shared_server.url) as channel:
        call = channel.stream_stream(
            STREAM,
            request_serializer=lambda b: b,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        responses = list(call(iter([INVALID_UTF8_NAME, good.SerializeToString()]), timeout=10))
    assert len(responses) == 2
    assert "malformed" in responses[0].error_message
    assert responses[1].error_message == ""
    assert responses[1].infer_response.id == "good"


def test_server_still_answers_after_malformed_requests(shared_server) -> None:
    with grpc.insecure_channel(shared_server.url) as channel:
        call = channel.unary_unary(METHOD, request_serializer=lambda b: b)
        for _ in range(20):
            with pytest.raises(grpc.RpcError):
                call(GARBAGE, timeout=10)
    client = grpcclient.InferenceServerClient(shared_server.url)
    assert client.is_server_live()
    assert client.is_model_ready("policy")
