"""Local mode: the client runs the policy in process from the sealed repository, follows new
versions, and leaves to the server what it cannot answer."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from forseti.client import AsyncDecisionClient, DecisionClient, DecisionRejected, LocalPolicy
from forseti.core.repository.manifest import commit_manifest, pinned
from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.sealed import seal_bytes
from forseti.core.storage import open_storage
from testkit.model_builders import policy_onnx, publish_sealed
from testkit.server_process import ServerProcess

OBS = np.full(8, 0.1, np.float32)


def test_local_mode_answers_in_process_and_follows_a_new_version(
    repository: Path, keyring: Keyring, keyring_path: Path
) -> None:
    local = LocalPolicy(repository, "policy", keyring_path, poll_s=0.05)
    with DecisionClient([], "policy", fallback=-1, local=local) as client:
        first = client.decide(OBS)
        publish_sealed(repository, "policy", policy_onnx(2), keyring, version=2)
        end = time.monotonic() + 10
        latest = first
        while latest.model_version != "2" and time.monotonic() < end:
            time.sleep(0.02)
            latest = client.decide(OBS)
    assert (first.endpoint, first.model_version, first.action.tolist()) == ("local", "1", [1])
    assert (latest.endpoint, latest.model_version, latest.action.tolist()) == ("local", "2", [2])
    assert not latest.fallback_used


def test_a_version_that_fails_to_open_leaves_the_local_one_answering(
    repository: Path, keyring: Keyring, keyring_path: Path
) -> None:
    local = LocalPolicy(repository, "policy", keyring_path, poll_s=0)
    publish_sealed(repository, "policy", policy_onnx(2), keyring, version=2)
    sealed = repository / "policy" / "2" / "model.onnx.sealed"
    blob = bytearray(sealed.read_bytes())
    blob[-1] ^= 1  # altered after publishing: it no longer opens
    sealed.write_bytes(bytes(blob))
    assert not local.refresh()
    assert local.version == 1 and local.last_error is not None
    answered = local.run({"obs": OBS[None]})
    assert answered is not None
    outputs, version = answered
    assert version == "1" and outputs["action"].tolist() == [[1]]


def test_a_version_folder_added_without_the_manifest_is_never_opened(
    repository: Path, keyring: Keyring, keyring_path: Path
) -> None:
    local = LocalPolicy(repository, "policy", keyring_path, poll_s=0)
    folder = repository / "policy" / "2"  # sealed with the key, but not published
    folder.mkdir()
    blob = seal_bytes(policy_onnx(2), keyring, model="policy", version=2, filename="model.onnx")
    (folder / "model.onnx.sealed").write_bytes(blob)
    local.refresh()
    assert local.version == 1


def test_local_mode_follows_a_rollback_pin_in_the_manifest(
    repository: Path, keyring: Keyring, keyring_path: Path
) -> None:
    publish_sealed(repository, "policy", policy_onnx(2), keyring, version=2)
    local = LocalPolicy(repository, "policy", keyring_path, poll_s=0)
    assert local.version == 2
    commit_manifest(
        open_storage(repository),
        "policy",
        keyring,
        lambda manifest: pinned(manifest, [1], "rollback"),  # type: ignore[arg-type]
    )
    assert local.refresh() and local.version == 1


def test_the_server_answers_what_local_mode_cannot(
    shared_server: ServerProcess, repository: Path, tmp_path: Path
) -> None:
    wrong_keys = tmp_path / "wrong.json"
    Keyring.generate().save(wrong_keys)
    unopened = LocalPolicy(repository, "policy", wrong_keys, poll_s=0)
    opened = LocalPolicy(repository, "policy", Keyring.load(shared_server.keyring), poll_s=0)
    assert unopened.version is None and opened.version == 1
    with (
        DecisionClient([shared_server.url], "policy", deadline_ms=2000, local=unopened) as a,
        DecisionClient([shared_server.url], "policy", deadline_ms=2000, local=opened) as b,
    ):
        no_version = a.decide(OBS)
        pinned = b.decide(OBS, version=1)
        with_parameters = b.decide(OBS, parameters={"priority": 1})
        with pytest.raises(DecisionRejected) as other_version:
            b.decide(OBS, version=3)  # not open locally: the server says it has none either
    assert no_version.endpoint == shared_server.url and not no_version.fallback_used
    assert pinned.endpoint == "local"
    assert with_parameters.endpoint == shared_server.url
    assert other_version.value.endpoint == shared_server.url


def test_local_mode_refuses_bad_input_as_the_server_would(
    repository: Path, keyring_path: Path
) -> None:
    local = LocalPolicy(repository, "policy", keyring_path, poll_s=0)
    with DecisionClient([], "policy", local=local) as client, pytest.raises(DecisionRejected) as e:
        client.decide(np.zeros(5, np.float32))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.endpoint == "local"
    assert "expects FP32 [-1, 8]" in e.value.message


def test_the_async_client_answers_locally_too(repository: Path, keyring_path: Path) -> None:
    async def scenario() -> tuple[str | None, str | None, tuple[int, ...]]:
        local = LocalPolicy(repository, "policy", keyring_path, poll_s=0)
        async with AsyncDecisionClient([], "policy", fallback=-1, local=local) as client:
            one = await client.decide(OBS)
            batch = await client.decide_batch(np.zeros((3, 8), np.float32))
        return one.endpoint, batch.model_version, batch.action.shape

    assert asyncio.run(scenario()) == ("local", "1", (3, 1))
