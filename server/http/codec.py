"""KServe v2 REST bodies <-> tensors, and the protobuf messages the gRPC front door uses.

An HTTP inference request (JSON, or JSON followed by binary tensors as Triton's binary data
extension sends them) is decoded into an `HttpInferRequest` of plain inputs. Without request,
input or output parameters it goes to the handler as it is (`InferenceHandler.infer_plain`)
and its outputs come back through `encode_arrays`; otherwise, or where the plain path declines
it, `to_proto()` makes it the `ModelInferRequest` with every tensor in `raw_input_contents`, so
it reaches the same handler, validation and error texts as a gRPC call, and the
`ModelInferResponse` goes out through `encode_infer`. Either way the answer is JSON, or JSON
followed by binary outputs where the request asked for them (`binary_data_output`, or an
output's `binary_data`).

Only what is specific to the wire format is checked here: the JSON itself, the binary
section's sizes, and whether a tensor's `data` holds values of its datatype; shapes, byte
sizes, names and datatypes against the model's config are checked by the shared decoder.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2 as pb

from forseti.core.datatypes import ANY_BY_DTYPE, BY_NAME
from forseti.core.errors import InvalidArgument
from forseti.server.protocol.tensors import strings_raw

INFER_HEADER = "inference-header-content-length"
_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
_INT_KINDS = "iub"  # numpy kinds an integer tensor's JSON values may parse to (bools are ints)
_FLOAT_KINDS = "iubf"
_OBJECT = np.dtype(np.object_)


def dumps(obj: object) -> bytes:
    """JSON bytes of `obj` (numpy arrays serialised natively)."""
    return orjson.dumps(obj, option=_DUMPS_OPTIONS)


def parse_json(data: bytes | memoryview, what: str) -> Any:
    """Parse a JSON body; InvalidArgument naming `what` when it is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"failed to parse the {what} as JSON: {exc}") from None


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def _parameter_field(key: str, value: object, where: str) -> str:
    """The InferParameter field a JSON parameter goes into (bool, int, float or string)."""
    if isinstance(value, bool):
        return "bool_param"
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise InvalidArgument(f"{where} parameter '{key[:64]}' is out of range")
        return "int64_param"
    if isinstance(value, float):
        return "double_param"
    if isinstance(value, str):
        return "string_param"
    raise InvalidArgument(f"{where} parameter '{key[:64]}' must be a boolean, number or string")


# A parameter as decoded: (InferParameter field, value); set on a protobuf map only when the
# request takes the protobuf path (InferenceHandler.infer).
Parameters = dict[str, tuple[str, object]]


def _set_parameters(target: Any, parameters: Parameters) -> None:
    for key, (name, value) in parameters.items():
        setattr(target[key], name, value)


def _parameters(value: object, what: str) -> dict[str, Any]:
    return {} if value is None else _object(value, f"'parameters' of {what}")


def _shape(value: object, name: str) -> list[int]:
    # type() is int: neither a bool nor any other int subclass (orjson makes plain ints)
    if not isinstance(value, list) or not all(type(d) is int for d in value):
        raise InvalidArgument(f"input '{name}': 'shape' must be a list of integers")
    if any(not -(2**63) <= d < 2**63 for d in value):
        raise InvalidArgument(f"input '{name}': 'shape' has a dimension out of range")
    return value


def _bytes_elements(data: list[Any], name: str) -> bytes:
    """BYTES tensor values from JSON strings, in Triton's serialised form (each element a
    4-byte little-endian length and its bytes)."""
    flat: list[Any] = []
    stack = [iter(data)]  # no recursion: the nesting depth is the client's
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            flat.append(v)
        else:
            stack.pop()
    out = bytearray()
    for v in flat:
        if not isinstance(v, str):
            raise InvalidArgument(f"input '{name}': BYTES data must be strings")
        raw = v.encode("utf-8")
        out += struct.pack("<I", len(raw))
        out += raw
    return bytes(out)


def _json_tensor(data: object, datatype: str, shape: list[int], name: str) -> bytes | np.ndarray:
    """A tensor given as JSON `data` (nested or flat) of `datatype`: a flat array of its
    dtype, or for BYTES the raw bytes in Triton's serialised form."""
    if not isinstance(data, list):
        raise InvalidArgument(f"input '{name}': 'data' must be a JSON array")
    if datatype == "BYTES":
        return _bytes_elements(data, name)
    ttype = BY_NAME.get(datatype)
    if ttype is None:
        return b""  # the shared check names the unknown datatype
    try:
        values = np.array(data)
    except ValueError:
        raise InvalidArgument(
            f"input '{name}': 'data' is not a regular array of {datatype} values"
        ) from None
    kind = ttype.dtype.kind
    if values.size and kind in "iu" and values.dtype.kind == "f":
        # numpy reads integers beyond int64 (a UINT64's upper half) as floats: look closer
        values = _exact_integers(data, ttype.dtype, name, datatype)
    allowed = "b" if kind == "b" else _FLOAT_KINDS if kind == "f" else _INT_KINDS
    if values.size and values.dtype.kind not in allowed:
        raise InvalidArgument(f"input '{name}': 'data' holds values that are not {datatype}")
    if values.size != math.prod(shape):
        raise InvalidArgument(
            f"input '{name}' has {values.size} values in 'data', its shape {shape} needs "
            f"{math.prod(shape)}"
        )
    if kind in "iu" and values.size and values.dtype != ttype.dtype:
        info = np.iinfo(ttype.dtype)
        if values.min() < info.min or values.max() > info.max:
            raise InvalidArgument(f"input '{name}' has values out of range for {datatype}")
    return values.astype(ttype.dtype, copy=False).reshape(-1)


def _exact_integers(data: list[Any], dtype: np.dtype, name: str, datatype: str) -> np.ndarray:
    """`data` as integers of `dtype`, refusing anything that is not an integer in range."""
    loose = np.array(data, dtype=object)
    if not all(type(v) is int for v in loose.flat):
        raise InvalidArgument(f"input '{name}': 'data' holds values that are not {datatype}")
    try:
        return np.array(data, dtype=dtype)
    except OverflowError:
        raise InvalidArgument(f"input '{name}' has values out of range for {datatype}") from None


@dataclass
class HttpInput:
    """One input as the body gave it: `data` is the raw bytes (binary data, BYTES) or a flat
    array of the datatype's dtype (JSON numbers)."""

    name: str
    datatype: str
    shape: list[int]
    parameters: Parameters
    data: bytes | np.ndarray

    @property
    def raw(self) -> bytes:
        data = self.data
        return data if isinstance(data, bytes) else data.tobytes()


@dataclass
class HttpOutput:
    """One requested output (its `binary_data` parameter is read into HttpInferRequest)."""

    name: str
    parameters: Parameters


@dataclass
class HttpInferRequest:
    """A decoded HTTP inference request, checked for what is specific to the wire format;
    `to_proto()` is the gRPC request it stands for, and the rest is how each output goes back."""

    model: str
    version: str
    id: str = ""
    parameters: Parameters = field(default_factory=dict)
    inputs: list[HttpInput] = field(default_factory=list)
    outputs: list[HttpOutput] = field(default_factory=list)
    binary_outputs: bool = False  # the request's `binary_data_output`
    output_binary: dict[str, bool] = field(default_factory=dict)  # per output `binary_data`

    def wants_binary(self, output: str) -> bool:
        return self.output_binary.get(output, self.binary_outputs)

    @property
    def parameter_free(self) -> bool:
        """No parameter reaches the handler: the request can skip the protobuf form."""
        return (
            not self.parameters
            and not any(t.parameters for t in self.inputs)
            and not any(o.parameters for o in self.outputs)
        )

    def to_proto(self) -> pb.ModelInferRequest:
        """The ModelInferRequest of this request, every tensor in `raw_input_contents`."""
        request = pb.ModelInferRequest(model_name=self.model, model_version=self.version)
        if self.id:
            request.id = self.id
        _set_parameters(request.parameters, self.parameters)
        for t in self.inputs:
            out = request.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
            _set_parameters(out.parameters, t.parameters)
        request.raw_input_contents.extend([t.raw for t in self.inputs])
        for o in self.outputs:
            _set_parameters(request.outputs.add(name=o.name).parameters, o.parameters)
        return request


def _decoded_parameters(
    value: object,
    what: str,
    where: str,
    special: str,
    check: Callable[[object], None] | None = None,
) -> tuple[Parameters, object]:
    """A `parameters` object's entries, and the value of its `special` key (None if absent),
    checked by `check` where it stands (the order in which the errors are found)."""
    out: Parameters = {}
    special_value: object = None
    for key, v in _parameters(value, what).items():
        if key == special:
            if check is not None:
                check(v)
            special_value = v
        else:
            out[key] = (_parameter_field(key, v, where), v)
    return out, special_value


def _request_flag(value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidArgument("parameter 'binary_data_output' must be a boolean")


def _output_flag(name: str) -> Callable[[object], None]:
    def check(value: object) -> None:
        if not isinstance(value, bool):
            raise InvalidArgument(f"output '{name}': 'binary_data' must be a boolean")

    return check


def decode_infer(
    body: bytes, header_length: int | None, model: str, version: str
) -> HttpInferRequest:
    """Decode an infer body; `header_length` is the Inference-Header-Content-Length value."""
    view = memoryview(body)
    if header_length is None:
        header, binary = view, view[:0]
    else:
        if not 0 <= header_length <= len(body):
            raise InvalidArgument(
                f"Inference-Header-Content-Length {header_length} is outside the body of "
                f"{len(body)} bytes"
            )
        header, binary = view[:header_length], view[header_length:]
    doc = _object(parse_json(header, "inference request header"), "the inference request")
    decoded = HttpInferRequest(model, version)
    rid = doc.get("id")
    if rid is not None:
        if not isinstance(rid, str):
            raise InvalidArgument("'id' must be a string")
        decoded.id = rid
    if "parameters" in doc:
        params, binary_outputs = _decoded_parameters(
            doc["parameters"], "the request", "request", "binary_data_output", _request_flag
        )
        if binary_outputs is not None:
            decoded.binary_outputs = bool(binary_outputs)
        decoded.parameters = params
    inputs = doc.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidArgument("the inference request must have an 'inputs' array")
    offset = 0
    for item in inputs:
        tensor = _object(item, "each of 'inputs'")
        name = tensor.get("name")
        datatype = tensor.get("datatype")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidArgument("each input needs a string 'name' and 'datatype'")
        shown = name[:64]
        shape = _shape(tensor.get("shape"), shown)
        tensor_params: Parameters = {}
        size: object = None
        if tensor.get("parameters") is not None:
            where = f"input '{shown}'"
            tensor_params, size = _decoded_parameters(
                tensor["parameters"], where, where, "binary_data_size"
            )
        data: bytes | np.ndarray
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidArgument(
                    f"input '{shown}': 'binary_data_size' must be a non-negative integer"
                )
            if "data" in tensor:
                raise InvalidArgument(
                    f"input '{shown}' has both 'data' and 'binary_data_size'; send it one way"
                )
            if offset + size > len(binary):
                raise InvalidArgument(
                    f"input '{shown}' needs {size} bytes of binary data, "
                    f"{len(binary) - offset} are left after the request header"
                )
            # a copy: aligned for numpy, and independent of the body
            data = binary[offset : offset + size].tobytes()
            offset += size
        elif "data" in tensor:
            data = _json_tensor(tensor["data"], datatype, shape, shown)
        else:
            raise InvalidArgument(f"input '{shown}' has neither 'data' nor binary data")
        decoded.inputs.append(HttpInput(name, datatype, shape, tensor_params, data))
    if offset != len(binary):
        raise InvalidArgument(
            f"the request has {len(binary) - offset} bytes of binary data that no input claims"
        )
    outputs = doc.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise InvalidArgument("'outputs' must be an array")
        for item in outputs:
            wanted = _object(item, "each of 'outputs'")
            name = wanted.get("name")
            if not isinstance(name, str):
                raise InvalidArgument("each requested output needs a string 'name'")
            where = f"output '{name[:64]}'"
            params, binary_data = _decoded_parameters(
                wanted.get("parameters"), where, where, "binary_data", _output_flag(name[:64])
            )
            if binary_data is not None:
                decoded.output_binary[name] = bool(binary_data)
            decoded.outputs.append(HttpOutput(name, params))
    return decoded


def _parameter_value(p: pb.InferParameter) -> object:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def _bytes_values(raw: bytes) -> list[str]:
    values = []
    offset = 0
    while offset + 4 <= len(raw):
        (n,) = struct.unpack_from("<I", raw, offset)
        values.append(raw[offset + 4 : offset + 4 + n].decode("utf-8", "replace"))
        offset += 4 + n
    return values


def _body(
    doc: dict[str, object], outputs: list[dict[str, object]], binary: list[bytes]
) -> tuple[bytes, int | None]:
    doc["outputs"] = outputs
    header = dumps(doc)
    if not binary:
        return header, None
    return b"".join([header, *binary]), len(header)


def encode_infer(
    response: pb.ModelInferResponse, decoded: HttpInferRequest
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it."""
    outputs: list[dict[str, object]] = []
    binary: list[bytes] = []
    raw = response.raw_output_contents
    for i, out in enumerate(response.outputs):
        data = raw[i] if i < len(raw) else b""
        entry: dict[str, object] = {
            "name": out.name,
            "datatype": out.datatype,
            "shape": list(out.shape),
        }
        if decoded.wants_binary(out.name):
            entry["parameters"] = {"binary_data_size": len(data)}
            binary.append(data)
        elif out.datatype == "BYTES":
            entry["data"] = _bytes_values(data)
        else:
            dtype = BY_NAME[out.datatype].dtype
            values = np.frombuffer(data, dtype=dtype)
            # orjson writes numpy arrays itself, except float16
            entry["data"] = values.tolist() if dtype == np.float16 else values
        outputs.append(entry)
    doc: dict[str, object] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = {k: _parameter_value(v) for k, v in response.parameters.items()}
    return _body(doc, outputs, binary)


def encode_arrays(
    decoded: HttpInferRequest, model: str, version: str, names: list[str], arrays: list[np.ndarray]
) -> tuple[bytes, int | None]:
    """What `encode_infer` makes of the ModelInferResponse for these outputs, made from the
    arrays themselves (the handler's plain path: no protobuf in between)."""
    outputs: list[dict[str, object]] = []
    binary: list[bytes] = []
    for name, arr in zip(names, arrays, strict=True):
        ttype = ANY_BY_DTYPE[arr.dtype]
        entry: dict[str, object] = {"name": name, "datatype": ttype.name, "shape": list(arr.shape)}
        strings = arr.dtype == _OBJECT
        if decoded.wants_binary(name):
            data = strings_raw(arr) if strings else arr.tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            binary.append(data)
        elif strings:
            entry["data"] = _bytes_values(strings_raw(arr))
        else:
            flat = arr.reshape(-1)  # a view, or a contiguous copy (orjson needs contiguous)
            entry["data"] = flat.tolist() if arr.dtype == np.float16 else flat
        outputs.append(entry)
    doc: dict[str, object] = {"model_name": model, "model_version": version}
    if decoded.id:
        doc["id"] = decoded.id
    return _body(doc, outputs, binary)


def plain(message: Message) -> dict[str, Any]:
    """A protobuf message as a JSON-ready dict with every field, integers as numbers (the
    form Triton's HTTP answers use for metadata, statistics and the repository index)."""
    out: dict[str, Any] = {}
    for f in message.DESCRIPTOR.fields:
        value = getattr(message, f.name)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            out[f.name] = {k: plain(v) if isinstance(v, Message) else v for k, v in value.items()}
        elif f.label == f.LABEL_REPEATED:
            out[f.name] = [plain(v) if isinstance(v, Message) else v for v in value]
        elif f.message_type is not None:
            out[f.name] = plain(value)
        else:
            out[f.name] = value
    return out


def parameters_dict(parameters: Mapping[str, pb.InferParameter]) -> dict[str, object]:
    """A protobuf parameter map as plain JSON values."""
    return {k: _parameter_value(v) for k, v in parameters.items()}
