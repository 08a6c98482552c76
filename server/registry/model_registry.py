"""The model registry: loads versions by policy and swaps them in atomically.

Every mutation of the routing table happens on the event-loop thread; the slow parts of a
load (reading, opening the seal, building sessions, warm-up) run in a worker thread, and the
new version map replaces the old one in a single assignment once they are done. Requests
hold the version they started on, which drains before it is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from forseti.core.audit import AuditError, AuditLog
from forseti.core.errors import ModelLoadError, NotFound, Unavailable, shown
from forseti.core.repository.config import (
    CONFIG_FILENAME,
    ModelSpec,
    model_spec,
    parameter,
    read_model_config,
)
from forseti.core.repository.layout import (
    find_artifact,
    is_hidden,
    list_models,
    select_versions,
    version_dirs,
)
from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.sealed import SealError, open_sealed, peek_key_id
from forseti.server.backends import create_backend
from forseti.server.backends.base import Backend
from forseti.server.registry.loaded_version import LoadedVersion
from forseti.server.registry.warmup import warm_up
from forseti.server.scheduler.direct import INLINE_BUDGET_NS, DirectScheduler
from forseti.server.scheduler.dynamic_batcher import DynamicBatcher
from forseti.server.stats import VersionStats

log = logging.getLogger(__name__)

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
LOADING = "LOADING"


@dataclass
class VersionStatus:
    state: str
    reason: str = ""


@dataclass(eq=False)
class ModelEntry:
    """One model folder's serving state."""

    name: str
    versions: dict[int, LoadedVersion] = field(default_factory=dict)
    latest: LoadedVersion | None = None
    status: dict[int, VersionStatus] = field(default_factory=dict)
    reason: str = ""  # why the last load of the model as a whole failed
    wanted: bool = False  # the server is meant to serve it (strict readiness)
    disk_state: object = None  # what poll mode last saw on disk
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True)
class IndexItem:
    name: str
    version: str
    state: str
    reason: str


@dataclass(frozen=True)
class _Opened:
    backend: Backend
    digest: str
    fingerprint: tuple
    warm_ns: int
    key_id: str | None  # the key that sealed the artifact; None for plaintext


class ModelRegistry:
    """Models of one repository, their loaded versions and their statistics."""

    def __init__(
        self,
        repository: Path,
        keyring: Keyring | None,
        allow_plaintext: bool,
        max_batch_size: int = 4096,
        audit: AuditLog | None = None,
    ) -> None:
        self.repository = repository
        self.max_batch_size = max_batch_size
        self.audit = audit
        self.keyring = keyring
        self.allow_plaintext = allow_plaintext
        self.models: dict[str, ModelEntry] = {}
        self.stats: dict[tuple[str, int], VersionStats] = {}

    # ---- request path -------------------------------------------------------------------

    def route(self, name: str, version: str) -> LoadedVersion:
        """The version a request goes to: the newest ready one when `version` is empty."""
        entry = self.models.get(name)
        if entry is None:
            if self._in_repository(name):
                raise Unavailable(f"model '{name}' is not loaded")
            raise NotFound(f"unknown model '{shown(name)}'")
        if not version:
            lv = entry.latest
            if lv is None:
                raise Unavailable(f"model '{name}' has no ready version{_why(entry.reason)}")
            return lv
        if not (version.isascii() and version.isdigit()) or len(version) > 18:
            raise NotFound(f"model '{name}' has no version '{shown(version)}'")
        number = int(version)
        lv = entry.versions.get(number)
        if lv is None:
            status = entry.status.get(number)
            if status is not None:
                raise Unavailable(f"model '{name}' version {number} is not ready ({status.state})")
            raise NotFound(f"model '{name}' has no version {number}")
        return lv

    def _in_repository(self, name: str) -> bool:
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
        if not self._in_repository(name):
            raise NotFound(f"model '{shown(name)}' is not in the model repository")
        entry = self.models.get(name)
        if entry is None:
            entry = self.models[name] = ModelEntry(name)
        async with entry.lock:
            entry.wanted = True
            await self._load_locked(entry, force)

    async def _load_locked(self, entry: ModelEntry, force: bool) -> None:
        name = entry.name
        model_dir = self.repository / name
        try:
            config = await asyncio.to_thread(read_model_config, model_dir)
            spec = model_spec(config, name)
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
            log.warning("model load failed", extra={"model": name, "reason": exc.reason})
            await self.audit_event("model.load_failed", model=name, reason=exc.reason)
            raise
        config_digest = hashlib.sha256(config.SerializeToString(deterministic=True)).hexdigest()

        new_map: dict[int, LoadedVersion] = {}
        failures: dict[int, str] = {}
        for v in wanted:
            existing = entry.versions.get(v)
            if existing is not None and not force:
                current = _artifact_fingerprint(model_dir / str(v), spec, self.allow_plaintext)
                if existing.fingerprint == (config_digest, current):
                    new_map[v] = existing
                    continue
            if existing is None:
                entry.status[v] = VersionStatus(LOADING)
            seen: dict[str, str] = {}
            try:
                opened = await asyncio.to_thread(
                    self._open_version, spec, model_dir / str(v), v, config_digest, seen
                )
            except ModelLoadError as exc:
                failures[v] = exc.reason
                entry.status[v] = VersionStatus(UNAVAILABLE, exc.reason)
                log.warning(
                    "version load failed",
                    extra={"model": name, "version": v, "reason": exc.reason},
                )
                await self.audit_event(
                    "model.version_load_failed",
                    model=name,
                    version=v,
                    reason=exc.reason,
                    sha256=seen.get("sha256"),
                )
                if existing is not None:
                    new_map[v] = existing  # the live one keeps serving
                continue
            stats = self.stats.setdefault((name, v), VersionStats())
            try:
                batcher = (
                    DynamicBatcher(spec, opened.backend, stats)
                    if spec.config.HasField("dynamic_batching")
                    else None
                )
            except ModelLoadError as exc:
                opened.backend.close()
                failures[v] = exc.reason
                entry.status[v] = VersionStatus(UNAVAILABLE, exc.reason)
                if existing is not None:
                    new_map[v] = existing
                continue
            new_map[v] = LoadedVersion(
                model=name,
                version=v,
                spec=spec,
                backend=opened.backend,
                scheduler=DirectScheduler(
                    opened.backend,
                    name,
                    batcher is None and _runs_inline(spec, opened.backend, opened.warm_ns),
                ),
                stats=stats,
                digest=opened.digest,
                fingerprint=opened.fingerprint,
                batcher=batcher,
            )
            log.info(
                "version loaded",
                extra={"model": name, "version": v, "sha256": opened.digest[:16]},
            )
            await self.audit_event(
                "model.version_loaded",
                model=name,
                version=v,
                sha256=opened.digest,
                sealed=opened.key_id is not None,
                key_id=opened.key_id,
                config_sha256=config_digest,
            )

        if not new_map:
            # Nothing the policy asks for could be loaded: keep whatever is live.
            new_map = dict(entry.versions)
        before = dict(entry.versions)
        self._swap(entry, new_map)
        if any(before.get(v) is not lv for v, lv in new_map.items()) or set(before) - set(new_map):
            await self.audit_event(
                "model.swap",
                model=name,
                serving={str(v): lv.digest for v, lv in sorted(new_map.items())},
                previous={str(v): lv.digest for v, lv in sorted(before.items())},
            )
        for v in new_map:
            # A version whose reload failed keeps serving its previous load; say so.
            reason = f"reload failed, previous load serving: {failures[v]}" if v in failures else ""
            entry.status[v] = VersionStatus(READY, reason)
        if failures:
            summary = "; ".join(f"version {v}: {r}" for v, r in sorted(failures.items()))
            entry.reason = summary if not entry.versions else ""
            raise ModelLoadError(summary)
        entry.reason = ""

    def _swap(self, entry: ModelEntry, new_map: dict[int, LoadedVersion]) -> None:
        old = entry.versions
        entry.versions = new_map
        entry.latest = new_map[max(new_map)] if new_map else None
        for v, lv in old.items():
            if new_map.get(v) is not lv:
                lv.retire()
                if v not in new_map:
                    entry.status.pop(v, None)
        if entry.latest is not None:
            log.info(
                "serving",
                extra={"model": entry.name, "versions": sorted(new_map)},
            )

    def _open_version(
        self,
        spec: ModelSpec,
        version_dir: Path,
        version: int,
        config_digest: str,
        seen: dict[str, str] | None = None,
    ) -> _Opened:
        """Read, open, build and warm one version. Runs in a worker thread.

        ``seen`` receives the artifact's SHA-256 as soon as it is read, so a failed load can
        still be audited with the digest of what it refused."""
        try:
            artifact = find_artifact(version_dir, spec.artifact_filename, self.allow_plaintext)
            fingerprint = (config_digest, artifact.fingerprint())
            blob = artifact.path.read_bytes()
            digest = hashlib.sha256(blob).hexdigest()
            if seen is not None:
                seen["sha256"] = digest
            key_id = None
            if artifact.sealed:
                with contextlib.suppress(SealError):
                    key_id = peek_key_id(blob)
                if self.keyring is None:
                    raise ModelLoadError("artifact is sealed but the server has no --keyring")
                try:
                    model_bytes = open_sealed(
                        blob,
                        self.keyring,
                        model=spec.name,
                        version=version,
                        filename=artifact.filename,
                    )
                except SealError as exc:
                    # The detail (key id, format) is for the operator; clients see the reason.
                    log.warning(
                        "sealed artifact refused",
                        extra={
                            "model": spec.name,
                            "version": version,
                            "reason": exc.reason,
                            "detail": exc.detail or "",
                        },
                    )
                    raise ModelLoadError(f"sealed artifact refused: {exc.reason}") from None
            else:
                model_bytes = blob
            del blob
            backend = create_backend(spec, model_bytes)
            del model_bytes
            try:
                warm_ns = warm_up(spec, backend)
            except BaseException:
                backend.close()
                raise
            return _Opened(backend, digest, fingerprint, warm_ns, key_id)
        except ModelLoadError:
            raise
        except OSError as exc:
            raise ModelLoadError(
                f"cannot read artifact: {exc.strerror or exc.__class__.__name__}"
            ) from None
        except Exception as exc:
            log.exception("unexpected error loading version", extra={"model": spec.name})
            raise ModelLoadError(f"unexpected error: {exc.__class__.__name__}") from None

    async def unload_model(self, name: str) -> None:
        """Stop serving every version of a model; running requests finish first."""
        entry = self.models.get(name)
        if entry is None:
            if self._in_repository(name):
                return
            raise NotFound(f"unknown model '{shown(name)}'")
        async with entry.lock:
            entry.wanted = False
            retired = {str(v): lv.digest for v, lv in sorted(entry.versions.items())}
            self._swap(entry, {})
            entry.status.clear()
            entry.reason = "unloaded"
            log.info("model unloaded", extra={"model": name})
            await self.audit_event("model.unload", model=name, previous=retired)

    async def load_all(self) -> None:
        """Load every model in the repository; failures are recorded, never fatal."""
        for name in list_models(self.repository):
            with contextlib.suppress(ModelLoadError, NotFound):
                await self.load_model(name)

    async def poll_once(self) -> None:
        """Poll mode: reload models whose folder changed, unload removed ones."""
        names = list_models(self.repository)
        for name in names:
            state = await asyncio.to_thread(_disk_state, self.repository / name)
            entry = self.models.get(name)
            if entry is not None and entry.disk_state == state:
                continue
            if entry is None:
                entry = self.models[name] = ModelEntry(name)
            entry.disk_state = state
            with contextlib.suppress(ModelLoadError, NotFound):
                await self.load_model(name)
        for name in set(self.models) - set(names):
            if self.models[name].wanted:
                await self.unload_model(name)
            self.models.pop(name, None)

    async def audit_event(self, event: str, **fields: object) -> None:
        """Record an event in the audit log, if there is one. A failed write is logged, not
        raised: the change it describes has already happened and must not be reported as
        failed to the caller."""
        if self.audit is None:
            return
        try:
            await self.audit.arecord(event, **fields)
        except AuditError as exc:
            log.error("audit write failed", extra={"event": event, "error": str(exc)})

    def release_all(self) -> None:
        for entry in self.models.values():
            self._swap(entry, {})

    # ---- views --------------------------------------------------------------------------

    def ready(self) -> bool:
        """Strict readiness: every model the server is meant to serve has a ready version."""
        return all(e.latest is not None for e in self.models.values() if e.wanted)

    def index(self, ready_only: bool) -> Iterator[IndexItem]:
        names = sorted(set(list_models(self.repository)) | set(self.models))
        for name in names:
            entry = self.models.get(name)
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

    def loaded_versions(self) -> Iterator[LoadedVersion]:
        for entry in self.models.values():
            yield from entry.versions.values()


def _runs_inline(spec: ModelSpec, backend: Backend, warm_ns: int) -> bool:
    """Inline on the event loop for a fast single-instance model, unless the config says."""
    choice = parameter(spec.config, "forseti.execution", "auto")
    if choice == "inline":
        return True
    if choice == "threaded":
        return False
    return backend.instance_count == 1 and warm_ns < INLINE_BUDGET_NS


def _why(reason: str) -> str:
    return f": {reason}" if reason else ""


def _artifact_fingerprint(version_dir: Path, spec: ModelSpec, allow_plaintext: bool) -> tuple:
    try:
        return find_artifact(version_dir, spec.artifact_filename, allow_plaintext).fingerprint()
    except (ModelLoadError, OSError):
        return ()


def _disk_state(model_dir: Path) -> tuple:
    """What poll mode compares: the config file and every version folder's files."""
    items: list[tuple] = []
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
