"""Peak memory of opening a chunked (format 2) sealed artifact, measured with tracemalloc.

    python -m benchmarks.bench_sealed_memory [--mib 12 64]

For each size: the peak while reading the file and opening it with `open_sealed` (bytes, as
callers that need bytes get it) and with `open_sealed_buffer` (the one buffer the server's
loader uses), shown as the ciphertext plus a multiple of the plaintext.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.sealed import open_sealed, open_sealed_buffer, seal_stream

CHUNK = 1 << 20
MODEL, VERSION, FILENAME = "policy", 1, "model.onnx"


def _peak(path: Path, keyring: Keyring, opener: Callable[..., object]) -> tuple[int, int]:
    """(peak bytes traced while reading and opening, ciphertext bytes)."""
    tracemalloc.start()
    try:
        blob = path.read_bytes()
        opened = opener(blob, keyring, model=MODEL, version=VERSION, filename=FILENAME)
        _, peak = tracemalloc.get_traced_memory()
        del opened
    finally:
        tracemalloc.stop()
    return peak, len(blob)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, nargs="+", default=[12, 64])
    args = parser.parse_args()
    keyring = Keyring.generate()
    print("| plaintext | opener | peak MiB | peak = ciphertext + |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for mib in args.mib:
            plain_bytes = mib * 1024 * 1024 + 12345  # the last chunk partial
            out = io.BytesIO()
            seal_stream(
                io.BytesIO(os.urandom(plain_bytes)), out, keyring,
                model=MODEL, version=VERSION, filename=FILENAME, chunk_size=CHUNK,
            )  # fmt: skip
            path = Path(tmp) / f"{mib}.sealed"
            path.write_bytes(out.getvalue())
            del out
            for name, opener in (
                ("open_sealed (bytes)", open_sealed),
                ("open_sealed_buffer", open_sealed_buffer),
            ):
                peak, ciphertext = _peak(path, keyring, opener)
                extra = (peak - ciphertext) / plain_bytes
                print(f"| {mib} MiB | {name} | {peak / 2**20:.1f} | {extra:.2f} x plaintext |")


if __name__ == "__main__":
    main()
