"""KServe v2 messages: a decision's inputs into a ModelInferRequest, a response's outputs
into numpy arrays (raw contents, as tritonclient sends and the server answers)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from forseti.client.errors import ClientConfigError
from forseti.core.datatypes import BY_DTYPE, BY_NAME


def _datatype(name: str, array: np.ndarray) -> str:
    t = BY_DTYPE.get(array.dtype)
    if t is not None:
        return t.name
    if array.dtype == np.object_ or array.dtype.kind in "SU":
        return "BYTES"
    raise ClientConfigError(f"input '{name}' has dtype {array.dtype}, which Triton cannot carry")


def set_parameter(parameter: pb.InferParameter, value: Any) -> None:
    """One request parameter from a Python value (bool, int, float or str)."""
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int | np.integer):
        parameter.int64_param = int(value)
    elif isinstance(value, float | np.floating):
        parameter.double_param = float(value)
    elif isinstance(value, str):
        parameter.string_param = value
    else:
        raise ClientConfigError(
            f"request parameter of type {type(value).__name__}: use bool, int, float or str"
        )


def infer_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    version: str = "",
    parameters: Mapping[str, Any] | None = None,
    outputs: Sequence[str] | None = None,
) -> pb.ModelInferRequest:
    """The ModelInferRequest for `inputs` (name -> array, batch dimension included)."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, array in inputs.items():
        datatype = _datatype(name, array)
        tensor = request.inputs.add()
        tensor.name = name
        tensor.datatype = datatype
        tensor.shape.extend(array.shape)
        if datatype == "BYTES":
            serialized = serialize_byte_tensor(array)
            request.raw_input_contents.append(serialized.item() if serialized.size else b"")
        else:
            request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    for name in outputs or ():
        request.outputs.add().name = name
    for key, value in (parameters or {}).items():
        set_parameter(request.parameters[key], value)
    return request


def _decode(tensor: pb.ModelInferResponse.InferOutputTensor, raw: bytes) -> np.ndarray:
    shape = tuple(tensor.shape)
    if tensor.datatype == "BYTES":
        return deserialize_bytes_tensor(raw).reshape(shape)
    return np.frombuffer(raw, dtype=BY_NAME[tensor.datatype].dtype).reshape(shape)


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """The response's outputs by name, as numpy arrays of their shapes."""
    raw = response.raw_output_contents
    return {t.name: _decode(t, raw[i]) for i, t in enumerate(response.outputs)}


class Outputs(Mapping[str, np.ndarray]):
    """A response's outputs by name, each decoded when it is first read (a caller that reads
    only the action pays for no other output), and cut to its first row when `row` is set
    (a `decide` call's batch of one)."""

    __slots__ = ("_decoded", "_names", "_response", "_row")

    def __init__(self, response: pb.ModelInferResponse, row: bool) -> None:
        self._response = response
        self._row = row
        self._decoded: dict[str, np.ndarray] = {}
        self._names: dict[str, int] | None = None

    def _index(self) -> dict[str, int]:
        if self._names is None:
            self._names = {t.name: i for i, t in enumerate(self._response.outputs)}
        return self._names

    def __getitem__(self, name: str) -> np.ndarray:
        array = self._decoded.get(name)
        if array is None:
            i = self._index()[name]
            array = _decode(self._response.outputs[i], self._response.raw_output_contents[i])
            if self._row:
                array = array[0]
            self._decoded[name] = array
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self._index())

    def __len__(self) -> int:
        return len(self._index())

    def __repr__(self) -> str:
        return repr(dict(self))
