"""Opening the chunked seal format holds the ciphertext and one plaintext, never a second full
copy of the plaintext (issue 13, finding 8), measured with tracemalloc; and a model sealed that
way still serves."""

from __future__ import annotations

import hashlib
import io
import os
import tracemalloc
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.sealed import open_sealed, open_sealed_buffer, seal_stream
from testkit.model_builders import (
    POLICY_CONFIG,
    authenticate_model,
    policy_onnx,
    publish_version,
    write_config,
)

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


def test_an_onnx_policy_sealed_in_chunks_is_served(
    repository: Path, keyring: Keyring, start_server
) -> None:
    """The loader hands onnxruntime bytes made from the opened buffer (it takes no other type)."""
    write_config(repository, "chunked", POLICY_CONFIG.replace('"policy"', '"chunked"'))

    def files(version: int) -> dict[str, bytes]:
        out = io.BytesIO()
        seal_stream(
            io.BytesIO(policy_onnx(1)), out, keyring, model="chunked", version=version,
            filename="model.onnx", chunk_size=256,
        )  # fmt: skip
        return {"model.onnx.sealed": out.getvalue()}

    publish_version(repository / "chunked", files, version=1)
    authenticate_model(repository, "chunked", keyring)
    server = start_server(repository, "--model-control-mode", "explicit", "--load-model", "*")
    client = grpcclient.InferenceServerClient(server.url)
    try:
        obs = np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8)
        answers = []
        for model in ("chunked", "policy"):  # the same network, sealed in format 2 and 1
            inp = grpcclient.InferInput("obs", [1, 8], "FP32")
            inp.set_data_from_numpy(obs)
            answers.append(client.infer(model, [inp]).as_numpy("logits"))
    finally:
        client.close()
    np.testing.assert_array_equal(answers[0], answers[1])
