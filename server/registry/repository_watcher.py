"""Poll mode: watch the repository and reload models whose listing changed.

A poll lists the repository's root once and each model's prefix once (one LIST request per
model on an object store, whatever the number of versions) and compares every object's tag
with what the last poll saw; a changed model is reloaded through the registry (which reads
the config and the manifest again), a removed one is unloaded.

When the store errors or times out, nothing changes: every model keeps serving what it has,
readiness stays as it was, the failure is counted (`registry.poll_errors`, exported as
forseti_repository_poll_errors) and logged once per outage, and the next good poll
catches up with whatever changed meanwhile.
"""

from __future__ import annotations

import asyncio
import logging

from forseti.core.errors import ModelLoadError, NotFound
from forseti.core.repository.listing import ModelListing, list_model, list_model_names
from forseti.core.storage import Storage, StorageError
from forseti.server.registry.model_registry import ModelRegistry
from forseti.server.registry.version_loader import RepositoryUnavailable

log = logging.getLogger(__name__)


class RepositoryWatcher:
    """Reloads what changed in the registry's repository, one poll at a time."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._seen: dict[str, tuple[object, ...]] = {}
        self._outage = False
        self.polls = 0

    async def poll_once(self) -> bool:
        """Reload models whose listing changed; unload removed ones. False when the store could
        not be listed (nothing was changed)."""
        self.polls += 1
        try:
            listings = await asyncio.to_thread(_list_everything, self.registry.storage)
        except StorageError as exc:
            self._failed(exc)
            return False
        self.registry.remember_names(list(listings))
        for name, listing in listings.items():
            state = listing.state()
            if self._seen.get(name) == state:
                continue
            self._seen[name] = state
            try:
                await self.registry.load_model(name, listing=listing)
            except RepositoryUnavailable as exc:
                # Read failed half-way: forget what was seen so that the next poll tries again.
                self._seen.pop(name, None)
                self._failed(exc)
                return False
            except (ModelLoadError, NotFound):
                pass
        for name in (set(self._seen) | set(self.registry.model_names())) - set(listings):
            self._seen.pop(name, None)
            await self.registry.forget_model(name)
        if self._outage:
            self._outage = False
            log.warning("model repository readable again; caught up")
        return True

    def _failed(self, exc: Exception) -> None:
        self.registry.poll_errors += 1
        if not self._outage:
            self._outage = True
            log.error(
                "model repository unreadable; every model keeps serving what it has and the "
                "next polls retry (logged once per outage; see "
                "forseti_repository_poll_errors)",
                extra={"repository": str(self.registry.repository), "detail": str(exc)},
            )

    async def run(self, every_s: float) -> None:
        """Poll every `every_s` seconds until cancelled; a failed poll is logged."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.poll_once()
            except Exception:
                log.exception("repository poll failed")


def _list_everything(storage: Storage) -> dict[str, ModelListing]:
    """One listing of the root and one per model: the whole cost of a poll that finds nothing
    changed."""
    return {name: list_model(storage, name) for name in list_model_names(storage)}
