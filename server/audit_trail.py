"""The server's audit records: control calls, refused calls, start and stop, and (as a
lifecycle listener) every load, swap, unload and failed load."""

from __future__ import annotations

import logging

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


def _chunks(mapping: dict[str, str]) -> list[dict[str, str]]:
    """`mapping` in pieces of at most MAX_DICT_ITEMS entries (at least one, maybe empty)."""
    items = list(mapping.items())
    size = MAX_DICT_ITEMS
    return [dict(items[i : i + size]) for i in range(0, len(items), size)] or [{}]


class AuditTrail:
    """Writes audit records when the server has an audit log; a failed write is logged, not
    raised: the change it describes has already happened and must not be reported to the
    caller as failed."""

    def __init__(self, audit: AuditLog | None) -> None:
        self.audit = audit

    @property
    def enabled(self) -> bool:
        return self.audit is not None

    async def record(self, event: str, **fields: object) -> None:
        if self.audit is None:
            return
        try:
            await self.audit.arecord(event, **fields)
        except AuditError as exc:
            log.error("audit write failed", extra={"event": event, "error": str(exc)})

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
        if self.audit is not None:
            self.audit.close()
