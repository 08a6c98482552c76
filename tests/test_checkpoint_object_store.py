"""Checkpoints on an object store (issue 14, item 1: the trainer's [checkpoint] directory may
be s3://): written by claim, objects and commit marker, found and opened from the store, pruned
marker first; a checkpoint without its marker is never used. Against moto on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import safetensors.torch as st_torch
import torch

from forseti.core.repository.listing import COMMIT_NAME
from forseti.core.sealing.keyring import Keyring
from forseti.core.storage import open_storage
from forseti.trainer_sidecar.checkpoint_format import (
    CHECKPOINTS_DIR,
    OPTIMIZER_FILE,
    POLICY_FILE,
    checkpoint_folders,
    latest_valid_checkpoint,
    write_checkpoint,
)
from testkit.object_store import S3Server, s3_server

RUN = "cartpole-run"


@pytest.fixture(scope="module")
def store() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


@pytest.fixture
def run_dir(store: S3Server, request: pytest.FixtureRequest) -> str:
    bucket = request.node.name.lower().replace("_", "-")[:40].strip("-")
    return store.bucket(bucket) + "/runs/cartpole"


def save(run_dir: str, keyring: Keyring, step: int, keep: int = 3) -> int:
    files = {
        POLICY_FILE: st_torch.save({"policy/w": torch.full((2,), float(step))}),
        OPTIMIZER_FILE: st_torch.save({"policy/state/0/step": torch.tensor([step])}),
    }
    state = {
        "algorithm": "PPO",
        "num_timesteps": step,
        "counters": {"episodes": step},
        "spec": {"model": "cartpole"},
        "spec_hash": "abc",
    }
    info = write_checkpoint(run_dir, keyring, run_name=RUN, files=files, state=state, keep=keep)
    return info.number


def test_a_checkpoint_written_to_s3_is_found_and_opened_from_it(
    run_dir: str, keyring: Keyring
) -> None:
    assert save(run_dir, keyring, 100) == 1
    assert save(run_dir, keyring, 200) == 2
    loaded = latest_valid_checkpoint(run_dir, keyring, run_name=RUN, spec_hash="abc")
    assert loaded is not None
    assert loaded.info.number == 2 and loaded.info.num_timesteps == 200
    assert loaded.info.path == f"{run_dir}/{CHECKPOINTS_DIR}/2"
    assert torch.equal(loaded.policy["policy/w"], torch.full((2,), 200.0))
    names = {i.key.rsplit("/", 1)[1] for i in open_storage(run_dir).list_all(CHECKPOINTS_DIR)}
    assert names <= {"policy.safetensors.sealed", "optimizer.safetensors.sealed",
                     "state.json.sealed", COMMIT_NAME, ".forseti-claim"}  # fmt: skip


def test_old_checkpoints_are_pruned_and_numbers_never_reused(
    run_dir: str, keyring: Keyring
) -> None:
    numbers = [save(run_dir, keyring, 10 * n, keep=2) for n in range(1, 5)]
    assert numbers == [1, 2, 3, 4]
    assert sorted(checkpoint_folders(run_dir)) == [3, 4]
    assert save(run_dir, keyring, 50, keep=2) == 5


def test_a_checkpoint_without_its_commit_marker_is_never_used(
    run_dir: str, keyring: Keyring
) -> None:
    save(run_dir, keyring, 100)
    save(run_dir, keyring, 200)
    storage = open_storage(run_dir)
    storage.delete(f"{CHECKPOINTS_DIR}/2/{COMMIT_NAME}")  # as if the writer died before it
    loaded = latest_valid_checkpoint(run_dir, keyring, run_name=RUN)
    assert loaded is not None and loaded.info.number == 1
    assert save(run_dir, keyring, 300) == 3  # the claimed number is not taken again
