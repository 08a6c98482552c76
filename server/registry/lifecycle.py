"""Lifecycle hooks: what observers (the audit log, the handler's encoders, and later others)
hear about loads, swaps, unloads, failures and releases, instead of being called inline."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from forseti.server.registry.loaded_version import LoadedVersion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelLoadFailed:
    """The model as a whole could not be loaded (config, version policy)."""

    model: str
    reason: str


@dataclass(frozen=True)
class VersionLoaded:
    """A version was opened, checked and warmed up; it serves from the next swap."""

    model: str
    version: int
    sha256: str
    key_id: str | None  # None for a plaintext artifact
    config_sha256: str


@dataclass(frozen=True)
class VersionLoadFailed:
    """A version was refused; whatever served before keeps serving."""

    model: str
    version: int
    reason: str
    sha256: str | None  # of what was refused, when it could be read


@dataclass(frozen=True)
class Swapped:
    """The versions a model serves changed (version -> artifact sha256, before and after)."""

    model: str
    serving: dict[str, str]
    previous: dict[str, str]


@dataclass(frozen=True)
class Unloaded:
    """A model stopped serving; its running requests finish first."""

    model: str
    previous: dict[str, str]


@dataclass(frozen=True)
class VersionReleased:
    """A retired version drained and closed its backend."""

    loaded: LoadedVersion


LifecycleEvent = (
    ModelLoadFailed | VersionLoaded | VersionLoadFailed | Swapped | Unloaded | VersionReleased
)


class LifecycleListener(Protocol):
    async def on_event(self, event: LifecycleEvent) -> None: ...


class LifecycleHooks:
    """Delivers events to listeners in subscription order. A listener that fails is logged
    and never fails the change it hears about: that change has already happened."""

    def __init__(self) -> None:
        self._listeners: list[LifecycleListener] = []
        self._pending: set[asyncio.Task[None]] = set()

    def subscribe(self, listener: LifecycleListener) -> None:
        self._listeners.append(listener)

    async def emit(self, event: LifecycleEvent) -> None:
        for listener in self._listeners:
            try:
                await listener.on_event(event)
            except Exception:
                log.exception(
                    "lifecycle listener failed",
                    extra={"event": type(event).__name__, "listener": type(listener).__name__},
                )

    def emit_soon(self, event: LifecycleEvent) -> None:
        """Emit from code that cannot await (a version released by its last request)."""
        if not self._listeners:
            return
        task = asyncio.get_running_loop().create_task(self.emit(event))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
