"""Sealed model artifacts: AES-256-GCM files bound to their model, version and file name.

Format version 1 (whole file in one GCM message)::

    b"FSEAL" | u8 format version (1) | u8 key-id length | key id (ascii) | 12-byte nonce
    | ciphertext || 16-byte tag

The associated data is the header bytes followed by a length-prefixed binding of model name,
version and plaintext file name, so a file copied to another model or version folder, renamed,
truncated or altered fails to open. Opening happens in memory only.

Format version 2 (chunked, for artifacts of any size, sealed and opened as streams)::

    b"FSEAL" | u8 format version (2) | u8 key-id length | key id (ascii) | 8-byte nonce prefix
    | u32 chunk size (big-endian) | chunk 0 | chunk 1 | ... | final chunk

Every chunk is its own AES-GCM message: ``ciphertext || 16-byte tag``. All chunks but the last
hold exactly ``chunk size`` plaintext bytes; the last holds 0..chunk size (0 only when the whole
plaintext is empty). Chunk ``i`` uses the nonce ``prefix || u32 i`` and the associated data
``header | binding | u64 i | u8 final``, so dropping chunks at the end (the new last chunk was
not sealed as final), appending, reordering or swapping chunks between files all fail.
"""

from __future__ import annotations

import io
import logging
import os
import secrets
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from forseti.core.durable import atomic_output, atomic_write

from .keyring import Keyring, KeyringError

logger = logging.getLogger(__name__)

SEALED_SUFFIX = ".sealed"
MAGIC = b"FSEAL"
FORMAT_V1 = 1
FORMAT_V2 = 2
NONCE_BYTES = 12
TAG_BYTES = 16
# cryptography's AESGCM refuses inputs of 2**31 bytes or more; larger models need the
# planned chunked format 2.
MAX_V1_PLAINTEXT = 2**31 - 1

# Format 2: a 96-bit nonce is an 8-byte random prefix per file and a 32-bit chunk counter.
NONCE_PREFIX_BYTES = 8
DEFAULT_CHUNK_SIZE = 1 << 20
# Bounds on the chunk size a header may declare: a hostile header must not make a reader
# allocate huge buffers; tiny chunks are allowed so tests can exercise many chunks cheaply.
MIN_CHUNK_SIZE = 64
MAX_CHUNK_SIZE = 64 << 20
MAX_CHUNKS = 2**32

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
    nonce: bytes  # format 1: the nonce; format 2: the per-file nonce prefix
    raw: bytes
    chunk_size: int = 0  # format 2 only

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


def _parse_key_id(blob: bytes, tail: int) -> tuple[str, int]:
    """The key id after the magic and format byte, and where the ``tail`` bytes after it end.

    Both formats go on with a fixed-size field (format 1 the nonce, format 2 the nonce prefix
    and chunk size); a blob too short for it is a truncated header.
    """
    pos = len(MAGIC) + 1
    if len(blob) < pos + 1:
        raise SealError("truncated header")
    kid_len = blob[pos]
    pos += 1
    if kid_len == 0:
        raise SealError("malformed header", "empty key id")
    end = pos + kid_len + tail
    if len(blob) < end:
        raise SealError("truncated header")
    try:
        key_id = bytes(blob[pos : pos + kid_len]).decode("ascii")
    except UnicodeDecodeError:
        raise SealError("malformed header", "key id is not ascii") from None
    return key_id, end


def _parse_v1_header(blob: bytes) -> SealHeader:
    key_id, end = _parse_key_id(blob, NONCE_BYTES)
    nonce = blob[end - NONCE_BYTES : end]
    return SealHeader(format_version=FORMAT_V1, key_id=key_id, nonce=nonce, raw=blob[:end])


def _open_v1(
    blob: bytes, header: SealHeader, keyring: Keyring, model: str, version: int, filename: str
) -> bytes:
    secret = _key_for(header, keyring)
    aad = header.raw + _binding(model, version, filename)
    body = memoryview(blob)[header.body_offset :]
    if len(body) < TAG_BYTES:
        raise SealError(AUTH_FAILED)
    try:
        return AESGCM(secret).decrypt(header.nonce, body, aad)
    except InvalidTag:
        raise SealError(AUTH_FAILED) from None


def _key_for(header: SealHeader, keyring: Keyring) -> bytes:
    try:
        return keyring.get(header.key_id).secret
    except KeyringError:
        raise SealError("unknown key id", f"key {header.key_id!r} is not in the keyring") from None


def _parse_v2_header(blob: bytes) -> SealHeader:
    key_id, end = _parse_key_id(blob, NONCE_PREFIX_BYTES + 4)
    prefix = bytes(blob[end - 4 - NONCE_PREFIX_BYTES : end - 4])
    (chunk_size,) = struct.unpack(">I", blob[end - 4 : end])
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise SealError(
            "malformed header",
            f"chunk size {chunk_size} outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}",
        )
    return SealHeader(
        format_version=FORMAT_V2,
        key_id=key_id,
        nonce=prefix,
        raw=bytes(blob[:end]),
        chunk_size=chunk_size,
    )


def _chunk_nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">I", index)


def _chunk_aad(header_and_binding: bytes, index: int, final: bool) -> bytes:
    return header_and_binding + struct.pack(">QB", index, 1 if final else 0)


class _ChunkOpener:
    """Authenticates and decrypts format-2 chunks in order; ``finish`` checks the end."""

    def __init__(
        self, header: SealHeader, keyring: Keyring, model: str, version: int, filename: str
    ) -> None:
        self._aead = AESGCM(_key_for(header, keyring))
        self._prefix = header.nonce
        self._ad = header.raw + _binding(model, version, filename)
        self._chunk_size = header.chunk_size
        self._index = 0
        self._finished = False

    def _check_next(self, sealed_chunk: bytes | memoryview, final: bool) -> tuple[bytes, bytes]:
        """Refuse a chunk that cannot be the next one; return its nonce and associated data."""
        i = self._index
        if self._finished:
            raise SealError(AUTH_FAILED, f"data after the final chunk {i - 1}")
        if i >= MAX_CHUNKS:
            raise SealError(AUTH_FAILED, "too many chunks")
        size = len(sealed_chunk)
        if size < TAG_BYTES or size > self._chunk_size + TAG_BYTES:
            raise SealError(AUTH_FAILED, f"chunk {i} has an impossible length")
        if not final and size != self._chunk_size + TAG_BYTES:
            raise SealError(AUTH_FAILED, f"chunk {i} is short")
        return _chunk_nonce(self._prefix, i), _chunk_aad(self._ad, i, final)

    def _advance(self, final: bool) -> None:
        self._index += 1
        self._finished = final

    def open_chunk(self, sealed_chunk: bytes | memoryview, final: bool) -> bytes:
        nonce, aad = self._check_next(sealed_chunk, final)
        try:
            plain = self._aead.decrypt(nonce, sealed_chunk, aad)
        except InvalidTag:
            raise SealError(AUTH_FAILED, f"chunk {self._index}") from None
        self._advance(final)
        return plain

    def open_chunk_into(
        self, sealed_chunk: bytes | memoryview, final: bool, out: memoryview
    ) -> None:
        """Like open_chunk, decrypting into ``out`` (exactly the chunk's plaintext length).
        On failure ``out`` holds garbage: the caller drops the whole buffer."""
        nonce, aad = self._check_next(sealed_chunk, final)
        try:
            if _HAS_DECRYPT_INTO:
                self._aead.decrypt_into(nonce, sealed_chunk, aad, out)
            else:  # cryptography before decrypt_into: one chunk-sized temporary
                out[:] = self._aead.decrypt(nonce, sealed_chunk, aad)
        except InvalidTag:
            raise SealError(AUTH_FAILED, f"chunk {self._index}") from None
        self._advance(final)


# Recent cryptography releases decrypt into a caller's buffer (51 here); older ones return bytes.
_HAS_DECRYPT_INTO = hasattr(AESGCM, "decrypt_into")


def _open_v2(
    blob: bytes, header: SealHeader, keyring: Keyring, model: str, version: int, filename: str
) -> bytearray:
    """Open every chunk into one buffer of the exact plaintext size, allocated once: no
    growing buffer, no join, no final copy. Peak memory is the ciphertext plus the plaintext
    (a chunk more where cryptography cannot decrypt into a buffer)."""
    opener = _ChunkOpener(header, keyring, model, version, filename)
    body = memoryview(blob)[header.body_offset :]
    chunk = header.chunk_size
    step = chunk + TAG_BYTES
    if len(body) == 0:
        raise SealError(AUTH_FAILED, "no chunks")
    # The last chunk is whatever is left after all full-size chunks, and it may be full-size.
    n_chunks = max(1, -(-len(body) // step))
    last = len(body) - (n_chunks - 1) * step
    if last < TAG_BYTES:
        raise SealError(AUTH_FAILED, f"chunk {n_chunks - 1} has an impossible length")
    out = bytearray((n_chunks - 1) * chunk + last - TAG_BYTES)
    with memoryview(out) as view:
        for i in range(n_chunks):
            sealed_chunk = body[i * step : (i + 1) * step]
            start = i * chunk
            opener.open_chunk_into(
                sealed_chunk,
                i == n_chunks - 1,
                view[start : start + len(sealed_chunk) - TAG_BYTES],
            )
    return out


# Dispatch on the format byte.
_HEADER_PARSERS: dict[int, Callable[[bytes], SealHeader]] = {
    FORMAT_V1: _parse_v1_header,
    FORMAT_V2: _parse_v2_header,
}
_OPENERS: dict[int, Callable[[bytes, SealHeader, Keyring, str, int, str], bytes | bytearray]] = {
    FORMAT_V1: _open_v1,
    FORMAT_V2: _open_v2,
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
    """Seal ``plaintext`` with the keyring's newest key, bound to model/version/filename.

    Format 1 up to AES-GCM's single-message limit; beyond it, the chunked format 2 (so a
    checkpoint or artifact over 2 GiB seals too).
    """
    if len(plaintext) > MAX_V1_PLAINTEXT:
        sealed = io.BytesIO()
        seal_stream(
            io.BytesIO(plaintext), sealed, keyring, model=model, version=version, filename=filename
        )
        return sealed.getvalue()
    key = keyring.newest
    kid = key.key_id.encode("ascii")
    header = MAGIC + bytes([FORMAT_V1, len(kid)]) + kid + secrets.token_bytes(NONCE_BYTES)
    parsed = _parse_v1_header(header)
    aad = header + _binding(model, version, filename)
    return header + AESGCM(key.secret).encrypt(parsed.nonce, plaintext, aad)


def open_sealed_buffer(
    blob: bytes, keyring: Keyring, *, model: str, version: int, filename: str
) -> bytes | bytearray:
    """Like open_sealed, without a copy: the chunked format 2 hands out the bytearray its
    chunks were decrypted into (format 1 gives the bytes AES-GCM returns). For large
    artifacts: the open holds the ciphertext and one plaintext, never two plaintexts."""
    header = parse_header(blob)
    return _OPENERS[header.format_version](blob, header, keyring, model, version, filename)


def open_sealed(blob: bytes, keyring: Keyring, *, model: str, version: int, filename: str) -> bytes:
    """Authenticate and decrypt a sealed blob in memory; raises SealError on any mismatch.

    ``filename`` is the plaintext name (``model.onnx``), not the ``.sealed`` name. Gives
    ``bytes`` (a format-2 plaintext is copied once into it); a caller that can take a
    bytearray, or can drop the ciphertext first, uses open_sealed_buffer.
    """
    plain = open_sealed_buffer(blob, keyring, model=model, version=version, filename=filename)
    return plain if isinstance(plain, bytes) else bytes(plain)


_RECORD_TAG = b"forseti-seal-record/1"


def _record_binding(kind: str, name: str) -> bytes:
    """Length-prefixed (kind, name) for a sealed record: a different tag than artifacts', so a
    record can never pass for an artifact (or the other way round), nor for another kind or
    another model's record."""
    if not kind or not name:
        raise SealError("invalid binding", "record kind and name must be non-empty")
    parts = [_RECORD_TAG, kind.encode("utf-8"), name.encode("utf-8")]
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def seal_record(plaintext: bytes, keyring: Keyring, *, kind: str, name: str) -> bytes:
    """Seal a small record (format 1, newest key) bound to its kind and name, e.g. a model's
    manifest: ``kind="model-manifest", name=<model>``."""
    key = keyring.newest
    kid = key.key_id.encode("ascii")
    header = MAGIC + bytes([FORMAT_V1, len(kid)]) + kid + secrets.token_bytes(NONCE_BYTES)
    parsed = _parse_v1_header(header)
    aad = header + _record_binding(kind, name)
    return header + AESGCM(key.secret).encrypt(parsed.nonce, plaintext, aad)


def open_record(blob: bytes, keyring: Keyring, *, kind: str, name: str) -> bytes:
    """Authenticate and decrypt a record sealed by `seal_record` for this kind and name."""
    header = parse_header(blob)
    if header.format_version != FORMAT_V1:
        raise SealError("unsupported seal format version", "records use format 1")
    aad = header.raw + _record_binding(kind, name)
    body = memoryview(blob)[header.body_offset :]
    if len(body) < TAG_BYTES:
        raise SealError(AUTH_FAILED)
    try:
        return AESGCM(_key_for(header, keyring)).decrypt(header.nonce, body, aad)
    except InvalidTag:
        raise SealError(AUTH_FAILED) from None


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
    plain_path: Path,
    keyring: Keyring,
    *,
    model: str,
    version: int,
    overwrite: bool = False,
    format_version: int | None = None,
) -> Path:
    """Seal ``plain_path`` to ``<name>.sealed`` atomically, then remove the plaintext.

    Refuses to replace an existing sealed file unless ``overwrite`` is set, because silently
    replacing a sealed model from a stray plaintext copy would be surprising.
    ``format_version`` None picks format 1 when the file fits it and otherwise streams the file
    through format 2, never holding it whole in memory.
    """
    plain_path = Path(plain_path)
    if plain_path.name.endswith(SEALED_SUFFIX):
        raise SealError("already sealed", str(plain_path))
    sealed_path = plain_path.with_name(plain_path.name + SEALED_SUFFIX)
    if sealed_path.exists() and not overwrite:
        raise SealError("sealed file already exists", f"{sealed_path}; remove one of the two")
    st = plain_path.stat()
    # Keep the plaintext's permissions so the server user can still read the sealed file.
    mode = stat.S_IMODE(st.st_mode) | stat.S_IRUSR | stat.S_IWUSR
    if format_version is None:
        format_version = FORMAT_V1 if st.st_size <= MAX_V1_PLAINTEXT else FORMAT_V2
    if format_version not in (FORMAT_V1, FORMAT_V2):
        raise SealError("unsupported seal format version", f"got {format_version}, use 1 or 2")
    if format_version == FORMAT_V2:
        with open(plain_path, "rb") as src, atomic_output(sealed_path, mode=mode) as dst:
            seal_stream(src, dst, keyring, model=model, version=version, filename=plain_path.name)
    else:
        blob = seal_bytes(
            plain_path.read_bytes(), keyring, model=model, version=version, filename=plain_path.name
        )
        atomic_write(sealed_path, blob, mode=mode)
    os.unlink(plain_path)
    return sealed_path


class SealingWriter:
    """A write-only stream that seals what is written to it into ``dst`` as format 2.

    Holds at most one chunk of plaintext. ``close`` (or leaving the ``with`` block normally)
    seals the final chunk; leaving it by an exception does not, so a half-written output never
    opens. ``dst`` is not closed.
    """

    def __init__(
        self,
        dst: BinaryIO,
        keyring: Keyring,
        *,
        model: str,
        version: int,
        filename: str,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise SealError(
                "invalid chunk size", f"{chunk_size}, allowed {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}"
            )
        key = keyring.newest
        kid = key.key_id.encode("ascii")
        header = (
            MAGIC
            + bytes([FORMAT_V2, len(kid)])
            + kid
            + secrets.token_bytes(NONCE_PREFIX_BYTES)
            + struct.pack(">I", chunk_size)
        )
        parsed = _parse_v2_header(header)
        self._dst = dst
        self._aead = AESGCM(key.secret)
        self._prefix = parsed.nonce
        self._ad = header + _binding(model, version, filename)
        self._chunk_size = chunk_size
        self._buf = bytearray()
        self._index = 0
        self._position = 0
        self._closed = False
        dst.write(header)

    def _emit(self, final: bool) -> None:
        if self._index >= MAX_CHUNKS:
            raise SealError("too large for seal format 2", f"more than {MAX_CHUNKS} chunks")
        nonce = _chunk_nonce(self._prefix, self._index)
        aad = _chunk_aad(self._ad, self._index, final)
        self._dst.write(self._aead.encrypt(nonce, self._buf, aad))
        self._buf.clear()
        self._index += 1

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Buffer ``data``; seal every chunk that is known not to be the last one."""
        if self._closed:
            raise SealError("sealing stream is closed")
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            if len(self._buf) == self._chunk_size:
                # More data follows, so the pending full chunk is not the final one.
                self._emit(final=False)
            take = min(self._chunk_size - len(self._buf), len(view) - pos)
            self._buf += view[pos : pos + take]
            pos += take
        self._position += len(view)
        return len(view)

    def tell(self) -> int:
        """Plaintext bytes written so far (what a file writer's ``tell`` would say)."""
        return self._position

    def flush(self) -> None:
        self._dst.flush()

    def close(self) -> None:
        """Seal the final chunk (possibly empty, possibly full-size) and flush ``dst``."""
        if self._closed:
            return
        self._emit(final=True)
        self._closed = True
        self._dst.flush()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> SealingWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True  # abandon: no final chunk, so the output cannot open


def seal_stream(
    src: BinaryIO,
    dst: BinaryIO,
    keyring: Keyring,
    *,
    model: str,
    version: int,
    filename: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> int:
    """Seal everything readable from ``src`` into ``dst`` as format 2; returns plaintext bytes.

    Memory stays at about one chunk whatever the size of ``src``.
    """
    with SealingWriter(
        dst, keyring, model=model, version=version, filename=filename, chunk_size=chunk_size
    ) as writer:
        while True:
            block = src.read(chunk_size)
            if not block:
                break
            writer.write(block)
        return writer.tell()


def _read_exact(src: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes; fewer only at end of stream (raw streams may return short reads)."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        block = src.read(n - got)
        if not block:
            break
        parts.append(block)
        got += len(block)
    return b"".join(parts)


def open_sealed_stream(
    src: BinaryIO, keyring: Keyring, *, model: str, version: int, filename: str
) -> Iterator[bytes]:
    """Yield the plaintext of a sealed stream piece by piece, each piece authenticated.

    Format 2 yields one chunk at a time; format 1 (at most 2 GiB) yields its plaintext once.
    Truncation is only detectable at the end: a consumer must treat the data as incomplete
    until the iterator finishes without raising SealError.
    """
    fixed = _read_exact(src, len(MAGIC) + 2)
    if len(fixed) < len(MAGIC) + 2:
        parse_header(fixed)  # raises the precise reason
        raise SealError("truncated header")
    # Both formats put 12 bytes after the key id (v1: nonce; v2: nonce prefix + chunk size).
    rest = _read_exact(src, fixed[-1] + 12)
    header = parse_header(fixed + rest)
    if header.format_version == FORMAT_V1:
        body = src.read()
        yield _open_v1(header.raw + body, header, keyring, model, version, filename)
        return
    opener = _ChunkOpener(header, keyring, model, version, filename)
    step = header.chunk_size + TAG_BYTES
    current = _read_exact(src, step)
    if not current:
        raise SealError(AUTH_FAILED, "no chunks")
    while True:
        if len(current) < step:
            yield opener.open_chunk(current, final=True)
            return
        following = _read_exact(src, step)
        if not following:
            yield opener.open_chunk(current, final=True)
            return
        yield opener.open_chunk(current, final=False)
        current = following
