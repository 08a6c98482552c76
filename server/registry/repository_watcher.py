"""Poll mode: watch the repository and reload models whose folder changed.

A poll compares what each model folder looks like (the config file and every version folder's
files: inode, size, mtime) with what the last poll saw; a changed model is reloaded through the
registry, a removed one is unloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from forseti.core.errors import ModelLoadError, NotFound
from forseti.core.repository.config import CONFIG_FILENAME
from forseti.core.repository.layout import list_models, version_dirs
from forseti.server.registry.model_registry import ModelRegistry

log = logging.getLogger(__name__)


class RepositoryWatcher:
    """Reloads what changed in the registry's repository, one poll at a time."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._seen: dict[str, tuple[object, ...]] = {}

    async def poll_once(self) -> None:
        """Reload models whose folder changed; unload removed ones."""
        repository = self.registry.repository
        names = list_models(repository)
        for name in names:
            state = await asyncio.to_thread(disk_state, repository / name)
            if self._seen.get(name) == state:
                continue
            self._seen[name] = state
            with contextlib.suppress(ModelLoadError, NotFound):
                await self.registry.load_model(name)
        for name in (set(self._seen) | set(self.registry.model_names())) - set(names):
            self._seen.pop(name, None)
            await self.registry.forget_model(name)

    async def run(self, every_s: float) -> None:
        """Poll every `every_s` seconds until cancelled; a failed poll is logged."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.poll_once()
            except Exception:
                log.exception("repository poll failed")


def disk_state(model_dir: Path) -> tuple[object, ...]:
    """What a poll compares: the config file and every version folder's files."""
    items: list[tuple[object, ...]] = []
    try:
        st = os.stat(model_dir / CONFIG_FILENAME)
        items.append((CONFIG_FILENAME, st.st_ino, st.st_size, st.st_mtime_ns))
    except OSError:
        items.append((CONFIG_FILENAME,))
    for v, path in sorted(version_dirs(model_dir).items()):
        try:
            for e in sorted(os.scandir(path), key=lambda e: e.name):
                st = e.stat()
                items.append((v, e.name, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            items.append((v,))
    return tuple(items)
