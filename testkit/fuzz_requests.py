"""Malformed ModelInfer requests for fuzzing the server, as hypothesis strategies, and the
judge of what the server answered.

Shared by `tests/test_fuzz.py` (fixed seed, bounded count, in CI) and `benchmarks/fuzz_run.py`
(10,000+ of each kind, prints a table). Both run against the standard test repository of
`testkit/model_builders.build_repository`: `policy`, `simple` and `all_types`.

A generated request is a `Case`: the exact bytes that go on the wire (so it can hold what
protobuf refuses to build, such as invalid UTF-8 in a string field, or no message at all) and
a label saying how it was made. What the server must answer is decided from the final bytes,
not from how they were made (mutations can undo each other): `expectation` parses them as
the server does and checks the message against the models' contracts, independently of the
server's code, giving

* "invalid": malformed beyond doubt (does not parse, unknown model or version, wrong
  datatype, shape or byte count, missing, extra or duplicate tensor, shared memory, ...);
  the server must answer an error, and OK is a finding;
* "valid": a request the model must answer with OK;
* "any": a server may reasonably go either way (request parameters such as `timeout` or
  `priority`, raw and typed contents together, typed values out of range, a version such
  as "+1" that reads as 1).

`send_unary` / `send_stream` send cases and judge what came back; a verdict in `BAD` breaks
the server's contract: UNKNOWN or INTERNAL (on a stream: an "internal error" message), a
hang (the client's deadline expired), a status the client could not read (the server's
message overflowed gRPC's metadata limit), a stream ended early, OK on an invalid request,
or an error on a valid one.
"""

from __future__ import annotations

import functools
import math
import re
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
import numpy as np
import psutil
from google.protobuf import text_format
from google.protobuf.message import DecodeError
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

UNARY_METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"

# The server's default --max-request-bytes (8 MiB): a bigger message is refused by gRPC.
MAX_REQUEST_BYTES = 8 * 1024 * 1024

# ---- the models of testkit/model_builders.build_repository --------------------------------------

# Triton datatype -> (numpy dtype, InferTensorContents field; None: raw only), per the protocol.
DATATYPES: dict[str, tuple[np.dtype, str | None]] = {
    "BOOL": (np.dtype(np.bool_), "bool_contents"),
    "UINT8": (np.dtype(np.uint8), "uint_contents"),
    "UINT16": (np.dtype(np.uint16), "uint_contents"),
    "UINT32": (np.dtype(np.uint32), "uint_contents"),
    "UINT64": (np.dtype(np.uint64), "uint64_contents"),
    "INT8": (np.dtype(np.int8), "int_contents"),
    "INT16": (np.dtype(np.int16), "int_contents"),
    "INT32": (np.dtype(np.int32), "int_contents"),
    "INT64": (np.dtype(np.int64), "int64_contents"),
    "FP16": (np.dtype(np.float16), None),
    "FP32": (np.dtype(np.float32), "fp32_contents"),
    "FP64": (np.dtype(np.float64), "fp64_contents"),
}
CONTENTS_FIELDS = (
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
)


@dataclass(frozen=True)
class Model:
    name: str
    max_batch: int
    inputs: dict[str, tuple[str, tuple[int, ...]]]  # name -> (datatype, dims without batch)
    outputs: tuple[str, ...]

    @property
    def raw_only(self) -> bool:
        return any(DATATYPES[dt][1] is None for dt, _ in self.inputs.values())


MODELS: dict[str, Model] = {
    m.name: m
    for m in (
        Model("policy", 64, {"obs": ("FP32", (8,))}, ("action", "logits")),
        Model(
            "simple",
            8,
            {"INPUT0": ("INT32", (16,)), "INPUT1": ("INT32", (16,))},
            ("OUTPUT0", "OUTPUT1"),
        ),
        Model(
            "all_types",
            4,
            {f"IN_{t}": (t, (3,)) for t in DATATYPES},
            tuple(f"OUT_{t}" for t in DATATYPES),
        ),
    )
}
MODEL_NAMES = sorted(MODELS)

# ---- what the server must answer ---------------------------------------------------------------

INPUT_SHM_KEYS = frozenset({"shared_memory_region", "shared_memory_byte_size"})
OUTPUT_REFUSED_KEYS = frozenset({"classification", "shared_memory_region"})


def _version_reads_as_1(version: str) -> bool:
    try:
        return int(version) == 1
    except ValueError:
        return False


def expectation(payload: bytes) -> tuple[str, str]:
    """("valid" | "invalid" | "any", why) for a ModelInfer request's bytes."""
    try:
        request = pb.ModelInferRequest.FromString(payload)
    except DecodeError:
        return "invalid", "does not parse"
    return expectation_of(request)


def expectation_of(request: pb.ModelInferRequest) -> tuple[str, str]:
    model = MODELS.get(request.model_name)
    if model is None:
        return "invalid", "unknown model"
    doubts: list[str] = []
    if request.model_version not in ("", "1"):
        if not _version_reads_as_1(request.model_version):
            return "invalid", "unknown version"
        doubts.append("version reads as 1")
    if request.parameters:
        doubts.append("request parameters")
    inputs = request.inputs
    names = [t.name for t in inputs]
    if sorted(names) != sorted(model.inputs):
        return "invalid", "inputs do not match the model's"
    batches = set()
    for t in inputs:
        datatype, dims = model.inputs[t.name]
        if t.datatype != datatype:
            return "invalid", "datatype"
        shape = list(t.shape)
        if len(shape) != len(dims) + 1 or shape[1:] != list(dims):
            return "invalid", "shape"
        if not 1 <= shape[0] <= model.max_batch:
            return "invalid", "batch size"
        batches.add(shape[0])
        if INPUT_SHM_KEYS & set(t.parameters):
            return "invalid", "shared memory input"
        if t.parameters:
            doubts.append("input parameters")
    if len(batches) != 1:
        return "invalid", "batch sizes differ"
    batch = batches.pop()
    raw = request.raw_input_contents
    for t in inputs:
        datatype, dims = model.inputs[t.name]
        dtype, field = DATATYPES[datatype]
        count = batch * math.prod(dims)
        if raw:
            if t.HasField("contents"):
                doubts.append("raw and typed contents")
            continue
        if field is None:
            return "invalid", "typed contents for a raw-only datatype"
        values = getattr(t.contents, field)
        if len(values) != count:
            return "invalid", "typed value count"
        if any(len(getattr(t.contents, f)) for f in CONTENTS_FIELDS if f != field):
            doubts.append("values in other contents fields")
        if dtype.kind in "iub" and field != "bool_contents":
            info = np.iinfo(dtype)
            if any(not info.min <= v <= info.max for v in values):
                doubts.append("typed values out of range")
    if raw:
        if len(raw) != len(inputs):
            return "invalid", "raw_input_contents count"
        for t, data in zip(inputs, raw, strict=True):
            datatype, dims = model.inputs[t.name]
            if len(data) != batch * math.prod(dims) * DATATYPES[datatype][0].itemsize:
                return "invalid", "raw byte count"
    if len({out.name for out in request.outputs}) != len(request.outputs):
        doubts.append("an output requested twice")
    for out in request.outputs:
        if out.name not in model.outputs:
            return "invalid", "unknown requested output"
        if OUTPUT_REFUSED_KEYS & set(out.parameters):
            return "invalid", "classification or shared memory output"
        if out.parameters:
            doubts.append("output parameters")
    if doubts:
        return "any", ", ".join(sorted(set(doubts)))
    return "valid", ""


# ---- what goes on the wire ---------------------------------------------------------------------


@dataclass
class Case:
    """One request as sent: `payload` is exactly the bytes of the gRPC message."""

    label: str
    payload: bytes
    expect: str  # "valid", "invalid" or "any"
    why: str
    request: pb.ModelInferRequest | None = None  # the message it was built from, if any

    @classmethod
    def of(cls, label: str, payload: bytes, request: pb.ModelInferRequest | None = None):
        expect, why = expectation(payload)
        return cls(label, payload, expect, why, request)

    def describe(self, limit: int = 600) -> str:
        """A reproducer: the proto it was built from and the payload bytes, with long runs of
        one character or byte written as `<x * n>` and the rest cut at `limit` characters."""
        lines = [f"label={self.label} expect={self.expect} ({self.why})"]
        if self.request is not None:
            text = text_format.MessageToString(self.request, as_utf8=True, as_one_line=True)
            lines.append("proto: " + _abridge(_squeeze(text), limit))
        hexed = _squeeze_hex(self.payload)
        lines.append(f"payload ({len(self.payload)} bytes) hex: {_abridge(hexed, limit)}")
        return "\n".join(lines)


def _squeeze(text: str, longest: int = 12) -> str:
    """Write runs of more than `longest` equal characters as `<'x' * n>`."""
    return re.sub(rf"(.)\1{{{longest},}}", lambda m: f"<{m[1]!r} * {len(m[0])}>", text)


def _squeeze_hex(data: bytes, longest: int = 12) -> str:
    """Bytes as hex pairs, runs of more than `longest` equal bytes written as `<'00' * n>`."""
    run = rf"([0-9a-f]{{2}} )\1{{{longest},}}"
    hexed = re.sub(run, lambda m: f"<{m[1][:2]!r} * {len(m[0]) // 3}> ", data.hex(" ") + " ")
    return hexed.strip()


def _abridge(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _case(label: str, request: pb.ModelInferRequest) -> Case:
    return Case.of(label, request.SerializeToString(), request)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if not n:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def _field(number: int, wire_type: int, body: bytes) -> bytes:
    """One protobuf field; for wire type 2 `body` gets its length prefix here."""
    tag = _varint((number << 3) | wire_type)
    if wire_type == 2:
        return tag + _varint(len(body)) + body
    return tag + body


# ---- strategies: building blocks ----------------------------------------------------------------
# Hypothesis keeps each example's choices small (a few KiB), so big values are drawn as a size
# and built here ("x" * n), never drawn byte by byte.

INT64_EDGES = [0, 1, -1, 2, 3, 7, 8, 9, 16, 63, 64, 65, 2**31 - 1, 2**31, -(2**31)]
INT64_EDGES += [2**32, 2**53 + 1, 2**62, 2**63 - 1, -(2**63), -(2**63) + 1]

dims = st.one_of(st.sampled_from(INT64_EDGES), st.integers(-(2**63), 2**63 - 1))
shapes = st.lists(dims, max_size=6)

UNKNOWN_DATATYPES = ["", "fp32", "FP32 ", " FP32", "FLOAT", "TYPE_FP32", "BF16", "FP8"]
UNKNOWN_DATATYPES += [
    "INT128",
    "BYTES",
    "STRING",
    "\x00",
    "FP32\x00",
    "☃",
    "\uff26\uff30\uff13\uff12",
]  # the last: "FP32" in full-width letters
datatypes = st.one_of(
    st.sampled_from(sorted(DATATYPES)),
    st.sampled_from(UNKNOWN_DATATYPES),
    st.text(max_size=12),
    st.integers(17, 20_000).map(lambda n: "FP" * n),
)

# Names the server handles specially, names that are long, odd or look like paths.
ODD_NAMES = ["", " ", ".", "..", "../policy", "policy/", "/policy", "policy\x00", "\x00"]
ODD_NAMES += ["POLICY", "policy ", " policy", "polícy", "policy\n", ".policy", "~policy"]
ODD_NAMES += ["policy/1", "policy/config.pbtxt", "a/../policy", "/etc/passwd", "💥" * 64]
names = st.one_of(
    st.sampled_from(ODD_NAMES),
    st.text(max_size=24),
    st.tuples(st.sampled_from(["x", "é", "💥", "/", "a/", ".", "%s"]), st.integers(2, 300)).map(
        lambda t: t[0] * t[1]
    ),
    st.integers(300, 200_000).map(lambda n: "n" * n),
)
model_names = st.one_of(st.sampled_from(MODEL_NAMES), names)

VERSIONS = [
    "",
    "1",
    "-1",
    "0",
    "2",
    "01",
    "+1",
    " 1",
    "1 ",
    "1.5",
    "1e0",
    "0x1",
    "0_1",
    "\u0661",
]  # Arabic-Indic 1
VERSIONS += ["99999999999999999999", "9223372036854775807", "9223372036854775808", "-0"]
VERSIONS += ["latest", "v1", "\x00", "1\x00"]
versions = st.one_of(
    st.sampled_from(VERSIONS),
    st.integers(-(2**70), 2**70).map(str),
    st.text(max_size=12),
    st.integers(30, 100_000).map(lambda n: "9" * n),
)

PARAM_KEYS = ["shared_memory_region", "shared_memory_offset", "shared_memory_byte_size"]
PARAM_KEYS += ["classification", "sequence_id", "sequence_start", "sequence_end", "priority"]
PARAM_KEYS += ["timeout", "binary_data", "binary_data_size", "binary_data_output", "headers"]
PARAM_KEYS += ["triton_enable_empty_final_response", ""]
param_keys = st.one_of(st.sampled_from(PARAM_KEYS), st.text(max_size=16))

doubles = st.one_of(
    st.sampled_from([0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e308, 5e-324]),
    st.floats(),
)
int64s = st.one_of(st.sampled_from(INT64_EDGES), st.integers(-(2**63), 2**63 - 1))
param_strings = st.one_of(
    st.sampled_from(["", "0", "-1", "1e9", "region0", "nan", "😀"]),
    st.text(max_size=16),
    st.integers(100, 50_000).map(lambda n: "s" * n),
)


@st.composite
def parameters(draw) -> pb.InferParameter:
    """An InferParameter of each kind (or with none set), holding weird values."""
    kind = draw(st.sampled_from(["bool", "int64", "string", "double", "uint64", "unset"]))
    if kind == "bool":
        return pb.InferParameter(bool_param=draw(st.booleans()))
    if kind == "int64":
        return pb.InferParameter(int64_param=draw(int64s))
    if kind == "string":
        return pb.InferParameter(string_param=draw(param_strings))
    if kind == "double":
        return pb.InferParameter(double_param=draw(doubles))
    if kind == "uint64":
        return pb.InferParameter(uint64_param=draw(st.sampled_from([0, 1, 2**63, 2**64 - 1])))
    return pb.InferParameter()


@st.composite
def param_maps(draw, max_size: int = 3) -> dict[str, pb.InferParameter]:
    keys = draw(st.lists(param_keys, max_size=max_size, unique=True))
    return {k: draw(parameters()) for k in keys}


def _fill(target, params: dict[str, pb.InferParameter]) -> None:
    for k, v in params.items():
        target[k].CopyFrom(v)


def _values(model: Model, name: str, batch: int, seed: int) -> np.ndarray:
    datatype, inner = model.inputs[name]
    dtype = DATATYPES[datatype][0]
    rng = np.random.default_rng(seed)
    if dtype.kind == "f":
        return rng.uniform(-1, 1, (batch, *inner)).astype(dtype)
    return rng.integers(0, 2, (batch, *inner)).astype(dtype)


def _extend(contents: pb.InferTensorContents, field: str, n: int) -> None:
    """Put n plausible values of the field's own kind into `contents.<field>`."""
    if field == "bytes_contents":
        contents.bytes_contents.extend([b"1"] * n)
    elif field == "bool_contents":
        contents.bool_contents.extend([True] * n)
    elif field.startswith("fp"):
        getattr(contents, field).extend([0.5] * n)
    else:
        getattr(contents, field).extend([1] * n)


def build_valid(
    model: Model, batch: int, seed: int, raw: bool, request_id: str = "", version: str = ""
) -> pb.ModelInferRequest:
    """A request the model answers with OK."""
    request = pb.ModelInferRequest(model_name=model.name, model_version=version, id=request_id)
    raw = raw or model.raw_only
    for i, (name, (datatype, inner)) in enumerate(model.inputs.items()):
        tensor = request.inputs.add(name=name, datatype=datatype, shape=[batch, *inner])
        values = _values(model, name, batch, seed + i)
        field = DATATYPES[datatype][1]
        if raw:
            request.raw_input_contents.append(values.tobytes())
        else:
            assert field is not None  # not raw_only: every input has a typed contents field
            getattr(tensor.contents, field).extend(values.ravel().tolist())
    return request


@st.composite
def valid_requests(draw, model: Model | None = None) -> pb.ModelInferRequest:
    model = model or MODELS[draw(st.sampled_from(MODEL_NAMES))]
    request = build_valid(
        model,
        batch=draw(st.integers(1, min(model.max_batch, 4))),
        seed=draw(st.integers(0, 2**32)),
        raw=draw(st.booleans()),
        request_id=draw(st.text(max_size=8)),
        version=draw(st.sampled_from(["", "1"])),
    )
    for out in draw(st.lists(st.sampled_from(model.outputs), max_size=2)):
        request.outputs.add(name=out)
    return request


# ---- mutations of a valid request ------------------------------------------------------------
# Each takes (draw, request, model), changes the request in place and returns a label. They
# run in the order of MUTATIONS; what the server must answer is judged on the result.


def _index(draw, items) -> int:
    """An index into items, which every caller has checked is not empty."""
    return draw(st.integers(0, len(items) - 1))


def mut_model(draw, request, model):
    request.model_name = draw(model_names.filter(lambda n: n != model.name))
    return "model_name"


def mut_version(draw, request, model):
    request.model_version = draw(versions)
    return "model_version"


def mut_id(draw, request, model):
    request.id = draw(st.one_of(names, st.integers(0, 100_000).map(lambda n: "i" * n)))
    return "request_id"


def mut_request_params(draw, request, model):
    _fill(request.parameters, draw(param_maps(max_size=5).filter(bool)))
    return "request_params"


def mut_outputs(draw, request, model):
    for _ in range(draw(st.integers(1, 3))):
        out = request.outputs.add(name=draw(st.one_of(st.sampled_from(model.outputs), names)))
        _fill(out.parameters, draw(param_maps()))
    return "outputs"


def mut_input_params(draw, request, model):
    i = _index(draw, request.inputs)
    _fill(request.inputs[i].parameters, draw(param_maps().filter(bool)))
    return "input_params"


def mut_datatype(draw, request, model):
    tensor = request.inputs[_index(draw, request.inputs)]
    right = tensor.datatype
    tensor.datatype = draw(datatypes.filter(lambda d: d != right))
    return "datatype"


def mut_shape(draw, request, model):
    tensor = request.inputs[_index(draw, request.inputs)]
    old = list(tensor.shape)
    kind = draw(st.sampled_from(["random", "batch", "rank", "inner", "huge", "many"]))
    if kind == "random":
        new = draw(shapes)
    elif kind == "batch":
        batch = draw(st.sampled_from([0, -1, model.max_batch + 1, 2**63 - 1, old[0] + 1]))
        new = [batch, *old[1:]]
    elif kind == "rank":
        new = draw(st.sampled_from([[], old[1:], [*old, 1], [1, *old], old[:1]]))
    elif kind == "inner":
        new = [old[0], *[draw(dims) for _ in old[1:]]]
    elif kind == "huge":
        new = [draw(st.sampled_from([2**63 - 1, -(2**63), 2**62, 2**32])) for _ in old]
    else:  # hundreds or thousands of dimensions
        new = [draw(st.sampled_from([1, 2**63 - 1, 0]))] * draw(st.integers(7, 2_000))
    tensor.shape[:] = new
    return f"shape.{kind}"


def mut_mixed(draw, request, model):
    """Raw and typed contents in one request (Triton refuses it; a server may be lenient)."""
    tensor = request.inputs[_index(draw, request.inputs)]
    if request.raw_input_contents:
        _extend(tensor.contents, draw(st.sampled_from(CONTENTS_FIELDS)), draw(st.integers(1, 8)))
        return "mixed.typed_into_raw"
    request.raw_input_contents.append(b"\x00" * 4 * draw(st.integers(0, 8)))
    return "mixed.raw_into_typed"


def mut_raw_count(draw, request, model):
    if request.raw_input_contents and draw(st.booleans()):
        del request.raw_input_contents[_index(draw, request.raw_input_contents)]
    else:
        request.raw_input_contents.append(bytes(draw(st.integers(0, 64))))
    return "raw_count"


def mut_typed_values(draw, request, model):
    tensor = request.inputs[_index(draw, request.inputs)]
    right = DATATYPES[model.inputs[tensor.name][0]][1]
    if request.raw_input_contents or right is None:
        return mut_mixed(draw, request, model)
    values = getattr(tensor.contents, right)
    if draw(st.booleans()) or not len(values):  # the values in the wrong field
        wrong = draw(st.sampled_from([f for f in CONTENTS_FIELDS if f != right]))
        count = len(values)
        tensor.contents.Clear()
        _extend(tensor.contents, wrong, count)
        return "typed.wrong_field"
    edge = {  # the right field, a value out of range for the datatype
        "int_contents": -(2**31),
        "int64_contents": -(2**63),
        "uint_contents": 2**32 - 1,
        "uint64_contents": 2**64 - 1,
        "fp32_contents": float("nan"),
        "fp64_contents": float("inf"),
        "bool_contents": True,
    }[right]
    values[draw(st.integers(0, len(values) - 1))] = edge
    return "typed.out_of_range"


def mut_bytes(draw, request, model):
    raw = request.raw_input_contents
    if raw:
        i = _index(draw, raw)
        data = raw[i]
        kind = draw(st.sampled_from(["truncate", "extend", "empty", "big"]))
        if kind == "truncate" and data:
            raw[i] = data[: draw(st.integers(0, len(data) - 1))]
        elif kind == "extend":
            raw[i] = data + bytes(draw(st.integers(1, 64)))
        elif kind == "big":
            raw[i] = data + b"\x7f" * draw(st.integers(1, 2_000_000))
        else:
            raw[i] = b""
        return f"raw_bytes.{kind}"
    tensor = request.inputs[_index(draw, request.inputs)]
    field = DATATYPES[model.inputs[tensor.name][0]][1] or "fp32_contents"
    values = getattr(tensor.contents, field)
    if draw(st.booleans()) and len(values):
        del values[draw(st.integers(0, len(values) - 1))]
        return "typed_count.fewer"
    _extend(tensor.contents, field, draw(st.integers(1, 100)))
    return "typed_count.more"


def mut_missing(draw, request, model):
    i = _index(draw, request.inputs)
    del request.inputs[i]
    if i < len(request.raw_input_contents):
        del request.raw_input_contents[i]
    return "missing_input"


def mut_extra(draw, request, model):
    extra = pb.ModelInferRequest.InferInputTensor()
    if request.inputs:
        extra.CopyFrom(request.inputs[_index(draw, request.inputs)])
    extra.name = draw(names)
    if draw(st.booleans()):
        extra.datatype = draw(datatypes)
        extra.shape[:] = draw(shapes)
    request.inputs.append(extra)
    if request.raw_input_contents:
        request.raw_input_contents.append(bytes(draw(st.integers(0, 64))))
    return "extra_input"


def mut_duplicate(draw, request, model):
    i = _index(draw, request.inputs)
    request.inputs.add().CopyFrom(request.inputs[i])
    if i < len(request.raw_input_contents):
        request.raw_input_contents.append(request.raw_input_contents[i])
    return "duplicate_input"


MUTATIONS: dict[str, Callable] = {
    f.__name__.removeprefix("mut_"): f
    for f in (
        mut_model,
        mut_version,
        mut_id,
        mut_request_params,
        mut_outputs,
        mut_input_params,
        mut_datatype,
        mut_shape,
        mut_mixed,
        mut_raw_count,
        mut_typed_values,
        mut_bytes,
        mut_missing,
        mut_extra,
        mut_duplicate,
    )
}
_ORDER = {name: i for i, name in enumerate(MUTATIONS)}


@st.composite
def mutated_requests(draw) -> Case:
    """A valid request with one to three things wrong with it."""
    model = MODELS[draw(st.sampled_from(MODEL_NAMES))]
    request = draw(valid_requests(model))
    chosen = draw(st.lists(st.sampled_from(list(MUTATIONS)), min_size=1, max_size=3, unique=True))
    labels = []
    for name in sorted(chosen, key=_ORDER.__getitem__):
        if request.inputs:
            labels.append(MUTATIONS[name](draw, request, model))
    return _case("+".join(labels), request)


# ---- requests built from nothing, bytes, and what protobuf cannot build ----------------------


@st.composite
def random_requests(draw) -> Case:
    """A ModelInferRequest with every field random."""
    request = pb.ModelInferRequest(
        model_name=draw(model_names), model_version=draw(versions), id=draw(st.text(max_size=8))
    )
    _fill(request.parameters, draw(param_maps()))
    for _ in range(draw(st.integers(0, 4))):
        tensor = request.inputs.add(name=draw(names), datatype=draw(datatypes))
        tensor.shape[:] = draw(shapes)
        _fill(tensor.parameters, draw(param_maps(max_size=2)))
        if draw(st.booleans()):
            _extend(
                tensor.contents, draw(st.sampled_from(CONTENTS_FIELDS)), draw(st.integers(0, 32))
            )
    for _ in range(draw(st.integers(0, 4))):
        request.raw_input_contents.append(draw(st.binary(max_size=64)))
    for _ in range(draw(st.integers(0, 2))):
        out = request.outputs.add(name=draw(names))
        _fill(out.parameters, draw(param_maps(max_size=2)))
    return _case("random_request", request)


INVALID_UTF8 = [
    b"\xff",
    b"\xfe\xff",
    b"\xc0\xaf",  # overlong '/'
    b"\xe0\x80\xaf",  # overlong
    b"\xed\xa0\x80",  # a UTF-16 surrogate
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xe2\x82",  # truncated sequence
    b"\x80",  # lone continuation byte
    b"\xf8\x88\x80\x80\x80",  # five-byte form
]
# Where a string can be, and how to put a marker string there.
_UTF8_PLACES: dict[str, Callable[[pb.ModelInferRequest, str], None]] = {
    "model_name": lambda r, m: setattr(r, "model_name", m),
    "model_version": lambda r, m: setattr(r, "model_version", m),
    "id": lambda r, m: setattr(r, "id", m),
    "input_name": lambda r, m: setattr(r.inputs[0], "name", m),
    "input_datatype": lambda r, m: setattr(r.inputs[0], "datatype", m),
    "output_name": lambda r, m: r.outputs.add(name=m),
    "request_param_key": lambda r, m: r.parameters[m].CopyFrom(pb.InferParameter(int64_param=1)),
    "request_param_value": lambda r, m: r.parameters["sequence_id"].CopyFrom(
        pb.InferParameter(string_param=m)
    ),
    "input_param_key": lambda r, m: r.inputs[0].parameters[m].CopyFrom(pb.InferParameter()),
    "output_param_value": lambda r, m: (
        r.outputs.add(name="action")
        .parameters["binary_data"]
        .CopyFrom(pb.InferParameter(string_param=m))
    ),
}


@st.composite
def invalid_utf8_requests(draw) -> Case:
    """A request with invalid UTF-8 in one string field. Protobuf will not build that, so the
    request is built with an ASCII marker of the same length there, and the marker's bytes are
    swapped for the bad ones in the serialized message (every length prefix stays right)."""
    request = draw(valid_requests())
    place = draw(st.sampled_from(sorted(_UTF8_PLACES)))
    bad = draw(st.text(alphabet="abcxyz_", max_size=4)).encode()
    bad += draw(st.sampled_from(INVALID_UTF8)) + draw(st.sampled_from([b"", b"ok", b"\xff"]))
    bad = bad.ljust(8, b"\x80")
    marker = ("\x1f\x1e" + "Q" * (len(bad) - 4) + "\x1e\x1f").encode()
    _UTF8_PLACES[place](request, marker.decode())
    data = request.SerializeToString()
    if data.count(marker) == 1:
        data = data.replace(marker, bad)
    else:  # the marker also occurs in the tensor data: send a second, bad, model name instead
        data += _field(1, 2, bad)
        place = "model_name"
    return Case.of(f"invalid_utf8.{place}", data, request)


@st.composite
def random_bytes(draw) -> Case:
    data = draw(
        st.one_of(
            st.binary(max_size=256),
            st.sampled_from([b"", b"\x00", b"\xff" * 16, b"\x0a\xff", b"\x0a\x80\x80\x80"]),
        )
    )
    return Case.of("random_bytes", data)


@st.composite
def corrupted_requests(draw) -> Case:
    """A valid request's bytes, truncated, with bits flipped, bytes inserted or deleted."""
    request = draw(valid_requests())
    data = bytearray(request.SerializeToString())
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete"]))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "truncate":
            del data[at:]
        elif kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            del data[at : at + draw(st.integers(1, 8))]
    return Case.of(f"corrupted.{kind}", bytes(data), request)


WIRE_TRICKS = [
    "deep_groups",
    "wrong_wire_type",
    "huge_length",
    "unknown_field",
    "bad_packed_shape",
    "name_twice",
    "stray_end_group",
    "many_inputs",
    "many_params",
]


@functools.cache
def _many_params(count: int) -> bytes:
    entry = _field(2, 2, _field(2, 0, b"\x01"))  # InferParameter(int64_param=1)
    return b"".join(_field(4, 2, _field(1, 2, b"p%d" % i) + entry) for i in range(count))


@st.composite
def wire_tricks(draw) -> Case:
    """A valid request's bytes followed by fields a generated message never holds."""
    request = draw(valid_requests())
    base = request.SerializeToString()
    kind = draw(st.sampled_from(WIRE_TRICKS))
    if kind == "deep_groups":  # start-group tags of an unknown field, nested deep
        depth = draw(st.integers(1, 50_000))
        tail = b"\x7b" * depth + b"\x7c" * draw(st.sampled_from([depth, 0, depth // 2]))
    elif kind == "wrong_wire_type":  # a known field with a varint / fixed64 / fixed32 body
        number = draw(st.integers(1, 7))
        wire_type = draw(st.sampled_from([0, 1, 5]))
        tail = _field(number, wire_type, {0: b"\x01", 1: b"\x01" * 8, 5: b"\x01" * 4}[wire_type])
    elif kind == "huge_length":  # a length prefix far beyond the end of the message
        number = draw(st.sampled_from([1, 5, 7, 99]))
        length = draw(st.sampled_from([2**31, 2**32 + 5, 2**63, 2**64 - 1, 10_000]))
        tail = _varint((number << 3) | 2) + _varint(length)
    elif kind == "unknown_field":
        tail = _field(draw(st.integers(8, 2**29 - 1)), 2, draw(st.binary(max_size=32)))
    elif kind == "bad_packed_shape":  # an input whose packed shape ends mid-varint
        tensor = _field(1, 2, b"obs") + _field(2, 2, b"FP32") + _field(3, 2, b"\x01\xff\xff")
        tail = _field(5, 2, tensor)
    elif kind == "name_twice":  # protobuf keeps the last model name
        tail = _field(1, 2, draw(st.sampled_from([b"", b"nope", b"policy", b"simple"])))
    elif kind == "stray_end_group":
        tail = b"\x7c"
    elif kind == "many_inputs":  # tens of thousands of input tensors named like a real one
        tail = _field(5, 2, _field(1, 2, b"obs")) * draw(st.integers(1_000, 200_000))
    else:  # tens of thousands of request parameters
        tail = _many_params(draw(st.sampled_from([1_000, 10_000, 100_000])))
    return Case.of(f"wire.{kind}", base + tail, request)


@st.composite
def oversize_requests(draw) -> Case:
    """Bigger than the server takes in one message: RESOURCE_EXHAUSTED, never a crash."""
    request = build_valid(MODELS["policy"], 1, 0, raw=True)
    request.raw_input_contents[0] = b"\x00" * (MAX_REQUEST_BYTES + draw(st.integers(1, 1 << 20)))
    return Case.of("oversize", request.SerializeToString())


# (weight, strategy): mostly mutations of a valid request, which get past parsing and routing.
_KINDS = [
    (12, mutated_requests()),
    (2, random_requests()),
    (2, invalid_utf8_requests()),
    (1, random_bytes()),
    (1, corrupted_requests()),
    (1, wire_tricks()),
]
_WEIGHTED = [strategy for weight, strategy in _KINDS for _ in range(weight)]


@st.composite
def malformed_cases(draw, oversize: bool = True) -> Case:
    """Every kind of malformed request. `oversize` adds messages over the server's size
    limit, about one in 250 (unary only: on a stream, gRPC ends the whole stream for one)."""
    if oversize and draw(st.integers(0, 249)) == 0:
        return draw(oversize_requests())
    return draw(_WEIGHTED[draw(st.integers(0, len(_WEIGHTED) - 1))])


def valid_case(request_id: str = "valid", model: str = "policy") -> Case:
    """A request the server must answer with OK."""
    return _case("valid", build_valid(MODELS[model], 1, 0, True, request_id))


def warmup_cases() -> list[Case]:
    """The biggest things the fuzzer sends, once each, plus valid requests: sent before the
    server's RSS is read as a baseline, so that buffers the size of the largest messages are
    already part of it."""
    cases = [valid_case(f"warm-{m}-{i}", m) for m in MODEL_NAMES for i in range(20)]
    policy = MODELS["policy"]
    for extra in (1, 1 << 20):  # over the limit
        request = build_valid(policy, 1, 0, raw=True)
        request.raw_input_contents[0] = b"\x00" * (MAX_REQUEST_BYTES + extra)
        cases.append(_case("oversize", request))
    for size in (MAX_REQUEST_BYTES - 4096, 2_000_000):  # just under it
        request = build_valid(policy, 1, 0, raw=True)
        request.raw_input_contents[0] += b"\x7f" * size
        cases.append(_case("raw_bytes.big", request))
    base = build_valid(policy, 1, 0, raw=True).SerializeToString()
    cases.append(Case.of("wire.many_inputs", base + _field(5, 2, _field(1, 2, b"obs")) * 200_000))
    cases.append(Case.of("wire.many_params", base + _many_params(100_000)))
    request = build_valid(policy, 1, 0, raw=True)
    request.inputs[0].shape[:] = [2**63 - 1] * 2_000
    cases.append(_case("shape.many", request))
    return cases


@st.composite
def stream_batches(draw, max_malformed: int = 8) -> list[Case]:
    """Malformed messages for one stream, then a valid one it must still answer."""
    cases = draw(st.lists(malformed_cases(oversize=False), min_size=1, max_size=max_malformed))
    model = draw(st.sampled_from(MODEL_NAMES))
    return [*cases, valid_case(f"valid-after-{len(cases)}", model)]


# ---- sending and judging ---------------------------------------------------------------------

BAD = frozenset(
    {
        "UNKNOWN",
        "INTERNAL",
        "HANG",
        "STATUS_LOST",
        "STREAM_ENDED",
        "ACCEPTED_INVALID",
        "REJECTED_VALID",
    }
)
INTERNAL_MESSAGE = "internal error"  # how the servicer words an unexpected error on a stream


@dataclass
class Outcome:
    verdict: str  # a status code name, OK, ERROR_MESSAGE (on a stream), or one of BAD
    detail: str
    seconds: float
    case: Case

    @property
    def bad(self) -> bool:
        return self.verdict in BAD

    def describe(self) -> str:
        return f"{self.verdict}: {self.detail[:300]}\n{self.case.describe()}"


def _identity(data: bytes) -> bytes:
    return data


def unary_stub(channel: grpc.Channel):
    """ModelInfer taking the request's bytes as they are."""
    return channel.unary_unary(
        UNARY_METHOD,
        request_serializer=_identity,
        response_deserializer=pb.ModelInferResponse.FromString,
    )


def stream_stub(channel: grpc.Channel):
    """ModelStreamInfer taking each request's bytes as they are."""
    return channel.stream_stream(
        STREAM_METHOD,
        request_serializer=_identity,
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )


def _judge_answer(case: Case, error: str | None, internal: bool) -> str:
    if internal:
        return "INTERNAL"
    if error is None:
        return "ACCEPTED_INVALID" if case.expect == "invalid" else "OK"
    return "REJECTED_VALID" if case.expect == "valid" else error


def _judge_error(err: grpc.RpcError, elapsed: float, deadline: float) -> tuple[str, str]:
    code = err.code()
    details = err.details() or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and elapsed >= 0.9 * deadline:
        return "HANG", f"no answer within the {deadline:g} s deadline"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata size exceeds" in details:
        # gRPC's client refused the trailers: the server's status message is too long to read.
        return "STATUS_LOST", details
    return code.name, details


def send_unary(stub, case: Case, deadline: float = 10.0) -> Outcome:
    start = time.perf_counter()
    try:
        stub(case.payload, timeout=deadline)
    except grpc.RpcError as err:
        elapsed = time.perf_counter() - start
        verdict, detail = _judge_error(err, elapsed, deadline)
        if verdict in BAD:
            return Outcome(verdict, detail, elapsed, case)
        internal = False  # _judge_error has already turned INTERNAL and UNKNOWN into verdicts
        return Outcome(_judge_answer(case, verdict, internal), detail, elapsed, case)
    return Outcome(_judge_answer(case, None, False), "", time.perf_counter() - start, case)


def send_stream(stub, cases: list[Case], deadline: float = 30.0) -> list[Outcome]:
    """Send `cases` on one stream; one outcome per case, in order (the server answers a
    stream's messages in order, one response each)."""
    start = time.perf_counter()
    answers: list[tuple[pb.ModelStreamInferResponse, float]] = []
    ended: tuple[str, str] | None = None
    try:
        for response in stub(iter([c.payload for c in cases]), timeout=deadline):
            answers.append((response, time.perf_counter() - start))
    except grpc.RpcError as err:
        verdict, detail = _judge_error(err, time.perf_counter() - start, deadline)
        ended = (
            verdict if verdict in BAD else "STREAM_ENDED",
            f"stream status {verdict}: {detail}",
        )
    outcomes = []
    previous = 0.0
    for i, case in enumerate(cases):
        if i >= len(answers):
            verdict, detail = ended or ("STREAM_ENDED", "the stream ended without an answer")
            outcomes.append(Outcome(verdict, detail, time.perf_counter() - start - previous, case))
            continue
        response, at = answers[i]
        elapsed, previous = at - previous, at
        message = response.error_message
        internal = message.startswith(INTERNAL_MESSAGE)
        verdict = _judge_answer(case, "ERROR_MESSAGE" if message else None, internal)
        outcomes.append(Outcome(verdict, message, elapsed, case))
    if len(answers) > len(cases):
        outcomes.append(Outcome("STREAM_ENDED", "more answers than requests", 0.0, cases[-1]))
    return outcomes


class RssSamples:
    """The server's resident memory, sampled as requests go by. Single readings swing by tens
    of MB with the big messages in flight (gRPC's buffers, glibc keeping freed memory), so
    growth is the median of the last `window` samples minus the median of the first."""

    def __init__(self, pid: int, window: int = 5) -> None:
        self.process = psutil.Process(pid)
        self.window = window
        self.samples: list[int] = []

    def sample(self) -> int:
        rss = self.process.memory_info().rss
        self.samples.append(rss)
        return rss

    @property
    def before(self) -> int:
        return int(statistics.median(self.samples[: self.window]))

    @property
    def after(self) -> int:
        return int(statistics.median(self.samples[-self.window :]))

    @property
    def growth(self) -> int:
        return self.after - self.before


def tally(outcomes: Iterable[Outcome]) -> dict[str, int]:
    """Count of outcomes per verdict, most frequent first."""
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.verdict] = counts.get(o.verdict, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
