"""Opening the chunked seal format holds the ciphertext and one plaintext, never a second full
copy of the plaintext (issue 13, finding 8), measured with tracemalloc."""

from __future__ import annotations

import hashlib
import io
import os
import tracemalloc
from pathlib import Path

from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.sealed import open_sealed, open_sealed_buffer, seal_stream

PLAINTEXT_BYTES = 12 * 1024 * 1024 + 12345  # several chunks, the last one partial
CHUNK = 1 << 20
MODEL, VERSION, FILENAME = "policy", 3, "model.onnx"


def _sealed_file(tmp_path: Path, keyring: Keyring) -> tuple[Path, str]:
    plain = os.urandom(PLAINTEXT_BYTES)
    out = io.BytesIO()
    seal_stream(
        io.BytesIO(plain), out, keyring, model=MODEL, version=VERSION, filename=FILENAME,
        chunk_size=CHUNK,
    )  # fmt: skip
    path = tmp_path / "model.onnx.sealed"
    path.write_bytes(out.getvalue())
    return path, hashlib.sha256(plain).hexdigest()


def _peak_of_open(path: Path, keyring: Keyring, opener) -> tuple[int, int, str]:
    """(peak bytes traced while reading and opening, ciphertext bytes, plaintext sha256)."""
    tracemalloc.start()
    try:
        blob = path.read_bytes()
        plain = opener(blob, keyring, model=MODEL, version=VERSION, filename=FILENAME)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, len(blob), hashlib.sha256(plain).hexdigest()


def test_opening_the_chunked_format_makes_no_second_copy_of_the_plaintext(
    tmp_path: Path, keyring: Keyring
) -> None:
    path, digest = _sealed_file(tmp_path, keyring)

    peak, ciphertext, opened = _peak_of_open(path, keyring, open_sealed_buffer)

    assert opened == digest
    # Ciphertext + one plaintext (+ small change); the previous opener (a growing bytearray
    # turned into bytes at the end) peaked at ciphertext + about two plaintexts.
    assert peak <= ciphertext + 1.3 * PLAINTEXT_BYTES, (peak, ciphertext)


def test_open_sealed_still_gives_bytes_for_callers_that_need_them(
    tmp_path: Path, keyring: Keyring
) -> None:
    path, digest = _sealed_file(tmp_path, keyring)
    blob = path.read_bytes()
    plain = open_sealed(blob, keyring, model=MODEL, version=VERSION, filename=FILENAME)
    assert isinstance(plain, bytes) and hashlib.sha256(plain).hexdigest() == digest
