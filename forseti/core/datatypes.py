"""Mapping between Triton datatypes, config DataType enums and numpy dtypes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc


@dataclass(frozen=True)
class TritonType:
    """One Triton datatype and how it travels."""

    name: str  # wire name, e.g. "FP32"
    config_type: int  # model_config_pb2.DataType value
    dtype: np.dtype
    contents_field: str | None  # InferTensorContents field for typed contents, None if raw only


def _t(name: str, config_name: str, dtype: type, field: str | None) -> TritonType:
    return TritonType(name, mc.DataType.Value(config_name), np.dtype(dtype), field)


NUMERIC_TYPES: tuple[TritonType, ...] = (
    _t("BOOL", "TYPE_BOOL", np.bool_, "bool_contents"),
    _t("UINT8", "TYPE_UINT8", np.uint8, "uint_contents"),
    _t("UINT16", "TYPE_UINT16", np.uint16, "uint_contents"),
    _t("UINT32", "TYPE_UINT32", np.uint32, "uint_contents"),
    _t("UINT64", "TYPE_UINT64", np.uint64, "uint64_contents"),
    _t("INT8", "TYPE_INT8", np.int8, "int_contents"),
    _t("INT16", "TYPE_INT16", np.int16, "int_contents"),
    _t("INT32", "TYPE_INT32", np.int32, "int_contents"),
    _t("INT64", "TYPE_INT64", np.int64, "int64_contents"),
    _t("FP16", "TYPE_FP16", np.float16, None),
    _t("FP32", "TYPE_FP32", np.float32, "fp32_contents"),
    _t("FP64", "TYPE_FP64", np.float64, "fp64_contents"),
)

# Strings (Triton's BYTES, TYPE_STRING in a config): numpy object arrays of bytes or str; each
# element travels raw as a 4-byte little-endian length and its bytes.
BYTES = TritonType("BYTES", mc.TYPE_STRING, np.dtype(np.object_), "bytes_contents")

BY_NAME: dict[str, TritonType] = {t.name: t for t in NUMERIC_TYPES}
BY_CONFIG_TYPE: dict[int, TritonType] = {t.config_type: t for t in NUMERIC_TYPES}
BY_DTYPE: dict[np.dtype, TritonType] = {t.dtype: t for t in NUMERIC_TYPES}
# The same three maps with BYTES: for what a model config or the server's own wire may hold.
ANY_BY_NAME: dict[str, TritonType] = {**BY_NAME, BYTES.name: BYTES}
ANY_BY_CONFIG_TYPE: dict[int, TritonType] = {**BY_CONFIG_TYPE, BYTES.config_type: BYTES}
ANY_BY_DTYPE: dict[np.dtype, TritonType] = {**BY_DTYPE, BYTES.dtype: BYTES}

# onnxruntime reports element types as strings like "tensor(float)".
ORT_TYPE_NAMES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def config_type_name(config_type: int) -> str:
    """Wire name ("FP32") for a config DataType value; "BYTES" for strings."""
    if config_type == mc.TYPE_STRING:
        return "BYTES"
    t = BY_CONFIG_TYPE.get(config_type)
    if t is None:
        return mc.DataType.Name(config_type).removeprefix("TYPE_")
    return t.name
