"""Refuse ONNX models whose tensors would be read from files ("external data").

An ONNX tensor may keep its bytes outside the model: `data_location: EXTERNAL` and
`external_data { key: "location" value: "<path>" }`. onnxruntime reads such a path when the
session is built; for a model built from bytes it resolves a relative path against the server's
working directory, and the tensor's bytes can then be returned as an output. A sealed model
could so serve any file the server can read. The server never writes a model to disk and gives
onnxruntime no model directory, so no file path in a model is ever legitimate here.

The only external data a model may use is data the server itself supplies from the same sealed
version, in memory (onnxruntime's SessionOptions.add_external_initializers). The server does not
do that today, so the contract for now is: any tensor that asks for external data is refused.

Parsing uses ONNX's own protobuf classes (`onnx.onnx_ml_pb2`); onnxruntime exposes no Python
API to read a model's tensors before it builds a session.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from onnx import onnx_ml_pb2 as pb

from forseti.core.errors import ModelLoadError

_EXTERNAL = pb.TensorProto.EXTERNAL


def _sparse_tensors(sparse: pb.SparseTensorProto) -> Iterator[pb.TensorProto]:
    yield sparse.values
    yield sparse.indices


def _graph_tensors(graph: pb.GraphProto) -> Iterator[pb.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from _sparse_tensors(sparse)
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Iterable[pb.NodeProto]) -> Iterator[pb.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            # Only attributes of tensor or graph kinds can hold tensors; checking the fields'
            # presence (not attr.type) also covers an attribute whose type field lies.
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield from _sparse_tensors(attr.sparse_tensor)
            for sparse in attr.sparse_tensors:
                yield from _sparse_tensors(sparse)
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for graph in attr.graphs:
                yield from _graph_tensors(graph)


def model_tensors(model: pb.ModelProto) -> Iterator[pb.TensorProto]:
    """Every TensorProto of `model`: initializers, sparse initializers (values and indices),
    tensors in node attributes, in subgraphs (recursively) and in model-local functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)


def parse_model(model_bytes: bytes) -> pb.ModelProto:
    """The ModelProto of `model_bytes`; raises google.protobuf's DecodeError if it is none."""
    model = pb.ModelProto()
    model.ParseFromString(model_bytes)
    return model


def refuse_external_data(model: pb.ModelProto) -> None:
    """Raise ModelLoadError for the first tensor whose data would be read from a file.

    The reason names the tensor but never the path it points at (a reason is shown to clients).
    """
    for tensor in model_tensors(model):
        if tensor.data_location == _EXTERNAL or len(tensor.external_data):
            raise ModelLoadError(
                f"model tensor '{tensor.name[:200]}' reads external data from a file; the server "
                "refuses external data: every tensor must be stored inside the sealed model"
            )
