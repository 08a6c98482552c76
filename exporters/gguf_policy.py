"""PolicyDescription -> GGUF policy artifact (the format of ``server/backends/gguf_policy_format``).

The file carries the whole serving contract, as the ONNX export does: observation normalisation,
the dense layers with their activations, the action transform and bounds, and the input/output
names, all in ``forseti.policy.*`` metadata and tensors, so the server's gguf backend can
rebuild and check the network without anything else. Weights are F32, F16 or Q8_0; biases and
normalisation statistics stay F32 (they are few, and an error there shifts every output).
"""

from __future__ import annotations

import io
import logging
import time

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.quants import quantize

from forseti.core.gguf import policy_format as fmt

from .errors import ExportError
from .gguf_stream import pad_to, write_gguf_head
from .policy_description import DenseLayer, PolicyDescription

log = logging.getLogger(__name__)

GGUF_FILENAME = "model.gguf"


def _weight_type(weight: np.ndarray, weight_type: str) -> GGMLQuantizationType:
    qtype = fmt.WEIGHT_TYPES[weight_type]
    if qtype == GGMLQuantizationType.Q8_0 and weight.shape[1] % 32:
        # Q8_0 quantises rows in blocks of 32; a narrower row (CartPole's 4 inputs) stays F16.
        return GGMLQuantizationType.F16
    return qtype


def _layers(desc: PolicyDescription) -> list[tuple[str, tuple[DenseLayer, ...]]]:
    chains = [("actor", desc.actor)]
    if desc.value is not None:
        chains.append(("value", desc.value))
    return chains


def _check_exportable(desc: PolicyDescription, weight_type: str) -> None:
    if weight_type not in fmt.WEIGHT_TYPES:
        raise ExportError(
            f"weight_type must be one of {', '.join(fmt.WEIGHT_TYPES)}, not '{weight_type}'"
        )
    parameters = 0
    for chain, layers in _layers(desc):
        if len(layers) > fmt.MAX_LAYERS:
            raise ExportError(
                f"{chain} has {len(layers)} layers; the server allows {fmt.MAX_LAYERS}"
            )
        for i, layer in enumerate(layers):
            if layer.activation not in fmt.ACTIVATIONS:
                raise ExportError(
                    f"{chain} layer {i}: activation '{layer.activation}' has no GGUF form; "
                    f"known: {', '.join(fmt.ACTIVATIONS)}"
                )
            if max(layer.weight.shape) > fmt.MAX_DIM:
                raise ExportError(
                    f"{chain} layer {i}: width {max(layer.weight.shape)} exceeds {fmt.MAX_DIM}"
                )
            if not (np.isfinite(layer.weight).all() and np.isfinite(layer.bias).all()):
                raise ExportError(f"{chain} layer {i}: weights or bias are not all finite")
            parameters += layer.weight.size
    if parameters > fmt.MAX_PARAMETERS:
        raise ExportError(f"{parameters} weights exceed the server's {fmt.MAX_PARAMETERS}")
    if desc.obs_dim > fmt.MAX_DIM:
        raise ExportError(f"obs_dim {desc.obs_dim} exceeds {fmt.MAX_DIM}")


def _add_metadata(writer: GGUFWriter, desc: PolicyDescription, weight_type: str) -> None:
    writer.add_name(f"{desc.algorithm} policy")
    writer.add_uint32(fmt.K_FORMAT_VERSION, fmt.FORMAT_VERSION)
    writer.add_string(fmt.K_ALGORITHM, desc.algorithm)
    writer.add_uint32(fmt.K_OBS_DIM, desc.obs_dim)
    writer.add_string(fmt.K_ACTION_SPACE, desc.action_space)
    writer.add_string(fmt.K_ACTION_TRANSFORM, desc.action_transform)
    if desc.n_actions is not None:
        writer.add_uint32(fmt.K_N_ACTIONS, desc.n_actions)
    if desc.action_dim is not None:
        assert desc.action_low is not None and desc.action_high is not None
        writer.add_uint32(fmt.K_ACTION_DIM, desc.action_dim)
        for k, bound in (
            (fmt.K_ACTION_LOW, desc.action_low),
            (fmt.K_ACTION_HIGH, desc.action_high),
        ):
            writer.add_key_value(
                k, [float(v) for v in bound], GGUFValueType.ARRAY, GGUFValueType.FLOAT32
            )
    norm = desc.obs_normalization
    writer.add_bool(fmt.K_OBS_NORMALIZATION, norm is not None)
    if norm is not None:
        writer.add_float32(fmt.K_OBS_NORM_CLIP, float(norm.clip))
    writer.add_uint32(fmt.K_ACTOR_LAYERS, len(desc.actor))
    writer.add_key_value(
        fmt.K_ACTOR_ACTIVATIONS,
        [layer.activation for layer in desc.actor],
        GGUFValueType.ARRAY,
        GGUFValueType.STRING,
    )
    writer.add_uint32(fmt.K_VALUE_LAYERS, len(desc.value or ()))
    if desc.value:
        writer.add_key_value(
            fmt.K_VALUE_ACTIVATIONS,
            [layer.activation for layer in desc.value],
            GGUFValueType.ARRAY,
            GGUFValueType.STRING,
        )
    writer.add_string(fmt.K_INPUT_NAME, fmt.INPUT_NAME)
    outputs = fmt.output_names(desc.value is not None, desc.extra_output)
    writer.add_key_value(fmt.K_OUTPUT_NAMES, outputs, GGUFValueType.ARRAY, GGUFValueType.STRING)
    if desc.extra_output is not None:
        writer.add_string(fmt.K_EXTRA_OUTPUT, desc.extra_output)
    writer.add_string(fmt.K_WEIGHT_TYPE, weight_type)


def _tensors(
    desc: PolicyDescription, weight_type: str
) -> list[tuple[str, np.ndarray, GGMLQuantizationType]]:
    """(name, data as written, GGUF type), in file order."""
    out: list[tuple[str, np.ndarray, GGMLQuantizationType]] = []
    norm = desc.obs_normalization
    if norm is not None:
        # The same float32 rounding as the ONNX export: mean, and std from float64 var + eps.
        std = np.sqrt(norm.var + norm.epsilon).astype(np.float32)
        out.append((fmt.OBS_MEAN, norm.mean.astype(np.float32), GGMLQuantizationType.F32))
        out.append((fmt.OBS_STD, std, GGMLQuantizationType.F32))
    for chain, layers in _layers(desc):
        for i, layer in enumerate(layers):
            qtype = _weight_type(layer.weight, weight_type)
            out.append((fmt.layer_tensor(chain, i, "weight"), quantize(layer.weight, qtype), qtype))
            out.append(
                (
                    fmt.layer_tensor(chain, i, "bias"),
                    layer.bias.astype(np.float32),
                    GGMLQuantizationType.F32,
                )
            )
    return out


def export_gguf(desc: PolicyDescription, *, weight_type: str = "f32") -> bytes:
    """Serialise ``desc`` as a GGUF policy file; ``weight_type`` f32, f16 or q8_0 (any case;
    weights of layers whose input width is not a multiple of 32 fall back from Q8_0 to F16).
    The server's gguf backend reads it as ``model.gguf`` with ``backend: "gguf"``."""
    started = time.perf_counter()
    weight_type = weight_type.lower()  # the training spec spells them F32, F16, Q8_0
    _check_exportable(desc, weight_type)
    tensors = _tensors(desc, weight_type)
    writer = GGUFWriter(path=None, arch=fmt.ARCHITECTURE)
    _add_metadata(writer, desc, weight_type)
    for name, data, qtype in tensors:
        shape = data.shape
        if qtype == GGMLQuantizationType.Q8_0:
            # quantize() returned bytes; GGUFWriter turns the byte shape back into the logical one.
            writer.add_tensor_info(name, shape, np.dtype(np.uint8), data.nbytes, raw_dtype=qtype)
        else:
            writer.add_tensor_info(name, shape, data.dtype, data.nbytes)
    sink = io.BytesIO()
    alignment = write_gguf_head(writer, sink)
    for _, data, _ in tensors:
        pad_to(sink, alignment)
        sink.write(np.ascontiguousarray(data).tobytes())
    pad_to(sink, alignment)
    blob = sink.getvalue()
    log.info(
        "exported gguf algorithm=%s weight_type=%s bytes=%d tensors=%d seconds=%.4f",
        desc.algorithm,
        weight_type,
        len(blob),
        len(tensors),
        time.perf_counter() - started,
    )
    return blob
