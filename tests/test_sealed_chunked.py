"""Chunked seal format 2: streaming round trips and every way of cutting or shuffling chunks."""

from __future__ import annotations

import io
import os
import struct
import tracemalloc
from pathlib import Path

import pytest

from forseti.core.sealing import sealed as sealed_module
from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.sealed import (
    FORMAT_V2,
    TAG_BYTES,
    SealError,
    SealingWriter,
    open_sealed,
    open_sealed_file,
    open_sealed_stream,
    parse_header,
    peek_key_id,
    seal_bytes,
    seal_file,
    seal_stream,
)

CHUNK = 64  # the smallest chunk a header may declare: many chunks from a few hundred bytes
WHERE = {"model": "big", "version": 2, "filename": "model.gguf"}


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.generate()


def _seal(plain: bytes, keyring: Keyring, chunk: int = CHUNK, **where: object) -> bytes:
    out = io.BytesIO()
    seal_stream(io.BytesIO(plain), out, keyring, chunk_size=chunk, **{**WHERE, **where})
    return out.getvalue()


def _split(blob: bytes, chunk: int = CHUNK) -> tuple[bytes, list[bytes]]:
    header = parse_header(blob)
    body = blob[header.body_offset :]
    step = chunk + TAG_BYTES
    return header.raw, [body[i : i + step] for i in range(0, len(body), step)]


def _stream_open(blob: bytes, keyring: Keyring) -> bytes:
    return b"".join(open_sealed_stream(io.BytesIO(blob), keyring, **WHERE))


PLAIN = os.urandom(CHUNK * 5 + 17)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 5 * CHUNK + 17])
def test_round_trip_for_sizes_around_chunk_boundaries(keyring: Keyring, size: int) -> None:
    plain = os.urandom(size)
    blob = _seal(plain, keyring)

    assert parse_header(blob).format_version == FORMAT_V2
    assert open_sealed(blob, keyring, **WHERE) == plain
    assert _stream_open(blob, keyring) == plain


def test_stream_opening_yields_one_piece_per_chunk(keyring: Keyring) -> None:
    pieces = list(open_sealed_stream(io.BytesIO(_seal(PLAIN, keyring)), keyring, **WHERE))

    assert [len(p) for p in pieces] == [CHUNK] * 5 + [17]


def test_writer_gives_same_plaintext_for_any_write_sizes(keyring: Keyring) -> None:
    out = io.BytesIO()
    with SealingWriter(out, keyring, chunk_size=CHUNK, **WHERE) as writer:
        for start, stop in ((0, 3), (3, 200), (200, 201), (201, len(PLAIN))):
            writer.write(PLAIN[start:stop])
        assert writer.tell() == len(PLAIN)

    assert open_sealed(out.getvalue(), keyring, **WHERE) == PLAIN


def test_truncation_at_a_chunk_boundary_fails(keyring: Keyring) -> None:
    header, chunks = _split(_seal(PLAIN, keyring))

    for keep in range(len(chunks)):
        cut = header + b"".join(chunks[:keep])
        with pytest.raises(SealError, match="authentication failed"):
            open_sealed(cut, keyring, **WHERE)
        with pytest.raises(SealError, match="authentication failed"):
            _stream_open(cut, keyring)


def test_truncation_of_a_multiple_of_chunk_size_plaintext_fails(keyring: Keyring) -> None:
    # The last chunk is full-size here, so only its final flag tells the reader it is the end.
    header, chunks = _split(_seal(os.urandom(4 * CHUNK), keyring))

    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(header + b"".join(chunks[:3]), keyring, **WHERE)


def test_truncation_inside_a_chunk_fails(keyring: Keyring) -> None:
    blob = _seal(PLAIN, keyring)

    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(blob[:-5], keyring, **WHERE)
    with pytest.raises(SealError, match="authentication failed"):
        _stream_open(blob[:-5], keyring)


def test_reordered_chunks_fail(keyring: Keyring) -> None:
    header, chunks = _split(_seal(PLAIN, keyring))
    chunks[1], chunks[2] = chunks[2], chunks[1]

    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(header + b"".join(chunks), keyring, **WHERE)


def test_chunk_from_another_file_with_the_same_key_fails(keyring: Keyring) -> None:
    header, chunks = _split(_seal(PLAIN, keyring))
    _, other = _split(_seal(PLAIN, keyring))  # same plaintext, key and binding; new prefix
    chunks[2] = other[2]

    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(header + b"".join(chunks), keyring, **WHERE)


def test_extra_chunk_after_the_final_one_fails(keyring: Keyring) -> None:
    full = _seal(os.urandom(4 * CHUNK), keyring)
    header, chunks = _split(full)

    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(full + chunks[0], keyring, **WHERE)
    with pytest.raises(SealError, match="authentication failed"):
        _stream_open(header + b"".join(chunks + chunks[:1]), keyring)


def test_final_flag_cannot_be_removed_to_append_data(keyring: Keyring) -> None:
    # A two-chunk file whose final chunk is full-size: appending any sealed chunk makes the
    # reader treat the old final chunk as non-final, which its tag refuses.
    blob = _seal(os.urandom(2 * CHUNK), keyring)
    header, chunks = _split(blob)

    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(header + chunks[0] + chunks[1] + chunks[1], keyring, **WHERE)


def test_header_without_chunks_fails(keyring: Keyring) -> None:
    header, _ = _split(_seal(PLAIN, keyring))

    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(header, keyring, **WHERE)
    with pytest.raises(SealError, match="authentication failed"):
        _stream_open(header, keyring)


def test_wrong_key_with_the_same_id_fails(keyring: Keyring) -> None:
    blob = _seal(PLAIN, keyring)
    impostor = _same_id_other_secret(keyring)

    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(blob, impostor, **WHERE)


def _same_id_other_secret(keyring: Keyring) -> Keyring:
    from forseti.core.sealing.keyring import Key

    original = keyring.newest
    return Keyring([Key(original.key_id, os.urandom(32), original.created)])


def test_unknown_key_id_fails_and_peek_reads_it(keyring: Keyring) -> None:
    blob = _seal(PLAIN, keyring)

    assert peek_key_id(blob) == keyring.newest.key_id
    with pytest.raises(SealError, match="unknown key id"):
        open_sealed(blob, Keyring.generate(), **WHERE)


@pytest.mark.parametrize(
    "field,value", [("model", "other"), ("version", 3), ("filename", "model.onnx")]
)
def test_other_binding_fails(keyring: Keyring, field: str, value: object) -> None:
    blob = _seal(PLAIN, keyring)

    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(blob, keyring, **{**WHERE, field: value})


def test_changed_chunk_size_in_header_fails(keyring: Keyring) -> None:
    blob = bytearray(_seal(PLAIN, keyring))
    end = parse_header(bytes(blob)).body_offset
    blob[end - 4 : end] = struct.pack(">I", CHUNK * 2)

    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(bytes(blob), keyring, **WHERE)


def test_hostile_chunk_size_is_refused_before_reading(keyring: Keyring) -> None:
    blob = bytearray(_seal(PLAIN, keyring))
    end = parse_header(bytes(blob)).body_offset
    blob[end - 4 : end] = struct.pack(">I", 2**32 - 1)

    with pytest.raises(SealError, match="chunk size"):
        open_sealed(bytes(blob), keyring, **WHERE)


def test_every_single_byte_flip_fails(keyring: Keyring) -> None:
    blob = _seal(os.urandom(CHUNK + 10), keyring)

    for i in range(len(blob)):
        flipped = bytearray(blob)
        flipped[i] ^= 0x01
        with pytest.raises(SealError):
            open_sealed(bytes(flipped), keyring, **WHERE)


def test_stream_opener_reads_format_1_too(keyring: Keyring) -> None:
    blob = seal_bytes(PLAIN, keyring, **WHERE)

    assert _stream_open(blob, keyring) == PLAIN


def test_abandoned_writer_leaves_an_output_that_never_opens(keyring: Keyring) -> None:
    out = io.BytesIO()
    with pytest.raises(RuntimeError), SealingWriter(out, keyring, chunk_size=CHUNK, **WHERE) as w:
        w.write(PLAIN)
        raise RuntimeError("converter failed half-way")

    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(out.getvalue(), keyring, **WHERE)


def test_sealing_a_stream_holds_about_one_chunk_in_memory(keyring: Keyring) -> None:
    chunk = 1 << 20
    size = 32 * chunk
    src = io.BufferedReader(io.BytesIO(b"\0" * size))

    class Sink(io.RawIOBase):
        written = 0

        def writable(self) -> bool:
            return True

        def write(self, b: bytes) -> int:  # type: ignore[override]
            Sink.written += len(b)
            return len(b)

    tracemalloc.start()
    try:
        seal_stream(src, Sink(), keyring, chunk_size=chunk, **WHERE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert Sink.written > size
    assert peak < 4 * chunk, f"peak {peak} bytes while sealing {size}"


def test_seal_file_streams_format_2_when_asked(keyring: Keyring, tmp_path: Path) -> None:
    plain = tmp_path / "model.gguf"
    data = os.urandom(5000)
    plain.write_bytes(data)

    out = seal_file(plain, keyring, model="big", version=2, format_version=FORMAT_V2)

    assert parse_header(out.read_bytes()).format_version == FORMAT_V2
    assert open_sealed_file(out, keyring, model="big", version=2) == data
    assert not plain.exists()


def test_seal_file_keeps_format_1_for_small_files_by_default(
    keyring: Keyring, tmp_path: Path
) -> None:
    plain = tmp_path / "model.onnx"
    plain.write_bytes(b"small")

    out = seal_file(plain, keyring, model="m", version=1)

    assert parse_header(out.read_bytes()).format_version == 1


def test_seal_bytes_beyond_the_format_1_limit_seals_as_format_2(
    keyring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real limit is 2 GiB (AES-GCM's one-message maximum in cryptography); lowered here.
    monkeypatch.setattr(sealed_module, "MAX_V1_PLAINTEXT", 1000)
    plaintext = os.urandom(5000)
    blob = seal_bytes(plaintext, keyring, model="m", version=1, filename="model.onnx")
    assert parse_header(blob).format_version == FORMAT_V2
    assert open_sealed(blob, keyring, model="m", version=1, filename="model.onnx") == plaintext
