"""A model may not read files: ONNX tensors stored as external data are refused before any
onnxruntime session is built (issue 13, finding 2).

Every model here computes y = x + w over uint8[N]; its w asks for external data at
`secret.key`, which is a real file in the working directory (of the test and of the server).
Built from bytes, onnxruntime resolves that path against the working directory, so without the
refusal the model's output is the secret's bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from forseti.core.errors import ModelLoadError
from forseti.core.repository.config import model_spec, parse_config_text
from forseti.core.sealing.keyring import Keyring
from forseti.server.backends.onnx_external_data import parse_model, refuse_external_data
from forseti.server.backends.onnxruntime_backend import OnnxRuntimeBackend
from testkit.model_builders import publish_sealed, write_config

SECRET = b"FORSETI-TEST-SECRET-KEY-0123456789"
N = len(SECRET)
CONFIG = f"""
name: "leak"
backend: "onnxruntime"
max_batch_size: 0
input [ {{ name: "x" data_type: TYPE_UINT8 dims: [ {N} ] }} ]
output [ {{ name: "y" data_type: TYPE_UINT8 dims: [ {N} ] }} ]
"""


def external(name: str, dtype: int = TensorProto.UINT8, length: int = N) -> TensorProto:
    """A tensor of `length` elements whose bytes are to be read from ./secret.key."""
    tensor = TensorProto(name=name, data_type=dtype, dims=[length])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "secret.key"), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def io() -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    return (
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [N])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [N])],
    )


def model(nodes: list, initializers=(), sparse=()) -> bytes:
    inputs, outputs = io()
    graph = helper.make_graph(
        nodes, "leak", inputs, outputs, list(initializers), sparse_initializer=list(sparse)
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto.SerializeToString()


def clean_model() -> bytes:
    w = numpy_helper.from_array(np.zeros(N, np.uint8), "w")
    return model([helper.make_node("Add", ["x", "w"], ["y"])], [w])


def initializer_model() -> bytes:
    return model([helper.make_node("Add", ["x", "w"], ["y"])], [external("w")])


def constant_model() -> bytes:
    const = helper.make_node("Constant", [], ["w"], value=external("w_const"))
    return model([const, helper.make_node("Add", ["x", "w"], ["y"])])


def sparse_model() -> bytes:
    indices = numpy_helper.from_array(np.arange(N, dtype=np.int64), "w_sparse_indices")
    sparse = helper.make_sparse_tensor(external("w_sparse"), indices, [N])
    return model([helper.make_node("Add", ["x", "w_sparse"], ["y"])], sparse=[sparse])


def if_subgraph_model() -> bytes:
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["w_then"], ["then_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.UINT8, [N])],
        [external("w_then")],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["w_else"], ["else_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.UINT8, [N])],
        [numpy_helper.from_array(np.zeros(N, np.uint8), "w_else")],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    nodes = [
        helper.make_node("If", ["cond"], ["w"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Add", ["x", "w"], ["y"]),
    ]
    return model(nodes, [cond])


ATTACKS = {
    "initializer": (initializer_model, "w"),
    "constant_attribute": (constant_model, "w_const"),
    "sparse_initializer": (sparse_model, "w_sparse"),
    "if_subgraph": (if_subgraph_model, "w_then"),
}


@pytest.fixture
def secret_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    (work / "secret.key").write_bytes(SECRET)
    monkeypatch.chdir(work)
    return work


def spec():
    return model_spec(parse_config_text(CONFIG, "leak"), "leak")


def x() -> np.ndarray:
    return np.zeros(N, np.uint8)


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_backend_refuses_a_tensor_read_from_a_file(attack: str, secret_cwd: Path) -> None:
    build, tensor = ATTACKS[attack]
    with pytest.raises(ModelLoadError) as excinfo:
        OnnxRuntimeBackend(spec(), build())
    message = str(excinfo.value)
    assert f"model tensor '{tensor}' reads external data from a file" in message
    assert "secret.key" not in message and SECRET.decode() not in message


def test_a_clean_model_with_the_same_signature_still_loads(secret_cwd: Path) -> None:
    backend = OnnxRuntimeBackend(spec(), clean_model())
    try:
        (y,) = backend.run({"x": np.arange(N, dtype=np.uint8)}, ["y"])
        assert bytes(y) == bytes(range(N))
    finally:
        backend.close()


def test_tensors_of_model_local_functions_are_walked() -> None:
    const = helper.make_node("Constant", [], ["out"], value=external("w_function"))
    function = helper.make_function("local", "leaky", [], ["out"], [const], [])
    proto = onnx.load_from_string(clean_model())
    proto.functions.append(function)
    with pytest.raises(ModelLoadError, match="model tensor 'w_function' reads external data"):
        refuse_external_data(parse_model(proto.SerializeToString()))


def test_sparse_indices_are_walked() -> None:
    values = numpy_helper.from_array(np.ones(N, np.uint8), "w_values")
    sparse = helper.make_sparse_tensor(values, external("w_idx", TensorProto.INT64), [N])
    raw = model([helper.make_node("Add", ["x", "w_values"], ["y"])], sparse=[sparse])
    with pytest.raises(ModelLoadError, match="model tensor 'w_idx' reads external data"):
        refuse_external_data(parse_model(raw))


def test_external_data_entries_without_the_location_flag_are_refused() -> None:
    tensor = external("w")
    tensor.data_location = TensorProto.DEFAULT
    raw = model([helper.make_node("Add", ["x", "w"], ["y"])], [tensor])
    with pytest.raises(ModelLoadError, match="model tensor 'w' reads external data"):
        refuse_external_data(parse_model(raw))


# ---- through a real server --------------------------------------------------------------------


def infer(client: grpcclient.InferenceServerClient) -> tuple[bytes, int]:
    inp = grpcclient.InferInput("x", [N], "UINT8")
    inp.set_data_from_numpy(x())
    result = client.infer("leak", [inp])
    return bytes(result.as_numpy("y")), int(result.get_response().model_version)


def test_a_sealed_version_with_external_data_fails_to_load_and_v1_keeps_serving(
    secret_cwd: Path, tmp_path: Path, keyring: Keyring, start_server
) -> None:
    repo = tmp_path / "repo"
    write_config(repo, "leak", CONFIG)
    publish_sealed(repo, "leak", clean_model(), keyring, version=1)
    server = start_server(repo, "--model-control-mode", "explicit", "--load-model", "leak")
    client = grpcclient.InferenceServerClient(server.url)
    seen: list[str] = []
    try:
        assert infer(client) == (bytes(N), 1)
        publish_sealed(repo, "leak", initializer_model(), keyring, version=2)
        with pytest.raises(InferenceServerException) as excinfo:
            client.load_model("leak")
        seen.append(excinfo.value.message())
        assert "model tensor 'w' reads external data from a file" in excinfo.value.message()
        output, version = infer(client)
        assert (output, version) == (bytes(N), 1)
        index = client.get_model_repository_index()
        seen += [m.reason for m in index.models]
        states = {m.version: (m.state, m.reason) for m in index.models if m.name == "leak"}
        assert states["2"][0] == "UNAVAILABLE"
        assert "reads external data" in states["2"][1]
        assert states["1"][0] == "READY"
        seen.append(str(client.get_model_repository_index(as_json=True)))
        seen.append(str(client.get_model_metadata("leak", as_json=True)))
        seen.append(str(client.get_model_config("leak", as_json=True)))
    finally:
        client.close()
    for text in seen:
        assert SECRET.decode() not in text and "secret.key" not in text
