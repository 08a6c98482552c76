"""Sealed model artifacts: AES-256-GCM files bound to their model, version and file name.

Format version 1 (whole file in one GCM message)::

    b"FSEAL" | u8 format version (1) | u8 key-id length | key id (ascii) | 12-byte nonce
    | ciphertext || 16-byte tag

The associated data is the header bytes followed by a length-prefixed binding of model name,
version and plaintext file name, so a file copied to another model or version folder, renamed,
truncated or altered fails to open. Opening happens in memory only.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .keyring import Keyring, KeyringError, atomic_write

logger = logging.getLogger(__name__)

SEALED_SUFFIX = ".sealed"
MAGIC = b"FSEAL"
FORMAT_V1 = 1
NONCE_BYTES = 12
TAG_BYTES = 16
# cryptography's AESGCM refuses inputs of 2**31 bytes or more; larger models need the
# planned chunked format 2.
MAX_V1_PLAINTEXT = 2**31 - 1

_BINDING_TAG = b"forseti-seal-binding/1"

AUTH_FAILED = (
    "authentication failed: wrong key, tampered, truncated, "
    "or moved from another model/version/file"
)


class SealError(Exception):
    """A seal could not be made or opened. Never carries key material or plaintext."""

    def __init__(self, reason: str, detail: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason} ({detail})" if detail else reason)


@dataclass(frozen=True)
class SealHeader:
    """The parsed header of a sealed blob; ``raw`` is the exact header bytes (part of the AAD)."""

    format_version: int
    key_id: str
    nonce: bytes
    raw: bytes

    @property
    def body_offset(self) -> int:
        return len(self.raw)


def _binding(model: str, version: int, filename: str) -> bytes:
    """Canonical, length-prefixed (model, version, filename) so no field can bleed into another."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise SealError("invalid binding", f"version must be a non-negative int, got {version!r}")
    if not model or not filename:
        raise SealError("invalid binding", "model and filename must be non-empty")
    if "/" in filename or "\\" in filename:
        raise SealError("invalid binding", f"filename must be a bare name, got {filename!r}")
    parts = [
        _BINDING_TAG,
        model.encode("utf-8"),
        str(version).encode("ascii"),
        filename.encode("utf-8"),
    ]
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def _parse_v1_header(blob: bytes) -> SealHeader:
    pos = len(MAGIC) + 1
    if len(blob) < pos + 1:
        raise SealError("truncated header")
    kid_len = blob[pos]
    pos += 1
    if kid_len == 0:
        raise SealError("malformed header", "empty key id")
    end = pos + kid_len + NONCE_BYTES
    if len(blob) < end:
        raise SealError("truncated header")
    try:
        key_id = blob[pos : pos + kid_len].decode("ascii")
    except UnicodeDecodeError:
        raise SealError("malformed header", "key id is not ascii") from None
    nonce = blob[pos + kid_len : end]
    return SealHeader(format_version=FORMAT_V1, key_id=key_id, nonce=nonce, raw=blob[:end])


def _open_v1(
    blob: bytes, header: SealHeader, keyring: Keyring, model: str, version: int, filename: str
) -> bytes:
    try:
        key = keyring.get(header.key_id)
    except KeyringError:
        raise SealError("unknown key id", f"key {header.key_id!r} is not in the keyring") from None
    aad = header.raw + _binding(model, version, filename)
    body = memoryview(blob)[header.body_offset :]
    if len(body) < TAG_BYTES:
        raise SealError(AUTH_FAILED)
    try:
        return AESGCM(key.secret).decrypt(header.nonce, body, aad)
    except InvalidTag:
        raise SealError(AUTH_FAILED) from None


# Dispatch on the format byte; a chunked/streaming format 2 plugs in here.
_HEADER_PARSERS: dict[int, Callable[[bytes], SealHeader]] = {FORMAT_V1: _parse_v1_header}
_OPENERS: dict[int, Callable[[bytes, SealHeader, Keyring, str, int, str], bytes]] = {
    FORMAT_V1: _open_v1,
}


def parse_header(blob: bytes) -> SealHeader:
    """Parse and check the header only; no key needed."""
    if len(blob) < len(MAGIC):
        if MAGIC.startswith(bytes(blob)) and blob:
            raise SealError("truncated header")
        raise SealError("not a sealed artifact")
    if bytes(blob[: len(MAGIC)]) != MAGIC:
        raise SealError("not a sealed artifact")
    if len(blob) < len(MAGIC) + 1:
        raise SealError("truncated header")
    fmt = blob[len(MAGIC)]
    parser = _HEADER_PARSERS.get(fmt)
    if parser is None:
        supported = ", ".join(str(v) for v in sorted(_HEADER_PARSERS))
        raise SealError("unsupported seal format version", f"got {fmt}, supported: {supported}")
    return parser(blob)


def peek_key_id(blob: bytes) -> str:
    """The id of the key a blob was sealed with (header only; for key rotation)."""
    return parse_header(blob).key_id


def seal_bytes(
    plaintext: bytes, keyring: Keyring, *, model: str, version: int, filename: str
) -> bytes:
    """Seal ``plaintext`` with the keyring's newest key, bound to model/version/filename."""
    if len(plaintext) > MAX_V1_PLAINTEXT:
        raise SealError(
            "too large for seal format 1",
            f"{len(plaintext)} bytes, limit {MAX_V1_PLAINTEXT}; chunked format 2 is planned",
        )
    key = keyring.newest
    kid = key.key_id.encode("ascii")
    header = MAGIC + bytes([FORMAT_V1, len(kid)]) + kid + secrets.token_bytes(NONCE_BYTES)
    parsed = _parse_v1_header(header)
    aad = header + _binding(model, version, filename)
    return header + AESGCM(key.secret).encrypt(parsed.nonce, plaintext, aad)


def open_sealed(blob: bytes, keyring: Keyring, *, model: str, version: int, filename: str) -> bytes:
    """Authenticate and decrypt a sealed blob in memory; raises SealError on any mismatch.

    ``filename`` is the plaintext name (``model.onnx``), not the ``.sealed`` name.
    """
    header = parse_header(blob)
    return _OPENERS[header.format_version](blob, header, keyring, model, version, filename)


def plaintext_name(sealed_path: Path) -> str:
    """``model.onnx.sealed`` -> ``model.onnx``."""
    name = sealed_path.name
    if not name.endswith(SEALED_SUFFIX) or name == SEALED_SUFFIX:
        raise SealError("not a sealed artifact", f"{name!r} does not end in {SEALED_SUFFIX}")
    return name[: -len(SEALED_SUFFIX)]


def open_sealed_file(path: Path, keyring: Keyring, *, model: str, version: int) -> bytes:
    """Read ``<name>.sealed`` and open it in memory, binding to ``<name>``."""
    path = Path(path)
    filename = plaintext_name(path)
    blob = path.read_bytes()
    try:
        return open_sealed(blob, keyring, model=model, version=version, filename=filename)
    except SealError as exc:
        raise SealError(exc.reason, f"{path}" + (f": {exc.detail}" if exc.detail else "")) from None


def seal_file(
    plain_path: Path, keyring: Keyring, *, model: str, version: int, overwrite: bool = False
) -> Path:
    """Seal ``plain_path`` to ``<name>.sealed`` atomically, then remove the plaintext.

    Refuses to replace an existing sealed file unless ``overwrite`` is set, because silently
    replacing a sealed model from a stray plaintext copy would be surprising.
    """
    plain_path = Path(plain_path)
    if plain_path.name.endswith(SEALED_SUFFIX):
        raise SealError("already sealed", str(plain_path))
    sealed_path = plain_path.with_name(plain_path.name + SEALED_SUFFIX)
    if sealed_path.exists() and not overwrite:
        raise SealError("sealed file already exists", f"{sealed_path}; remove one of the two")
    st = plain_path.stat()
    blob = seal_bytes(
        plain_path.read_bytes(), keyring, model=model, version=version, filename=plain_path.name
    )
    # Keep the plaintext's permissions so the server user can still read the sealed file.
    atomic_write(sealed_path, blob, mode=stat.S_IMODE(st.st_mode) | stat.S_IRUSR | stat.S_IWUSR)
    os.unlink(plain_path)
    return sealed_path
