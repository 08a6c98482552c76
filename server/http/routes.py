"""The KServe v2 REST endpoints with Triton's extensions, as a plain ASGI application.

Each endpoint converts the HTTP request into the gRPC front door's protobuf request, calls
the same `TritonServicer` method (so routing, validation, statistics, audit records, limits
and error texts are the gRPC ones), and converts its answer. A servicer refusal arrives as
`HttpAbort` from `HttpCallContext.abort` and goes out as Triton's `{"error": "..."}` body
with the HTTP status of its code (status.py). The one exception is the common inference
request, with no parameters: it goes to the servicer's handler without its protobuf form
(`InferenceHandler.infer_plain`, the same routing, statistics and limits), and whatever that
path declines takes the protobuf one, whose checks word the error.

Restricted API groups (`--http-restricted-api`) are checked before anything is read.
"""

from __future__ import annotations

import base64
import binascii
import logging
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb

from forseti.core.errors import (
    ForsetiError,
    InvalidArgument,
    new_request_id,
    refusal_message,
    with_request_id,
)
from forseti.server.http.codec import (
    INFER_HEADER,
    HttpInferRequest,
    decode_infer,
    dumps,
    encode_arrays,
    encode_infer,
    plain,
)
from forseti.server.http.codec import parse_json as _parse_json
from forseti.server.http.status import http_status
from forseti.server.protocol.servicer import TritonServicer
from forseti.server.registry.loaded_version import LoadedVersion
from forseti.server.security.restricted import (
    ProtocolGroup,
    RefusalHook,
    RestrictedProtocols,
    mark_token_group,
)

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]
_BINARY = [(b"content-type", b"application/octet-stream")]


class HttpAbort(Exception):
    """A servicer refusal (or a refusal of the HTTP layer) on its way to the client."""

    def __init__(self, code: grpc.StatusCode, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = http_status(code) if status is None else status


class HttpCallContext:
    """What the servicer asks of a call's context, for a call that came over HTTP: its
    peer, no TLS identity, no deadline (HTTP has none; the `timeout` parameter is read from
    the request), and an abort that raises HttpAbort."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope  # the peer is worded only when asked for (few calls ask)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise HttpAbort(code, details)

    def peer(self) -> str:
        return _peer(self._scope)

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def time_remaining(self) -> float | None:
        return None


@dataclass
class Answer:
    """What an endpoint returns: status, body and extra headers."""

    status: int = 200
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] | None = None


@dataclass(frozen=True)
class HttpLimits:
    """What one request may cost: its body size (as gRPC's --max-request-bytes)."""

    max_body_bytes: int = 8 * 1024 * 1024


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    if not client:
        return "unknown"
    host, port = client[0], client[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def _json(obj: object, status: int = 200) -> Answer:
    return Answer(status, dumps(obj), _JSON)


def _error(status: int, message: str) -> Answer:
    return Answer(status, dumps({"error": message}), _JSON)


Endpoint = Callable[["TritonHttpApp", "Call"], Awaitable[Answer]]


@dataclass
class Call:
    """One HTTP request, routed: its path parameters, headers, body and context."""

    model: str
    version: str
    headers: dict[str, str]
    body: bytes
    context: grpc.aio.ServicerContext[Any, Any]  # an HttpCallContext, as the servicer sees it
    query: bytes = b""


class TritonHttpApp:
    """The ASGI application of the HTTP front door."""

    def __init__(
        self,
        servicer: TritonServicer,
        restrictions: RestrictedProtocols,
        limits: HttpLimits,
        on_refused: RefusalHook | None = None,
    ) -> None:
        self.servicer = servicer
        self.handler = servicer.handler
        self.limits = limits
        self.on_refused = on_refused
        self.by_protocol: dict[str, ProtocolGroup] = {
            p: g for g in restrictions.groups for p in g.protocols
        }

    # ---- ASGI ---------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            answer = await self._answer(scope, receive)
        except HttpAbort as exc:
            answer = _error(exc.status, exc.message)
            if exc.status in (408, 413):
                # the rest of the body was never read: the connection cannot carry on
                answer.headers = [*_JSON, (b"connection", b"close")]
        except Exception:
            rid = new_request_id()
            log.exception("unexpected error", extra={"path": scope.get("path"), "request_id": rid})
            answer = _error(500, with_request_id("internal error", rid))
        headers = [(b"content-length", str(len(answer.body)).encode()), *(answer.headers or _JSON)]
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body})

    async def _answer(self, scope: Scope, receive: Receive) -> Answer:
        method, path = scope["method"], scope["path"]
        routed = _routed.get((method, path))
        if routed is None:
            found = _route(method, path)
            if isinstance(found, Answer):
                return found
            if len(_routed) >= _ROUTED_LIMIT:
                _routed.clear()
            routed = _routed[(method, path)] = found
        endpoint, protocol, rpc, model, version = routed
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        context = cast("grpc.aio.ServicerContext[Any, Any]", HttpCallContext(scope))
        group = self.by_protocol.get(protocol)
        if group is not None:
            await self._check_restriction(group, headers, context, rpc)
        body = await self._read_body(headers, receive)
        call = Call(model, version, headers, body, context, scope.get("query_string", b""))
        return await endpoint(self, call)

    async def _check_restriction(
        self,
        group: ProtocolGroup,
        headers: dict[str, str],
        context: grpc.aio.ServicerContext[Any, Any],
        rpc: str,
    ) -> None:
        presented = headers.get(group.header)
        if presented is not None and group.accepts(presented):
            mark_token_group(group.label)
            return
        request_id = new_request_id()
        reason = "missing header" if presented is None else "token not accepted"
        fields = {
            "peer": context.peer(),
            "tls_subject": "",
            "rpc": rpc,
            "group": group.label,
            "reason": reason,
            "request_id": request_id,
            "protocol": "http",
        }
        log.warning("restricted call refused", extra=fields)
        if self.on_refused is not None:
            await self.on_refused(rpc, fields)
        # Triton's text and status (403 either way); the group and the fix follow it.
        message = (
            f"This API is restricted, expecting header '{group.header}' ({group.label}; {reason})"
        )
        raise HttpAbort(
            grpc.StatusCode.PERMISSION_DENIED, with_request_id(message, request_id), 403
        )

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> bytes:
        limit = self.limits.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and not declared.isdigit():
            raise HttpAbort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Content-Length '{declared[:32]}' is not a number",
                400,
            )
        if declared is not None and int(declared) > limit:
            raise HttpAbort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request body of {declared} bytes is larger than the server's limit of "
                f"{limit} bytes (--max-request-bytes)",
                413,
            )
        # The time the body may take is kept by the transport (server.py), which answers 408
        # and disconnects: a receive here then returns http.disconnect.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise HttpAbort(grpc.StatusCode.CANCELLED, "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HttpAbort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"request body is larger than the server's limit of {limit} bytes "
                    "(--max-request-bytes)",
                    413,
                )
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        encoding = headers.get("content-encoding")
        if encoding and encoding != "identity":
            body = _inflate(body, encoding, limit)
        return body

    # ---- endpoints ----------------------------------------------------------------------

    async def live(self, call: Call) -> Answer:
        r = await self.servicer.ServerLive(pb.ServerLiveRequest(), call.context)
        return Answer(200 if r.live else 400)

    async def ready(self, call: Call) -> Answer:
        r = await self.servicer.ServerReady(pb.ServerReadyRequest(), call.context)
        return Answer(200 if r.ready else 400)

    async def server_metadata(self, call: Call) -> Answer:
        r = await self.servicer.ServerMetadata(pb.ServerMetadataRequest(), call.context)
        return _json(plain(r))

    async def model_ready(self, call: Call) -> Answer:
        request = pb.ModelReadyRequest(name=call.model, version=call.version)
        r = await self.servicer.ModelReady(request, call.context)
        return Answer(200 if r.ready else 400)

    async def model_metadata(self, call: Call) -> Answer:
        request = pb.ModelMetadataRequest(name=call.model, version=call.version)
        return _json(plain(await self.servicer.ModelMetadata(request, call.context)))

    async def model_config(self, call: Call) -> Answer:
        request = pb.ModelConfigRequest(name=call.model, version=call.version)
        r = await self.servicer.ModelConfig(request, call.context)
        # protobuf's JSON mapping of ModelConfig, field names as in config.pbtxt (as Triton)
        return _json(json_format.MessageToDict(r.config, preserving_proto_field_name=True))

    async def statistics(self, call: Call) -> Answer:
        request = pb.ModelStatisticsRequest(name=call.model, version=call.version)
        return _json(plain(await self.servicer.ModelStatistics(request, call.context)))

    async def infer(self, call: Call) -> Answer:
        header = call.headers.get(INFER_HEADER)
        try:
            header_length = None if header is None else int(header)
            decoded = decode_infer(call.body, header_length, call.model, call.version)
        except ValueError:
            raise HttpAbort(
                grpc.StatusCode.INVALID_ARGUMENT,
                refusal_message(
                    "ModelInfer",
                    InvalidArgument(
                        f"Inference-Header-Content-Length '{str(header)[:32]}' is not a number"
                    ),
                ),
            ) from None
        except ForsetiError as exc:
            raise HttpAbort(exc.code, refusal_message("ModelInfer", exc)) from None
        if decoded.parameter_free:
            # The common case without the protobuf form: the handler takes the decoded
            # tensors, and the outputs go straight to JSON. None: the protobuf path words why.
            try:
                answer = await self.handler.infer_plain(
                    call.model,
                    call.version,
                    decoded.inputs,
                    [o.name for o in decoded.outputs],
                    partial(_encode_plain, decoded),
                )
            except ForsetiError as exc:
                raise HttpAbort(exc.code, refusal_message("ModelInfer", exc)) from None
            except Exception:
                rid = new_request_id()
                log.exception("unexpected error", extra={"rpc": "ModelInfer", "request_id": rid})
                raise HttpAbort(
                    grpc.StatusCode.INTERNAL, with_request_id("internal error", rid)
                ) from None
        else:
            answer = None
        if answer is None:
            response = await self.servicer.ModelInfer(decoded.to_proto(), call.context)
            answer = encode_infer(response, decoded)
        body, json_length = answer
        if json_length is None:
            return Answer(200, body, _JSON)
        return Answer(
            200, body, [*_BINARY, (b"inference-header-content-length", b"%d" % json_length)]
        )

    async def repository_index(self, call: Call) -> Answer:
        ready = False
        if call.body.strip():
            doc = self._json_body(call, "RepositoryIndex")
            ready = bool(doc.get("ready", False))
        request = pb.RepositoryIndexRequest(ready=ready)
        r = await self.servicer.RepositoryIndex(request, call.context)
        return _json([plain(m) for m in r.models])

    async def load(self, call: Call) -> Answer:
        request = pb.RepositoryModelLoadRequest(model_name=call.model)
        if call.body.strip():
            doc = self._json_body(call, "RepositoryModelLoad")
            _load_parameters(request, doc.get("parameters"))
        await self.servicer.RepositoryModelLoad(request, call.context)
        return Answer(200)

    async def unload(self, call: Call) -> Answer:
        request = pb.RepositoryModelUnloadRequest(model_name=call.model)
        if call.body.strip():
            doc = self._json_body(call, "RepositoryModelUnload")
            params = doc.get("parameters")
            if isinstance(params, dict) and isinstance(params.get("unload_dependents"), bool):
                request.parameters["unload_dependents"].bool_param = params["unload_dependents"]
        await self.servicer.RepositoryModelUnload(request, call.context)
        return Answer(200)

    async def shared_memory(self, call: Call) -> Answer:
        await self.servicer.SystemSharedMemoryStatus(None, call.context)
        return Answer(501)

    async def cuda_shared_memory(self, call: Call) -> Answer:
        await self.servicer.CudaSharedMemoryStatus(None, call.context)
        return Answer(501)

    async def trace(self, call: Call) -> Answer:
        await self.servicer.TraceSetting(None, call.context)
        return Answer(501)

    async def logging(self, call: Call) -> Answer:
        await self.servicer.LogSettings(None, call.context)
        return Answer(501)

    def _json_body(self, call: Call, rpc: str) -> dict[str, Any]:
        try:
            doc = _parse_json(call.body, "request body")
            if not isinstance(doc, dict):
                raise InvalidArgument("the request body must be a JSON object")
        except ForsetiError as exc:
            raise HttpAbort(exc.code, refusal_message(rpc, exc)) from None
        return doc


def _encode_plain(
    decoded: HttpInferRequest, lv: LoadedVersion, names: list[str], arrays: list[np.ndarray]
) -> tuple[bytes, int | None]:
    return encode_arrays(decoded, lv.model, lv.version_str, names, arrays)


def _load_parameters(request: pb.RepositoryModelLoadRequest, params: object) -> None:
    """Load parameters as Triton's HTTP client sends them: `config` as a JSON string, files as
    `file:<path>` keys with base64 content."""
    if params is None:
        return
    if not isinstance(params, dict):
        raise HttpAbort(grpc.StatusCode.INVALID_ARGUMENT, "'parameters' must be a JSON object")
    for key, value in params.items():
        target = request.parameters[key]
        if key.startswith("file:") and isinstance(value, str):
            try:
                target.bytes_param = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise HttpAbort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"load parameter '{key[:64]}' is not base64"
                ) from None
        elif isinstance(value, bool):
            target.bool_param = value
        elif isinstance(value, int):
            target.int64_param = value
        elif isinstance(value, str):
            target.string_param = value
        else:
            raise HttpAbort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"load parameter '{key[:64]}' must be a string, integer or boolean",
            )


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate request body, decompressed to at most `limit` bytes."""
    if encoding == "gzip":
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":
        wbits = zlib.MAX_WBITS
    else:
        raise HttpAbort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"Content-Encoding '{encoding[:32]}' is not supported; use gzip, deflate or none",
            415,
        )
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise HttpAbort(
            grpc.StatusCode.INVALID_ARGUMENT, f"the request body is not valid {encoding} data"
        ) from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise HttpAbort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the decompressed request body is larger than the server's limit of {limit} bytes",
            413,
        )
    return out


# ---- routing --------------------------------------------------------------------------------

# (endpoint, HTTP method, restricted-API group, the gRPC RPC it answers as)
_Route = tuple[Endpoint, str, str, str]

_MODEL_TAILS: dict[tuple[str, ...], _Route] = {
    (): (TritonHttpApp.model_metadata, "GET", "metadata", "ModelMetadata"),
    ("ready",): (TritonHttpApp.model_ready, "GET", "health", "ModelReady"),
    ("config",): (TritonHttpApp.model_config, "GET", "model-config", "ModelConfig"),
    ("stats",): (TritonHttpApp.statistics, "GET", "statistics", "ModelStatistics"),
    ("infer",): (TritonHttpApp.infer, "POST", "inference", "ModelInfer"),
    ("trace", "setting"): (TritonHttpApp.trace, "*", "trace", "TraceSetting"),
}
_FIXED: dict[tuple[str, ...], _Route] = {
    ("v2",): (TritonHttpApp.server_metadata, "GET", "metadata", "ServerMetadata"),
    ("v2", "health", "live"): (TritonHttpApp.live, "GET", "health", "ServerLive"),
    ("v2", "health", "ready"): (TritonHttpApp.ready, "GET", "health", "ServerReady"),
    ("v2", "models", "stats"): (TritonHttpApp.statistics, "GET", "statistics", "ModelStatistics"),
    ("v2", "repository", "index"): (
        TritonHttpApp.repository_index,
        "POST",
        "model-repository",
        "RepositoryIndex",
    ),
    ("v2", "trace", "setting"): (TritonHttpApp.trace, "*", "trace", "TraceSetting"),
    ("v2", "logging"): (TritonHttpApp.logging, "*", "logging", "LogSettings"),
}

Routed = tuple[Endpoint, str, str, str, str]

# The routes of recent (method, path) pairs: splitting and matching a path is a few
# microseconds of every call. Bounded (it starts over when full): paths are the client's.
_routed: dict[tuple[str, str], Routed] = {}
_ROUTED_LIMIT = 1024


def _route(method: str, path: str) -> Routed | Answer:
    """(endpoint, restricted-API group, rpc, model, version) for a request, or the 404/405."""
    parts = tuple(path.strip("/").split("/"))
    model = version = ""
    route = _FIXED.get(parts)
    if route is None and len(parts) >= 3 and parts[:2] == ("v2", "models"):
        model, tail = parts[2], parts[3:]
        if len(tail) >= 2 and tail[0] == "versions":
            version, tail = tail[1], tail[2:]
        route = _MODEL_TAILS.get(tail)
    elif route is None and len(parts) == 5 and parts[:3] == ("v2", "repository", "models"):
        model = parts[3]
        if parts[4] == "load":
            route = (TritonHttpApp.load, "POST", "model-repository", "RepositoryModelLoad")
        elif parts[4] == "unload":
            route = (TritonHttpApp.unload, "POST", "model-repository", "RepositoryModelUnload")
    elif route is None and len(parts) >= 3 and parts[0] == "v2":
        if parts[1] == "systemsharedmemory":
            route = (TritonHttpApp.shared_memory, "*", "shared-memory", "SystemSharedMemoryStatus")
        elif parts[1] == "cudasharedmemory":
            route = (
                TritonHttpApp.cuda_shared_memory,
                "*",
                "shared-memory",
                "CudaSharedMemoryStatus",
            )
    if route is None:
        return _error(404, "Not Found")
    endpoint, allowed, protocol, rpc = route
    if allowed != "*" and method != allowed:
        return Answer(
            405, dumps({"error": "Method Not Allowed"}), [*_JSON, (b"allow", allowed.encode())]
        )
    return endpoint, protocol, rpc, model, version
