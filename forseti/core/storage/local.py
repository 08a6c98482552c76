"""A repository in a local folder: today's behaviour, behind the storage interface."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from forseti.core.durable import atomic_write, fsync_dir
from forseti.core.storage.base import (
    ConflictError,
    Listing,
    ObjectInfo,
    Storage,
    StorageError,
    StorageNotFound,
    TooLarge,
)

FILE_MODE = 0o640


def _etag(st: os.stat_result) -> str:
    # Every write here is a new file renamed into place, so the inode changes with the bytes.
    return f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"


class LocalStorage(Storage):
    """Keys are paths under `root`; writes are atomic renames; conditional writes hold a lock."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.location = str(self.root)

    def local_root(self) -> Path | None:
        return self.root

    def _path(self, key: str) -> Path:
        parts = key.split("/") if key else []
        if any(p in ("", ".", "..") for p in parts) or "\x00" in key:
            raise StorageError(f"invalid key {key!r}")
        return self.root.joinpath(*parts)

    def list_dir(self, prefix: str) -> Listing:
        listing = Listing()
        try:
            entries = list(os.scandir(self._path(prefix.rstrip("/"))))
        except (FileNotFoundError, NotADirectoryError):
            return listing
        base = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        for e in entries:
            try:
                if e.is_dir():
                    listing.folders.append(e.name)
                elif e.is_file():
                    listing.objects[e.name] = ObjectInfo(base + e.name, *_size_tag(e.stat()))
            except OSError:
                continue  # gone between the scan and the stat
        listing.folders.sort()
        return listing

    def list_all(self, prefix: str) -> list[ObjectInfo]:
        found: list[ObjectInfo] = []
        start = self._path(prefix.rstrip("/"))
        base = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        seen: set[tuple[int, int]] = set()
        # Links are followed (a version folder may be a link, as the server always allowed);
        # a folder reached twice is not walked again, so a link loop ends.
        for dirpath, dirnames, filenames in os.walk(start, followlinks=True):
            try:
                st = os.stat(dirpath)
            except OSError:
                dirnames.clear()
                continue
            if (st.st_dev, st.st_ino) in seen:
                dirnames.clear()
                continue
            seen.add((st.st_dev, st.st_ino))
            dirnames.sort()
            rel = os.path.relpath(dirpath, start)
            head = base if rel == "." else base + rel.replace(os.sep, "/") + "/"
            for name in sorted(filenames):
                try:
                    st = os.stat(os.path.join(dirpath, name), follow_symlinks=True)
                except OSError:
                    continue
                found.append(ObjectInfo(head + name, *_size_tag(st)))
        return sorted(found, key=lambda i: i.key)

    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        return self.read_object(key, max_bytes)[0]

    def read_object(self, key: str, max_bytes: int | None = None) -> tuple[bytes, ObjectInfo]:
        try:
            with open(self._path(key), "rb") as fh:
                st = os.fstat(fh.fileno())
                info = ObjectInfo(key, *_size_tag(st))
                if max_bytes is None:
                    return fh.read(), info
                if st.st_size > max_bytes:
                    raise TooLarge(key, st.st_size, max_bytes)
                blob = fh.read(max_bytes + 1)
        except (FileNotFoundError, NotADirectoryError):
            raise StorageNotFound(f"{key} not found") from None
        except IsADirectoryError:
            raise StorageNotFound(f"{key} is a folder") from None
        except OSError as exc:
            raise StorageError(f"cannot read {key}: {exc.strerror or type(exc).__name__}") from None
        if len(blob) > max_bytes:
            raise TooLarge(key, len(blob), max_bytes)
        return blob, info

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not os.path.isfile(self._path(key)):
            return None
        return ObjectInfo(key, *_size_tag(st))

    def write(self, key: str, data: bytes) -> ObjectInfo:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data, mode=FILE_MODE)
        return self._info(key)

    def create(self, key: str, data: bytes) -> ObjectInfo:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # link() fails when the name exists: the create-if-absent step, atomic.
            os.link(temp, path)
        except FileExistsError:
            raise ConflictError(f"{key} already exists") from None
        finally:
            os.unlink(temp)
        fsync_dir(path.parent)
        return self._info(key)

    def replace(self, key: str, data: bytes, etag: str) -> ObjectInfo:
        path = self._path(key)
        with _locked(path):
            current = self.stat(key)
            if current is None or current.etag != etag:
                raise ConflictError(f"{key} changed since it was read")
            atomic_write(path, data, mode=FILE_MODE)
            return self._info(key)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))

    def _info(self, key: str) -> ObjectInfo:
        info = self.stat(key)
        if info is None:
            raise StorageError(f"{key} vanished right after it was written")
        return info


def _size_tag(st: os.stat_result) -> tuple[int, str]:
    return st.st_size, _etag(st)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the folder holding `path`, held while the block runs (flock on
    the folder itself: no lock file appears among the repository's entries)."""
    try:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise StorageNotFound(f"folder of {path.name} not found") from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
