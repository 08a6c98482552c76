"""Atomic publishing of a new version folder (the repository contract's write side).

Files go into a hidden temporary folder inside the model folder, are flushed, and the folder
is renamed to its version number in one step: a reader never sees half a version, and a
rename onto a number another publisher took fails, so two publishers never share a number.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from forseti.core.repository.layout import version_dirs

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
