"""PolicyDescription -> ONNX graph, built directly with ``onnx.helper``.

The graph carries the whole serving contract: raw observations in, env-ready actions out.
Observation normalisation and the action transform (argmax, clip or scale) are inside it, so a
client never needs the training statistics or the action bounds.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ExportError
from .policy_description import (
    ACTION,
    ACTION_ARGMAX,
    ACTION_CLIP,
    ELU_ALPHA,
    LEAKY_RELU_SLOPE,
    OBS,
    VALUE,
    DenseLayer,
    IOSpec,
    PolicyDescription,
    policy_outputs,
)

log = logging.getLogger(__name__)

BATCH_DIM = "batch"
# onnxruntime 1.17 (the oldest the server accepts) reads IR version 9; opset 17 needs IR >= 8.
IR_VERSION = 8
_ONNX_TYPES = {"TYPE_FP32": TensorProto.FLOAT, "TYPE_INT64": TensorProto.INT64}


def onnx_outputs(desc: PolicyDescription) -> list[IOSpec]:
    """The graph's outputs (name, Triton type, dims without batch), in graph order."""
    return policy_outputs(desc)


class _GraphBuilder:
    """Accumulates nodes and initializers with unique tensor names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, hint: str, value: np.ndarray) -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def op(
        self, op_type: str, inputs: list[str], hint: str, out: str | None = None, **attrs: Any
    ) -> str:
        output = out or self.name(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [output], **attrs))
        return output

    def activation(self, x: str, name: str, hint: str, out: str | None) -> str:
        if name == "identity":
            return self.op("Identity", [x], hint, out) if out else x
        if name == "tanh":
            return self.op("Tanh", [x], hint, out)
        if name == "relu":
            return self.op("Relu", [x], hint, out)
        if name == "elu":
            return self.op("Elu", [x], hint, out, alpha=ELU_ALPHA)
        if name == "leaky_relu":
            return self.op("LeakyRelu", [x], hint, out, alpha=LEAKY_RELU_SLOPE)
        if name == "sigmoid":
            return self.op("Sigmoid", [x], hint, out)
        if name == "silu":
            return self.op("Mul", [x, self.op("Sigmoid", [x], hint)], hint, out)
        if name == "gelu":
            # Opset 17 has no Gelu: the exact form torch uses, x * 0.5 * (1 + erf(x / sqrt 2)).
            inv_sqrt2 = self.const("inv_sqrt2", np.array(1 / math.sqrt(2), np.float32))
            erf = self.op("Erf", [self.op("Mul", [x, inv_sqrt2], hint)], hint)
            one_plus = self.op("Add", [erf, self.const("one", np.array(1, np.float32))], hint)
            half_x = self.op("Mul", [x, self.const("half", np.array(0.5, np.float32))], hint)
            return self.op("Mul", [half_x, one_plus], hint, out)
        raise ExportError(f"activation '{name}' has no ONNX form")

    def dense_chain(self, x: str, layers: tuple[DenseLayer, ...], hint: str, out: str) -> str:
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1
            w = self.const(f"{hint}.{i}.weight", layer.weight)
            b = self.const(f"{hint}.{i}.bias", layer.bias)
            # Gemm with transB keeps torch's [out, in] layout: y = x @ W.T + b.
            y = self.op("Gemm", [x, w, b], f"{hint}.{i}.gemm", transB=1)
            x = self.activation(y, layer.activation, f"{hint}.{i}.act", out if last else None)
        return x


def _value_info(spec: IOSpec) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(
        spec.name, _ONNX_TYPES[spec.data_type], [BATCH_DIM, *spec.dims]
    )


def _metadata(desc: PolicyDescription) -> dict[str, str]:
    meta = {
        "forseti.algorithm": desc.algorithm,
        "forseti.obs_dim": str(desc.obs_dim),
        "forseti.action_space": desc.action_space,
        "forseti.action_transform": desc.action_transform,
        "forseti.obs_normalization": str(desc.obs_normalization is not None).lower(),
    }
    if desc.n_actions is not None:
        meta["forseti.n_actions"] = str(desc.n_actions)
    if desc.action_low is not None and desc.action_high is not None:
        meta["forseti.action_low"] = json.dumps([float(v) for v in desc.action_low])
        meta["forseti.action_high"] = json.dumps([float(v) for v in desc.action_high])
    return meta


def export_onnx(desc: PolicyDescription, *, opset: int = 17) -> bytes:
    """Serialise ``desc`` as an ONNX model: input ``obs`` FP32 [batch, obs_dim]; outputs as
    ``onnx_outputs(desc)``. The model passes ``onnx.checker`` (full check)."""
    if opset < 13:
        raise ExportError(f"opset {opset} is too old; need >= 13 (Clip with tensor bounds)")
    started = time.perf_counter()
    g = _GraphBuilder()
    x = OBS
    norm = desc.obs_normalization
    if norm is not None:
        # Same formula as VecNormalize.normalize_obs; the statistics are rounded to float32
        # once here (std from float64), which keeps the graph within ~1e-7 of SB3's float64.
        mean = g.const("obs_mean", norm.mean.astype(np.float32))
        std = g.const("obs_std", np.sqrt(norm.var + norm.epsilon).astype(np.float32))
        centred = g.op("Sub", [x, mean], "obs_centred")
        scaled = g.op("Div", [centred, std], "obs_scaled")
        lo = g.const("obs_clip_low", np.array(-norm.clip, np.float32))
        hi = g.const("obs_clip_high", np.array(norm.clip, np.float32))
        x = g.op("Clip", [scaled, lo, hi], "obs_normalized")
    head_name = desc.extra_output or "head"
    head = g.dense_chain(x, desc.actor, "actor", head_name)
    if desc.action_transform == ACTION_ARGMAX:
        g.op("ArgMax", [head], "argmax", ACTION, axis=1, keepdims=1)
    elif desc.action_transform == ACTION_CLIP:
        assert desc.action_low is not None and desc.action_high is not None
        low = g.const("action_low", desc.action_low)
        high = g.const("action_high", desc.action_high)
        g.op("Min", [g.op("Max", [head, low], "action_max"), high], "action_min", ACTION)
    else:
        # low + 0.5 * (head + 1) * (high - low), in SB3's unscale_action order, then clipped
        # to the bounds that float32 rounding may overshoot by an ulp.
        assert desc.action_low is not None and desc.action_high is not None
        low = g.const("action_low", desc.action_low)
        high = g.const("action_high", desc.action_high)
        span = (desc.action_high - desc.action_low).astype(np.float32)
        plus_one = g.op("Add", [head, g.const("one", np.array(1, np.float32))], "plus_one")
        half = g.op("Mul", [g.const("half", np.array(0.5, np.float32)), plus_one], "half")
        scaled = g.op("Mul", [half, g.const("action_span", span)], "scaled")
        unscaled = g.op("Add", [low, scaled], "unscaled")
        g.op("Min", [g.op("Max", [unscaled, low], "action_max"), high], "action_min", ACTION)
    if desc.value is not None:
        g.dense_chain(x, desc.value, "value", VALUE)
    graph = helper.make_graph(
        g.nodes,
        f"forseti_{desc.algorithm.lower()}_policy",
        [helper.make_tensor_value_info(OBS, TensorProto.FLOAT, [BATCH_DIM, desc.obs_dim])],
        [_value_info(spec) for spec in onnx_outputs(desc)],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="forseti",
        doc_string=f"{desc.algorithm} deterministic policy: raw obs -> env-ready action",
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, _metadata(desc))
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the generated ONNX graph is invalid: {exc}") from exc
    data = model.SerializeToString()
    log.info(
        "exported onnx algorithm=%s bytes=%d nodes=%d seconds=%.4f",
        desc.algorithm,
        len(data),
        len(g.nodes),
        time.perf_counter() - started,
    )
    return data
