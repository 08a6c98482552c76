"""Atomic publishing of a new version (the repository contract's write side).

On a folder, files go into a hidden temporary folder inside the model folder, are flushed,
and the folder is renamed to its version number in one step: a reader never sees half a
version, and a rename onto a number another publisher took fails, so two publishers never
share a number. On an object store, where there is no rename, the number is claimed with a
create-if-absent object, the files are written, and a commit marker is written last. In a
sealed repository the model manifest's update (a conditional replace) is the commit: a
version it does not list is never served.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from forseti.core.repository.config import CONFIG_FILENAME
from forseti.core.repository.layout import version_dirs
from forseti.core.repository.listing import CLAIM_NAME, COMMIT_NAME, list_model
from forseti.core.repository.manifest import (
    MAX_MANIFEST_BYTES,
    ModelManifest,
    commit_manifest,
    file_hashes,
    read_manifest,
    sha256_hex,
    with_version,
)
from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.sealed import SEALED_SUFFIX, seal_bytes
from forseti.core.storage import ConflictError, Storage, StorageNotFound

log = logging.getLogger(__name__)

TEMP_PREFIX = ".publish-"

# Given the version number being claimed, return {file name: bytes}. Called again with the
# next number if another publisher took this one, because seals bind the version number.
FileMaker = Callable[[int], dict[str, bytes]]


class PublishError(Exception):
    """Publishing failed; nothing was made visible."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(model_dir: Path, files: dict[str, bytes]) -> Path:
    temp = model_dir / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
    os.mkdir(temp, 0o750)
    try:
        for name, data in files.items():
            if "/" in name or name.startswith("."):
                raise PublishError(f"invalid file name '{name}' for a version folder")
            fd = os.open(temp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(temp)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return temp


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def publish_version(
    model_dir: Path, make_files: FileMaker, version: int | None = None, attempts: int = 100
) -> int:
    """Publish the next version (or exactly `version`) of a model; returns its number."""
    if not model_dir.is_dir():
        raise PublishError(f"model folder {model_dir} does not exist")
    for _ in range(attempts):
        number = version if version is not None else max(version_dirs(model_dir), default=0) + 1
        temp = _write_temp(model_dir, make_files(number))
        target = model_dir / str(number)
        try:
            if target.exists():
                raise FileExistsError(errno.EEXIST, "version exists", str(target))
            os.rename(temp, target)
        except OSError as exc:
            shutil.rmtree(temp, ignore_errors=True)
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise PublishError(f"cannot publish {target}: {exc.strerror}") from None
            if version is not None:
                raise PublishError(
                    f"version {version} of {model_dir.name} already exists"
                ) from None
            continue
        _fsync_dir(model_dir)
        log.info("version published", extra={"model": model_dir.name, "version": number})
        return number
    raise PublishError(f"could not claim a version number in {model_dir} after {attempts} tries")


# ---- publishing through the storage interface (folder or object store), with the manifest ----


@dataclass(frozen=True)
class Published:
    """A published version; `serial` is the model manifest's serial that committed it (None for
    a plaintext repository, where the rename or the commit marker commits)."""

    model: str
    version: int
    serial: int | None


def _claim_body() -> bytes:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()


def publish_objects(
    storage: Storage,
    model: str,
    make_files: FileMaker,
    version: int | None = None,
    taken: set[int] | None = None,
    attempts: int = 100,
) -> int:
    """Object store: claim the number under the prefix `model` (create-if-absent), write the
    files, then the commit marker; returns the number. A claim is never reused, so two
    publishers never write into the same folder. (Checkpoints use it too.)"""
    taken = set() if taken is None else taken
    for _ in range(attempts):
        listing = list_model(storage, model)
        number = (
            version if version is not None else max(set(listing.versions) | taken, default=0) + 1
        )
        try:
            storage.create(f"{model}/{number}/{CLAIM_NAME}", _claim_body())
        except ConflictError:
            if version is not None:
                raise PublishError(f"version {version} of {model} already exists") from None
            taken.add(number)
            continue
        for name, data in make_files(number).items():
            if "/" in name or name.startswith("."):
                raise PublishError(f"invalid file name '{name}' for a version folder")
            storage.write(f"{model}/{number}/{name}", data)
        storage.write(f"{model}/{number}/{COMMIT_NAME}", _claim_body())
        return number
    raise PublishError(f"could not claim a version number of {model} after {attempts} tries")


def _config_for_publish(
    storage: Storage,
    model: str,
    config_text: bytes | None,
    manifest: ModelManifest | None,
    adopt_config: bool,
) -> bytes:
    """The config the new version is published with (written when given and different)."""
    key = f"{model}/{CONFIG_FILENAME}"
    try:
        current: bytes | None = storage.read(key, max_bytes=MAX_MANIFEST_BYTES)
    except StorageNotFound:
        current = None
    if config_text is not None:
        if current != config_text:
            storage.write(key, config_text)
        return config_text
    if current is None:
        raise PublishError(f"{model} has no {CONFIG_FILENAME}; pass the config to publish with")
    if manifest is not None and not adopt_config and sha256_hex(current) != manifest.config_sha256:
        raise PublishError(
            f"{CONFIG_FILENAME} of {model} is not the one its manifest authenticates (changed "
            "without the key?); pass --config FILE to publish a config deliberately"
        )
    return current


def publish_model_version(
    storage: Storage,
    model: str,
    artifacts: Mapping[str, bytes],
    *,
    keyring: Keyring | None,
    config_text: str | bytes | None = None,
    extra_files: Mapping[str, bytes] | Callable[[int], Mapping[str, bytes]] | None = None,
    adopt_config: bool = False,
    version: int | None = None,
) -> Published:
    """Publish `artifacts` (plaintext, by file name) as the next version of `model`.

    With a keyring each artifact is sealed bound to the number claimed, and the model manifest
    is updated last: that update is the commit (a conditional replace, retried on conflict).
    Without one (a plaintext repository) the files are written as they are and the rename (a
    folder) or the commit marker (an object store) commits. `extra_files` (e.g. the trainer's
    manifest.json: no secret in it; or a function of the version number that gives them) are
    written unsealed and their hashes committed too.
    `adopt_config` authenticates whatever config.pbtxt is there now (the test builders).
    """
    if not model or "/" in model or model.startswith("."):
        raise PublishError(f"invalid model name {model!r}")
    config_bytes = config_text.encode() if isinstance(config_text, str) else config_text
    fixed_extra = {} if extra_files is None or callable(extra_files) else dict(extra_files)

    def extras(number: int) -> Mapping[str, bytes]:
        return extra_files(number) if callable(extra_files) else fixed_extra

    current = read_manifest(storage, model, keyring) if keyring is not None else None
    config = _config_for_publish(
        storage, model, config_bytes, current[0] if current else None, adopt_config
    )
    plain_hashes = file_hashes(artifacts)
    hashes_by_number: dict[int, dict[str, str]] = {}

    def make_files(number: int) -> dict[str, bytes]:
        extra = dict(extras(number))
        sealed_names = {n + SEALED_SUFFIX for n in artifacts} if keyring else set(artifacts)
        if set(extra) & sealed_names:
            raise PublishError(f"file names given twice: {sorted(set(extra) & sealed_names)}")
        hashes_by_number[number] = {**plain_hashes, **file_hashes(extra)}
        if keyring is None:
            files = dict(artifacts)
        else:
            files = {
                name + SEALED_SUFFIX: seal_bytes(
                    data, keyring, model=model, version=number, filename=name
                )
                for name, data in artifacts.items()
            }
        files.update(extra)
        return files

    root = storage.local_root()
    if root is not None:
        (root / model).mkdir(parents=True, exist_ok=True)
        number = publish_version(root / model, make_files, version=version)
    else:
        taken = set(current[0].versions) if current else set()
        number = publish_objects(storage, model, make_files, version, taken)
    if keyring is None:
        return Published(model, number, None)
    config_sha = sha256_hex(config)
    written = commit_manifest(
        storage,
        model,
        keyring,
        lambda m: with_version(m, model, config_sha, number, hashes_by_number[number], "publish"),
    )
    log.info(
        "version committed",
        extra={"model": model, "version": number, "serial": written.serial},
    )
    return Published(model, number, written.serial)
