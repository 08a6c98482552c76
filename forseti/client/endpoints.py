"""The replica set: where decisions can go, which replicas are healthy, whose turn it is.

Endpoints are `host:port` strings, one replica each, or `dns:///host:port`, which stands for
every address the name resolves to (re-resolved now and then, so that replicas added behind
the name are found). Calls go round robin over the healthy replicas. A replica that fails with
UNAVAILABLE is ejected at once (after `eject_after` consecutive failures; deadline misses
need `eject_after_timeouts`), and the client's prober checks it until it answers its health
RPC again. Transport-agnostic: the sync and async clients keep their channel and stub on the
`Endpoint`.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from forseti.client.errors import ClientConfigError

log = logging.getLogger(__name__)

DNS_PREFIXES = ("dns:///", "dns:")

Resolver = Callable[[str, int], list[str]]


def resolve_all(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, as `address:port` (IPv6 in brackets), sorted."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found = set()
    for family, _, _, _, sockaddr in infos:
        address = str(sockaddr[0])
        found.add(f"[{address}]:{port}" if family == socket.AF_INET6 else f"{address}:{port}")
    return sorted(found)


def split_host_port(target: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` into its parts; the port is required."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ClientConfigError(f"endpoint '{target}': expected host:port")
    return host.strip("[]"), int(port)


@dataclass(eq=False)
class Endpoint:
    """One replica: its address, its health, and the client's channel to it."""

    address: str  # what is dialled: "host:port"
    authority: str | None = None  # the DNS name it came from (TLS checks the cert against it)
    healthy: bool = True
    # Answered a call or a health check since its last failure: its channel is connected, so
    # an attempt may use the whole deadline (see ClientBase.attempt_timeout).
    connected: bool = False
    failures: int = 0  # consecutive failed calls
    timeouts: int = 0  # consecutive calls that missed their deadline here
    ejected_at: float = 0.0
    checked_at: float = 0.0  # last health check (monotonic)
    channel: Any = None
    stub: Any = None
    extra: dict[str, Any] = field(default_factory=dict)  # the transport's own state

    def __str__(self) -> str:
        return self.address


class ReplicaSet:
    """The replicas of one client, with round robin over the healthy ones (thread-safe)."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        eject_after: int = 1,
        eject_after_timeouts: int = 3,
        resolver: Resolver = resolve_all,
    ) -> None:
        specs = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if eject_after < 1 or eject_after_timeouts < 1:
            raise ClientConfigError("eject_after and eject_after_timeouts must be >= 1")
        self.specs = specs
        self.eject_after = eject_after
        self.eject_after_timeouts = eject_after_timeouts
        self.resolver = resolver
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self.endpoints: list[Endpoint] = []
        self._healthy: tuple[Endpoint, ...] = ()
        # Listeners told of endpoints that appeared or went away (the client opens and closes
        # their channels) and of every health change (metrics).
        self.on_added: Callable[[Endpoint], None] = lambda ep: None
        self.on_removed: Callable[[Endpoint], None] = lambda ep: None
        self.on_health: Callable[[Endpoint, bool], None] = lambda ep, healthy: None

    @property
    def uses_dns(self) -> bool:
        return any(s.startswith(DNS_PREFIXES) for s in self.specs)

    def targets(self) -> list[tuple[str, str | None]]:
        """(address, authority) for every replica the specs stand for now."""
        found: dict[str, str | None] = {}
        for spec in self.specs:
            if spec.startswith(DNS_PREFIXES):
                name = spec.removeprefix("dns:///").removeprefix("dns:")
                host, port = split_host_port(name)
                try:
                    addresses = self.resolver(host, port)
                except OSError as exc:
                    log.warning("cannot resolve %s: %s", name, exc)
                    continue
                for address in addresses:
                    found.setdefault(address, host)
            else:
                split_host_port(spec)
                found.setdefault(spec, None)
        return list(found.items())

    def refresh(self, targets: list[tuple[str, str | None]] | None = None) -> None:
        """Bring the endpoint list in line with the specs (at start, and to follow DNS), or
        with `targets` resolved beforehand. A name that resolves to nothing keeps the replicas
        it had (DNS can fail briefly)."""
        targets = self.targets() if targets is None else targets
        if not targets and self.endpoints:
            return
        wanted = dict(targets)
        with self._lock:
            current = {ep.address: ep for ep in self.endpoints}
            added = [Endpoint(a, wanted[a]) for a in wanted if a not in current]
            removed = [ep for a, ep in current.items() if a not in wanted]
            self.endpoints = [ep for ep in self.endpoints if ep.address in wanted] + added
            self._rebuild()
        for ep in added:
            self.on_added(ep)
        for ep in removed:
            self.on_removed(ep)
        if added or removed:
            log.info(
                "replicas changed",
                extra={"added": [str(e) for e in added], "removed": [str(e) for e in removed]},
            )

    def _rebuild(self) -> None:
        self._healthy = tuple(ep for ep in self.endpoints if ep.healthy)

    def pick(self, exclude: Iterable[Endpoint] = ()) -> Endpoint | None:
        """The next healthy replica in round-robin order that is not in `exclude`."""
        healthy = self._healthy
        n = len(healthy)
        if not n:
            return None
        start = next(self._counter)
        for k in range(n):
            ep = healthy[(start + k) % n]
            if ep not in exclude:
                return ep
        return None

    def healthy_count(self) -> int:
        return len(self._healthy)

    def succeeded(self, ep: Endpoint) -> None:
        ep.connected = True
        ep.failures = 0
        ep.timeouts = 0

    def failed(self, ep: Endpoint, code: grpc.StatusCode) -> bool:
        """Count a failed call; eject the replica when it has failed often enough. True when
        this call ejected it."""
        ep.connected = False
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            ep.timeouts += 1
            if ep.timeouts < self.eject_after_timeouts:
                return False
        else:
            ep.failures += 1
            if ep.failures < self.eject_after:
                return False
        return self.set_health(ep, False, reason=code.name)

    def set_health(self, ep: Endpoint, healthy: bool, reason: str = "") -> bool:
        """Mark a replica healthy (probed back) or not (ejected). True when it changed."""
        with self._lock:
            if ep.healthy == healthy:
                return False
            ep.healthy = healthy
            if healthy:
                ep.failures = ep.timeouts = 0
            else:
                ep.ejected_at = time.monotonic()
            self._rebuild()
        log.warning(
            "replica ejected" if not healthy else "replica back in rotation",
            extra={"endpoint": ep.address, "reason": reason},
        )
        self.on_health(ep, healthy)
        return True

    def due_for_check(self, now: float, probe_every: float, check_every: float) -> list[Endpoint]:
        """Replicas whose health check is due: ejected ones every `probe_every` seconds,
        healthy ones every `check_every`."""
        return [
            ep
            for ep in list(self.endpoints)
            if now - ep.checked_at >= (check_every if ep.healthy else probe_every)
        ]

    def next_check_in(self, now: float, probe_every: float, check_every: float) -> float:
        """Seconds until the next health check is due (0 when one is due now)."""
        waits = [
            ep.checked_at + (check_every if ep.healthy else probe_every) - now
            for ep in list(self.endpoints)
        ]
        return max(min(waits, default=probe_every), 0.0)
