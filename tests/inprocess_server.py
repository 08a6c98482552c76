"""The Forseti gRPC server assembled inside the test process, for tests of the request path.

This is the one place that builds the server as `forseti.server.app.serve()` does (registry,
servicer, registration, grpc.aio server, initial load), without the signals, the metrics HTTP
endpoint or the audit log. Constructors that change update here only.

    async with inprocess_server(repo, keyring, load=["policy"]) as srv:
        async with aioclient.InferenceServerClient(srv.url) as client:
            ...

or, for a whole test body, `run_inprocess(repo, keyring, body, load=["policy"])`.

The server runs on the current event loop, so a test runs client and server in one
`asyncio.run`; it listens on 127.0.0.1 on a free port and is stopped when the block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import tritonclient.grpc.aio as aioclient

from forseti.core.sealing.keyring import Keyring
from forseti.server.app import assemble
from forseti.server.metrics import TritonMetricsCollector, exposition
from forseti.server.protocol.registration import add_servicer
from forseti.server.registry.model_registry import ModelRegistry

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_INFLIGHT = 1024


@dataclass
class InProcessServer:
    """A running in-process server: where to call it and what it serves from."""

    url: str
    registry: ModelRegistry

    def metrics(self) -> str:
        """What /metrics would answer now (the Prometheus text exposition)."""
        return exposition(TritonMetricsCollector(self.registry)).decode()


@contextlib.asynccontextmanager
async def inprocess_server(
    repository: Path,
    keyring: Keyring | None,
    *,
    control_mode: str = "explicit",
    load: Sequence[str] = (),
    max_inflight: int = DEFAULT_MAX_INFLIGHT,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_batch_size: int = 4096,
    allow_plaintext: bool = False,
    stop_grace_s: float = 1.0,
) -> AsyncIterator[InProcessServer]:
    """Start a server over `repository` on 127.0.0.1:<free port> and load its models.

    `control_mode` "none" loads every model; "explicit" loads the models named in `load`
    ("*" for all). Unlike `forseti serve`, a failed initial load raises, so a test never runs
    against a server that silently lacks its model.
    """
    service = assemble(
        Path(repository).resolve(),
        keyring,
        allow_plaintext=allow_plaintext,
        max_batch_size=max_batch_size,
        max_inflight=max_inflight,
        control_mode=control_mode,
    )
    registry, state = service.registry, service.state
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_request_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ]
    )
    add_servicer(service.servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        if control_mode == "none" or "*" in load:
            await registry.load_all()
        elif control_mode == "poll":
            await service.watcher.poll_once()
        else:
            for name in load:
                await registry.load_model(name)
        state.started = True
        yield InProcessServer(url=f"127.0.0.1:{port}", registry=registry)
    finally:
        state.stopping = True
        await server.stop(stop_grace_s)
        registry.release_all()


def run_inprocess(
    repository: Path,
    keyring: Keyring | None,
    body: Callable[[aioclient.InferenceServerClient, InProcessServer], Awaitable],
    **server_options,
):
    """Start a server, run `body(client, server)` with a tritonclient aio client connected to
    it, stop both; returns what `body` returns. One `asyncio.run`, so one event loop."""

    async def main():
        async with contextlib.AsyncExitStack() as stack:
            srv = await stack.enter_async_context(
                inprocess_server(repository, keyring, **server_options)
            )
            client = await stack.enter_async_context(aioclient.InferenceServerClient(srv.url))
            return await body(client, srv)

    return asyncio.run(main())
