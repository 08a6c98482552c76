"""Keyring: the AES-256 keys that seal model artifacts, stored in an owner-only JSON file."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import secrets
import threading
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from forseti.core.durable import atomic_write
from forseti.core.secret_files import SecretFileError, read_secret_file

logger = logging.getLogger(__name__)

KEYRING_FORMAT = "forseti-keyring/1"
KEY_BYTES = 32


class KeyringError(Exception):
    """A keyring could not be loaded, saved or queried. Messages never include key bytes."""


@dataclass(frozen=True)
class Key:
    """One AES-256 key. The secret is kept out of repr so it cannot leak into logs."""

    key_id: str
    secret: bytes = field(repr=False)
    created: str

    def __post_init__(self) -> None:
        if not self.key_id or not self.key_id.isascii() or len(self.key_id) > 255:
            # The seal header stores the id as ascii with a one-byte length.
            raise KeyringError(f"invalid key id {self.key_id!r}: must be 1-255 ascii characters")
        if len(self.secret) != KEY_BYTES:
            raise KeyringError(
                f"key {self.key_id!r} is {len(self.secret)} bytes; AES-256 needs {KEY_BYTES}"
            )

    @classmethod
    def generate(cls) -> Key:
        """A fresh random key with an id like ``k-20250101-1a2b3c4d``."""
        now = datetime.now(UTC)
        key_id = f"k-{now:%Y%m%d}-{secrets.token_hex(4)}"
        return cls(
            key_id=key_id,
            secret=secrets.token_bytes(KEY_BYTES),
            created=now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        )


class Keyring:
    """An ordered set of keys; the newest one seals, any of them opens."""

    def __init__(self, keys: Iterable[Key]) -> None:
        self._keys: list[Key] = []
        self._by_id: dict[str, Key] = {}
        for key in keys:
            self._append(key)
        if not self._keys:
            raise KeyringError("keyring has no keys")

    def __repr__(self) -> str:
        return f"Keyring(key_ids={self.key_ids!r})"

    def __len__(self) -> int:
        return len(self._keys)

    def _append(self, key: Key) -> None:
        if key.key_id in self._by_id:
            raise KeyringError(f"duplicate key id {key.key_id!r} in keyring")
        self._keys.append(key)
        self._by_id[key.key_id] = key

    @property
    def newest(self) -> Key:
        """The key used for new seals (the last one added)."""
        return self._keys[-1]

    @property
    def key_ids(self) -> list[str]:
        """Key ids, oldest first."""
        return [k.key_id for k in self._keys]

    def get(self, key_id: str) -> Key:
        """The key with this id; raises KeyringError if the keyring lacks it."""
        try:
            return self._by_id[key_id]
        except KeyError:
            raise KeyringError(f"unknown key id {key_id!r}") from None

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._by_id

    @classmethod
    def generate(cls) -> Keyring:
        """A keyring with one fresh key."""
        return cls([Key.generate()])

    def add_new_key(self) -> Key:
        """Generate a key and make it the newest; older keys still open existing seals."""
        key = Key.generate()
        while key.key_id in self._by_id:  # 32 random bits per day; retry the rare clash
            key = Key.generate()
        self._append(key)
        return key

    def to_json(self) -> str:
        """Serialise in the keyring file format (contains secrets; write it owner-only)."""
        doc = {
            "format": KEYRING_FORMAT,
            "keys": [
                {
                    "id": k.key_id,
                    "created": k.created,
                    "secret": base64.b64encode(k.secret).decode("ascii"),
                }
                for k in self._keys
            ],
        }
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "keyring") -> Keyring:
        """Parse and validate the keyring file format."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KeyringError(
                f"{source}: not valid JSON ({exc.msg} at line {exc.lineno})"
            ) from None
        if not isinstance(doc, dict):
            raise KeyringError(f"{source}: expected a JSON object")
        if doc.get("format") != KEYRING_FORMAT:
            raise KeyringError(
                f"{source}: unsupported format {doc.get('format')!r}, expected {KEYRING_FORMAT!r}"
            )
        entries = doc.get("keys")
        if not isinstance(entries, list) or not entries:
            raise KeyringError(f"{source}: 'keys' must be a non-empty list")
        keys: list[Key] = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise KeyringError(f"{source}: key #{i} is not an object")
            key_id, created, secret_b64 = entry.get("id"), entry.get("created"), entry.get("secret")
            if not isinstance(key_id, str) or not isinstance(created, str):
                raise KeyringError(f"{source}: key #{i} needs string 'id' and 'created'")
            if not isinstance(secret_b64, str):
                raise KeyringError(f"{source}: key {key_id!r} has no base64 'secret'")
            try:
                secret = base64.b64decode(secret_b64, validate=True)
            except (binascii.Error, ValueError):
                raise KeyringError(f"{source}: key {key_id!r} secret is not valid base64") from None
            try:
                keys.append(Key(key_id=key_id, secret=secret, created=created))
            except KeyringError as exc:
                raise KeyringError(f"{source}: {exc}") from None
        try:
            return cls(keys)
        except KeyringError as exc:
            raise KeyringError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> Keyring:
        """Read and validate a keyring file. It must be owned by this process's user and give
        group/others no access (0600, as `save` writes it); otherwise it is refused."""
        path = Path(path)
        try:
            data, _ = read_secret_file(path, "keyring")
            text = data.decode("utf-8")
        except FileNotFoundError:
            raise KeyringError(
                f"keyring file {path} does not exist; create one with `forseti keys new {path}`"
            ) from None
        except SecretFileError as exc:
            raise KeyringError(str(exc)) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyringError(f"cannot read keyring file {path}: {exc}") from None
        return cls.from_json(text, source=str(path))

    def save(self, path: str | Path) -> None:
        """Write atomically; the file is owner-only (0600) from its first byte."""
        atomic_write(Path(path), self.to_json().encode("utf-8"), mode=0o600)


class FileKeyring(Keyring):
    """A keyring read from a file that re-reads the file once it has changed.

    After ``forseti keys rotate`` a running server can open artifacts resealed to the new key
    (the file is re-read when a seal names a key it lacks) and a running publisher seals with
    the new key (the file is re-checked whenever the newest key is asked for), without a
    restart. A file that has become unreadable or invalid keeps the keys already loaded.
    """

    def __init__(self, keys: Iterable[Key], path: Path, stamp: tuple[int, int, int]) -> None:
        super().__init__(keys)
        self.path = path
        self._stamp = stamp
        self._reload_lock = threading.Lock()

    @classmethod
    def load_file(cls, path: str | Path) -> FileKeyring:
        """Read and validate a keyring file, remembering where it came from."""
        path = Path(path)
        ring = Keyring.load(path)
        return cls((ring.get(k) for k in ring.key_ids), path, _stamp(path))

    def refresh(self) -> bool:
        """Re-read the file if it changed since it was read; True when keys were replaced."""
        with self._reload_lock:
            try:
                stamp = _stamp(self.path)
                if stamp == self._stamp:
                    return False
                fresh = Keyring.load(self.path)
            except (OSError, KeyringError) as exc:
                logger.warning(
                    "keyring file changed but cannot be re-read; keeping the loaded keys",
                    extra={"path": str(self.path), "error": str(exc)},
                )
                return False
            # Each attribute is replaced in one assignment, so readers in other threads see
            # the old or the new set, never a mixture within one attribute.
            self._by_id = dict(fresh._by_id)
            self._keys = list(fresh._keys)
            self._stamp = stamp
        logger.info("keyring re-read", extra={"path": str(self.path), "keys": len(fresh)})
        return True

    @property
    def newest(self) -> Key:
        self.refresh()
        return self._keys[-1]

    def get(self, key_id: str) -> Key:
        try:
            return super().get(key_id)
        except KeyringError:
            if not self.refresh():
                raise
        return super().get(key_id)


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


KEYRING_ENV = "FORSETI_KEYRING"
KEYRING_FD_ENV = "FORSETI_KEYRING_FD"
_MAX_KEYRING_BYTES = 1024 * 1024


def keyring_from_environment(environ: MutableMapping[str, str] | None = None) -> Keyring | None:
    """The keyring that the environment names, for containers; None when it names none.

    ``FORSETI_KEYRING_FD=<n>``: read the keyring JSON from open descriptor n (a pipe, a
    memfd or a mounted secret file), then close it. ``FORSETI_KEYRING``: the keyring JSON
    itself when it starts with ``{``, else the path of a keyring file. A keyring given as JSON
    is removed from the environment once read, so child processes do not inherit it.
    A keyring file named by path is checked like ``--keyring`` (owner-only, else refused); the
    JSON and the descriptor have no file of their own to check: whoever launched forseti
    chose who can read them.
    """
    env = os.environ if environ is None else environ
    fd_text = env.get(KEYRING_FD_ENV, "").strip()
    if fd_text:
        return Keyring.from_json(_read_fd(fd_text), source=f"${KEYRING_FD_ENV}")
    value = env.get(KEYRING_ENV, "")
    if value.lstrip().startswith("{"):
        ring = Keyring.from_json(value, source=f"${KEYRING_ENV}")
        env.pop(KEYRING_ENV, None)
        return ring
    if value.strip():
        return FileKeyring.load_file(value.strip())
    return None


def _read_fd(fd_text: str) -> str:
    if not fd_text.isdigit():
        raise KeyringError(f"${KEYRING_FD_ENV} must be a file descriptor number, got {fd_text!r}")
    fd = int(fd_text)
    chunks: list[bytes] = []
    total = 0
    try:
        while chunk := os.read(fd, 65536):
            total += len(chunk)
            if total > _MAX_KEYRING_BYTES:
                raise KeyringError(f"${KEYRING_FD_ENV}: more than {_MAX_KEYRING_BYTES} bytes")
            chunks.append(chunk)
    except OSError as exc:
        raise KeyringError(f"${KEYRING_FD_ENV}={fd}: cannot read it: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise KeyringError(f"${KEYRING_FD_ENV}={fd}: not UTF-8 text") from None


def load_keyring(
    path: str | Path | None = None, *, environ: MutableMapping[str, str] | None = None
) -> Keyring:
    """Load the keyring file at ``path`` (re-read when it changes, see FileKeyring); without
    a path, the keyring the environment names (see keyring_from_environment)."""
    if path is not None:
        return FileKeyring.load_file(path)
    ring = keyring_from_environment(environ)
    if ring is None:
        raise KeyringError(
            f"no keyring given: pass --keyring FILE, or set ${KEYRING_ENV} (a keyring file path "
            f"or the keyring JSON) or ${KEYRING_FD_ENV} (an open descriptor holding the JSON)"
        )
    return ring
