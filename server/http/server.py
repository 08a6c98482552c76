"""The HTTP front door's transport: uvicorn's httptools protocol on the server's own asyncio
loop (beside grpc.aio, one process, one registry), with the limits a public endpoint needs.

uvicorn was chosen by measurement (docs/http.md): the fastest of the stacks that can share the
loop. Its `Server.serve()` would install its own signal handlers, so the server is driven
through `startup()` / `shutdown()`, with forseti's own signal handling in charge.

Limits beyond the application's (body size and body time, routes.py): a client must finish
its request line and headers within `head_timeout_s` of starting them (or of connecting),
and they may be at most `max_head_bytes` long; an idle keep-alive connection is closed after
`keep_alive_s`; more than `max_connections` connections and requests at once get 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from forseti.server.http.routes import Receive, Scope, Send
from forseti.server.security.restricted import RestrictedProtocols
from forseti.server.security.tls import is_loopback, server_ssl_context

log = logging.getLogger(__name__)

AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class HttpStartError(Exception):
    """The HTTP endpoint cannot start; the message says why."""


@dataclass(frozen=True)
class TransportLimits:
    head_timeout_s: float = 30.0  # for the request line and headers, and again for the body
    max_head_bytes: int = 64 * 1024
    keep_alive_s: int = 300
    max_connections: int = 4096  # connections and running requests (uvicorn's limit_concurrency)


def _reply(transport: asyncio.BaseTransport, status: bytes, message: bytes) -> None:
    """Write a JSON error and close: used where no ASGI cycle exists yet."""
    body = b'{"error":"' + message + b'"}'
    assert isinstance(transport, asyncio.WriteTransport)
    transport.write(
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )
    transport.close()


class _HeadTooLarge(Exception):
    pass


def protocol_class(limits: TransportLimits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, bounded in the time and size of a request's head."""

    class BoundedProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _body_timer: asyncio.TimerHandle | None = None
        _head_bytes = 0

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            # asyncio sets TCP_NODELAY only on sockets made with proto=IPPROTO_TCP, which the
            # listening socket bound here is not: without it a response's head and body wait
            # on the client's delayed ACK (40 ms a call)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._arm()

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(limits.head_timeout_s, self._head_late)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                log.info("http client too slow to send its request head; closed")
                _reply(self.transport, b"408 Request Timeout", b"request head not received in time")

        def _count(self, n: int) -> None:
            self._head_bytes += n
            if self._head_bytes > limits.max_head_bytes:
                if not self.transport.is_closing():
                    _reply(
                        self.transport,
                        b"431 Request Header Fields Too Large",
                        b"request line and headers are larger than %d bytes"
                        % limits.max_head_bytes,
                    )
                raise _HeadTooLarge  # stops the parser; uvicorn then closes the connection

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_bytes = 0
            self._arm()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()
            # the body has its own time, from the end of the head to the end of the message
            self._body_timer = self.loop.call_later(limits.head_timeout_s, self._body_late)

        def on_message_complete(self) -> None:
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None
            super().on_message_complete()

        def _body_late(self) -> None:
            self._body_timer = None
            if not self.transport.is_closing():
                log.info("http client too slow to send its request body; closed")
                _reply(
                    self.transport,
                    b"408 Request Timeout",
                    b"the request body did not arrive within %g s" % limits.head_timeout_s,
                )

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None
            super().connection_lost(exc)

    return BoundedProtocol


def http_ssl_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """TLS 1.2+ server context for --http-ssl-cert/--http-ssl-key; None without them."""
    return server_ssl_context(cert, key, "--http-ssl-cert", "--http-ssl-key")


def _bind(address: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family = infos[0][0]
        return socket.create_server((address.strip("[]"), port), family=family, backlog=2048)
    except OSError as exc:
        raise HttpStartError(
            f"cannot listen on {address}:{port} for HTTP: {exc.strerror or exc}"
        ) from None


class HttpFrontDoor:
    """A started HTTP endpoint; `stop()` drains it."""

    def __init__(self, server: uvicorn.Server, sock: socket.socket, ticker: asyncio.Task[None]):
        self.server = server
        self.sock = sock
        self.ticker = ticker

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, let running requests finish for up to `grace_s`, close."""
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.ticker
        self.server.config.timeout_graceful_shutdown = max(1, int(grace_s))
        await self.server.shutdown(sockets=[self.sock])

    def end_grace(self) -> None:
        """End a running stop's wait for open connections now: the requests being handled
        have answered, and what is left (a request whose bytes never finished arriving)
        must not hold the stop to the whole grace."""
        self.server.force_exit = True


async def start_http(
    app: AsgiApp,
    address: str,
    port: int,
    tls: ssl.SSLContext | None = None,
    limits: TransportLimits | None = None,
) -> HttpFrontDoor:
    """Listen on address:port and serve `app` on the running loop."""
    limits = limits or TransportLimits()
    sock = _bind(address, port)
    factory: Callable[[Any, Any], ssl.SSLContext] | None = None
    if tls is not None:
        context = tls
        factory = lambda _config, _default: context  # noqa: E731
    config = uvicorn.Config(
        app,
        http=protocol_class(limits),
        interface="asgi3",
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        ws="none",
        timeout_keep_alive=limits.keep_alive_s,
        limit_concurrency=limits.max_connections,
        ssl_context_factory=factory,
    )
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)  # what serve() would set; "off" here
    await server.startup(sockets=[sock])
    ticker = asyncio.create_task(server.main_loop())
    return HttpFrontDoor(server, sock, ticker)


def http_control_guard(control_mode: str, address: str, restrictions: RestrictedProtocols) -> str:
    """What keeps callers who reach the HTTP port from changing the served models: "mode"
    (none and poll modes refuse load/unload), "token" (the model-repository API group needs
    a header), "loopback", or "none"."""
    if control_mode != "explicit":
        return "mode"
    if any("model-repository" in group.protocols for group in restrictions.groups):
        return "token"
    if is_loopback(address):
        return "loopback"
    return "none"


def http_exposure_fixes() -> str:
    """The ways out of an HTTP endpoint that exposes model control, for the refusal."""
    return (
        "add a token to its model-repository API group "
        "(--http-restricted-api=model-repository:<header>=@<token-file>), or bind it to "
        "loopback (--http-address 127.0.0.1), or turn it off (--allow-http false); "
        "--allow-unauthenticated-control accepts the risk and serves it anyway"
    )
