"""What the synchronous and asyncio clients share: settings, the replica set, turning a call
into a request and an answer (or a fallback) into a Decision, and counting failures. The two
clients differ only in how they wait."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb

from forseti.client import decision as reasons
from forseti.client.credentials import TLSConfig, token_metadata
from forseti.client.decision import Decision
from forseti.client.endpoints import Endpoint, ReplicaSet
from forseti.client.errors import (
    EJECTING,
    RETRYABLE,
    ClientConfigError,
    DecisionRejected,
    status_of,
)
from forseti.client.fallback import Fallback, as_fallback
from forseti.client.hedging import Hedging
from forseti.client.local_mode import LocalPolicy
from forseti.client.metrics import ClientMetrics, NoMetrics
from forseti.client.wire import Outputs, infer_request

log = logging.getLogger(__name__)

# tritonclient's channel limits (2 GiB messages), so that whatever it can send, this can.
MAX_MESSAGE_BYTES = 2**31 - 1
# An error that comes this close to the deadline is the deadline's doing (a server drops a
# queued call whose deadline passed with UNAVAILABLE): the fallback, and no replica's fault.
AT_DEADLINE_S = 0.001


class DeadlineLateness:
    """How late gRPC's own deadlines fire on this machine, to end a call on time.

    gRPC fires a call's deadline from its timer thread, which on a busy machine runs a few
    milliseconds late (measured: p50 4 ms on a loaded 2-core VM). A call that waits on gRPC's
    deadline is therefore given `margin` less than what is left, where the margin is the worst
    lateness of the last `window` deadlines it saw (at most a fifth of the budget), so that the
    fallback comes at the deadline and not after it."""

    def __init__(self, initial_s: float = 0.002, window: int = 16) -> None:
        self._recent: deque[float] = deque([initial_s], maxlen=window)
        self._worst = initial_s
        self._lock = threading.Lock()

    def timeout(self, remaining: float) -> float:
        """The gRPC timeout for a call that must end within `remaining` seconds."""
        return remaining - min(self._worst, remaining / 5)

    def observe(self, late_s: float) -> None:
        with self._lock:  # only on a missed deadline: the lock is off the answered path
            self._recent.append(max(late_s, 0.0))
            self._worst = max(self._recent)


class Call:
    """One decide/decide_batch call on its way: what to send and how to answer without it."""

    __slots__ = ("batch", "deadline", "inputs", "key", "keys", "obs", "request", "start", "version")

    def __init__(
        self,
        obs: np.ndarray,
        inputs: dict[str, np.ndarray],
        request: pb.ModelInferRequest | None,
        start: float,
        deadline: float,
        batch: bool,
        key: Hashable | None,
        keys: Sequence[Hashable] | None,
        version: str,
    ) -> None:
        self.obs = obs
        self.inputs = inputs
        self.request = request
        self.start = start
        self.deadline = deadline
        self.batch = batch
        self.key = key
        self.keys = keys
        self.version = version


class ClientBase:
    """Settings and bookkeeping shared by DecisionClient and AsyncDecisionClient.

    :param endpoints: `host:port` replicas, or `dns:///host:port` for every address of a name.
    :param model: the model to ask.
    :param deadline_ms: how long a decision may take (per call: `deadline_ms=`).
    :param fallback: the action when no answer comes in time: an action value, a callable
        `fn(obs, reason)`, or a `Fallback` (`FixedAction`, `LastGoodAction`). None: raise.
    :param hedging: a `Hedging` to send a second request when the first is slow.
    :param tls: a `TLSConfig` (TLS, or mutual TLS with a client certificate).
    :param tokens: restricted-protocol tokens, `{key: token}` (or `{key: "@/path/file"}`).
    :param metrics: a `ClientMetrics` to count into (Prometheus).
    :param local: a `LocalPolicy` that answers in process when it can.
    :param input_name: the observation's input name; `action_output` the action's output.
    :param obs_dtype: observations are converted to this dtype (None: sent as given).
    :param batched: the model takes a batch dimension (`max_batch_size` > 0).
    :param max_attempts: replicas tried per call (retries of UNAVAILABLE/RESOURCE_EXHAUSTED).
    :param connect_timeout_ms: an attempt on a replica that is not connected yet gets at most
        this long, so that a dead address does not eat the whole deadline.
    :param probe_every_s: how often an ejected replica is probed; `check_every_s` how often a
        healthy one is checked; `resolve_every_s` how often DNS names are resolved again;
        `probe_timeout_s` how long a health check may take.
    :param eject_after: consecutive failed calls (UNAVAILABLE) that eject a replica;
        `eject_after_timeouts` consecutive deadline misses that do.
    :param fallback_on_rejection: answer a rejected request (INVALID_ARGUMENT and the like)
        with the fallback instead of raising DecisionRejected. It is never retried either way.
    :param headers: extra metadata sent with every call.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        model: str,
        deadline_ms: float = 100.0,
        fallback: Any = None,
        *,
        hedging: Hedging | None = None,
        tls: TLSConfig | None = None,
        tokens: Mapping[str, str] | None = None,
        metrics: ClientMetrics | None = None,
        local: LocalPolicy | None = None,
        input_name: str = "obs",
        action_output: str = "action",
        obs_dtype: Any = np.float32,
        batched: bool = True,
        max_attempts: int = 3,
        connect_timeout_ms: float = 50.0,
        probe_every_s: float = 1.0,
        check_every_s: float = 5.0,
        resolve_every_s: float = 30.0,
        probe_timeout_s: float = 1.0,
        eject_after: int = 1,
        eject_after_timeouts: int = 3,
        fallback_on_rejection: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if deadline_ms <= 0:
            raise ClientConfigError(f"deadline_ms must be > 0, got {deadline_ms}")
        if max_attempts < 1:
            raise ClientConfigError(f"max_attempts must be >= 1, got {max_attempts}")
        self.model = model
        self.deadline_s = deadline_ms / 1000
        self.fallback: Fallback | None = as_fallback(fallback)
        self.hedging = hedging
        self.tls = tls
        self.metadata: tuple[tuple[str, str], ...] = token_metadata(tokens) + tuple(
            (headers or {}).items()
        )
        self.metrics = metrics.for_model(model) if metrics is not None else NoMetrics()
        self.local = local
        self.input_name = input_name
        self.action_output = action_output
        self.obs_dtype = None if obs_dtype is None else np.dtype(obs_dtype)
        self.batched = batched
        self.max_attempts = max_attempts
        self.connect_timeout_s = connect_timeout_ms / 1000
        self.probe_every_s = probe_every_s
        self.check_every_s = check_every_s
        self.resolve_every_s = resolve_every_s
        self.probe_timeout_s = probe_timeout_s
        self.fallback_on_rejection = fallback_on_rejection
        self.credentials = tls.credentials() if tls is not None else None
        self.replicas = ReplicaSet(
            endpoints, eject_after=eject_after, eject_after_timeouts=eject_after_timeouts
        )
        if not self.replicas.specs and local is None:
            raise ClientConfigError("no endpoints: give at least one host:port (or local=)")
        self.replicas.on_health = self._health_changed
        self.closed = False
        self.lateness = DeadlineLateness()

    # -- channels ---------------------------------------------------------------------------

    def channel_options(self, ep: Endpoint) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # A replica that comes back is reconnected within a probe or two, not after
            # gRPC's default backoff (which grows to two minutes).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", max(int(self.probe_every_s * 1000), 200)),
            # One channel per replica: never share a subchannel with another client's channel,
            # so that ejecting or closing one is private to this client.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        server_name = self.tls.server_name if self.tls is not None else None
        if self.credentials is not None and (server_name or ep.authority):
            options.append(("grpc.ssl_target_name_override", server_name or ep.authority))
        return options

    # -- requests ---------------------------------------------------------------------------

    def prepare(
        self,
        obs: Any,
        batch: bool,
        key: Hashable | None,
        keys: Sequence[Hashable] | None,
        deadline_ms: float | None,
        version: int | str | None,
        parameters: Mapping[str, Any] | None,
        inputs: Mapping[str, Any] | None,
        outputs: Sequence[str] | None,
    ) -> Call:
        """The call for one decide (batch=False) or decide_batch, its deadline started now."""
        start = time.monotonic()
        deadline = start + (self.deadline_s if deadline_ms is None else deadline_ms / 1000)
        array = np.asarray(obs, dtype=self.obs_dtype)
        if batch and keys is not None and len(keys) != len(array):
            raise ClientConfigError(f"{len(keys)} keys for a batch of {len(array)} observations")
        sent = array[None] if self.batched and not batch else array
        feeds = {self.input_name: sent}
        for name, value in (inputs or {}).items():
            extra = np.asarray(value)
            feeds[name] = extra[None] if self.batched and not batch else extra
        version_text = "" if version is None else str(version)
        request = None
        if self.replicas.specs:
            request = infer_request(self.model, feeds, version_text, parameters, outputs)
        call = Call(array, feeds, request, start, deadline, batch, key, keys, version_text)
        return call

    def local_decision(self, call: Call, has_parameters: bool) -> Decision | None:
        """The local policy's decision, or None when it cannot make it (not loaded, another
        version asked for, request parameters it cannot honour): the server is asked then."""
        if self.local is None or has_parameters:
            return None
        answered = self.local.run(call.inputs, call.version)
        if answered is None:
            return None
        outputs, version = answered
        if not call.batch and self.batched:
            outputs = {name: value[0] for name, value in outputs.items()}
        return self.answered(call, outputs, version, "local")

    def answered(
        self, call: Call, outputs: Mapping[str, np.ndarray], version: str, endpoint: str
    ) -> Decision:
        """The decision from `outputs` (rows already cut for a single decision)."""
        latency = time.monotonic() - call.start
        action = outputs.get(self.action_output)
        if self.fallback is not None:
            if call.key is not None and not call.batch:
                self.fallback.remember(call.key, action)
            elif call.keys is not None and action is not None:
                for k, a in zip(call.keys, action, strict=True):
                    self.fallback.remember(k, a)
        if self.hedging is not None and endpoint != "local":
            self.hedging.observe(latency, endpoint)
        self.metrics.decided(latency, "local" if endpoint == "local" else "replica")
        return Decision(action, outputs, version, endpoint, latency, False, None)

    def from_response(self, call: Call, response: pb.ModelInferResponse, ep: Endpoint) -> Decision:
        outputs = Outputs(response, row=not call.batch and self.batched)
        return self.answered(call, outputs, response.model_version, ep.address)

    def fall_back(self, call: Call, reason: str, error: grpc.RpcError | None = None) -> Decision:
        """The fallback decision for `reason`; without a fallback, DecisionRejected with the
        status that ended the call (DEADLINE_EXCEEDED at the deadline)."""
        self.metrics.fallback(reason)
        if self.fallback is None:
            code = grpc.StatusCode.DEADLINE_EXCEEDED
            if reason != reasons.DEADLINE:
                code = grpc.StatusCode.UNAVAILABLE
            detail = f": {error.details()}" if error is not None else ""
            raise DecisionRejected(
                f"no decision from model '{self.model}' ({reason}){detail}; "
                "give the client a fallback to get an action instead",
                code,
                "",
            )
        if call.batch:
            action = self.fallback.batch(call.obs, call.keys, reason)
        else:
            action = self.fallback.single(call.obs, call.key, reason)
        latency = time.monotonic() - call.start
        self.metrics.decided(latency, "fallback")
        return Decision(action, {}, None, None, latency, True, reason)

    def rejected(self, call: Call, error: grpc.RpcError, ep: Endpoint) -> Decision:
        """A non-retryable status: raise DecisionRejected, or fall back when configured."""
        code = status_of(error)
        if self.fallback_on_rejection and self.fallback is not None:
            return self.fall_back(call, f"{reasons.REJECTED}:{code.name}")
        raise DecisionRejected(error.details() or code.name, code, ep.address)

    # -- failures ---------------------------------------------------------------------------

    def failed(self, ep: Endpoint, error: grpc.RpcError) -> grpc.StatusCode:
        """Count a failed attempt on `ep`; eject it when it looks unwell. Returns the code."""
        code = status_of(error)
        if code == grpc.StatusCode.CANCELLED:
            return code  # this client cancelled it (a hedge lost, the deadline passed)
        self.metrics.replica_error(ep.address, code.name)
        if code in EJECTING:
            self.replicas.failed(ep, code)
        return code

    @staticmethod
    def retryable(code: grpc.StatusCode) -> bool:
        return code in RETRYABLE

    def _health_changed(self, ep: Endpoint, healthy: bool) -> None:
        if not healthy:
            self.metrics.ejected(ep.address)
        self.metrics.healthy_replicas(self.replicas.healthy_count())

    def attempt_timeout(self, ep: Endpoint, remaining: float, tried: int) -> float:
        """An attempt's timeout: what is left of the deadline, and no more than the connect
        timeout while the replica's channel is not connected and another replica is left to
        try (`tried`: replicas tried so far, this one included)."""
        if ep.connected or self.replicas.healthy_count() <= tried:
            return remaining
        return min(remaining, self.connect_timeout_s)
