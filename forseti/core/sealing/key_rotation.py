"""Key rotation: add a key, find which sealed files still need a key, retire a key safely.

The cycle is ``rotate`` (the new key seals, every key still opens), ``forseti reseal`` (every
artifact moves to the newest key, one file at a time), then ``retire`` (drops an old key, but
only once no sealed file under the given folders names it).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .keyring import Key, Keyring, KeyringError
from .sealed import MAGIC, SEALED_SUFFIX, SealError, parse_header

logger = logging.getLogger(__name__)

# `forseti keys rotate|retire` hold an exclusive flock on this file beside the keyring while
# they read and rewrite it (the keyring itself is replaced by rename, so it cannot hold one).
LOCK_SUFFIX = ".lock"

# Every seal format's header fits: magic, format byte, id length, a 255-byte id, 12 bytes.
_HEADER_READ = len(MAGIC) + 2 + 255 + 12


@dataclass(frozen=True)
class SealedFile:
    """One sealed file found under a scanned folder, with the key its header names."""

    root: Path
    path: Path
    key_id: str
    format_version: int

    @property
    def relative(self) -> str:
        return str(self.path.relative_to(self.root))


@dataclass
class KeyUsage:
    """Which key each sealed file under some folders needs, and files that could not be read."""

    files: list[SealedFile] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # "path: why" (blocks a retire)
    malformed: list[str] = field(default_factory=list)  # "path: why" (opens with no key)

    def needing(self, key_id: str) -> list[SealedFile]:
        return [f for f in self.files if f.key_id == key_id]

    def counts(self) -> dict[str, int]:
        """Sealed files per key id."""
        out: dict[str, int] = {}
        for f in self.files:
            out[f.key_id] = out.get(f.key_id, 0) + 1
        return out


class KeyInUseError(KeyringError):
    """A key cannot be retired: sealed files still need it, or their keys are unknown."""


class KeyringLockedError(KeyringError):
    """Another keys command holds the keyring's lock."""


def lock_path(keyring_path: Path) -> Path:
    """The lock file of a keyring: ``keyring.json`` -> ``keyring.json.lock`` beside it."""
    return keyring_path.with_name(keyring_path.name + LOCK_SUFFIX)


@contextlib.contextmanager
def keyring_lock(keyring_path: Path) -> Iterator[None]:
    """Hold the keyring's exclusive lock, or raise KeyringLockedError at once.

    Two rotations at once would each add a key to the file they read and the second rename
    would drop the first one's key (which may already have sealed artifacts); a retire racing
    a rotation could likewise write back a keyring without the new key. Not waiting: the
    other command may be an operator's, and the message says what to do. The lock file is
    left in place (removing it would let a third command lock a different file)."""
    path = lock_path(Path(keyring_path))
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise KeyringError(f"cannot open the keyring's lock file {path}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KeyringLockedError(
                f"another keys command holds the lock on keyring {keyring_path} ({path}); "
                "let it finish, then run this again; the keyring was not changed"
            ) from None
        yield
    finally:
        os.close(fd)


def read_header_key(path: Path) -> tuple[str, int]:
    """(key id, format version) from a sealed file's header, reading only the header."""
    with open(path, "rb") as fh:
        head = fh.read(_HEADER_READ)
    header = parse_header(head)
    return header.key_id, header.format_version


def _walk_sealed(root: Path) -> Iterator[Path]:
    """Every ``*.sealed`` regular file under ``root``, hidden folders included: an in-progress
    publish in a hidden temp folder becomes a served version the moment it is renamed."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(SEALED_SUFFIX):
                yield Path(dirpath) / name


def _served_sealed(root: Path) -> Iterator[Path]:
    """The sealed files in ``root`` as a server of that repository lists them, through the
    repository listing the server itself uses (storage listing: model folders, and everything
    under each, through symlinks, which ``os.walk`` does not follow): each model's manifest and
    the files of its version folders. Only folders with a model config count as models (the
    server loads no model without one), so a checkpoint folder given as a root adds nothing
    here and no warnings about its sub-folders."""
    # Imported here: the repository modules import the seal format from this package.
    from forseti.core.repository.config import CONFIG_FILENAME
    from forseti.core.repository.listing import list_model, list_model_names
    from forseti.core.storage import open_storage

    storage = open_storage(root)
    for name in list_model_names(storage):
        if storage.stat(f"{name}/{CONFIG_FILENAME}") is None:
            continue
        listing = list_model(storage, name)
        infos = [listing.manifest] if listing.manifest is not None else []
        for _, version in sorted(listing.versions.items()):
            infos += version.files.values()
        for info in infos:
            if info.key.endswith(SEALED_SUFFIX):
                yield root.joinpath(*info.key.split("/"))


def _sealed_files(root: Path) -> Iterator[Path]:
    """Every sealed file under ``root`` (recursively) and every one a server of ``root`` reads,
    each once (by its real path)."""
    seen: set[str] = set()
    for path in (*_walk_sealed(root), *_served_sealed(root)):
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            yield path


def scan_key_usage(roots: Iterable[Path]) -> KeyUsage:
    """Read the header of every sealed file under each folder in ``roots``."""
    usage = KeyUsage()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            usage.unreadable.append(f"{root}: not a folder")
            continue
        for path in _sealed_files(root):
            try:
                key_id, fmt = read_header_key(path)
            except FileNotFoundError:
                continue  # removed while we walked: needs nothing any more
            except OSError as exc:
                usage.unreadable.append(f"{path}: {exc.strerror or exc}")
                continue
            except SealError as exc:
                usage.malformed.append(f"{path}: {exc}")
                continue
            usage.files.append(SealedFile(root, path, key_id, fmt))
    return usage


def rotate_keyring(path: Path) -> Key:
    """Add a fresh key to the keyring file at ``path``; it becomes the key that seals.
    Holds the keyring's lock (KeyringLockedError when another keys command has it)."""
    with keyring_lock(path):
        ring = Keyring.load(path)
        key = ring.add_new_key()
        ring.save(path)
    logger.info("key added", extra={"keyring": str(path), "key_id": key.key_id})
    return key


def retire_key(path: Path, key_id: str, roots: Iterable[Path]) -> Keyring:
    """Remove ``key_id`` from the keyring file at ``path``, refusing while it is needed.

    Raises KeyInUseError when a sealed file under ``roots`` names the key (or a file's key
    cannot be read), KeyringError when the key is unknown or is the newest,
    KeyringLockedError when another keys command holds the keyring's lock.
    """
    with keyring_lock(path):
        return _retire_locked(path, key_id, roots)


def _retire_locked(path: Path, key_id: str, roots: Iterable[Path]) -> Keyring:
    ring = Keyring.load(path)
    if key_id not in ring:
        raise KeyringError(
            f"keyring {path} has no key {key_id!r}; its keys are: {', '.join(ring.key_ids)}"
        )
    if ring.newest.key_id == key_id:
        raise KeyringError(
            f"{key_id!r} is the newest key of {path}, the one that seals new artifacts; "
            f"run `forseti keys rotate {path}` and `forseti reseal` first"
        )
    roots = [Path(r) for r in roots]
    usage = scan_key_usage(roots)
    needing = usage.needing(key_id)
    if needing or usage.unreadable:
        raise KeyInUseError(_in_use_message(path, key_id, needing, usage.unreadable, roots))
    remaining = Keyring(ring.get(k) for k in ring.key_ids if k != key_id)
    remaining.save(path)
    logger.info("key retired", extra={"keyring": str(path), "key_id": key_id})
    return remaining


def _in_use_message(
    path: Path, key_id: str, needing: list[SealedFile], unreadable: list[str], roots: list[Path]
) -> str:
    lines = []
    if needing:
        per_root: dict[Path, int] = {}
        for f in needing:
            per_root[f.root] = per_root.get(f.root, 0) + 1
        where = ", ".join(f"{n} in {root}" for root, n in per_root.items())
        lines.append(f"key {key_id!r} is still needed by {len(needing)} sealed file(s) ({where}):")
        lines += [f"  {f.path}" for f in needing[:10]]
        if len(needing) > 10:
            lines.append(f"  ... and {len(needing) - 10} more")
        repos = " ".join(str(r) for r in roots)
        lines.append(f"reseal them first: forseti reseal --keyring {path} {repos}")
    if unreadable:
        lines.append(
            f"{len(unreadable)} file(s) could not be read, so whether they need the key is unknown:"
        )
        lines += [f"  {u}" for u in unreadable[:10]]
    lines.append(f"keyring {path} left unchanged")
    return "\n".join(lines)
