"""The model registry: loads versions by policy and swaps them in atomically.

Every change to the routing table happens on the event-loop thread; the slow parts of a load
(reading, opening the seal, building sessions, warm-up) run in a worker thread through the
version loader, and the new version map replaces the old one in a single assignment once they
are done. Requests hold the version they started on, which drains before it is released.
Observers (the audit log, encoders) hear about every change through the lifecycle hooks.

What a model serves is decided by its config and its version set. In a sealed repository both
are authenticated by the model manifest (forseti.core.repository.manifest): a config whose
hash differs is refused, version folders it does not list are ignored, an older manifest than
one already accepted is refused, and a listed version that vanished keeps serving from memory
rather than letting the model fall back to an older one. A model without a manifest is served
as Triton serves it only with --allow-plaintext.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from forseti.core.errors import ModelLoadError, NotFound, shown
from forseti.core.repository.config import (
    CONFIG_FILENAME,
    ModelSpec,
    model_spec,
    parse_config_text,
)
from forseti.core.repository.layout import (
    DEFAULT_MAX_ARTIFACT_BYTES,
    is_hidden,
    select_versions,
)
from forseti.core.repository.listing import (
    ModelListing,
    VersionListing,
    list_model,
    list_model_names,
)
from forseti.core.repository.manifest import (
    CREATE_HINT,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    ManifestError,
    ModelManifest,
    open_manifest,
    sha256_hex,
)
from forseti.core.sealing.keyring import Keyring
from forseti.core.storage import Storage, StorageError, StorageNotFound, open_storage
from forseti.server.registry.autocomplete import complete_platform, may_complete
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
from forseti.server.registry.version_loader import RepositoryUnavailable, VersionLoader
from forseti.server.stats import VersionStats

log = logging.getLogger(__name__)

# A label file (one class label a line) is read whole; past this it is refused.
MAX_LABEL_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class LoadPlan:
    """What one load works from: the checked config, the versions to serve, and where they
    are (the listing), with the manifest entry of each when the model has a manifest."""

    spec: ModelSpec
    wanted: list[int]
    config_digest: str
    listing: ModelListing
    manifest: ModelManifest | None


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
        repository: Path | str | Storage,
        keyring: Keyring | None,
        allow_plaintext: bool,
        max_batch_size: int = 4096,
        hooks: LifecycleHooks | None = None,
        max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
    ) -> None:
        self.storage = repository if isinstance(repository, Storage) else open_storage(repository)
        # The folder (a Path) or the URL: what logs and audit records name.
        self.repository: Path | str = self.storage.local_root() or self.storage.location
        self.keyring = keyring
        self.allow_plaintext = allow_plaintext
        self.max_batch_size = max_batch_size
        self.loader = VersionLoader(keyring, allow_plaintext, max_artifact_bytes)
        self.hooks = hooks if hooks is not None else LifecycleHooks()
        self.routing = RoutingTable(self.in_repository)
        # Statistics outlive reloads: a version keeps its counters across swaps.
        self.stats: dict[tuple[str, int], VersionStats] = {}
        # The highest manifest serial accepted per model in this process: an older manifest
        # (a copy put back) is refused.
        self.accepted_serial: dict[str, int] = {}
        # Config overrides of explicit loads (Triton's "config" load parameter), by model.
        self.config_overrides: dict[str, mc.ModelConfig] = {}
        self._labels_warned: set[tuple[str, str]] = set()
        self._unlisted_warned: set[tuple[str, int]] = set()
        # A remote repository's model names as last listed (by a poll, a load or an index):
        # what the request path and RepositoryIndex use, so neither waits on the store.
        self._names: frozenset[str] = frozenset()
        # Polls whose listing of the repository failed (forseti_repository_poll_errors).
        self.poll_errors = 0

    # ---- request path -------------------------------------------------------------------

    def route(self, name: str, version: str) -> LoadedVersion:
        """The version a request goes to: the newest ready one when `version` is empty."""
        return self.routing.route(name, version)

    def in_repository(self, name: str) -> bool:
        """The repository has a model folder of this name."""
        if not name or is_hidden(name) or "/" in name or "\x00" in name:
            return False
        root = self.storage.local_root()
        if root is not None:
            try:
                return (root / name).is_dir()
            except OSError:  # e.g. a name longer than the file system allows
                return False
        return name in self._names  # never a request to the store on the event loop

    async def _exists_now(self, name: str) -> bool:
        """in_repository, listing a remote repository again (in a worker thread) when the name
        is not among the last listed: a load must see a model published a moment ago."""
        if self.storage.local_root() is None and name not in self._names:
            try:
                await asyncio.to_thread(self.model_names_in_repository)
            except StorageError as exc:
                raise RepositoryUnavailable(
                    f"cannot read the model repository ({type(exc).__name__})"
                ) from None
        return self.in_repository(name)

    async def refresh_names(self) -> None:
        """List a remote repository's models again, in a worker thread (RepositoryIndex calls
        it); a store that fails leaves the names last listed."""
        if self.storage.local_root() is None:
            try:
                await asyncio.to_thread(self.model_names_in_repository)
            except StorageError as exc:
                log.warning("cannot list the model repository", extra={"detail": str(exc)})

    def remember_names(self, names: list[str]) -> None:
        """The model names a listing of the repository's root found (the poll calls it)."""
        self._names = frozenset(names)

    def model_names_in_repository(self) -> list[str]:
        """Model folders in the repository now (one listing of its root; blocking)."""
        names = list_model_names(self.storage)
        self.remember_names(names)
        return names

    # ---- loading and swapping -----------------------------------------------------------

    async def load_model(
        self,
        name: str,
        force: bool = False,
        listing: ModelListing | None = None,
        config_override: mc.ModelConfig | None = None,
    ) -> None:
        """Load (or reload) a model's versions by its version policy and swap them in.

        `listing` is the poll's listing of the model, when it has one (saves listing again).
        `config_override` (Triton's load with a "config" parameter) replaces the repository's
        config for this load and later reloads, until a load without one.
        Raises ModelLoadError when anything failed; whatever was live before keeps serving.
        """
        if listing is None and not await self._exists_now(name):
            raise NotFound(f"model '{shown(name)}' is not in the model repository")
        if config_override is not None:
            self.config_overrides[name] = config_override
        elif listing is None:
            self.config_overrides.pop(name, None)
        entry = self.routing.entry(name)
        async with entry.lock:
            entry.wanted = True
            await self._load_locked(entry, force, listing)

    def _read_plan(self, name: str, listing: ModelListing | None) -> LoadPlan:
        """List (unless given), read and check the config and the manifest; pick the versions.
        Runs in a worker thread (storage calls block)."""
        try:
            if listing is None:
                listing = list_model(self.storage, name)
            config_bytes = (
                self.storage.read(listing.config.key, max_bytes=MAX_MANIFEST_BYTES)
                if listing.config is not None
                else None
            )
            manifest = self._manifest(name, listing)
            if config_bytes is None:
                if manifest is not None:
                    raise ModelLoadError(f"missing {CONFIG_FILENAME} in model folder")
                # A plaintext model without a config is served from the config completed
                # from the model, as Triton does (auto-complete).
                config_bytes = b""
        except StorageNotFound:
            raise ModelLoadError(
                f"{CONFIG_FILENAME} or {MANIFEST_NAME} vanished while it was read"
            ) from None
        except StorageError as exc:
            log.warning("cannot read the repository", extra={"model": name, "detail": str(exc)})
            raise RepositoryUnavailable(
                f"cannot read the model repository ({type(exc).__name__})"
            ) from None
        if manifest is not None and sha256_hex(config_bytes) != manifest.config_sha256:
            raise ModelLoadError(
                f"{CONFIG_FILENAME} is not the one the model manifest authenticates (changed "
                f"without the key?); refused. To serve it: {CREATE_HINT}"
            )
        try:
            text = config_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelLoadError(f"cannot read {CONFIG_FILENAME}: UnicodeDecodeError") from None
        config = self.config_overrides.get(name) or parse_config_text(text, name)
        complete_platform(
            config,
            [f for v in sorted(listing.versions, reverse=True) for f in listing.versions[v].files],
        )
        spec = model_spec(config, name, complete_later=may_complete(config))
        spec = self._with_labels(name, spec, authenticated_only=manifest is not None)
        if spec.max_batch_size > self.max_batch_size:
            raise ModelLoadError(
                f"max_batch_size {spec.max_batch_size} exceeds the server's limit "
                f"{self.max_batch_size} (--max-batch-size)"
            )
        if manifest is not None:
            self._warn_unlisted(name, listing, manifest)
            available = sorted(manifest.versions)
            if manifest.pin is not None:
                wanted = list(manifest.pin)
            else:
                wanted = select_versions(config.version_policy, available)
        else:
            remote = self.storage.local_root() is None
            available = sorted(
                v for v, vl in listing.versions.items() if vl.committed or not remote
            )
            wanted = select_versions(config.version_policy, available)
        if not wanted:
            raise ModelLoadError(
                "no version folder matches the version_policy"
                if available
                else "no version folders"
            )
        digest = hashlib.sha256(config.SerializeToString(deterministic=True)).hexdigest()
        if manifest is not None:
            self.accepted_serial[name] = max(self.accepted_serial.get(name, 0), manifest.serial)
        return LoadPlan(spec, wanted, digest, listing, manifest)

    def _with_labels(self, name: str, spec: ModelSpec, authenticated_only: bool) -> ModelSpec:
        """The spec with its outputs' class labels (label_filename, in the model folder).

        The model manifest authenticates the config and the versions' files, not label
        files: in a sealed repository (`authenticated_only`) they are not read, so nobody
        without the key can change what a classification answers; it answers value:index."""
        labels: dict[str, tuple[str, ...]] = {}
        for out in spec.outputs.values():
            if not out.label_filename:
                continue
            if authenticated_only:
                if (name, out.label_filename) not in self._labels_warned:
                    self._labels_warned.add((name, out.label_filename))
                    log.warning(
                        "label_filename is not authenticated by the model manifest; "
                        "classification answers value:index without labels",
                        extra={"model": name, "output": out.name},
                    )
                continue
            try:
                data = self.storage.read(f"{name}/{out.label_filename}", max_bytes=MAX_LABEL_BYTES)
                labels[out.name] = tuple(data.decode("utf-8").splitlines())
            except (StorageError, UnicodeDecodeError) as exc:
                raise ModelLoadError(
                    f"output '{out.name}': cannot read label_filename '{out.label_filename}' "
                    f"({type(exc).__name__})"
                ) from None
        return dataclasses.replace(spec, labels=labels) if labels else spec

    def _manifest(self, name: str, listing: ModelListing) -> ModelManifest | None:
        """The model's manifest, authenticated; None for a plaintext model (when allowed)."""
        if listing.manifest is None:
            if name in self.accepted_serial:
                raise ModelLoadError(
                    f"the model manifest ({MANIFEST_NAME}) was removed after serial "
                    f"{self.accepted_serial[name]} was accepted; refused"
                )
            if self.allow_plaintext:
                return None
            missing = f"missing {CONFIG_FILENAME} and " if listing.config is None else ""
            raise ModelLoadError(f"{missing}no model manifest ({MANIFEST_NAME}); {CREATE_HINT}")
        if self.keyring is None:
            raise ModelLoadError(
                f"the model has a sealed manifest ({MANIFEST_NAME}) but the server has no --keyring"
            )
        blob = self.storage.read(listing.manifest.key, max_bytes=MAX_MANIFEST_BYTES)
        try:
            manifest = open_manifest(blob, self.keyring, name)
        except ManifestError as exc:
            raise ModelLoadError(str(exc)) from None
        accepted = self.accepted_serial.get(name, 0)
        if manifest.serial < accepted:
            raise ModelLoadError(
                f"model manifest serial {manifest.serial} is older than serial {accepted} "
                "already accepted (an earlier copy put back?); refused"
            )
        return manifest

    def _warn_unlisted(self, name: str, listing: ModelListing, manifest: ModelManifest) -> None:
        for v in sorted(set(listing.versions) - set(manifest.versions)):
            if (name, v) in self._unlisted_warned:
                continue
            self._unlisted_warned.add((name, v))
            log.warning(
                "version folder not in the model manifest; ignored (being published, or "
                "added without the key)",
                extra={"model": name, "version": v},
            )

    async def _plan(self, entry: ModelEntry, listing: ModelListing | None) -> LoadPlan:
        """The load plan; on refusal the live versions keep serving and say why."""
        try:
            return await asyncio.to_thread(self._read_plan, entry.name, listing)
        except ModelLoadError as exc:
            entry.reason = exc.reason
            for v in entry.versions:
                entry.status[v] = VersionStatus(
                    READY, f"reload refused, this version keeps serving: {exc.reason}"
                )
            log.warning("model load failed", extra={"model": entry.name, "reason": exc.reason})
            await self.hooks.emit(ModelLoadFailed(entry.name, exc.reason))
            raise

    async def _load_version(
        self, entry: ModelEntry, plan: LoadPlan, v: int, listed: VersionListing
    ) -> LoadedVersion:
        """Open and build one version; raises ModelLoadError (already reported) on refusal."""
        seen: dict[str, str] = {}
        spec, config_digest = plan.spec, plan.config_digest
        expected = plan.manifest.versions.get(v) if plan.manifest is not None else None
        if v not in entry.versions:
            entry.status[v] = VersionStatus(LOADING)
        try:
            opened = await asyncio.to_thread(
                self.loader.open, spec, self.storage, listed, v, config_digest, seen, expected
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

    async def _load_locked(
        self, entry: ModelEntry, force: bool, listing: ModelListing | None
    ) -> None:
        plan = await self._plan(entry, listing)
        new_map: dict[int, LoadedVersion] = {}
        failures: dict[int, str] = {}
        unreadable = False  # a version failed because the store could not be read
        for v in plan.wanted:
            existing = entry.versions.get(v)
            listed = plan.listing.versions.get(v)
            if listed is None:
                # Committed but gone from the repository: a failed load like any other, so
                # the loaded copy keeps serving (and says why) and the model never falls back
                # to an older version because of it.
                failures[v] = (
                    "missing artifact: the version is committed in the model manifest but its "
                    "files are not in the repository"
                )
                log.warning(
                    "version load failed",
                    extra={"model": entry.name, "version": v, "reason": failures[v]},
                )
                if existing is not None:
                    new_map[v] = existing
                else:
                    entry.status[v] = VersionStatus(UNAVAILABLE, failures[v])
                continue
            if existing is not None and not force:
                current = self.loader.fingerprint(listed, plan.spec)
                if existing.fingerprint == (plan.config_digest, current):
                    new_map[v] = existing
                    continue
            try:
                new_map[v] = await self._load_version(entry, plan, v, listed)
            except ModelLoadError as exc:
                failures[v] = exc.reason
                unreadable |= isinstance(exc, RepositoryUnavailable)
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
            # An outage is retryable (the poll tries again, a load answers UNAVAILABLE).
            raise RepositoryUnavailable(summary) if unreadable else ModelLoadError(summary)
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
        try:
            names = await asyncio.to_thread(self.model_names_in_repository)
        except StorageError as exc:
            log.error(
                "cannot list the model repository; nothing loaded",
                extra={"repository": str(self.repository), "detail": str(exc)},
            )
            return
        for name in names:
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
        if self.storage.local_root() is not None:
            listed = set(list_model_names(self.storage))
        else:
            listed = set(self._names)  # as last listed: the index never waits on the store
        names = sorted(listed | set(models))
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
