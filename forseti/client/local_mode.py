"""Local mode: run the policy in the caller's process, from the sealed repository.

With the keyring and read access to the repository, `LocalPolicy` opens the newest version of
a model the way a server does (the config through forseti.core.repository, the seal through
forseti.core.sealing, the model through the server's own backends, which refuse ONNX external
data and check the model against its config), and polls the repository for a newer version,
swapping to it once it is open and warmed, keeping the old one if it fails.

It answers only what it can answer as the server would: a call that pins another version, or
passes request parameters, or comes before any version is open, goes to the server.

Security trade-off: the key that opens every sealed model now lives in the calling service's
process (its memory, its environment or key file), not only in the servers. Whoever can read
that process can decrypt the models. Use it where the caller is as trusted as the servers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np

from forseti.client.errors import DecisionRejected
from forseti.core.errors import ModelLoadError
from forseti.core.repository.config import ModelSpec, model_spec, read_model_config
from forseti.core.repository.layout import (
    DEFAULT_MAX_ARTIFACT_BYTES,
    find_artifact,
    select_versions,
    version_dirs,
)
from forseti.core.sealing.keyring import FileKeyring, Keyring
from forseti.core.sealing.sealed import SealError, open_sealed

if TYPE_CHECKING:
    from forseti.server.backends.base import Backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Loaded:
    version: int
    spec: ModelSpec
    backend: Backend
    state: tuple[object, ...]  # what the repository looked like when it was loaded
    output_names: list[str]


def _files(folder: Path) -> tuple[tuple[str, int, int], ...]:
    found = []
    for entry in os.scandir(folder):
        if entry.is_file():
            st = entry.stat()
            found.append((entry.name, st.st_size, st.st_mtime_ns))
    return tuple(sorted(found))


def _repository_state(model_dir: Path) -> tuple[object, ...]:
    """A cheap picture of what would be loaded: the files of the model folder (its config,
    and any record beside it) and of every version folder, by name, size and time. A change
    means: look again."""
    try:
        top = _files(model_dir)
    except OSError:
        return ()
    folders = []
    for number, path in sorted(version_dirs(model_dir).items()):
        with contextlib.suppress(OSError):
            folders.append((number, _files(path)))
    return (top, tuple(folders))


class LocalPolicy:
    """The newest version of `model` in `repository`, run in process with onnxruntime.

    :param repository: the model repository (Triton layout, sealed artifacts).
    :param model: the model folder's name.
    :param keyring: a Keyring, or the path of a keyring file (re-read when it changes).
    :param poll_s: how often to look for a new version (0: never).
    :param allow_plaintext: also open unsealed artifacts (as `forseti serve --allow-plaintext`).
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
        self.model_dir = Path(repository) / model
        self.model = model
        self.keyring = keyring if isinstance(keyring, Keyring) else FileKeyring.load_file(keyring)
        self.poll_s = poll_s
        self.allow_plaintext = allow_plaintext
        self.max_artifact_bytes = max_artifact_bytes
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
        state = _repository_state(self.model_dir)
        current = self._loaded
        if current is not None and current.state == state:
            return False
        try:
            loaded = self._open(state)
        except ModelLoadError as exc:
            if str(exc) != self.last_error:
                log.warning(
                    "local mode cannot open the model; the server answers",
                    extra={"model": self.model, "reason": str(exc)},
                )
            self.last_error = str(exc)
            return False
        self.last_error = None
        self._loaded = loaded  # one assignment: a running call keeps the version it started on
        log.info("local mode serving", extra={"model": self.model, "version": loaded.version})
        return current is None or current.version != loaded.version

    def _open(self, state: tuple[object, ...]) -> _Loaded:
        # The server's backends: the same refusal of external data and the same check of the
        # model against its config as on a replica (see the commit that added local mode).
        from forseti.server.backends import create_backend

        spec = model_spec(read_model_config(self.model_dir), self.model)
        dirs = version_dirs(self.model_dir)
        chosen = select_versions(spec.config.version_policy, list(dirs))
        if not chosen:
            raise ModelLoadError("no version to serve")
        version = chosen[-1]
        artifact = find_artifact(dirs[version], spec.artifact_filename, self.allow_plaintext)
        blob = self._read(artifact.path)
        if artifact.sealed:
            try:
                blob = open_sealed(
                    blob,
                    self.keyring,
                    model=self.model,
                    version=version,
                    filename=artifact.filename,
                )
            except SealError as exc:
                raise ModelLoadError(f"sealed artifact refused: {exc.reason}") from None
        backend = create_backend(spec, blob)
        return _Loaded(version, spec, backend, state, list(spec.outputs))

    def _read(self, path: Path) -> bytes:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > self.max_artifact_bytes:
                raise ModelLoadError(f"artifact is {size} bytes, over {self.max_artifact_bytes}")
            return fh.read(self.max_artifact_bytes + 1)

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
