"""What a client sees when something fails: no stack trace, file path, key id or tensor value,
and a request id that finds the server's log line about it."""

from __future__ import annotations

import asyncio
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg
from tritonclient.utils import InferenceServerException

from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.sealed import seal_bytes
from forseti.server.protocol.registration import add_servicer
from testkit.model_builders import (
    ALL_TYPES,
    OBS_DIM,
    POLICY_CONFIG,
    authenticate_model,
    build_repository,
    policy_onnx,
    publish_sealed,
    write_config,
)
from testkit.server_process import ServerProcess

# Distinctive values: if one of them shows up in a message, it was copied from the request.
MARKER_VALUE = 4242.125
MARKER_INT = 98765
REQUEST_ID = re.compile(r"\((?:request|error) id ([0-9a-f]{12})")


def _config(name: str) -> str:
    return POLICY_CONFIG.replace('name: "policy"', f'name: "{name}"')


GGUF_KEY = "hunter2.private_note"


def _gguf_with_a_duplicate_key() -> bytes:
    """A GGUF header that passes Forseti's structure walk and makes gguf.GGUFReader raise
    KeyError("Duplicate hunter2.private_note already in list at offset ...")."""

    def kv_string(key: str, value: str) -> bytes:
        k, v = key.encode(), value.encode()
        return struct.pack("<Q", len(k)) + k + struct.pack("<IQ", 8, len(v)) + v

    head = struct.pack("<IIQQ", 0x46554747, 3, 0, 2)
    return head + kv_string(GGUF_KEY, "a") + kv_string(GGUF_KEY, "b")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, keyring: Keyring, keyring_path: Path):
    """A repository with good models and three that fail to load: a tampered artifact, one
    sealed with a key the server lacks, and one whose bytes are not a model."""
    root = tmp_path_factory.mktemp("hygiene") / "private-folder-7c1e"
    repo = root / "repo"
    repo.mkdir(parents=True)
    build_repository(repo, keyring)

    write_config(repo, "tampered", _config("tampered"))
    publish_sealed(repo, "tampered", policy_onnx(1), keyring, version=1)
    sealed = repo / "tampered" / "1" / "model.onnx.sealed"
    blob = bytearray(sealed.read_bytes())
    blob[-40] ^= 0x01
    sealed.write_bytes(bytes(blob))

    stranger = Keyring.generate()
    write_config(repo, "wrong_key", _config("wrong_key"))
    publish_sealed(repo, "wrong_key", policy_onnx(1), stranger, version=1, manifest_keyring=keyring)

    write_config(repo, "not_a_model", _config("not_a_model"))
    (repo / "not_a_model" / "1").mkdir()
    (repo / "not_a_model" / "1" / "model.onnx.sealed").write_bytes(
        seal_bytes(
            b"\x08\x07 not an onnx graph",
            keyring,
            model="not_a_model",
            version=1,
            filename="model.onnx",
        )
    )
    authenticate_model(repo, "not_a_model", keyring)
    # A GGUF file the gguf library itself refuses, with a text that quotes a key of the file.
    write_config(repo, "bad_gguf", _config("bad_gguf").replace('"onnxruntime"', '"gguf"'))
    (repo / "bad_gguf" / "1").mkdir()
    (repo / "bad_gguf" / "1" / "model.gguf.sealed").write_bytes(
        seal_bytes(_gguf_with_a_duplicate_key(), keyring, model="bad_gguf", version=1,
                   filename="model.gguf")
    )  # fmt: skip
    authenticate_model(repo, "bad_gguf", keyring)
    server = ServerProcess(
        repo,
        keyring_path,
        [
            "--model-control-mode",
            "explicit",
            "--load-model",
            "policy",
            "--load-model",
            "all_types",
        ],
    ).start()
    secrets = [str(root), root.name, keyring.newest.key_id, stranger.newest.key_id]
    yield server, secrets
    server.stop()


@pytest.fixture
def server(setup) -> ServerProcess:
    return setup[0]


@pytest.fixture
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = server.client()
    yield c
    c.close()


def assert_clean(message: str, secrets: list[str], *values: str) -> None:
    """No trace, no path, no key id, none of the request's values."""
    assert "Traceback" not in message
    assert 'File "' not in message
    assert ".py" not in message
    for secret in [*secrets, *values]:
        assert secret not in message, f"{secret!r} leaked into {message!r}"


def assert_logged(server: ServerProcess, message: str) -> str:
    """The server log line that carries the message's request id."""
    match = REQUEST_ID.search(message)
    assert match, f"no request id in {message!r}"
    rid = match.group(1)
    assert server.log_path is not None
    lines = [
        line
        for line in server.log_path.read_text().splitlines()
        if f"request_id={rid}" in line or f"error_id={rid}" in line
    ]
    assert lines, f"request id {rid} is not in the server log"
    return lines[0]


def _refusal(action) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as refused:
        action()
    return refused.value


# ---- bad requests ------------------------------------------------------------------------


def test_bad_tensor_shape_names_no_value_and_is_logged(client, setup) -> None:
    server, secrets = setup
    obs = grpcclient.InferInput("obs", [1, OBS_DIM - 1], "FP32")
    obs.set_data_from_numpy(np.full((1, OBS_DIM - 1), MARKER_VALUE, np.float32))
    refused = _refusal(lambda: client.infer("policy", [obs]))
    assert refused.status() == "StatusCode.INVALID_ARGUMENT"
    assert_clean(refused.message(), secrets, str(MARKER_VALUE), "4242")
    line = assert_logged(server, refused.message())
    assert "rpc=ModelInfer" in line and "code=INVALID_ARGUMENT" in line


def test_bad_tensor_datatype_names_no_value(client, setup) -> None:
    server, secrets = setup
    obs = grpcclient.InferInput("obs", [1, OBS_DIM], "FP64")
    obs.set_data_from_numpy(np.full((1, OBS_DIM), MARKER_VALUE, np.float64))
    refused = _refusal(lambda: client.infer("policy", [obs]))
    assert refused.status() == "StatusCode.INVALID_ARGUMENT"
    assert_clean(refused.message(), secrets, "4242")
    assert_logged(server, refused.message())


def test_out_of_range_typed_contents_name_no_value(server: ServerProcess, setup) -> None:
    _, secrets = setup
    request = pb.ModelInferRequest(model_name="all_types")
    tensor = request.inputs.add(name="IN_INT8", datatype="INT8", shape=[1, 3])
    tensor.contents.int_contents.extend([MARKER_INT] * 3)
    # The other inputs, so that the request passes the input count and reaches IN_INT8's
    # values (no typed field carries FP16: it comes last, after the refusal).
    for name, _, _ in ALL_TYPES:
        if name not in ("INT8", "FP16"):
            request.inputs.add(name=f"IN_{name}", datatype=name, shape=[1, 3])
    request.inputs.add(name="IN_FP16", datatype="FP16", shape=[1, 3])
    with grpc.insecure_channel(server.url) as channel, pytest.raises(grpc.RpcError) as refused:
        pbg.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    message = refused.value.details()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "out of range" in message
    assert_clean(message, secrets, str(MARKER_INT))
    assert_logged(server, message)


def test_unknown_model_is_not_found_with_a_request_id(client, setup) -> None:
    server, secrets = setup
    refused = _refusal(lambda: client.get_model_metadata("no_such_model"))
    assert refused.status() == "StatusCode.NOT_FOUND"
    assert_clean(refused.message(), secrets)
    line = assert_logged(server, refused.message())
    assert "rpc=ModelMetadata" in line


def test_stream_errors_carry_a_request_id(server: ServerProcess, setup) -> None:
    import queue

    _, secrets = setup
    client = server.client()
    errors: queue.Queue = queue.Queue()
    obs = grpcclient.InferInput("obs", [1, 3], "FP32")
    obs.set_data_from_numpy(np.full((1, 3), MARKER_VALUE, np.float32))
    try:
        client.start_stream(callback=lambda result, error: errors.put(error))
        client.async_stream_infer("policy", [obs])
        error = errors.get(timeout=10)
    finally:
        client.stop_stream()
        client.close()
    assert error is not None
    assert_clean(error.message(), secrets, "4242")
    assert "rpc=ModelStreamInfer" in assert_logged(server, error.message())


# ---- load failures -------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tampered", "wrong_key"])
def test_refused_seal_names_no_path_or_key_id(client, setup, model: str) -> None:
    server, secrets = setup
    refused = _refusal(lambda: client.load_model(model))
    assert refused.status() == "StatusCode.INVALID_ARGUMENT"
    message = refused.message()
    assert "sealed artifact refused" in message
    assert_clean(message, secrets)
    assert "rpc=RepositoryModelLoad" in assert_logged(server, message)


def test_repository_index_reasons_name_no_path_or_key_id(client, setup) -> None:
    _, secrets = setup
    for model in ("tampered", "wrong_key", "not_a_model"):
        with pytest.raises(InferenceServerException):
            client.load_model(model)
    reasons = {m.name: m.reason for m in client.get_model_repository_index().models}
    for model in ("tampered", "wrong_key", "not_a_model"):
        assert reasons[model]
        assert_clean(reasons[model], secrets)


def test_library_error_text_stays_in_the_log_under_an_error_id(client, setup) -> None:
    server, secrets = setup
    refused = _refusal(lambda: client.load_model("not_a_model"))
    message = refused.message()
    assert "onnxruntime could not load the model" in message
    assert "ONNXRuntimeError" not in message
    assert_clean(message, secrets)
    error_id = re.search(r"error id ([0-9a-f]{12})", message)
    assert error_id
    line = next(
        line for line in server.log().splitlines() if f"error_id={error_id.group(1)}" in line
    )
    # The operator still gets the library's own words (the model's bytes do not parse as ONNX:
    # the external-data check's parser says so before onnxruntime is asked).
    assert "error_type=DecodeError" in line and "onnx.ModelProto" in line


def test_gguf_library_error_text_reaches_repository_index_only_as_an_error_id(
    client, setup
) -> None:
    server, secrets = setup
    with pytest.raises(InferenceServerException):
        client.load_model("bad_gguf")
    reason = next(
        m.reason for m in client.get_model_repository_index().models if m.name == "bad_gguf"
    )
    assert "gguf could not parse the file (KeyError; error id" in reason
    assert "hunter2" not in reason and "Duplicate" not in reason
    assert_clean(reason, secrets)
    error_id = re.search(r"error id ([0-9a-f]{12})", reason)
    assert error_id
    line = next(
        line for line in server.log().splitlines() if f"error_id={error_id.group(1)}" in line
    )
    assert "error_type=KeyError" in line and GGUF_KEY in line  # the library's words, logged


def test_the_server_log_names_the_key_a_refused_artifact_needs(client, setup) -> None:
    server, secrets = setup
    stranger_key_id = secrets[3]
    _refusal(lambda: client.load_model("wrong_key"))
    assert stranger_key_id in server.log()


# ---- unexpected exceptions ---------------------------------------------------------------


class _Broken(pbg.GRPCInferenceServiceServicer):
    """A servicer whose ServerMetadata fails the way a bug would, with a path in the text."""

    async def ServerMetadata(self, request, context):
        raise ValueError(f"/srv/forseti/private/state.json: bad value {MARKER_VALUE}")


def test_unexpected_exception_reaches_the_client_as_internal_with_only_a_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> Any:
        server = grpc.aio.server()
        add_servicer(_Broken(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:

            def ask() -> Any:
                client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
                try:
                    return _refusal(client.get_server_metadata)
                finally:
                    client.close()

            return await asyncio.to_thread(ask)
        finally:
            await server.stop(None)

    refused = asyncio.run(main())
    assert refused.status() == "StatusCode.INTERNAL"
    assert_clean(refused.message(), ["/srv/forseti", "state.json", "ValueError"], "4242")
    rid = REQUEST_ID.search(refused.message())
    assert rid
    record = next(r for r in caplog.records if getattr(r, "request_id", None) == rid.group(1))
    assert record.exc_info is not None  # the traceback stays on the server
