"""Turn a ModelInferRequest's tensors into numpy arrays, checked against the model's config,
and numpy results back into a ModelInferResponse.

This is the one validation path of both front doors (gRPC, and HTTP once its request is
decoded into a ModelInferRequest); its refusals use Triton's own texts for the common
validation errors, since clients and Triton's examples match on them (see `messages`).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from forseti.core.datatypes import ANY_BY_DTYPE, BYTES
from forseti.core.errors import InvalidArgument, shown
from forseti.core.repository.config import ModelSpec, TensorSpec

_UNSUPPORTED_INPUT_PARAMS = ("shared_memory_region", "shared_memory_byte_size")
_UNSUPPORTED_OUTPUT_PARAMS = ("shared_memory_region",)
_LENGTH = struct.Struct("<I")
_OBJECT = np.dtype(np.object_)


# ---- Triton's texts for the common validation errors -------------------------------------


def _dims_text(dims: tuple[int, ...] | list[int]) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


def _names_text(names: list[str]) -> str:
    return "[" + ",".join(f"'{shown(n)}'" for n in names) + "]"


def _listed(names: Iterable[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def unexpected_input(name: str, model: str, spec: ModelSpec) -> InvalidArgument:
    return InvalidArgument(
        f"unexpected inference input '{shown(name)}' for model '{model}' (its inputs: "
        f"{_listed(spec.inputs)})"
    )


def input_count(spec: ModelSpec, model: str, got: list[str]) -> InvalidArgument:
    required = spec.required_inputs
    missing = [n for n in required if n not in got]
    if len(required) == len(spec.inputs):
        expected = f"expected {len(required)} inputs"
    else:
        expected = f"expected number of inputs between {len(required)} and {len(spec.inputs)}"
    return InvalidArgument(
        f"{expected} but got {len(got)} inputs for model '{model}'. Got input(s) "
        f"{_names_text(got)}, but missing required input(s) {_names_text(missing)}. "
        "Please provide all required input(s)."
    )


def datatype_mismatch(name: str, model: str, got: str, want: str) -> InvalidArgument:
    return InvalidArgument(
        f"inference input '{name}' data-type is '{shown(got, 16)}', but model '{model}' "
        f"expects '{want}'"
    )


def shape_mismatch(
    name: str, model: str, ts: TensorSpec, spec: ModelSpec, shape: tuple[int, ...]
) -> InvalidArgument:
    expected = ((-1,) if spec.batched else ()) + ts.dims
    note = ""
    if spec.batched and len(shape) == len(ts.dims):
        note = (
            ". NOTE: Setting a non-zero max_batch_size in the model config requires a batch "
            "dimension to be prepended to each input shape. If you want to specify the full "
            "shape including the batch dim in your input dims config, try setting "
            "max_batch_size to zero. See the model configuration docs for more info on "
            "max_batch_size."
        )
    return InvalidArgument(
        f"unexpected shape for input '{name}' for model '{model}'. Expected "
        f"{_dims_text(expected)}, got {_dims_text(shape)}{note}"
    )


def batch_too_large(model: str, max_batch_size: int, batch: int) -> InvalidArgument:
    return InvalidArgument(
        f"inference request batch-size must be <= {max_batch_size} for '{model}' "
        f"(the request's is {batch})"
    )


def byte_size_mismatch(name: str, model: str, expected: int, got: int) -> InvalidArgument:
    return InvalidArgument(
        f"input byte size mismatch for input '{name}' for model '{model}'. "
        f"Expected {expected}, got {got}"
    )


def contents_with_raw(name: str, model: str) -> InvalidArgument:
    return InvalidArgument(
        "contents field must not be specified when using raw_input_contents for "
        f"'{name}' for model '{model}'"
    )


def duplicate_input(name: str) -> InvalidArgument:
    return InvalidArgument(f"input '{name}' already exists in request")


def duplicate_output(name: str) -> InvalidArgument:
    return InvalidArgument(f"output '{name}' already exists in request")


def unexpected_output(name: str, model: str, spec: ModelSpec) -> InvalidArgument:
    return InvalidArgument(
        f"unexpected inference output '{shown(name)}' for model '{model}' (its outputs: "
        f"{_listed(spec.outputs)})"
    )


# ---- decoding ----------------------------------------------------------------------------


def _check_shape(model: str, ts: TensorSpec, spec: ModelSpec, shape: tuple[int, ...]) -> int:
    """Return the batch size (1 for non-batching models); raise on any mismatch."""
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input '{ts.name}' has a negative dimension in {list(shape)}")
    dims = shape
    batch = 1
    if spec.batched:
        if len(shape) != len(ts.dims) + 1:
            raise shape_mismatch(ts.name, model, ts, spec, shape)
        batch = shape[0]
        if batch < 1:
            raise InvalidArgument(f"input '{ts.name}' has batch size 0")
        if batch > spec.max_batch_size:
            raise batch_too_large(model, spec.max_batch_size, batch)
        dims = shape[1:]
    elif len(shape) != len(ts.dims):
        raise shape_mismatch(ts.name, model, ts, spec, shape)
    for got, want in zip(dims, ts.dims, strict=True):
        if want != -1 and got != want:
            raise shape_mismatch(ts.name, model, ts, spec, shape)
    return batch


def _from_contents(
    tensor: pb.ModelInferRequest.InferInputTensor, ts: TensorSpec, count: int, model: str
) -> np.ndarray:
    field = ts.ttype.contents_field
    if field is None:
        raise InvalidArgument(
            f"input '{ts.name}' of type {ts.ttype.name} must be sent in raw_input_contents"
        )
    values = getattr(tensor.contents, field)
    if len(values) != count:
        size = ts.ttype.dtype.itemsize
        refused = byte_size_mismatch(ts.name, model, count * size, len(values) * size)
        raise InvalidArgument(
            f"{refused.message} ({len(values)} values in contents.{field}, the shape needs {count})"
        )
    try:
        return np.array(values, dtype=ts.ttype.dtype)
    except OverflowError:
        raise InvalidArgument(
            f"input '{ts.name}' has values out of range for {ts.ttype.name}"
        ) from None


def _text(element: bytes, name: str, model: str) -> str:
    # onnxruntime takes strings as UTF-8 text (its Python binding would turn bytes into
    # their repr); refusing here keeps one bad request from failing a formed batch.
    try:
        return element.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(
            f"inference input '{name}' for model '{model}' holds a BYTES element that is not "
            "valid UTF-8 text"
        ) from None


def _strings_from_raw(data: bytes, name: str, model: str, count: int) -> np.ndarray:
    """Triton's raw BYTES layout: each element a 4-byte little-endian length, then its
    bytes; exactly `count` elements filling `data`."""
    out = np.empty(count, dtype=_OBJECT)
    view = memoryview(data)
    offset = 0
    end = len(data)
    n = 0
    while offset < end:
        if n == count:
            raise InvalidArgument(
                f"unexpected number of string elements {n + 1} for inference input '{name}' "
                f"for model '{model}', expecting {count}"
            )
        if offset + 4 > end:
            raise InvalidArgument(
                f"inference input '{name}' for model '{model}': the BYTES data ends inside "
                "an element's 4-byte length"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > end:
            raise InvalidArgument(
                f"inference input '{name}' for model '{model}': a BYTES element's length "
                f"{length} runs past the end of its data"
            )
        out[n] = _text(bytes(view[offset : offset + length]), name, model)
        offset += length
        n += 1
    if n != count:
        raise InvalidArgument(
            f"expected {count} string elements for inference input '{name}' for model "
            f"'{model}', got {n}"
        )
    return out


def _strings_from_contents(values: list[bytes], name: str, model: str, count: int) -> np.ndarray:
    if len(values) < count:
        raise InvalidArgument(
            f"expected {count} string elements for inference input '{name}' for model "
            f"'{model}', got {len(values)}"
        )
    if len(values) > count:
        raise InvalidArgument(
            f"unexpected number of string elements {count + 1} for inference input '{name}' "
            f"for model '{model}', expecting {count}"
        )
    out = np.empty(count, dtype=_OBJECT)
    for i, v in enumerate(values):
        out[i] = _text(v, name, model)
    return out


def _fast_batch(shape: tuple[int, ...], ts: TensorSpec, max_batch: int, batch: int) -> int | None:
    """The batch size of a tensor of exactly its configured shape (1 for a model without
    batching), agreeing with the request's other inputs (`batch`, -1 before the first); None
    when it is not the common case."""
    if max_batch:
        if not shape or shape[1:] != ts.dims:
            return None
        b = shape[0]
        if not 0 < b <= max_batch or (batch != -1 and b != batch):
            return None
        return b
    return 1 if shape == ts.dims else None


def _decode_raw_fast(
    request: pb.ModelInferRequest, spec: ModelSpec
) -> tuple[dict[str, np.ndarray], int] | None:
    """The common case in one pass: raw tensors of fixed shape that match the config exactly.
    Anything unusual returns None and goes through the full check, which words the error."""
    specs = spec.inputs
    max_batch = spec.max_batch_size
    feeds: dict[str, np.ndarray] = {}
    batch = -1
    for tensor, data in zip(request.inputs, request.raw_input_contents):  # noqa: B905
        name = tensor.name
        ts = specs.get(name)
        if (
            ts is None
            or not ts.item_nbytes
            or tensor.datatype != ts.ttype.name
            or tensor.parameters
            or name in feeds
            or tensor.HasField("contents")
        ):
            return None
        shape = tuple(tensor.shape)
        b = _fast_batch(shape, ts, max_batch, batch)
        if b is None:
            return None
        if len(data) != b * ts.item_nbytes:
            return None
        # One constructor call over the request's bytes (no copy; read-only like frombuffer).
        feeds[name] = np.ndarray(shape, ts.ttype.dtype, data)
        batch = b
    return feeds, batch


class PlainTensor(Protocol):
    """An input already split from its wire format (the HTTP front door's): name, datatype,
    shape and its data as bytes or a flat array of the datatype's dtype."""

    name: str
    datatype: str
    shape: list[int]
    data: bytes | np.ndarray


def decode_plain(
    inputs: Sequence[PlainTensor], spec: ModelSpec
) -> tuple[dict[str, np.ndarray], int] | None:
    """`_decode_raw_fast` for inputs that have no protobuf form: parameter-free tensors of
    fixed shape that match the config exactly. Anything else returns None, and the caller
    takes the protobuf path, whose full check words the error."""
    specs = spec.inputs
    if len(inputs) != len(specs):
        return None
    max_batch = spec.max_batch_size
    feeds: dict[str, np.ndarray] = {}
    batch = -1
    for tensor in inputs:
        name = tensor.name
        ts = specs.get(name)
        if ts is None or not ts.item_nbytes or tensor.datatype != ts.ttype.name or name in feeds:
            return None
        shape = tuple(tensor.shape)
        b = _fast_batch(shape, ts, max_batch, batch)
        if b is None:
            return None
        data = tensor.data
        if isinstance(data, bytes):
            if len(data) != b * ts.item_nbytes:
                return None
            feeds[name] = np.ndarray(shape, ts.ttype.dtype, data)
        else:
            if data.nbytes != b * ts.item_nbytes or data.dtype != ts.ttype.dtype:
                return None
            feeds[name] = data.reshape(shape)
        batch = b
    return feeds, batch


def decode_inputs(
    request: pb.ModelInferRequest, spec: ModelSpec
) -> tuple[dict[str, np.ndarray], int]:
    """Check every input against the config and return (feeds, batch size)."""
    raw = request.raw_input_contents
    if raw and len(raw) == len(request.inputs) == len(spec.inputs):
        fast = _decode_raw_fast(request, spec)
        if fast is not None:
            return fast
    return _decode_checked(request, spec)


def _decode_checked(
    request: pb.ModelInferRequest, spec: ModelSpec
) -> tuple[dict[str, np.ndarray], int]:
    model = request.model_name
    raw = request.raw_input_contents
    inputs = request.inputs
    if raw:
        for tensor in inputs:
            if tensor.HasField("contents"):
                raise contents_with_raw(tensor.name, model)
        if len(raw) != len(inputs):
            raise InvalidArgument(
                f"request has {len(inputs)} inputs but {len(raw)} raw_input_contents entries"
            )
    got = [t.name for t in inputs]
    if len(set(got)) != len(got):
        raise duplicate_input(next(n for i, n in enumerate(got) if n in got[:i]))
    required = spec.required_inputs
    if not len(required) <= len(got) <= len(spec.inputs):
        raise input_count(spec, model, got)
    feeds: dict[str, np.ndarray] = {}
    strings: list[tuple[int, pb.ModelInferRequest.InferInputTensor, TensorSpec, int]] = []
    batch = -1
    for i, tensor in enumerate(inputs):
        name = tensor.name
        ts = spec.inputs.get(name)
        if ts is None:
            raise unexpected_input(name, model, spec)
        if tensor.datatype != ts.ttype.name:
            raise datatype_mismatch(name, model, tensor.datatype, ts.ttype.name)
        for key in _UNSUPPORTED_INPUT_PARAMS:
            if key in tensor.parameters:
                raise InvalidArgument(f"input '{name}': shared memory is not supported")
        shape = tuple(tensor.shape)
        this_batch = _check_shape(model, ts, spec, shape)
        if batch == -1:
            batch = this_batch
        elif this_batch != batch:
            raise InvalidArgument(
                f"input '{name}' has batch size {this_batch}, other inputs have {batch}"
            )
        count = math.prod(shape)
        if ts.ttype is BYTES:
            feeds[name] = np.empty(0, _OBJECT)  # placeholder: strings are checked below
            strings.append((i, tensor, ts, count))
        elif raw:
            data = raw[i]
            expected = count * ts.ttype.dtype.itemsize
            if len(data) != expected:
                raise byte_size_mismatch(name, model, expected, len(data))
            feeds[name] = np.frombuffer(data, dtype=ts.ttype.dtype).reshape(shape)
        else:
            feeds[name] = _from_contents(tensor, ts, count, model).reshape(shape)
    # String element counts are checked once every input's name, type and shape passed, the
    # last input first: the order in which Triton reports them.
    for i, tensor, ts, count in reversed(strings):
        if raw:
            arr = _strings_from_raw(raw[i], ts.name, model, count)
        else:
            arr = _strings_from_contents(
                list(tensor.contents.bytes_contents), ts.name, model, count
            )
        feeds[ts.name] = arr.reshape(tuple(tensor.shape))
    if any(n not in feeds for n in required):  # an optional input sent in a required's place
        raise input_count(spec, model, got)
    return feeds, max(batch, 1)


# ---- requested outputs -------------------------------------------------------------------


def requested_outputs(
    request: pb.ModelInferRequest, spec: ModelSpec, default: list[str]
) -> list[str]:
    """Output names to compute: the request's subset, or every output of the config."""
    if not request.outputs:
        return default
    names: list[str] = []
    for out in request.outputs:
        if out.name not in spec.outputs:
            raise unexpected_output(out.name, request.model_name, spec)
        for key in _UNSUPPORTED_OUTPUT_PARAMS:
            if key in out.parameters:
                raise InvalidArgument(f"output '{out.name}': shared memory is not supported")
        if out.name in names:
            raise duplicate_output(out.name)
        names.append(out.name)
    return names


def classifications(request: pb.ModelInferRequest) -> dict[str, int]:
    """The requested outputs that ask for Triton's classification extension, with their
    class_count (only read when the request names outputs)."""
    wanted: dict[str, int] = {}
    for out in request.outputs:
        if "classification" not in out.parameters:
            continue
        p = out.parameters["classification"]
        which = p.WhichOneof("parameter_choice")
        if which not in ("int64_param", "uint64_param"):
            raise InvalidArgument(
                f"output '{out.name}': the classification parameter must be an integer class count"
            )
        count = int(getattr(p, which))
        if count < 1:
            raise InvalidArgument(
                f"output '{out.name}': classification class count must be at least 1, got {count}"
            )
        wanted[out.name] = count
    return wanted


def _class_text(value: object, index: int, labels: tuple[str, ...]) -> bytes:
    # Triton's format: "<value>:<index>" with ":<label>" when the output has labels; floats
    # print with six decimals (C++ std::to_string), integers as integers.
    shown_value = f"{value:f}" if isinstance(value, float | np.floating) else str(value)
    text = f"{shown_value}:{index}"
    if index < len(labels):
        text += f":{labels[index]}"
    return text.encode("utf-8")


def classify(
    names: list[str],
    outputs: list[np.ndarray],
    wanted: dict[str, int],
    spec: ModelSpec,
) -> list[np.ndarray]:
    """Replace each classified output by its top `class_count` entries per batch item, as
    BYTES "value:index[:label]", highest value first."""
    result = list(outputs)
    for i, name in enumerate(names):
        count = wanted.get(name)
        if count is None:
            continue
        arr = np.asarray(outputs[i])
        if arr.dtype == _OBJECT:
            raise InvalidArgument(f"output '{name}': BYTES outputs cannot be classified")
        items = arr.reshape(arr.shape[0], -1) if spec.batched else arr.reshape(1, -1)
        k = min(count, items.shape[1])
        labels = spec.labels.get(name, ())
        classes = np.empty((items.shape[0], k), dtype=_OBJECT)
        for b, row in enumerate(items):
            # Stable sort: equal values keep index order, as a heap-free top-k would.
            order = np.argsort(-row.astype(np.float64), kind="stable")[:k]
            for j, idx in enumerate(order):
                classes[b, j] = _class_text(row[idx].item(), int(idx), labels)
        result[i] = classes if spec.batched else classes[0]
    return result


# ---- encoding ----------------------------------------------------------------------------


def strings_raw(arr: np.ndarray) -> bytes:
    """A BYTES output's raw_output_contents entry in Triton's length-prefixed layout (str
    elements as UTF-8)."""
    parts = []
    for element in arr.reshape(-1):
        data = element.encode("utf-8") if isinstance(element, str) else bytes(element)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


_OutputTensor = pb.ModelInferResponse.InferOutputTensor
_TEMPLATE_LIMIT = 256


_FromString = pb.ModelInferResponse.FromString


class ResponseEncoder:
    """Encodes one version's responses from a cached template per (outputs, shapes): parsing
    the template's serialized bytes is cheaper than constructing the output tensors each time
    (and, cold, ~3 us cheaper than CopyFrom of a template message). Bounded: the cache starts
    over past `_TEMPLATE_LIMIT` shapes."""

    def __init__(self, model: str, version: str) -> None:
        self.model = model
        self.version = version
        self._templates: dict[tuple[object, ...], bytes] = {}

    def encode(
        self,
        request_id: str,
        names: list[str],
        results: list[np.ndarray],
        retyped: bool = False,
    ) -> pb.ModelInferResponse:
        """The response; `retyped` when an output may not have its config's datatype (a
        classified output is BYTES), so the template is chosen by datatype too."""
        key: tuple[object, ...] = (*names, *[arr.shape for arr in results])
        if retyped:
            key = (*key, *[arr.dtype.str for arr in results])
        template = self._templates.get(key)
        if template is None:
            template = pb.ModelInferResponse(
                model_name=self.model,
                model_version=self.version,
                outputs=[
                    _OutputTensor(name=name, datatype=ANY_BY_DTYPE[arr.dtype].name, shape=arr.shape)
                    for name, arr in zip(names, results, strict=True)
                ],
            ).SerializeToString()
            if len(self._templates) >= _TEMPLATE_LIMIT:
                self._templates.clear()
            self._templates[key] = template
        response = _FromString(template)
        response.id = request_id
        response.raw_output_contents.extend(
            [arr.tobytes() if arr.dtype is not _OBJECT else strings_raw(arr) for arr in results]
        )
        return response
