"""Durable file writes: a reader sees the old file or the whole new one, and a completed write
survives a crash (file and directory entry fsynced)."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(directory: Path) -> None:
    """Persist a directory's entries (a rename, a new file); a filesystem that refuses to fsync
    a directory is not an error."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(
    path: Path, *, mode: int = 0o600, verify: Callable[[Path], None] | None = None
) -> Iterator[BinaryIO]:
    """Stream into ``path`` through a hidden temp file; fsync and rename on success only.

    The temp file is created with ``mode`` by os.open itself, so it is never wider than that,
    not even briefly; on an exception it is removed. ``verify`` gets the complete, fsynced temp
    file before the rename and raises to keep it from replacing ``path``.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            # The umask may have narrowed ``mode``; set it exactly (never wider than asked).
            os.fchmod(fh.fileno(), mode)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if verify is not None:
            verify(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically and durably (see atomic_output)."""
    with atomic_output(path, mode=mode) as fh:
        fh.write(data)
