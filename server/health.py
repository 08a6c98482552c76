"""The standard gRPC health service (grpc.health.v1.Health: Check and Watch), kept in step with
the server's readiness, for Kubernetes' gRPC probes and grpc_health_probe.

Service names: "" is the replica as a whole, SERVING exactly when ServerReady answers true
(started, the models meant to be served ready, not stopping); a model's name is that model,
SERVING while it has a ready version. Statuses are recomputed on every lifecycle event, and a
swap replaces a model's versions in one assignment, so a swap never shows NOT_SERVING. On stop
every service turns NOT_SERVING for good (the drain), before the server stops answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from forseti.server.registry.lifecycle import LifecycleEvent, VersionReleased

if TYPE_CHECKING:
    from forseti.server.protocol.servicer import ServerState
    from forseti.server.registry.model_registry import ModelRegistry

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
OVERALL = ""  # the whole server, by the health protocol's convention


class _HealthServicer(health.aio.HealthServicer):
    """The library's servicer, with two changes. Its Watch forgets a service's condition when
    any one watcher leaves, so the other watchers of that service stop hearing about changes
    (grpc/grpc#43403): the condition is put back while watchers remain. And watches end (OK,
    after their last status) when the server stops, instead of holding the stop for its whole
    grace period."""

    def __init__(self) -> None:
        super().__init__()
        self._watching: Counter[str] = Counter()
        self._closed = asyncio.Event()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        service = request.service
        condition = self._server_watchers[service]
        self._watching[service] += 1
        watch = asyncio.ensure_future(super().Watch(request, context))
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait((watch, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watch, closed):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            self._watching[service] -= 1
            if self._watching[service] > 0:
                # No await between the library's removal and this: no status set is lost.
                self._server_watchers[service] = condition
            else:
                del self._watching[service]

    def close_watches(self) -> None:
        """End every open Watch stream."""
        self._closed.set()


class ServingHealth:
    """Serving statuses from the registry and the server state; a lifecycle listener."""

    def __init__(self, registry: ModelRegistry, state: ServerState) -> None:
        self.registry = registry
        self.state = state
        self.servicer = _HealthServicer()
        self._lock = asyncio.Lock()
        self._refreshing: set[asyncio.Task[None]] = set()
        self._models: set[str] = set()  # every model name given a status so far

    def add_to(self, server: grpc.aio.Server) -> None:
        """Serve grpc.health.v1.Health on `server`."""
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def on_event(self, event: LifecycleEvent) -> None:
        if isinstance(event, VersionReleased):  # a release changes nothing that serves
            return
        # In a task of its own: the library writes to Watch streams while holding a status's
        # lock, so a watcher that reads slowly must not hold up the load that emitted this.
        task = asyncio.get_running_loop().create_task(self.refresh())
        self._refreshing.add(task)
        task.add_done_callback(self._refreshing.discard)

    async def refresh(self) -> None:
        """Set every status from what the registry serves now (a no-op once draining)."""
        async with self._lock:
            overall = SERVING if self.state.is_ready(self.registry) else NOT_SERVING
            await self.servicer.set(OVERALL, overall)
            models = dict(self.registry.routing.models)
            for name, entry in models.items():
                await self.servicer.set(name, SERVING if entry.latest is not None else NOT_SERVING)
            # A model whose folder left the repository has no entry any more.
            for name in self._models - set(models):
                await self.servicer.set(name, NOT_SERVING)
            self._models |= set(models)

    async def drain(self) -> None:
        """Every service NOT_SERVING from now on, whatever loads or swaps meanwhile."""
        await self.servicer.set(OVERALL, NOT_SERVING)
        await self.servicer.enter_graceful_shutdown()
        log.info("health: NOT_SERVING (stopping)")

    def close(self) -> None:
        """End the Watch streams (their last status was NOT_SERVING): the server is stopping."""
        self.servicer.close_watches()
