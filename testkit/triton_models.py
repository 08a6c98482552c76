"""Small ONNX models for the Triton-conformance tests: identities of any type and shape,
with the graph's dims given as ints (fixed), strings (symbolic) or an empty list (scalar)."""

from __future__ import annotations

from collections.abc import Sequence

from onnx import TensorProto, helper

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
