"""The model registry: loads versions by policy and swaps them in atomically.

Every change to the routing table happens on the event-loop thread; the slow parts of a load
(reading, opening the seal, building sessions, warm-up) run in a worker thread through the
version loader, and the new version map replaces the old one in a single assignment once they
are done. Requests hold the version they started on, which drains before it is released.
Observers (the audit log, encoders) hear about every change through the lifecycle hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from forseti.core.errors import ModelLoadError, NotFound, shown
from forseti.core.repository.config import ModelSpec, model_spec, read_model_config
from forseti.core.repository.layout import (
    DEFAULT_MAX_ARTIFACT_BYTES,
    is_hidden,
    list_models,
    select_versions,
    version_dirs,
)
from forseti.core.sealing.keyring import Keyring
from forseti.server.registry.lifecycle import (
    LifecycleHooks,
    ModelLoadFailed,
    Swapped,
    Unloaded,
    VersionLoaded,
    VersionLoadFailed,
    VersionReleased,
)
from forseti.server.registry.loaded_version import LoadedVersion
from forseti.server.registry.routing import (
    LOADING,
    READY,
    UNAVAILABLE,
    ModelEntry,
    RoutingTable,
    VersionStatus,
)
from forseti.server.registry.version_loader import VersionLoader
from forseti.server.stats import VersionStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexItem:
    name: str
    version: str
    state: str
    reason: str


class ModelRegistry:
    """Models of one repository, their loaded versions and their statistics."""

    def __init__(
        self,
        repository: Path,
        keyring: Keyring | None,
        allow_plaintext: bool,
        max_batch_size: int = 4096,
        hooks: LifecycleHooks | None = None,
        max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
    ) -> None:
        self.repository = repository
        self.max_batch_size = max_batch_size
        self.loader = VersionLoader(keyring, allow_plaintext, max_artifact_bytes)
        self.hooks = hooks if hooks is not None else LifecycleHooks()
        self.routing = RoutingTable(self.in_repository)
        # Statistics outlive reloads: a version keeps its counters across swaps.
        self.stats: dict[tuple[str, int], VersionStats] = {}

    # ---- request path -------------------------------------------------------------------

    def route(self, name: str, version: str) -> LoadedVersion:
        """The version a request goes to: the newest ready one when `version` is empty."""
        return self.routing.route(name, version)

    def in_repository(self, name: str) -> bool:
        """The repository has a model folder of this name."""
        if not name or is_hidden(name) or "/" in name or "\x00" in name:
            return False
        try:
            return (self.repository / name).is_dir()
        except OSError:  # e.g. a name longer than the file system allows
            return False

    # ---- loading and swapping -----------------------------------------------------------

    async def load_model(self, name: str, force: bool = False) -> None:
        """Load (or reload) a model's versions by its version policy and swap them in.

        Raises ModelLoadError when anything failed; whatever was live before keeps serving.
        """
        if not self.in_repository(name):
            raise NotFound(f"model '{shown(name)}' is not in the model repository")
        entry = self.routing.entry(name)
        async with entry.lock:
            entry.wanted = True
            await self._load_locked(entry, force)

    async def _read_config(self, entry: ModelEntry) -> tuple[ModelSpec, list[int], str]:
        """The model's checked config, the versions its policy asks for, the config digest."""
        model_dir = self.repository / entry.name
        try:
            config = await asyncio.to_thread(read_model_config, model_dir)
            spec = model_spec(config, entry.name)
            if spec.max_batch_size > self.max_batch_size:
                raise ModelLoadError(
                    f"max_batch_size {spec.max_batch_size} exceeds the server's limit "
                    f"{self.max_batch_size} (--max-batch-size)"
                )
            available = version_dirs(model_dir)
            wanted = select_versions(config.version_policy, list(available))
            if not wanted:
                raise ModelLoadError(
                    "no version folder matches the version_policy"
                    if available
                    else "no version folders"
                )
        except ModelLoadError as exc:
            entry.reason = exc.reason
            log.warning("model load failed", extra={"model": entry.name, "reason": exc.reason})
            await self.hooks.emit(ModelLoadFailed(entry.name, exc.reason))
            raise
        digest = hashlib.sha256(config.SerializeToString(deterministic=True)).hexdigest()
        return spec, wanted, digest

    async def _load_version(
        self, entry: ModelEntry, spec: ModelSpec, v: int, config_digest: str
    ) -> LoadedVersion:
        """Open and build one version; raises ModelLoadError (already reported) on refusal."""
        seen: dict[str, str] = {}
        if v not in entry.versions:
            entry.status[v] = VersionStatus(LOADING)
        try:
            version_dir = self.repository / entry.name / str(v)
            opened = await asyncio.to_thread(
                self.loader.open, spec, version_dir, v, config_digest, seen
            )
            stats = self.stats.setdefault((entry.name, v), VersionStats())
            lv = self.loader.build(spec, v, opened, stats)
        except ModelLoadError as exc:
            entry.status[v] = VersionStatus(UNAVAILABLE, exc.reason)
            log.warning(
                "version load failed",
                extra={"model": entry.name, "version": v, "reason": exc.reason},
            )
            await self.hooks.emit(VersionLoadFailed(entry.name, v, exc.reason, seen.get("sha256")))
            raise
        lv.on_released = self._released
        log.info(
            "version loaded", extra={"model": entry.name, "version": v, "sha256": lv.digest[:16]}
        )
        await self.hooks.emit(VersionLoaded(entry.name, v, lv.digest, opened.key_id, config_digest))
        return lv

    async def _load_locked(self, entry: ModelEntry, force: bool) -> None:
        spec, wanted, config_digest = await self._read_config(entry)
        new_map: dict[int, LoadedVersion] = {}
        failures: dict[int, str] = {}
        for v in wanted:
            existing = entry.versions.get(v)
            if existing is not None and not force:
                current = self.loader.fingerprint(self.repository / entry.name / str(v), spec)
                if existing.fingerprint == (config_digest, current):
                    new_map[v] = existing
                    continue
            try:
                new_map[v] = await self._load_version(entry, spec, v, config_digest)
            except ModelLoadError as exc:
                failures[v] = exc.reason
                if existing is not None:
                    new_map[v] = existing  # the live one keeps serving

        if not new_map:
            # Nothing the policy asks for could be loaded: keep whatever is live.
            new_map = dict(entry.versions)
        before = dict(entry.versions)
        self.routing.swap(entry, new_map)
        if entry.latest is not None:
            log.info("serving", extra={"model": entry.name, "versions": sorted(new_map)})
        if any(before.get(v) is not lv for v, lv in new_map.items()) or set(before) - set(new_map):
            await self.hooks.emit(Swapped(entry.name, _digests(new_map), _digests(before)))
        for v in new_map:
            # A version whose reload failed keeps serving its previous load; say so.
            reason = f"reload failed, previous load serving: {failures[v]}" if v in failures else ""
            entry.status[v] = VersionStatus(READY, reason)
        if failures:
            summary = "; ".join(f"version {v}: {r}" for v, r in sorted(failures.items()))
            entry.reason = summary if not entry.versions else ""
            raise ModelLoadError(summary)
        entry.reason = ""

    def _released(self, lv: LoadedVersion) -> None:
        self.hooks.emit_soon(VersionReleased(lv))

    async def unload_model(self, name: str) -> None:
        """Stop serving every version of a model; running requests finish first."""
        entry = self.routing.models.get(name)
        if entry is None:
            if self.in_repository(name):
                return
            raise NotFound(f"unknown model '{shown(name)}'")
        async with entry.lock:
            entry.wanted = False
            retired = _digests(entry.versions)
            self.routing.swap(entry, {})
            entry.status.clear()
            entry.reason = "unloaded"
            log.info("model unloaded", extra={"model": name})
            await self.hooks.emit(Unloaded(name, retired))

    async def forget_model(self, name: str) -> None:
        """The model's folder left the repository: unload it if served, drop its entry."""
        entry = self.routing.models.get(name)
        if entry is not None and entry.wanted:
            await self.unload_model(name)
        self.routing.forget(name)

    async def load_all(self) -> None:
        """Load every model in the repository; failures are recorded, never fatal."""
        for name in list_models(self.repository):
            with contextlib.suppress(ModelLoadError, NotFound):
                await self.load_model(name)

    def release_all(self) -> None:
        for entry in list(self.routing.models.values()):
            self.routing.swap(entry, {})

    # ---- views --------------------------------------------------------------------------

    def ready(self) -> bool:
        """Strict readiness: every model the server is meant to serve has a ready version."""
        return self.routing.ready()

    def model_names(self) -> list[str]:
        return sorted(self.routing.models)

    def versions_of(self, name: str) -> list[LoadedVersion]:
        """A model's loaded versions, oldest first."""
        return self.routing.versions_of(name)

    def loaded_versions(self) -> tuple[LoadedVersion, ...]:
        """Every loaded version: a snapshot that other threads may walk while the loop swaps."""
        return self.routing.serving

    def index(self, ready_only: bool) -> Iterator[IndexItem]:
        models = self.routing.models
        names = sorted(set(list_models(self.repository)) | set(models))
        for name in names:
            entry = models.get(name)
            if entry is None or (not entry.status and not entry.versions):
                if not ready_only:
                    reason = entry.reason if entry is not None and entry.reason else "unloaded"
                    yield IndexItem(name, "", UNAVAILABLE, reason)
                continue
            for v in sorted(entry.status):
                st = entry.status[v]
                if ready_only and st.state != READY:
                    continue
                yield IndexItem(name, str(v), st.state, st.reason)


def _digests(versions: dict[int, LoadedVersion]) -> dict[str, str]:
    return {str(v): lv.digest for v, lv in sorted(versions.items())}
