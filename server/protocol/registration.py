"""Register the servicer with the generated tritonclient handlers, made safe against messages
that do not parse: those get INVALID_ARGUMENT instead of grpc's UNKNOWN and a traceback, and
against unexpected exceptions, which grpc would send to the client as their text."""

from __future__ import annotations

import logging
from collections.abc import Callable
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


def _guard_unary(behaviour: Callable, method: str) -> Callable:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
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
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.handlers = dict(handlers)


def add_servicer(servicer: pbg.GRPCInferenceServiceServicer, server: grpc.aio.Server) -> None:
    """Like the generated registration, with parse failures answered as INVALID_ARGUMENT.

    Streaming requests that fail to parse reach the servicer as MALFORMED items, and it
    answers each with an error response on the stream."""
    capture = _Capture()
    pbg.add_GRPCInferenceServiceServicer_to_server(servicer, capture)
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method, handler in capture.handlers.items():
        safe = handler._replace(request_deserializer=_safe(handler.request_deserializer))
        if handler.unary_unary is not None and method not in CHECKS_OWN_INPUT:
            safe = safe._replace(unary_unary=_guard_unary(handler.unary_unary, method))
        handlers[method] = safe
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
