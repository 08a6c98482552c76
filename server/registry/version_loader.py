"""The version loader: read an artifact, open its seal in memory, build the backend, check it
against the config and warm it up; then give it a scheduler.

`open` runs in a worker thread (it is the slow part of a load); `build` runs on the event-loop
thread, because a scheduler may start tasks on the loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from forseti.core.errors import ModelLoadError
from forseti.core.repository.config import ModelSpec
from forseti.core.repository.layout import DEFAULT_MAX_ARTIFACT_BYTES, find_artifact
from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.sealed import SealError, open_sealed, peek_key_id
from forseti.server.backends import create_backend
from forseti.server.backends.base import Backend
from forseti.server.registry.loaded_version import LoadedVersion
from forseti.server.registry.warmup import warm_up
from forseti.server.scheduler.selection import create_scheduler
from forseti.server.stats import VersionStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenedVersion:
    backend: Backend
    digest: str  # sha256 of the artifact as stored
    fingerprint: tuple[object, ...]  # (config digest, artifact file identity)
    warm_ns: int  # the slowest warm-up run
    key_id: str | None  # the key that sealed the artifact; None for plaintext


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

    def fingerprint(self, version_dir: Path, spec: ModelSpec) -> tuple[object, ...]:
        """What the artifact on disk looks like now; () when it cannot be found."""
        try:
            return find_artifact(
                version_dir, spec.artifact_filename, self.allow_plaintext
            ).fingerprint()
        except (ModelLoadError, OSError):
            return ()

    def open(
        self,
        spec: ModelSpec,
        version_dir: Path,
        version: int,
        config_digest: str,
        seen: dict[str, str] | None = None,
    ) -> OpenedVersion:
        """Read, open, build and warm one version. Runs in a worker thread.

        ``seen`` receives the artifact's SHA-256 as soon as it is read, so a failed load can
        still be audited with the digest of what it refused."""
        try:
            artifact = find_artifact(version_dir, spec.artifact_filename, self.allow_plaintext)
            fingerprint = (config_digest, artifact.fingerprint())
            blob = self._read_bounded(artifact.path)
            digest = hashlib.sha256(blob).hexdigest()
            if seen is not None:
                seen["sha256"] = digest
            key_id = None
            if artifact.sealed:
                with contextlib.suppress(SealError):
                    key_id = peek_key_id(blob)
                model_bytes = self._unseal(blob, spec, version, artifact.filename)
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
            return OpenedVersion(backend, digest, fingerprint, warm_ns, key_id)
        except ModelLoadError:
            raise
        except OSError as exc:
            raise ModelLoadError(
                f"cannot read artifact: {exc.strerror or exc.__class__.__name__}"
            ) from None
        except Exception as exc:
            log.exception("unexpected error loading version", extra={"model": spec.name})
            raise ModelLoadError(f"unexpected error: {exc.__class__.__name__}") from None

    def _read_bounded(self, path: Path) -> bytes:
        """The artifact's bytes, refused before reading when the file is over the limit (and
        read no further than the limit plus one byte if it grows meanwhile)."""
        limit = self.max_artifact_bytes
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > limit:
                raise ModelLoadError(
                    f"artifact is {size} bytes, over the server's limit of {limit} "
                    "(--max-artifact-bytes)"
                )
            blob = fh.read(limit + 1)
        if len(blob) > limit:
            raise ModelLoadError(
                f"artifact grew past the server's limit of {limit} bytes while it was read "
                "(--max-artifact-bytes)"
            )
        return blob

    def _unseal(self, blob: bytes, spec: ModelSpec, version: int, filename: str) -> bytes:
        if self.keyring is None:
            raise ModelLoadError("artifact is sealed but the server has no --keyring")
        try:
            return open_sealed(
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
