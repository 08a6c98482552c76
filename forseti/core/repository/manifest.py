"""The model manifest: what decides what a model serves, authenticated with the keyring.

One sealed record per model, ``<model>/model_manifest.sealed`` (AES-GCM, bound to the model's
name and to the record's role, so it cannot be moved to another model nor pass for an
artifact). It holds:

- ``serial``: increases by one on every change; a server refuses a manifest older than one it
  has already accepted (a replayed copy of an earlier manifest);
- ``config_sha256``: the SHA-256 of ``config.pbtxt``'s bytes; a config changed without the
  key is refused and the live version keeps serving;
- ``versions``: every committed version with the SHA-256 of each of its files' plaintext
  (by plaintext name: resealing to a new key changes no entry); version folders that are not
  listed are never served;
- ``pin``: the versions to serve instead of the config's version_policy, set by
  ``forseti rollback`` and cleared by the next publish.

Writers go through `commit_manifest`: read, change, write back only if nobody changed it
meanwhile (create-if-absent, then replace-if-unchanged on its ETag), retried on conflict, so
two publishers never lose each other's version nor take the same one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.sealed import SealError, open_record, seal_record
from forseti.core.storage import ConflictError, ObjectInfo, Storage, StorageNotFound

log = logging.getLogger(__name__)

MANIFEST_NAME = "model_manifest.sealed"
MANIFEST_FORMAT = "forseti-model-manifest/1"
RECORD_KIND = "model-manifest"
# A manifest is small (a few hundred bytes per version); anything far larger is not one.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
CREATE_HINT = (
    "write it with `forseti seal --keyring KEYRING REPOSITORY` (it authenticates the config "
    "and version folders found there) or publish with `forseti publish`"
)


class ManifestError(Exception):
    """A manifest could not be read, opened, trusted or written; the message says why."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ModelManifest:
    """The authenticated description of what a model may serve."""

    model: str
    serial: int
    config_sha256: str
    versions: dict[int, dict[str, str]] = field(default_factory=dict)
    pin: tuple[int, ...] | None = None
    updated: str = ""
    reason: str = ""  # what wrote this serial: "publish", "seal", "rollback", ...

    def to_bytes(self) -> bytes:
        body = {
            "format": MANIFEST_FORMAT,
            "model": self.model,
            "serial": self.serial,
            "config_sha256": self.config_sha256,
            "versions": {
                str(v): dict(sorted(files.items())) for v, files in sorted(self.versions.items())
            },
            "pin": list(self.pin) if self.pin is not None else None,
            "updated": self.updated,
            "reason": self.reason,
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, model: str) -> ModelManifest:
        try:
            body = json.loads(data)
            if body.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {body.get('format')!r}")
            versions = {
                int(v): {str(n): str(h) for n, h in files.items()}
                for v, files in body["versions"].items()
            }
            pin = body.get("pin")
            manifest = cls(
                model=str(body["model"]),
                serial=int(body["serial"]),
                config_sha256=str(body["config_sha256"]),
                versions=versions,
                pin=tuple(int(v) for v in pin) if pin is not None else None,
                updated=str(body.get("updated", "")),
                reason=str(body.get("reason", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(f"model manifest is malformed ({type(exc).__name__})") from None
        if manifest.model != model:
            raise ManifestError(f"model manifest names model {manifest.model!r}, not {model!r}")
        return manifest

    def next(self, reason: str, **changes: object) -> ModelManifest:
        """The manifest with `changes` applied, one serial later."""
        return replace(self, serial=self.serial + 1, updated=_now(), reason=reason, **changes)  # type: ignore[arg-type]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_manifest(model: str, config_sha256: str, reason: str) -> ModelManifest:
    return ModelManifest(model, 1, config_sha256, {}, None, _now(), reason)


def manifest_key(model: str) -> str:
    return f"{model}/{MANIFEST_NAME}"


def seal_manifest(manifest: ModelManifest, keyring: Keyring) -> bytes:
    return seal_record(manifest.to_bytes(), keyring, kind=RECORD_KIND, name=manifest.model)


def open_manifest(blob: bytes, keyring: Keyring, model: str) -> ModelManifest:
    """Authenticate and parse a sealed manifest; ManifestError says why it is refused."""
    try:
        data = open_record(blob, keyring, kind=RECORD_KIND, name=model)
    except SealError as exc:
        raise ManifestError(f"model manifest refused: {exc.reason}") from None
    return ModelManifest.from_bytes(data, model)


def read_manifest(
    storage: Storage, model: str, keyring: Keyring
) -> tuple[ModelManifest, ObjectInfo] | None:
    """The model's manifest and the object it was read from, or None when there is none."""
    try:
        blob, info = storage.read_object(manifest_key(model), max_bytes=MAX_MANIFEST_BYTES)
    except StorageNotFound:
        return None
    return open_manifest(blob, keyring, model), info


ManifestChange = Callable[[ModelManifest | None], ModelManifest]


def commit_manifest(
    storage: Storage, model: str, keyring: Keyring, change: ManifestChange, attempts: int = 50
) -> ModelManifest:
    """Read the manifest, apply `change`, and write it back only if it was not changed
    meanwhile; on a conflict, read it again and re-apply. Returns what was written."""
    key = manifest_key(model)
    for _ in range(attempts):
        current = read_manifest(storage, model, keyring)
        updated = change(current[0] if current else None)
        blob = seal_manifest(updated, keyring)
        try:
            if current is None:
                storage.create(key, blob)
            else:
                storage.replace(key, blob, current[1].etag)
        except ConflictError:
            log.info("model manifest changed meanwhile; retrying", extra={"model": model})
            continue
        log.info(
            "model manifest written",
            extra={"model": model, "serial": updated.serial, "reason": updated.reason},
        )
        return updated
    raise ManifestError(f"could not update the manifest of {model} after {attempts} tries")


def file_hashes(files: Mapping[str, bytes]) -> dict[str, str]:
    """{plaintext name: sha256} of a version's files."""
    return {name: sha256_hex(data) for name, data in files.items()}


def with_version(
    manifest: ModelManifest | None,
    model: str,
    config_sha256: str,
    version: int,
    hashes: dict[str, str],
    reason: str,
) -> ModelManifest:
    """`manifest` with one more committed version, the given config, and no pin (a new
    version is what the publisher means to serve)."""
    if manifest is None:
        manifest = new_manifest(model, config_sha256, reason)
        return replace(manifest, versions={version: hashes})
    if version in manifest.versions and manifest.versions[version] != hashes:
        raise ManifestError(f"version {version} of {model} is already committed")
    versions = dict(manifest.versions)
    versions[version] = hashes
    if manifest.pin is not None:
        log.info(
            "publishing clears the rollback pin",
            extra={"model": model, "pin": list(manifest.pin), "version": version},
        )
    return manifest.next(reason, config_sha256=config_sha256, versions=versions, pin=None)


def pinned(manifest: ModelManifest, versions: Iterable[int] | None, reason: str) -> ModelManifest:
    """`manifest` pinned to `versions` (None: unpinned, the config's version_policy again)."""
    if versions is None:
        return manifest.next(reason, pin=None)
    chosen = tuple(sorted(set(versions)))
    missing = [v for v in chosen if v not in manifest.versions]
    if missing or not chosen:
        committed = ", ".join(str(v) for v in sorted(manifest.versions)) or "none"
        raise ManifestError(
            f"version {', '.join(map(str, missing)) or '(none)'} of {manifest.model} is not "
            f"committed (committed: {committed})"
        )
    return manifest.next(reason, pin=chosen)
