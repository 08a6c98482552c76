"""Local mode: run the policy in the caller's process, from the sealed repository.

With the keyring and read access to the repository (a folder or an object store),
`LocalPolicy` decides what to serve the way a server does, from the core's shared pieces: one
listing of the model (forseti.core.repository.listing), the authenticated model manifest
(forseti.core.repository.manifest: the config must be the one it authenticates, only versions
it lists count, its pin wins over the version_policy, an older or removed manifest than one
already accepted is refused), the seal (forseti.core.sealing) and the manifest's hash of the
opened file; the model then runs on the server's own backends, which refuse ONNX external
data and check the model against its config. It polls the repository and swaps to a new
version once it is open, keeping the current one if the new one fails.

It answers only what it can answer as the server would: a call that pins another version, or
passes request parameters, or comes before any version is open, goes to the server.

Security trade-off: the key that opens every sealed model now lives in the calling service's
process (its memory, its environment or key file), not only in the servers. Whoever can read
that process can decrypt the models. Use it where the caller is as trusted as the servers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np

from forseti.client.errors import DecisionRejected
from forseti.core.errors import ModelLoadError
from forseti.core.repository.config import (
    CONFIG_FILENAME,
    ModelSpec,
    model_spec,
    parse_config_text,
)
from forseti.core.repository.layout import DEFAULT_MAX_ARTIFACT_BYTES, select_versions
from forseti.core.repository.listing import ModelListing, find_listed_artifact, list_model
from forseti.core.repository.manifest import (
    CREATE_HINT,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    ManifestError,
    ModelManifest,
    open_manifest,
    sha256_hex,
)
from forseti.core.sealing.keyring import FileKeyring, Keyring
from forseti.core.sealing.sealed import SealError, open_sealed
from forseti.core.storage import StorageError, open_storage

if TYPE_CHECKING:
    from forseti.server.backends.base import Backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Loaded:
    version: int
    spec: ModelSpec
    backend: Backend
    state: tuple[object, ...]  # the listing it was loaded from (every object's tag)
    output_names: list[str]


class LocalPolicy:
    """The newest servable version of `model` in `repository`, run in process.

    :param repository: the model repository: a folder, or an object-store URL (`s3://...`).
    :param model: the model's name.
    :param keyring: a Keyring, or the path of a keyring file (re-read when it changes).
    :param poll_s: how often to look for a new version (0: never).
    :param allow_plaintext: also open unsealed models without a manifest (as
        `forseti serve --allow-plaintext`).
    """

    def __init__(
        self,
        repository: str | Path,
        model: str,
        keyring: Keyring | str | Path,
        *,
        poll_s: float = 1.0,
        allow_plaintext: bool = False,
        max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
    ) -> None:
        self.storage = open_storage(repository)
        self.model = model
        self.keyring = keyring if isinstance(keyring, Keyring) else FileKeyring.load_file(keyring)
        self.poll_s = poll_s
        self.allow_plaintext = allow_plaintext
        self.max_artifact_bytes = max_artifact_bytes
        self.accepted_serial = 0  # the newest manifest serial accepted: older ones are refused
        self._loaded: _Loaded | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.refresh()
        if poll_s > 0:
            self._thread = threading.Thread(
                target=self._poll, name=f"forseti-local-{model}", daemon=True
            )
            self._thread.start()

    @property
    def version(self) -> int | None:
        """The version answering now; None before one could be opened."""
        loaded = self._loaded
        return None if loaded is None else loaded.version

    def refresh(self) -> bool:
        """Look at the repository now; open a newer (or changed) version. True when the
        version answering changed. A version that fails to open leaves the current one."""
        current = self._loaded
        try:
            listing = list_model(self.storage, self.model)
            if current is not None and current.state == listing.state():
                return False
            loaded = self._open(listing)
        except (ModelLoadError, StorageError) as exc:
            reason = str(exc)
            if reason != self.last_error:
                log.warning(
                    "local mode cannot open the model; the server answers what it cannot",
                    extra={"model": self.model, "reason": reason},
                )
            self.last_error = reason
            return False
        self.last_error = None
        self._loaded = loaded  # one assignment: a running call keeps the version it started on
        log.info("local mode serving", extra={"model": self.model, "version": loaded.version})
        return current is None or current.version != loaded.version

    def _manifest(self, listing: ModelListing) -> ModelManifest | None:
        """The model's manifest, authenticated (None for a plaintext model, when allowed)."""
        if listing.manifest is None:
            if self.accepted_serial:
                raise ModelLoadError(
                    f"the model manifest ({MANIFEST_NAME}) was removed after serial "
                    f"{self.accepted_serial} was accepted; refused"
                )
            if self.allow_plaintext:
                return None
            raise ModelLoadError(f"no model manifest ({MANIFEST_NAME}); {CREATE_HINT}")
        blob = self.storage.read(listing.manifest.key, max_bytes=MAX_MANIFEST_BYTES)
        try:
            manifest = open_manifest(blob, self.keyring, self.model)
        except ManifestError as exc:
            raise ModelLoadError(str(exc)) from None
        if manifest.serial < self.accepted_serial:
            raise ModelLoadError(
                f"model manifest serial {manifest.serial} is older than serial "
                f"{self.accepted_serial} already accepted; refused"
            )
        return manifest

    def _open(self, listing: ModelListing) -> _Loaded:
        # The server's backends: the same refusal of external data and the same check of the
        # model against its config as on a replica (see the commit that added local mode).
        from forseti.server.backends import create_backend

        if listing.config is None:
            raise ModelLoadError(f"missing {CONFIG_FILENAME} in model folder")
        config_bytes = self.storage.read(listing.config.key, max_bytes=MAX_MANIFEST_BYTES)
        manifest = self._manifest(listing)
        if manifest is not None and sha256_hex(config_bytes) != manifest.config_sha256:
            raise ModelLoadError(
                f"{CONFIG_FILENAME} is not the one the model manifest authenticates; refused"
            )
        try:
            text = config_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelLoadError(f"cannot read {CONFIG_FILENAME}: not UTF-8") from None
        config = parse_config_text(text, self.model)
        spec = model_spec(config, self.model)
        if manifest is not None:
            available = sorted(manifest.versions)
            wanted = (
                list(manifest.pin)
                if manifest.pin is not None
                else select_versions(config.version_policy, available)
            )
        else:
            remote = self.storage.local_root() is None
            available = sorted(
                v for v, vl in listing.versions.items() if vl.committed or not remote
            )
            wanted = select_versions(config.version_policy, available)
        if not wanted:
            raise ModelLoadError("no version to serve")
        version = max(wanted)
        listed = listing.versions.get(version)
        if listed is None:
            raise ModelLoadError(f"version {version} has no folder in the repository")
        info, sealed = find_listed_artifact(
            listed.files, spec.artifact_filename, self.allow_plaintext
        )
        blob = self.storage.read(info.key, max_bytes=self.max_artifact_bytes)
        if sealed:
            try:
                blob = bytes(
                    open_sealed(
                        blob,
                        self.keyring,
                        model=self.model,
                        version=version,
                        filename=spec.artifact_filename,
                    )
                )
            except SealError as exc:
                raise ModelLoadError(f"sealed artifact refused: {exc.reason}") from None
        if manifest is not None:
            want = manifest.versions.get(version, {}).get(spec.artifact_filename)
            if want is None or sha256_hex(blob) != want:
                raise ModelLoadError(
                    f"'{spec.artifact_filename}' of version {version} is not the file the "
                    "model manifest committed; refused"
                )
        backend = create_backend(spec, blob)
        if manifest is not None:
            self.accepted_serial = max(self.accepted_serial, manifest.serial)
        return _Loaded(version, spec, backend, listing.state(), list(spec.outputs))

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
            except Exception:  # a poll must never end the thread
                log.exception("local mode poll failed", extra={"model": self.model})

    def run(
        self, inputs: Mapping[str, np.ndarray], version: str = ""
    ) -> tuple[dict[str, np.ndarray], str] | None:
        """The outputs and version for `inputs`, or None when the server should answer
        instead. Inputs that disagree with the config raise DecisionRejected, as the server
        would answer INVALID_ARGUMENT."""
        loaded = self._loaded
        if loaded is None or (version and version != str(loaded.version)):
            return None
        spec = loaded.spec
        feeds: dict[str, np.ndarray] = {}
        for name, array in inputs.items():
            tensor = spec.inputs.get(name)
            if tensor is None or array.dtype != tensor.ttype.dtype:
                expected = "no such input" if tensor is None else tensor.ttype.name
                raise DecisionRejected(
                    f"input '{name}' does not fit model '{self.model}' ({expected})",
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "local",
                )
            dims = array.shape[1:] if spec.batched else array.shape
            if len(dims) != len(tensor.dims) or any(
                d != -1 and d != got for d, got in zip(tensor.dims, dims, strict=True)
            ):
                raise DecisionRejected(
                    f"input '{name}' has shape {list(array.shape)}, model '{self.model}' "
                    f"expects {tensor.describe(spec.batched)}",
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "local",
                )
            feeds[name] = array
        missing = sorted(
            n
            for n, t in spec.inputs.items()
            if n not in feeds and not getattr(t, "optional", False)
        )
        if missing:
            raise DecisionRejected(
                f"model '{self.model}' needs inputs {missing}",
                grpc.StatusCode.INVALID_ARGUMENT,
                "local",
            )
        backend = loaded.backend
        results = backend.run(feeds, loaded.output_names)
        return dict(zip(loaded.output_names, results, strict=True)), str(loaded.version)

    def close(self) -> None:
        """Stop polling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
