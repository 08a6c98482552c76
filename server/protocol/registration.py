"""Register the servicer with the generated tritonclient handlers, made safe against messages
that do not parse: those get INVALID_ARGUMENT instead of grpc's UNKNOWN and a traceback, and
against unexpected exceptions, which grpc would send to the client as their text."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2_grpc as pbg

from forseti.core.errors import new_request_id, with_request_id

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"


class Malformed:
    """Stands in for a request message whose bytes did not parse."""

    __slots__ = ()


MALFORMED = Malformed()

# Methods that check for MALFORMED themselves, sparing the hot path a wrapper coroutine.
CHECKS_OWN_INPUT = frozenset({"ModelInfer"})


def _safe(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError:
            return MALFORMED

    return parse


# grpc's stubs type method behaviours as synchronous; the aio server's are coroutines.
Behaviour = Callable[..., Awaitable[Any]]


def _guard_unary(behaviour: Callable[..., Any], method: str) -> Behaviour:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if request is MALFORMED:
            rid = new_request_id()
            log.info("malformed request", extra={"rpc": method, "request_id": rid})
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                with_request_id(f"malformed {method} request: it does not parse", rid),
            )
        try:
            return await behaviour(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception:
            # grpc would answer UNKNOWN with the exception's text, which can hold file paths
            # and values: the client gets an id, the log gets the traceback.
            rid = new_request_id()
            log.exception("unexpected error", extra={"rpc": method, "request_id": rid})
            await context.abort(grpc.StatusCode.INTERNAL, with_request_id("internal error", rid))

    return call


class _Capture:
    """Receives what the generated `add_..._to_server` registers, instead of a server."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.handlers = dict(handlers)


def _made_safe(
    method: str, handler: grpc.RpcMethodHandler[Any, Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler with a parse-safe deserializer and, for unary methods, the guard."""
    assert handler.request_deserializer is not None, f"{method} has no deserializer"
    options = {
        "request_deserializer": _safe(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        behaviour: Callable[..., Any] = handler.unary_unary
        if method not in CHECKS_OWN_INPUT:
            behaviour = _guard_unary(behaviour, method)
        return grpc.unary_unary_rpc_method_handler(behaviour, **options)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(handler.unary_stream, **options)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(handler.stream_unary, **options)
    assert handler.stream_stream is not None, f"{method} has no behaviour"
    return grpc.stream_stream_rpc_method_handler(handler.stream_stream, **options)


def add_servicer(servicer: pbg.GRPCInferenceServiceServicer, server: grpc.aio.Server) -> None:
    """Like the generated registration, with parse failures answered as INVALID_ARGUMENT.

    Streaming requests that fail to parse reach the servicer as MALFORMED items, and it
    answers each with an error response on the stream."""
    capture = _Capture()
    pbg.add_GRPCInferenceServiceServicer_to_server(servicer, capture)
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method, handler in capture.handlers.items():
        handlers[method] = _made_safe(method, handler)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
