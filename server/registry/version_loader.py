"""The version loader: read an artifact from the repository's storage (a folder or an object
store) into memory, open its seal there, check it against the model manifest, build the
backend, check it against the config and warm it up; then give it a scheduler.

`open` runs in a worker thread (it is the slow part of a load); `build` runs on the event-loop
thread, because a scheduler may start tasks on the loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass

from forseti.core.errors import ModelLoadError
from forseti.core.repository.config import ModelSpec
from forseti.core.repository.layout import DEFAULT_MAX_ARTIFACT_BYTES
from forseti.core.repository.listing import VersionListing, find_listed_artifact
from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.sealed import SealError, open_sealed_buffer, peek_key_id
from forseti.core.storage import (
    Storage,
    StorageError,
    StorageNotFound,
    StorageUnavailable,
    TooLarge,
)
from forseti.server.backends import create_backend
from forseti.server.backends.base import Backend
from forseti.server.registry.autocomplete import complete_spec
from forseti.server.registry.loaded_version import LoadedVersion
from forseti.server.registry.warmup import warm_up
from forseti.server.scheduler.selection import create_scheduler
from forseti.server.stats import VersionStats

log = logging.getLogger(__name__)


class RepositoryUnavailable(ModelLoadError):
    """The repository's storage could not be read (an object store that errors or times out):
    a retryable failure, not the model's (nothing changed; the next poll or load tries again)."""


@dataclass(frozen=True)
class OpenedVersion:
    backend: Backend
    digest: str  # sha256 of the artifact as stored
    fingerprint: tuple[object, ...]  # (config digest, artifact file identity)
    warm_ns: int  # the slowest warm-up run
    key_id: str | None  # the key that sealed the artifact; None for plaintext
    spec: ModelSpec | None = None  # the config completed from the model (auto-complete)


class VersionLoader:
    """Opens versions of a repository with one keyring."""

    def __init__(
        self,
        keyring: Keyring | None,
        allow_plaintext: bool,
        max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
    ) -> None:
        self.keyring = keyring
        self.allow_plaintext = allow_plaintext
        self.max_artifact_bytes = max_artifact_bytes

    def fingerprint(self, listed: VersionListing | None, spec: ModelSpec) -> tuple[object, ...]:
        """What the artifact in the repository looks like now (tag and size, from the last
        listing); () when it cannot be found."""
        if listed is None:
            return ()
        try:
            info, _ = find_listed_artifact(
                listed.files, spec.artifact_filename, self.allow_plaintext
            )
        except ModelLoadError:
            return ()
        return (info.etag, info.size)

    def open(
        self,
        spec: ModelSpec,
        storage: Storage,
        listed: VersionListing,
        version: int,
        config_digest: str,
        seen: dict[str, str] | None = None,
        expected: dict[str, str] | None = None,
    ) -> OpenedVersion:
        """Read, open, build and warm one version. Runs in a worker thread.

        ``seen`` receives the artifact's SHA-256 as soon as it is read, so a failed load can
        still be audited with the digest of what it refused. ``expected`` is the version's
        entry in the model manifest ({plaintext name: sha256}): the opened artifact must
        match it."""
        try:
            info, sealed = find_listed_artifact(
                listed.files, spec.artifact_filename, self.allow_plaintext
            )
            fingerprint = (config_digest, (info.etag, info.size))
            blob = self._read_bounded(storage, info.key)
            digest = hashlib.sha256(blob).hexdigest()
            if seen is not None:
                seen["sha256"] = digest
            key_id = None
            if sealed:
                with contextlib.suppress(SealError):
                    key_id = peek_key_id(blob)
                model_bytes = self._unseal(blob, spec, version, spec.artifact_filename)
            else:
                model_bytes = blob
            del blob
            # The chunked format opens into a bytearray (no second copy of the plaintext
            # beside the ciphertext); onnxruntime takes only bytes, so convert once the
            # ciphertext is gone: a load never holds the ciphertext and two plaintexts.
            if not isinstance(model_bytes, bytes):
                model_bytes = bytes(model_bytes)
            if expected is not None:
                self._check_manifest(spec, version, model_bytes, expected)
            # Auto-complete (Triton's default) from the authenticated, opened model.
            spec = complete_spec(spec, model_bytes)
            backend = create_backend(spec, model_bytes)
            del model_bytes
            try:
                warm_ns = warm_up(spec, backend)
            except BaseException:
                backend.close()
                raise
            return OpenedVersion(backend, digest, fingerprint, warm_ns, key_id, spec)
        except ModelLoadError:
            raise
        except StorageNotFound:
            raise ModelLoadError(
                "artifact vanished from the repository while it was read"
            ) from None
        except StorageError as exc:
            log.warning("cannot read artifact", extra={"model": spec.name, "detail": str(exc)})
            if isinstance(exc, StorageUnavailable):
                raise RepositoryUnavailable(
                    f"cannot read the model repository ({type(exc).__name__})"
                ) from None
            raise ModelLoadError(f"cannot read artifact: {type(exc).__name__}") from None
        except OSError as exc:
            raise ModelLoadError(
                f"cannot read artifact: {exc.strerror or exc.__class__.__name__}"
            ) from None
        except Exception as exc:
            log.exception("unexpected error loading version", extra={"model": spec.name})
            raise ModelLoadError(f"unexpected error: {exc.__class__.__name__}") from None

    @staticmethod
    def _check_manifest(
        spec: ModelSpec, version: int, model_bytes: bytes, expected: dict[str, str]
    ) -> None:
        want = expected.get(spec.artifact_filename)
        if want is None:
            raise ModelLoadError(
                f"the model manifest lists no '{spec.artifact_filename}' for this version"
            )
        if hashlib.sha256(model_bytes).hexdigest() != want:
            raise ModelLoadError(
                f"'{spec.artifact_filename}' is not the file the model manifest committed "
                "(replaced after publishing?)"
            )

    def _read_bounded(self, storage: Storage, key: str) -> bytes:
        """The artifact's bytes, refused before reading when it is over the limit (and read
        no further than the limit plus one byte if it grows meanwhile)."""
        limit = self.max_artifact_bytes
        try:
            return storage.read(key, max_bytes=limit)
        except TooLarge as exc:
            raise ModelLoadError(
                f"artifact is {exc.size} bytes, over the server's limit of {limit} "
                "(--max-artifact-bytes)"
            ) from None

    def _unseal(
        self, blob: bytes, spec: ModelSpec, version: int, filename: str
    ) -> bytes | bytearray:
        if self.keyring is None:
            raise ModelLoadError("artifact is sealed but the server has no --keyring")
        try:
            return open_sealed_buffer(
                blob, self.keyring, model=spec.name, version=version, filename=filename
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

    @staticmethod
    def build(
        spec: ModelSpec, version: int, opened: OpenedVersion, stats: VersionStats
    ) -> LoadedVersion:
        """The servable version, with its scheduler. On the event-loop thread; closes the
        backend and raises ModelLoadError when the scheduler refuses the config."""
        spec = opened.spec or spec  # the completed config, where auto-complete added to it
        try:
            scheduler = create_scheduler(spec, opened.backend, opened.warm_ns)
        except ModelLoadError:
            opened.backend.close()
            raise
        return LoadedVersion(
            model=spec.name,
            version=version,
            spec=spec,
            backend=opened.backend,
            scheduler=scheduler,
            stats=stats,
            digest=opened.digest,
            fingerprint=opened.fingerprint,
        )
