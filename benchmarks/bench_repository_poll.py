"""The cost of a repository poll and of a version load, on a local S3 server (moto) and on a
local folder.

    python -m benchmarks.bench_repository_poll [--models 10] [--versions 5] [--polls 20]

Counts the storage requests one poll makes (a poll that finds nothing changed: one listing
of the root and one per model), times the poll, and times reading + opening + building one
sealed version from each kind of repository.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from forseti.core.repository.config import model_spec, parse_config_text
from forseti.core.repository.listing import list_model, list_model_names
from forseti.core.repository.publish import publish_model_version
from forseti.core.sealing.keyring import Keyring
from forseti.core.storage import ObjectInfo, Storage, open_storage
from forseti.core.storage.base import Listing
from testkit.model_builders import POLICY_CONFIG, policy_onnx
from testkit.object_store import s3_server


class CountingStorage(Storage):
    """Counts the calls (each one request on an object store, one page of 1000 per listing)."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.location = inner.location
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def list_dir(self, prefix: str) -> Listing:
        self._count("list")
        return self.inner.list_dir(prefix)

    def list_all(self, prefix: str) -> list[ObjectInfo]:
        self._count("list")
        return self.inner.list_all(prefix)

    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        self._count("get")
        return self.inner.read(key, max_bytes)

    def read_object(self, key: str, max_bytes: int | None = None) -> tuple[bytes, ObjectInfo]:
        self._count("get")
        return self.inner.read_object(key, max_bytes)

    def stat(self, key: str) -> ObjectInfo | None:
        self._count("head")
        return self.inner.stat(key)

    def write(self, key: str, data: bytes) -> ObjectInfo:
        return self.inner.write(key, data)

    def create(self, key: str, data: bytes) -> ObjectInfo:
        return self.inner.create(key, data)

    def replace(self, key: str, data: bytes, etag: str) -> ObjectInfo:
        return self.inner.replace(key, data, etag)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


def _fill(storage: Storage, keyring: Keyring, models: int, versions: int) -> None:
    for m in range(models):
        name = f"policy{m}"
        config = POLICY_CONFIG.replace('name: "policy"', f'name: "{name}"')
        for v in range(versions):
            publish_model_version(
                storage, name, {"model.onnx": policy_onnx(v)}, keyring=keyring, config_text=config
            )


def _poll_cost(storage: Storage, polls: int, models: int) -> tuple[float, float]:
    counting = CountingStorage(storage)
    times = []
    for _ in range(polls):
        start = time.perf_counter()
        for name in list_model_names(counting):
            list_model(counting, name)
        times.append((time.perf_counter() - start) * 1e3)
    per_model = sum(counting.calls.values()) / polls / models
    return per_model, statistics.median(times)


def _load_ms(storage: Storage, keyring: Keyring, rounds: int = 10) -> float:
    from forseti.server.registry.version_loader import VersionLoader

    loader = VersionLoader(keyring, allow_plaintext=False)
    spec = model_spec(parse_config_text(POLICY_CONFIG.replace('"policy"', '"policy0"'), "policy0"),
                      "policy0")  # fmt: skip
    listed = list_model(storage, "policy0").versions[1]
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        opened = loader.open(spec, storage, listed, 1, "")
        times.append((time.perf_counter() - start) * 1e3)
        opened.backend.close()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--versions", type=int, default=5)
    parser.add_argument("--polls", type=int, default=20)
    args = parser.parse_args()
    keyring = Keyring.generate()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, s3_server() as s3:
        for kind, storage in (
            ("folder", open_storage(Path(tmp))),
            ("s3 (moto)", open_storage(s3.bucket("bench-poll") + "/repo")),
        ):
            _fill(storage, keyring, args.models, args.versions)
            per_model, poll_ms = _poll_cost(storage, args.polls, args.models)
            rows.append((kind, per_model, poll_ms, _load_ms(storage, keyring)))
    print(f"{args.models} models x {args.versions} versions, {args.polls} polls")
    print("| repository | requests per model per poll | poll p50 (ms) | version load p50 (ms) |")
    print("|---|---|---|---|")
    for kind, per_model, poll_ms, load_ms in rows:
        print(f"| {kind} | {per_model:.2f} | {poll_ms:.1f} | {load_ms:.1f} |")


if __name__ == "__main__":
    main()
