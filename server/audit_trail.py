"""The server's audit records: control calls, refused calls, start and stop, and (as a
lifecycle listener) every load, swap, unload and failed load.

Calls that change nothing (refused control calls, repository reads) are not written one by
one: they are counted per caller address, method and reason, and each count is written as one
record when its window (AGGREGATE_WINDOW_S) ends, or at shutdown. A flood of such calls then
costs a few records, not one fsync each."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from forseti.core.audit import MAX_DICT_ITEMS, AuditError, AuditLog
from forseti.server.registry.lifecycle import (
    LifecycleEvent,
    ModelLoadFailed,
    Swapped,
    Unloaded,
    VersionLoaded,
    VersionLoadFailed,
)

log = logging.getLogger(__name__)

# How long calls are counted before their aggregate record is written.
AGGREGATE_WINDOW_S = 10.0
# Distinct (event, caller, method, reason) counts held at once; calls beyond it are counted
# under one overflow entry, so many source addresses cannot grow memory without bound.
MAX_PENDING = 1024
OVERFLOW_PEER = "(other addresses)"

TallyValue = str | bool | None


def _chunks(mapping: dict[str, str]) -> list[dict[str, str]]:
    """`mapping` in pieces of at most MAX_DICT_ITEMS entries (at least one, maybe empty)."""
    items = list(mapping.items())
    size = MAX_DICT_ITEMS
    return [dict(items[i : i + size]) for i in range(0, len(items), size)] or [{}]


def peer_address(peer: str) -> str:
    """gRPC's peer string without the source port (`ipv4:10.0.0.7:53122` -> `ipv4:10.0.0.7`,
    `ipv6:[::1]:5` -> `ipv6:[::1]`): a client opening a new connection per call is one caller."""
    kind, sep, rest = peer.partition(":")
    if not sep or kind not in ("ipv4", "ipv6"):
        return peer
    host, colon, port = rest.rpartition(":")
    return f"{kind}:{host}" if colon and port.isdigit() else peer


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class _Tally:
    count: int
    first: str
    last: str
    first_request_id: str | None
    last_request_id: str | None


class AuditTrail:
    """Writes audit records when the server has an audit log.

    `record` logs a failed write and returns: the change it describes has already happened
    and must not be reported to the caller as failed. `record_before_change` raises instead,
    so a caller can refuse a change that could not be audited."""

    def __init__(self, audit: AuditLog | None, *, window_s: float = AGGREGATE_WINDOW_S) -> None:
        self.audit = audit
        self.window_s = window_s
        self._pending: dict[tuple[str, tuple[tuple[str, TallyValue], ...]], _Tally] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        return self.audit is not None

    async def record(self, event: str, **fields: object) -> None:
        """Write a record; a failure is logged (by record_before_change) and not raised."""
        with contextlib.suppress(AuditError):
            await self.record_before_change(event, **fields)

    async def record_before_change(self, event: str, **fields: object) -> None:
        """Write a record that must exist before a change is made; raises AuditError (logged
        here with the reason) when it cannot be written."""
        if self.audit is None:
            return
        try:
            await self.audit.arecord(event, **fields)
        except AuditError as exc:
            log.error("audit write failed", extra={"event": event, "error": str(exc)})
            raise

    # ---- counted calls ------------------------------------------------------------------

    def tally(self, event: str, request_id: str | None, **key: TallyValue) -> None:
        """Count one call that changed nothing; `key` (caller address, method, reason...)
        says which calls count together. No I/O here: the count is written when its window
        ends (or by `flush`). Call it on the event loop's thread."""
        if self.audit is None:
            return
        ident = (event, tuple(key.items()))
        now = _now()
        tally = self._pending.get(ident)
        if tally is None and len(self._pending) >= MAX_PENDING:
            key = {**key, "peer": OVERFLOW_PEER}
            ident = (event, tuple(key.items()))
            tally = self._pending.get(ident)
        if tally is None:
            self._pending[ident] = _Tally(1, now, now, request_id, request_id)
        else:
            tally.count += 1
            tally.last = now
            tally.last_request_id = request_id or tally.last_request_id
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.window_s, self._window_ended)

    def tally_refusal(self, fields: dict[str, str]) -> None:
        """Count a control call refused by a token check, from the fields the restricted
        protocol interceptor gives (peer, tls_subject, rpc, group, reason, request_id)."""
        self.tally(
            "repository.refused",
            fields.get("request_id"),
            peer=peer_address(fields.get("peer", "")),
            tls_subject=fields.get("tls_subject") or None,
            rpc=fields.get("rpc", ""),
            group=fields.get("group", ""),
            reason=fields.get("reason", ""),
        )

    def _window_ended(self) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self.flush())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def flush(self) -> None:
        """Write every pending count now, one record each; returns once counts whose window
        ended earlier are written too (so nothing counted lands after a later record)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, {}
        for (event, key), tally in pending.items():
            ids = (
                {
                    "first_request_id": tally.first_request_id,
                    "last_request_id": tally.last_request_id,
                }
                if tally.first_request_id is not None
                else {}
            )
            await self.record(
                event,
                **dict(key),
                count=tally.count,
                first=tally.first,
                last=tally.last,
                window_s=self.window_s,
                **ids,
            )
        current = asyncio.current_task()
        for task in list(self._flushing):
            if task is not current:
                await task

    # ---- lifecycle ----------------------------------------------------------------------

    async def on_event(self, event: LifecycleEvent) -> None:
        """The lifecycle listener: one record per registry change."""
        if isinstance(event, VersionLoaded):
            await self.record(
                "model.version_loaded",
                model=event.model,
                version=event.version,
                sha256=event.sha256,
                sealed=event.key_id is not None,
                key_id=event.key_id,
                config_sha256=event.config_sha256,
            )
        elif isinstance(event, VersionLoadFailed):
            await self.record(
                "model.version_load_failed",
                model=event.model,
                version=event.version,
                reason=event.reason,
                sha256=event.sha256,
            )
        elif isinstance(event, ModelLoadFailed):
            await self.record("model.load_failed", model=event.model, reason=event.reason)
        elif isinstance(event, Swapped):
            await self._record_versions(
                "model.swap", event.model, serving=event.serving, previous=event.previous
            )
        elif isinstance(event, Unloaded):
            await self._record_versions("model.unload", event.model, previous=event.previous)

    async def _record_versions(self, event: str, model: str, **maps: dict[str, str]) -> None:
        """A record naming version -> sha256 maps; a model with more versions than one audit
        field may hold gets several records (`part`, `parts`) instead of losing the record."""
        chunks = {name: _chunks(mapping) for name, mapping in maps.items()}
        parts = max(len(c) for c in chunks.values())
        if parts == 1:
            await self.record(event, model=model, **maps)
            return
        for i in range(parts):
            fields = {name: c[i] if i < len(c) else {} for name, c in chunks.items()}
            await self.record(event, model=model, part=i + 1, parts=parts, **fields)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.audit is not None:
            self.audit.close()
