"""Malformed HTTP/REST inference requests, as hypothesis strategies, for fuzzing the HTTP
front door (the gRPC strategies are in testkit/fuzz_requests.py, and are reused here).

A case is a whole HTTP request: path, headers and body. They are made from

* the gRPC fuzzer's requests (valid, and valid with one to three things wrong), written as
  KServe v2 JSON with each tensor either as JSON `data` or as binary data after the JSON
  header (Triton's binary tensor extension);
* JSON-level damage: a value replaced by any JSON value, a key dropped, the document replaced;
* byte-level damage: the body cut or flipped, an Inference-Header-Content-Length that is
  wrong, negative or not a number, a Content-Encoding that does not match the body.

What the server must do is simple to judge: answer every one with a status below 500 and a
JSON body, and stay up.
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import numpy as np
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from testkit.fuzz_requests import DATATYPES, mutated_requests, valid_requests


@dataclass
class HttpCase:
    """One HTTP request as sent."""

    label: str
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def describe(self, limit: int = 400) -> str:
        return f"{self.label}: POST {self.path} {self.headers} body={self.body[:limit]!r}"


def _parameter(p: pb.InferParameter) -> object:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def to_http(
    request: pb.ModelInferRequest, binary: list[bool], binary_output: bool
) -> tuple[str, bytes, dict[str, str]]:
    """A ModelInferRequest as Triton's HTTP client would send it: (path, body, headers)."""
    model = quote(request.model_name, safe="") or "%20"
    path = f"/v2/models/{model}"
    if request.model_version:
        path += f"/versions/{quote(request.model_version, safe='')}"
    path += "/infer"
    doc: dict[str, Any] = {}
    if request.id:
        doc["id"] = request.id
    params = {k: _parameter(v) for k, v in request.parameters.items()}
    if binary_output:
        params["binary_data_output"] = True
    if params:
        doc["parameters"] = params
    tail: list[bytes] = []
    inputs = []
    raw = request.raw_input_contents
    for i, tensor in enumerate(request.inputs):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        data = raw[i] if i < len(raw) else b""
        as_binary = binary[i % len(binary)] if binary else True
        known = DATATYPES.get(tensor.datatype)
        if known is not None and not as_binary and len(data) % known[0].itemsize == 0:
            values = np.frombuffer(data, dtype=known[0])
            entry["data"] = (
                [v if np.isfinite(v) else 0.0 for v in values.tolist()]
                if (known[0].kind == "f")
                else values.tolist()
            )
        else:
            entry["parameters"] = {"binary_data_size": len(data)}
            tail.append(data)
        inputs.append(entry)
    doc["inputs"] = inputs
    if request.outputs:
        doc["outputs"] = [{"name": o.name} for o in request.outputs]
    header = json.dumps(doc).encode()
    headers = {"Content-Type": "application/json"}
    if tail:
        headers["Inference-Header-Content-Length"] = str(len(header))
    return path, header + b"".join(tail), headers


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


def _json_damage(draw: st.DrawFn, body: bytes, headers: dict[str, str]) -> tuple[bytes, str]:
    length = headers.get("Inference-Header-Content-Length")
    split = int(length) if length else len(body)
    doc = json.loads(body[:split])
    kind = draw(st.sampled_from(["replace", "drop", "document", "tensor-key"]))
    if kind == "document":
        doc = draw(json_values)
    elif kind == "tensor-key" and doc.get("inputs"):
        tensor = doc["inputs"][draw(st.integers(0, len(doc["inputs"]) - 1))]
        key = draw(st.sampled_from(["name", "datatype", "shape", "data", "parameters"]))
        tensor[key] = draw(json_values)
    elif kind == "drop" and doc:
        doc.pop(draw(st.sampled_from(sorted(doc))))
    elif doc:
        doc[draw(st.sampled_from(sorted(doc)))] = draw(json_values)
    header = json.dumps(doc).encode()
    if length:
        headers["Inference-Header-Content-Length"] = str(len(header))
    return header + body[split:], f"json-{kind}"


def _byte_damage(draw: st.DrawFn, body: bytes, headers: dict[str, str]) -> tuple[bytes, str]:
    kind = draw(st.sampled_from(["cut", "flip", "header-length", "encoding", "noise"]))
    if kind == "cut" and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif kind == "flip" and body:
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1 :]
    elif kind == "header-length":
        headers["Inference-Header-Content-Length"] = draw(
            st.sampled_from(["-1", "abc", "99999999", "", "1e3", " 5"])
            | st.integers(-5, len(body) + 5).map(str)
        )
    elif kind == "encoding":
        headers["Content-Encoding"] = draw(st.sampled_from(["gzip", "deflate", "br", "x"]))
    else:
        body = draw(st.binary(max_size=64))
    return body, f"bytes-{kind}"


@st.composite
def http_cases(draw: st.DrawFn) -> HttpCase:
    """One HTTP inference request: valid, wrong in what it says, or damaged in its JSON or
    bytes."""
    source = draw(st.sampled_from(["valid", "mutated"]))
    if source == "valid":
        request = draw(valid_requests())
        label = "valid"
    else:
        case = draw(mutated_requests())
        request = pb.ModelInferRequest.FromString(case.payload)
        label = case.label
    binary = draw(st.lists(st.booleans(), min_size=1, max_size=3))
    path, body, headers = to_http(request, binary, draw(st.booleans()))
    damage = draw(st.sampled_from(["none", "json", "bytes"]))
    if damage == "json":
        body, how = _json_damage(draw, body, headers)
        label += "+" + how
    elif damage == "bytes":
        body, how = _byte_damage(draw, body, headers)
        label += "+" + how
    return HttpCase(label, path, body, headers)


def send(conn: http.client.HTTPConnection, case: HttpCase) -> tuple[int, bytes]:
    """POST the case on `conn`; (status, body)."""
    conn.request("POST", case.path, body=case.body, headers=case.headers)
    response = conn.getresponse()
    return response.status, response.read()
