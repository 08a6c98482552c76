"""The native data plane seen from Python: a server object with the part of grpc.aio.Server's
interface that app.py uses, over the C++ extension `forseti_native`.

The C++ side owns the port. It answers ModelInfer (unary and streaming) for the versions it
has a route for; every other call, and every request outside the common case, comes back
here as method name and serialized bytes and is answered by the same servicer, interceptors
and handlers as on the Python data plane (`_serve`), on the event loop.

Routes follow the registry through its lifecycle events: a route holds its version (one
`acquire`) while the routing table or any native request holds the route, and releases it
on the event loop when the last one lets go, so a swap drains native requests like Python
ones.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from forseti.core.errors import (
    ForsetiError,
    ResourceExhausted,
    new_request_id,
    refusal_message,
    with_request_id,
)
from forseti.server.backends.onnxruntime_backend import OnnxRuntimeBackend
from forseti.server.registry.lifecycle import LifecycleEvent, VersionReleased
from forseti.server.registry.loaded_version import LoadedVersion
from forseti.server.registry.model_registry import ModelRegistry
from forseti.server.scheduler.inline import InlineScheduler
from forseti.server.security.tls import GrpcTlsOptions, _read, load_server_pair

log = logging.getLogger(__name__)

SHUTDOWN_SLACK_S = 10.0  # past the grace period, for cancelled calls to end
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
INFER = "/inference.GRPCInferenceService/ModelInfer"

# grpc's stubs type method handlers as synchronous; on an aio server their behaviours are
# coroutines and async generators, so the fallback reads them untyped.
Handler = Any


class _CallDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str, metadata: tuple[tuple[str, Any], ...]) -> None:
        self.method = method
        self.invocation_metadata = metadata


class FallbackContext:
    """What the servicer and the interceptors read of grpc.aio.ServicerContext."""

    def __init__(
        self,
        metadata: tuple[tuple[str, Any], ...],
        timeout: float | None,
        peer: str,
        auth: dict[str, list[bytes]],
    ) -> None:
        self._metadata = metadata
        self._deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        self._peer = peer
        self._auth = auth
        self.code_: grpc.StatusCode | None = None
        self.details_ = ""
        # For server-streaming handlers that send with `await context.write(message)` (the
        # grpc.health.v1 servicer's Watch) instead of yielding.
        self.writer: Callable[[Any], None] | None = None

    async def write(self, message: Any) -> None:
        if self.writer is None:
            raise RuntimeError("write() on a call that does not stream its responses")
        self.writer(message)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[Any] = ()
    ) -> None:
        self.code_ = code
        self.details_ = details
        raise grpc.aio.AbortError()

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code_ = code

    def set_details(self, details: str) -> None:
        self.details_ = details

    def code(self) -> grpc.StatusCode | None:
        return self.code_

    def details(self) -> str:
        return self.details_

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    def set_trailing_metadata(self, metadata: Sequence[Any]) -> None:
        pass

    async def send_initial_metadata(self, metadata: Sequence[Any]) -> None:
        pass


async def _one(item: Any) -> AsyncIterator[Any]:
    yield item


async def _none() -> AsyncIterator[Any]:
    return
    yield


async def _responses(behaviour: Any) -> AsyncIterator[Any]:
    """What a streaming behaviour sends: it is an async generator, or a coroutine that
    returns (or aborts, as a refusal does) having sent its messages with context.write."""
    if inspect.isawaitable(behaviour):
        result = await behaviour
        if result is not None:
            yield result
        return
    async for item in behaviour:
        yield item


def eligible(lv: LoadedVersion) -> bool:
    """Whether the native side can answer this version: onnxruntime, inline scheduling, and
    inputs of fixed size (no BYTES, no reshape)."""
    return (
        isinstance(lv.backend, OnnxRuntimeBackend)
        and isinstance(lv.scheduler, InlineScheduler)
        and all(t.item_nbytes > 0 for t in lv.spec.inputs.values())
    )


class NativeGrpcServer:
    """grpc.aio.Server's interface (the part app.py uses) over the native server."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        max_request_bytes: int = 8 * 1024 * 1024,
        max_streams_per_connection: int = 0,
        max_concurrent_rpcs: int = 0,
        max_inflight: int = 0,
        tls: GrpcTlsOptions | None = None,
        restricted_methods: Sequence[str] = (),
    ) -> None:
        import forseti_native  # type: ignore[import-not-found]  # built by `make native`

        options = forseti_native.ServerOptions()
        options.max_receive_bytes = max_request_bytes
        options.max_streams_per_connection = max_streams_per_connection
        options.max_concurrent_rpcs = max_concurrent_rpcs
        options.max_inflight = max_inflight
        self._native = forseti_native
        self._server = forseti_native.Server(options)
        self._server.set_fallback(self._fallback)
        self._server.set_failure(self._failure)
        self._server.set_limit_refusal(functools.partial(self._limit_refusal, max_inflight))
        self._server.set_cancel(self._cancelled)
        # Methods whose calls pass the interceptors first: unary ModelInfer then goes to Python
        # whole; a stream is admitted once by Python, then served natively.
        self._server.set_checked_methods(list(restricted_methods))
        self._interceptors = list(interceptors)
        self._tls = tls or GrpcTlsOptions()
        self._methods: dict[str, Handler] = {}
        self._generic: list[grpc.GenericRpcHandler] = []
        self._tasks: dict[int, asyncio.Task[None]] = {}  # by the call's link id
        self._loop: asyncio.AbstractEventLoop | None = None
        self._registry = registry
        self._routes: dict[LoadedVersion, Any] = {}
        self._port = 0
        registry.hooks.subscribe(self)

    # ---- grpc.aio.Server's interface ----------------------------------------------------

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        for name, handler in handlers.items():
            self._methods[f"/{service}/{name}"] = handler

    def add_insecure_port(self, address: str) -> int:
        return self._start(address)

    def add_secure_port(self, address: str, credentials: object) -> int:
        # grpc's credentials object is opaque: the same files are read again for the C++ side.
        return self._start(address, self._tls)

    async def start(self) -> None:
        pass  # serving began when the port was bound

    async def stop(self, grace: float | None) -> None:
        not_done, tasks = self._server.live_calls, len(self._tasks)
        # gRPC's Shutdown returns once every call has ended; calls still running at the grace
        # deadline are cancelled. A daemon thread, and a bound on the wait: a call that never
        # ended (a bug) is logged and must not keep the process from exiting.
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def shutdown() -> None:
            try:
                self._server.shutdown(grace or 0.0)
            finally:
                loop.call_soon_threadsafe(done.set)

        threading.Thread(target=shutdown, name="native-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(done.wait(), (grace or 0.0) + SHUTDOWN_SLACK_S)
        except TimeoutError:
            log.error(
                "native data plane: calls did not end after the grace period; exiting anyway",
                extra={"calls_open": self._server.live_calls},
            )
        calls = max(1, self.native_calls)
        log.info(
            "native data plane stopped",
            extra={
                "native_calls": self.native_calls,
                "fallback_calls": self.fallback_calls,
                "native_us_per_call": round(self._server.native_ns / calls / 1e3, 1),
                "gil_wait_us_per_call": round(self._server.gil_wait_ns / calls / 1e3, 1),
                "calls_open_at_stop": not_done,
                "fallback_tasks_at_stop": tasks,
            },
        )
        self._server.clear_routes()
        self._routes.clear()
        for _ in range(2):  # the routes' releases were posted to the loop: let them run
            await asyncio.sleep(0)

    @property
    def native_calls(self) -> int:
        return int(self._server.native_calls)

    @property
    def fallback_calls(self) -> int:
        return int(self._server.fallback_calls)

    # ---- routes -------------------------------------------------------------------------

    def _start(self, address: str, tls: GrpcTlsOptions | None = None) -> int:
        self._loop = asyncio.get_running_loop()
        try:
            if tls is None or not tls.enabled:
                port = self._server.start(address)
            else:
                key, cert = load_server_pair(
                    tls.server_cert, tls.server_key, "--grpc-server-cert", "--grpc-server-key"
                )
                root = b""
                if tls.use_ssl_mutual:
                    root = _read(tls.root_cert, "--grpc-root-cert", "the CA of the clients")
                port = self._server.start(
                    address,
                    tls=True,
                    key_pem=key.decode(),
                    cert_pem=cert.decode(),
                    root_pem=root.decode(),
                    mutual=tls.use_ssl_mutual,
                )
        except RuntimeError as exc:
            raise RuntimeError(f"native data plane: {exc}") from None
        self._port = int(port)
        for name in list(self._registry.routing.models):
            self.sync(name)
        return self._port

    async def on_event(self, event: LifecycleEvent) -> None:
        """Lifecycle listener: a model's routes follow each change of what it serves."""
        model = event.loaded.model if isinstance(event, VersionReleased) else event.model
        if self._loop is not None:  # routes are installed once the port is bound
            self.sync(model)

    def sync(self, model: str) -> None:
        """Install the native routes of `model` from the registry's routing table."""
        entry = self._registry.routing.models.get(model)
        routes: dict[str, Any] = {}
        if entry is not None:
            for lv in entry.versions.values():
                if not lv.retired and eligible(lv):
                    routes[lv.version_str] = self._route(lv)
            latest = entry.latest
            if latest is not None and latest.version_str in routes:
                routes[""] = routes[latest.version_str]
        self._server.set_routes(model, routes)
        for lv in [lv for lv in self._routes if lv.model == model]:
            if routes.get(lv.version_str) is not self._routes[lv]:
                del self._routes[lv]  # the native side lets go once its requests finish

    def _route(self, lv: LoadedVersion) -> Any:
        route = self._routes.get(lv)
        if route is not None:
            return route
        assert self._loop is not None
        spec = lv.spec
        lv.acquire()  # released by on_drop, on the loop, when nothing holds the route
        route = self._native.Route(
            model=lv.model,
            version=lv.version_str,
            max_batch=spec.max_batch_size if spec.batched else 0,
            inputs=[
                (t.name, t.ttype.name, list(t.dims), t.item_nbytes, t.ttype.dtype)
                for t in spec.inputs.values()
            ],
            outputs=list(lv.output_names),
            lv=lv,
            run=lv.backend.run,
            record_success=lv.stats.record_success,
            on_drop=functools.partial(self._loop.call_soon_threadsafe, lv.release),
        )
        self._routes[lv] = route
        return route

    # ---- called by the native side, on its threads, with the GIL ----------------------------

    @staticmethod
    def _failure(lv: LoadedVersion, exc: BaseException, total_ns: int, rpc: str) -> tuple[int, str]:
        """A native request failed in the backend: count it, and the status to send, worded
        as the Python data plane words it."""
        lv.stats.record_failure(total_ns)
        if isinstance(exc, ForsetiError):
            return exc.code.value[0], refusal_message(rpc, exc)
        rid = new_request_id()
        log.error("unexpected error", exc_info=exc, extra={"rpc": rpc, "request_id": rid})
        return grpc.StatusCode.INTERNAL.value[0], with_request_id("internal error", rid)

    @staticmethod
    def _limit_refusal(limit: int, rpc: str) -> tuple[int, str]:
        exc = ResourceExhausted(
            f"server is at its limit of {limit} in-flight requests; retry later"
        )
        return exc.code.value[0], refusal_message(rpc, exc)

    def _fallback(
        self,
        link: Any,
        method: str,
        payload: bytes | None,
        metadata: list[tuple[str, Any]],
        timeout: float | None,
        peer: str,
        auth: dict[str, list[bytes]],
    ) -> None:
        loop = self._loop
        assert loop is not None
        loop.call_soon_threadsafe(
            self._spawn, link, method, payload, tuple(metadata), timeout, peer, auth
        )

    # ---- on the event loop ----------------------------------------------------------------

    def _cancelled(self, link_id: int) -> None:
        loop = self._loop
        assert loop is not None
        loop.call_soon_threadsafe(self._cancel_task, link_id)

    def _cancel_task(self, link_id: int) -> None:
        task = self._tasks.get(link_id)
        if task is not None:
            task.cancel()

    def _spawn(self, link: Any, *args: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(link, *args))
        key = int(link.id)
        self._tasks[key] = task
        task.add_done_callback(functools.partial(self._task_done, key, link))

    def _task_done(self, key: int, link: Any, task: asyncio.Task[None]) -> None:
        if self._tasks.get(key) is task:  # a stream's next request may have its own by now
            del self._tasks[key]
        if task.cancelled():
            # Cancelled before it ran a line (its own handler answers otherwise): the call
            # must still end, or the server would wait for it forever. A second answer to a
            # call is ignored.
            link.answer(grpc.StatusCode.CANCELLED.value[0], "the call was cancelled")

    def _lookup(self, method: str) -> Handler | None:
        handler = self._methods.get(method)
        if handler is not None:
            return handler
        details = _CallDetails(method, ())
        for generic in self._generic:
            found = generic.service(details)
            if found is not None:
                return found
        return None

    async def _intercepted(self, details: _CallDetails) -> Handler | None:
        async def last(d: grpc.HandlerCallDetails) -> Handler | None:
            return self._lookup(d.method)

        chain: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]] = last
        for interceptor in reversed(self._interceptors):
            chain = functools.partial(interceptor.intercept_service, chain)
        return await chain(details)

    async def _serve(
        self,
        link: Any,
        method: str,
        payload: bytes | None,
        metadata: tuple[tuple[str, Any], ...],
        timeout: float | None,
        peer: str,
        auth: dict[str, list[bytes]],
    ) -> None:
        context = FallbackContext(metadata, timeout, peer, auth)
        try:
            if method == STREAM_INFER and payload is not None:
                # One request of an admitted stream: the servicer's stream behaviour, one item.
                handler = self._lookup(method)
                assert handler is not None and handler.stream_stream is not None
                request = handler.request_deserializer(payload)
                context.writer = lambda m: link.write(handler.response_serializer(m))
                async for response in _responses(handler.stream_stream(_one(request), context)):
                    link.write(handler.response_serializer(response))
                link.resume()
                return
            handler = await self._intercepted(_CallDetails(method, metadata))
            if handler is None:
                link.answer(grpc.StatusCode.UNIMPLEMENTED.value[0], "Method not found!")
                return
            if payload is None:  # admission of a stream by the interceptors
                if handler is self._lookup(method):
                    link.resume()
                    return
                async for _ in _responses(handler.stream_stream(_none(), context)):
                    pass
                link.answer(grpc.StatusCode.OK.value[0], "")
                return
            request = handler.request_deserializer(payload)
            if handler.unary_unary is not None:
                response = await handler.unary_unary(request, context)
                if context.code_ not in (None, grpc.StatusCode.OK):
                    link.answer(context.code_.value[0], context.details_)
                else:
                    link.answer(0, "", handler.response_serializer(response))
            elif handler.unary_stream is not None:
                context.writer = lambda m: link.write(handler.response_serializer(m))
                async for response in _responses(handler.unary_stream(request, context)):
                    link.write(handler.response_serializer(response))
                code = context.code_ or grpc.StatusCode.OK
                link.answer(code.value[0], context.details_)
            else:
                link.answer(
                    grpc.StatusCode.UNIMPLEMENTED.value[0],
                    "the native data plane streams only ModelStreamInfer",
                )
        except grpc.aio.AbortError:
            code = context.code_ or grpc.StatusCode.UNKNOWN
            link.answer(code.value[0], context.details_)
        except asyncio.CancelledError:
            link.answer(grpc.StatusCode.CANCELLED.value[0], "the call was cancelled")
            raise
        except Exception as exc:
            # grpc.aio's own answer to an exception that escapes a handler.
            log.exception("unexpected error in a fallback call", extra={"rpc": method})
            link.answer(grpc.StatusCode.UNKNOWN.value[0], f"Unexpected {type(exc)}: {exc}")
