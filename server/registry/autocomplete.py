"""Config auto-complete, as Triton does by default for ONNX models.

A config may leave out what the model itself says: the platform (found from the artifact's
file name in the version folders), the inputs and outputs (names, types and dims read from the
ONNX graph), and batching (a model whose every input and output has a variable first
dimension gets max_batch_size 4 and dynamic batching, as Triton's onnxruntime backend gives
it). A model folder without a config.pbtxt is served from the completed config, where the
repository allows plaintext models.

Completion only adds what is missing; what the config states is kept and still checked
against the model. It works on what was read and authenticated: the config text the model
manifest vouches for (in a sealed repository) and the artifact after its seal was opened.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from onnx import TensorProto
from onnx import onnx_ml_pb2 as onnx_pb
from tritonclient.grpc import model_config_pb2 as mc

from forseti.core.errors import ModelLoadError
from forseti.core.repository.config import ModelSpec, model_spec
from forseti.core.sealing.sealed import SEALED_SUFFIX
from forseti.server.backends.onnx_external_data import parse_model

# Triton's default for a model that can batch and whose config does not say (its
# --backend-config=default-max-batch-size).
DEFAULT_MAX_BATCH_SIZE = 4

_PLATFORM_BY_FILE = {"model.onnx": "onnxruntime_onnx"}

_CONFIG_TYPES: dict[int, int] = {
    TensorProto.BOOL: mc.TYPE_BOOL,
    TensorProto.UINT8: mc.TYPE_UINT8,
    TensorProto.UINT16: mc.TYPE_UINT16,
    TensorProto.UINT32: mc.TYPE_UINT32,
    TensorProto.UINT64: mc.TYPE_UINT64,
    TensorProto.INT8: mc.TYPE_INT8,
    TensorProto.INT16: mc.TYPE_INT16,
    TensorProto.INT32: mc.TYPE_INT32,
    TensorProto.INT64: mc.TYPE_INT64,
    TensorProto.FLOAT16: mc.TYPE_FP16,
    TensorProto.FLOAT: mc.TYPE_FP32,
    TensorProto.DOUBLE: mc.TYPE_FP64,
    TensorProto.STRING: mc.TYPE_STRING,
}


def complete_platform(config: mc.ModelConfig, file_names: Iterable[str]) -> None:
    """Set the platform from the artifact's name when the config names neither platform nor
    backend (`file_names`: the files of the model's version folders)."""
    if config.platform or config.backend:
        return
    wanted = config.default_model_filename
    for name in file_names:
        base = name.removesuffix(SEALED_SUFFIX)
        if wanted and base == wanted and base.endswith(".onnx"):
            config.platform = "onnxruntime_onnx"
            return
        if not wanted and base in _PLATFORM_BY_FILE:
            config.platform = _PLATFORM_BY_FILE[base]
            return


def may_complete(config: mc.ModelConfig) -> bool:
    """Whether the model's own signature may add to this config: an ONNX model whose config
    lacks inputs or outputs. (A config that declares both is taken as it is, batching
    included: completing it would mean parsing every such model a second time at load.)"""
    onnx = config.platform == "onnxruntime_onnx" or config.backend == "onnxruntime"
    return onnx and (not config.input or not config.output)


def _dims(value_info: onnx_pb.ValueInfoProto) -> list[int]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in shape.dim]


def _signature(
    model: onnx_pb.ModelProto,
) -> tuple[list[onnx_pb.ValueInfoProto], list[onnx_pb.ValueInfoProto]]:
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    return inputs, list(model.graph.output)


def _can_batch(config: mc.ModelConfig, tensors: list[onnx_pb.ValueInfoProto]) -> bool:
    """Every model tensor has a variable first dimension, and every tensor the config
    declares leaves it out (its dims are one shorter than the model's)."""
    declared = {t.name: len(t.dims) for t in (*config.input, *config.output)}
    for t in tensors:
        dims = _dims(t)
        if not dims or dims[0] != -1:
            return False
        if t.name in declared and declared[t.name] != len(dims) - 1:
            return False
    return bool(tensors)


def complete_from_onnx(config: mc.ModelConfig, model: onnx_pb.ModelProto) -> mc.ModelConfig:
    """A copy of `config` with what the ONNX graph adds: max_batch_size (with dynamic
    batching) when it can batch and the config does not say, and the inputs and outputs
    when the config declares none."""
    done = mc.ModelConfig()
    done.CopyFrom(config)
    inputs, outputs = _signature(model)
    if done.max_batch_size == 0 and _can_batch(done, [*inputs, *outputs]):
        done.max_batch_size = DEFAULT_MAX_BATCH_SIZE
        if not done.HasField("dynamic_batching") and not done.HasField("sequence_batching"):
            done.dynamic_batching.SetInParent()
    skip = 1 if done.max_batch_size > 0 else 0
    for declared, found in ((done.input, inputs), (done.output, outputs)):
        if len(declared):
            continue
        for t in found:
            elem = t.type.tensor_type.elem_type
            if elem not in _CONFIG_TYPES:
                raise ModelLoadError(
                    f"auto-complete: model tensor '{t.name[:64]}' has an ONNX element type "
                    f"({elem}) with no Triton datatype; declare the model's inputs and outputs"
                )
            dims = _dims(t)[skip:]
            added = declared.add(name=t.name, data_type=_CONFIG_TYPES[elem], dims=dims or [1])
            if not dims and skip:
                # A batch of single values: Triton declares [1] and reshapes to no dims.
                added.reshape.SetInParent()
    return done


def complete_spec(spec: ModelSpec, model_bytes: bytes) -> ModelSpec:
    """The spec of the completed config (labels kept), or `spec` when nothing is added."""
    if not may_complete(spec.config):
        return spec
    try:
        model = parse_model(model_bytes)
    except Exception:  # not an ONNX model: the backend says so with its own reason
        return spec
    completed = complete_from_onnx(spec.config, model)
    if completed == spec.config:
        return spec
    return dataclasses.replace(model_spec(completed, spec.name), labels=spec.labels)
