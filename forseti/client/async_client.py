"""AsyncDecisionClient: DecisionClient for asyncio callers, over grpc.aio.

The same settings and behaviour as DecisionClient (see ClientBase): an attempt awaits one
grpc.aio call whose deadline is the decision's; hedges and retries are further calls, the
first answer wins and the rest are cancelled. Channels and the health-check task start with
the first call (or `await client.start()`), on the running loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2_grpc
from tritonclient.grpc import service_pb2_grpc

from forseti.client import decision as reasons
from forseti.client.base import AT_DEADLINE_S, Call, ClientBase
from forseti.client.decision import Decision
from forseti.client.endpoints import Endpoint
from forseti.client.errors import ClientConfigError, status_of
from forseti.client.health import health_request, health_unimplemented, is_healthy

log = logging.getLogger(__name__)

_READY = grpc.ChannelConnectivity.READY


class AsyncDecisionClient(ClientBase):
    """Decisions for asyncio callers; parameters as DecisionClient (see ClientBase).

    >>> async with AsyncDecisionClient(["10.0.0.1:8001"], "cartpole", fallback=0) as client:
    ...     decision = await client.decide(obs)
    """

    def __init__(self, endpoints: str | Sequence[str], model: str, **kwargs: Any) -> None:
        super().__init__(endpoints, model, **kwargs)
        self.replicas.on_added = self._open
        self.replicas.on_removed = self._forget
        self._prober: asyncio.Task[None] | None = None
        self._closing: list[grpc.aio.Channel] = []
        self._started = False

    async def start(self) -> AsyncDecisionClient:
        """Open the channels and start health checks on the running loop (idempotent)."""
        if self._started:
            return self
        self._started = True
        self.replicas.refresh()
        self.metrics.healthy_replicas(self.replicas.healthy_count())
        if self.replicas.specs:
            self._prober = asyncio.get_running_loop().create_task(self._probe_loop())
        return self

    # -- channels ---------------------------------------------------------------------------

    def _open(self, ep: Endpoint) -> None:
        options = self.channel_options(ep)
        if self.credentials is not None:
            channel = grpc.aio.secure_channel(ep.address, self.credentials, options=options)
        else:
            channel = grpc.aio.insecure_channel(ep.address, options=options)
        channel.get_state(try_to_connect=True)
        ep.channel = channel
        ep.stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        ep.extra["health"] = health_pb2_grpc.HealthStub(channel)

    def _forget(self, ep: Endpoint) -> None:
        if ep.channel is not None:
            self._closing.append(ep.channel)

    def attempt_timeout(self, ep: Endpoint, remaining: float, tried: int) -> float:
        # grpc.aio tells the channel's state without a polling thread: ask it.
        ep.connected = ep.channel.get_state(try_to_connect=True) == _READY
        return super().attempt_timeout(ep, remaining, tried)

    async def close(self) -> None:
        """Stop health checks and close every channel (and the local policy's poller)."""
        self.closed = True
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
        channels = [ep.channel for ep in self.replicas.endpoints if ep.channel is not None]
        for channel in channels + self._closing:
            await channel.close()
        if self.local is not None:
            await asyncio.to_thread(self.local.close)

    async def __aenter__(self) -> AsyncDecisionClient:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- health -----------------------------------------------------------------------------

    async def check(self, ep: Endpoint) -> bool:
        """Ask one replica whether it serves the model (within probe_timeout_s)."""
        ep.checked_at = time.monotonic()
        for _ in range(2):
            kind, request = health_request(ep, self.model)
            rpc = ep.extra["health"].Check if kind == "health" else ep.stub.ModelReady
            try:
                response = await rpc(request, timeout=self.probe_timeout_s, metadata=self.metadata)
            except grpc.RpcError as error:
                if health_unimplemented(ep, kind, error):
                    continue
                return False
            return is_healthy(kind, response)
        return False

    async def _probe_loop(self) -> None:
        last_resolve = time.monotonic()
        while True:
            now = time.monotonic()
            if self.replicas.uses_dns and now - last_resolve >= self.resolve_every_s:
                last_resolve = now
                # getaddrinfo blocks: resolve on a worker thread, not on the caller's loop
                self.replicas.refresh(await asyncio.to_thread(self.replicas.targets))
                while self._closing:
                    await self._closing.pop().close()
            for ep in self.replicas.due_for_check(now, self.probe_every_s, self.check_every_s):
                healthy = await self.check(ep)
                if healthy != ep.healthy:
                    self.replicas.set_health(ep, healthy, reason="health check")
            wait = self.replicas.next_check_in(
                time.monotonic(), self.probe_every_s, self.check_every_s
            )
            await asyncio.sleep(min(max(wait, 0.01), self.probe_every_s))

    # -- decisions --------------------------------------------------------------------------

    async def decide(
        self,
        obs: Any,
        *,
        key: Hashable | None = None,
        deadline_ms: float | None = None,
        version: int | str | None = None,
        parameters: Mapping[str, Any] | None = None,
        inputs: Mapping[str, Any] | None = None,
        outputs: Sequence[str] | None = None,
    ) -> Decision:
        """One decision for one observation, by its deadline (see DecisionClient.decide)."""
        call = self.prepare(
            obs, False, key, None, deadline_ms, version, parameters, inputs, outputs
        )
        return await self._decide(call, bool(parameters))

    async def decide_batch(
        self,
        obs: Any,
        *,
        keys: Sequence[Hashable] | None = None,
        deadline_ms: float | None = None,
        version: int | str | None = None,
        parameters: Mapping[str, Any] | None = None,
        inputs: Mapping[str, Any] | None = None,
        outputs: Sequence[str] | None = None,
    ) -> Decision:
        """Decisions for a batch of observations (see DecisionClient.decide_batch)."""
        call = self.prepare(
            obs, True, None, keys, deadline_ms, version, parameters, inputs, outputs
        )
        return await self._decide(call, bool(parameters))

    async def _decide(self, call: Call, has_parameters: bool) -> Decision:
        if self.closed:
            raise ClientConfigError("the client is closed")
        if not self._started:
            await self.start()
        local = self.local_decision(call, has_parameters)
        if local is not None:
            return local
        if call.request is None:
            return self.fall_back(call, reasons.NO_REPLICA)
        if self.hedging is not None and self.hedging.delay_s() is not None:
            return await self._attempts(call)
        return await self._sequential(call)

    async def _sequential(self, call: Call) -> Decision:
        """Attempts one after another, each one call awaited with the deadline as its own."""
        tried: list[Endpoint] = []
        last_error: grpc.RpcError | None = None
        while True:
            remaining = call.deadline - time.monotonic()
            if remaining <= 0:
                return self.fall_back(call, reasons.DEADLINE, last_error)
            ep = self.replicas.pick(tried) if len(tried) < self.max_attempts else None
            if ep is None:
                reason = reasons.UNAVAILABLE if tried else reasons.NO_REPLICA
                return self.fall_back(call, reason, last_error)
            if last_error is not None:
                self.metrics.retry(status_of(last_error).name)
            tried.append(ep)
            timeout = self.attempt_timeout(ep, remaining, len(tried))
            bounded = timeout >= remaining  # the decision's deadline, not a connect timeout
            if bounded:
                timeout = self.lateness.timeout(remaining)
            sent = time.monotonic()
            try:
                response = await ep.stub.ModelInfer(
                    call.request, timeout=timeout, metadata=self.metadata
                )
            except grpc.RpcError as error:
                last_error = error
                if bounded and time.monotonic() >= sent + timeout - AT_DEADLINE_S:
                    # The call ran to its deadline: gRPC's DEADLINE_EXCEEDED, or the server
                    # dropping it at the deadline (UNAVAILABLE), which is no fault of its own.
                    if status_of(error) == grpc.StatusCode.DEADLINE_EXCEEDED:
                        self.failed(ep, error)
                        self.lateness.observe(time.monotonic() - sent - timeout)
                    return self.fall_back(call, reasons.DEADLINE, error)
                code = self.failed(ep, error)
                if self.retryable(code) or code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # another replica (a deadline here was a connect timeout)
                return self.rejected(call, error, ep)
            self.replicas.succeeded(ep)
            return self.from_response(call, response, ep)

    async def _attempts(self, call: Call) -> Decision:
        """Attempts on replicas until one answers, the deadline passes or a status says the
        request itself is wrong; a hedge after the hedging delay; the first answer wins."""
        delay = self.hedging.delay_s() if self.hedging is not None else None
        hedge_at = call.start + delay if delay is not None else float("inf")
        pending: dict[asyncio.Future[Any], tuple[Endpoint, grpc.aio.UnaryUnaryCall]] = {}
        tried: list[Endpoint] = []
        hedge: asyncio.Future[Any] | None = None
        last_error: grpc.RpcError | None = None

        def launch(ep: Endpoint, remaining: float) -> asyncio.Future[Any]:
            tried.append(ep)
            timeout = self.attempt_timeout(ep, remaining, len(tried))
            rpc = ep.stub.ModelInfer(call.request, timeout=timeout, metadata=self.metadata)
            future = asyncio.ensure_future(rpc)
            pending[future] = (ep, rpc)
            return future

        try:
            while True:
                now = time.monotonic()
                if now >= call.deadline:
                    return self.fall_back(call, reasons.DEADLINE, last_error)
                if not pending:
                    ep = self.replicas.pick(tried) if len(tried) < self.max_attempts else None
                    if ep is None:
                        reason = reasons.UNAVAILABLE if tried else reasons.NO_REPLICA
                        return self.fall_back(call, reason, last_error)
                    if last_error is not None:
                        self.metrics.retry(status_of(last_error).name)
                    launch(ep, call.deadline - now)
                    continue
                wake = call.deadline if hedge is not None else min(call.deadline, hedge_at)
                done, _ = await asyncio.wait(
                    list(pending), timeout=max(wake - now, 0.0), return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    if hedge is None and time.monotonic() >= hedge_at:
                        hedge_at = float("inf")
                        ep = self.replicas.pick(tried)
                        if ep is not None:
                            hedge = launch(ep, call.deadline - time.monotonic())
                            self.metrics.hedge("sent")
                    continue
                for future in done:
                    ep, _rpc = pending.pop(future)
                    if future.cancelled():
                        continue
                    error = future.exception()
                    if error is None:
                        self.replicas.succeeded(ep)
                        if future is hedge:
                            self.metrics.hedge("won")
                        return self.from_response(call, future.result(), ep)
                    if not isinstance(error, grpc.RpcError):
                        raise error
                    last_error = error
                    if time.monotonic() >= call.deadline - AT_DEADLINE_S:
                        continue  # dropped at the deadline: the fallback, not the replica's fault
                    code = self.failed(ep, error)
                    if self.retryable(code) or code == grpc.StatusCode.DEADLINE_EXCEEDED:
                        continue
                    return self.rejected(call, error, ep)
        finally:
            for future, (_ep, rpc) in pending.items():
                rpc.cancel()
                future.cancel()
