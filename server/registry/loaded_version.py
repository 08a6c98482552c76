"""A version that is ready to serve, with the in-flight count that lets it drain."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from forseti.core.repository.config import ModelSpec
from forseti.server.backends.base import Backend
from forseti.server.scheduler.base import Scheduler
from forseti.server.stats import VersionStats

log = logging.getLogger(__name__)


@dataclass(eq=False)
class LoadedVersion:
    """Opened, checked and warmed up. Mutated only on the event-loop thread."""

    model: str
    version: int
    spec: ModelSpec
    backend: Backend
    scheduler: Scheduler
    stats: VersionStats
    digest: str  # sha256 of the artifact file as stored (sealed bytes)
    fingerprint: tuple[object, ...]
    on_released: Callable[[LoadedVersion], None] | None = None
    output_names: list[str] = field(init=False)
    version_str: str = field(init=False)
    inflight: int = 0
    retired: bool = False
    released: bool = False

    def __post_init__(self) -> None:
        self.output_names = list(self.spec.outputs)
        self.version_str = str(self.version)

    def acquire(self) -> None:
        self.inflight += 1

    def release(self) -> None:
        self.inflight -= 1
        if self.retired and self.inflight == 0:
            self._close()

    def retire(self) -> None:
        """Take no new requests; close once the running ones have finished."""
        if self.retired:
            return
        self.retired = True
        if self.inflight == 0:
            self._close()
        else:
            log.info(
                "version draining",
                extra={"model": self.model, "version": self.version, "inflight": self.inflight},
            )

    def _close(self) -> None:
        if self.released:
            return
        self.released = True
        self.scheduler.close()
        self.backend.close()
        log.info("version released", extra={"model": self.model, "version": self.version})
        if self.on_released is not None:
            self.on_released(self)
