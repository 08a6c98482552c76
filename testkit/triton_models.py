"""Small ONNX models for the Triton-conformance tests: identities of any type and shape,
with the graph's dims given as ints (fixed), strings (symbolic) or an empty list (scalar)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from testkit.model_builders import onnx_model_bytes

Dims = Sequence[int | str]


def identity_onnx(tensors: Sequence[tuple[str, str, int, Dims]], name: str = "identity") -> bytes:
    """One Identity node per (input name, output name, onnx element type, dims)."""
    nodes, inputs, outputs = [], [], []
    for src, dst, elem, dims in tensors:
        nodes.append(helper.make_node("Identity", [src], [dst]))
        inputs.append(helper.make_tensor_value_info(src, elem, list(dims)))
        outputs.append(helper.make_tensor_value_info(dst, elem, list(dims)))
    return onnx_model_bytes(helper.make_graph(nodes, name, inputs, outputs))


def add_sub_onnx(elem: int = TensorProto.FLOAT, dims: Dims = ("batch", 16)) -> bytes:
    """OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 (Triton's `simple` shape)."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "add_sub",
        [
            helper.make_tensor_value_info("INPUT0", elem, list(dims)),
            helper.make_tensor_value_info("INPUT1", elem, list(dims)),
        ],
        [
            helper.make_tensor_value_info("OUTPUT0", elem, list(dims)),
            helper.make_tensor_value_info("OUTPUT1", elem, list(dims)),
        ],
    )
    return onnx_model_bytes(graph)


def sum_onnx(inputs: Sequence[str], optional: Sequence[str] = ()) -> bytes:
    """OUTPUT0 [1] = the sum of every element of the FP32 inputs (each of length -1); the
    `optional` ones default to empty (graph inputs with an initializer, which onnxruntime
    lets a request override), as Triton's optional-input models do."""
    initializers = [numpy_helper.from_array(np.zeros((0,), np.float32), n) for n in optional]
    graph = helper.make_graph(
        [
            helper.make_node("Concat", list(inputs), ["cat"], axis=0),
            helper.make_node("ReduceSum", ["cat"], ["OUTPUT0"], keepdims=1),
        ],
        "sum",
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, [f"n{i}"])
            for i, n in enumerate(inputs)
        ],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [1])],
        initializers,
    )
    return onnx_model_bytes(graph)


def write_plain_model(repo: Path, name: str, config_text: str | None, model: bytes) -> Path:
    """`<repo>/<name>/1/model.onnx` in plaintext (served with --allow-plaintext), and the
    config when given (None: no config.pbtxt, for auto-complete)."""
    folder = repo / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "1" / "model.onnx").write_bytes(model)
    if config_text is not None:
        (folder / "config.pbtxt").write_text(config_text)
    return folder
