"""`forseti keys rotate|retire` hold a lock on the keyring (a second command is refused and
changes nothing), and `retire` finds sealed files through the symlinked model and version
folders a server follows (issue 13, finding 9)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from forseti.core.sealing.key_rotation import (
    KeyInUseError,
    KeyringLockedError,
    keyring_lock,
    lock_path,
    retire_key,
    rotate_keyring,
)
from forseti.core.sealing.keyring import Keyring
from testkit.model_builders import POLICY_CONFIG, policy_onnx, publish_sealed, write_config
from testkit.server_process import run_forseti

# Another process holding the lock as a second `forseti keys` command would, until killed.
HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def test_keys_rotate_is_refused_while_another_process_holds_the_keyring_lock(
    own_keyring: Path,
) -> None:
    before = own_keyring.read_bytes()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(lock_path(own_keyring))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        result = run_forseti("keys", "rotate", str(own_keyring))
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1
    assert "another keys command holds the lock" in result.stderr
    assert own_keyring.read_bytes() == before
    # Once the other command is gone, the same command goes through.
    assert run_forseti("keys", "rotate", str(own_keyring)).returncode == 0
    assert len(Keyring.load(own_keyring).key_ids) == 2


def test_retire_is_refused_while_the_keyring_is_locked(own_keyring: Path, tmp_path: Path) -> None:
    old = Keyring.load(own_keyring).newest.key_id
    rotate_keyring(own_keyring)
    before = own_keyring.read_bytes()
    with keyring_lock(own_keyring), pytest.raises(KeyringLockedError, match="holds the lock"):
        retire_key(own_keyring, old, [tmp_path])
    assert own_keyring.read_bytes() == before


def test_retire_finds_keys_needed_through_symlinked_model_and_version_folders(
    own_keyring: Path, tmp_path: Path
) -> None:
    """The server lists model and version folders with os.scandir's is_dir(), which follows
    symlinks; os.walk does not descend into them, so before this a retire passed while the
    server still served artifacts that needed the key."""
    old_ring = Keyring.load(own_keyring)
    outside = tmp_path / "volumes"
    # A whole model folder kept elsewhere, linked into the repository.
    write_config(outside, "linked_model", POLICY_CONFIG.replace('"policy"', '"linked_model"'))
    publish_sealed(outside, "linked_model", policy_onnx(1), old_ring, version=1)
    # A version folder kept elsewhere, linked into a real model folder.
    write_config(outside, "staging", POLICY_CONFIG)
    publish_sealed(outside, "staging", policy_onnx(2), old_ring, version=7)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "linked_model").symlink_to(outside / "linked_model", target_is_directory=True)
    write_config(repo, "policy", POLICY_CONFIG)
    (repo / "policy" / "7").symlink_to(outside / "staging" / "7", target_is_directory=True)
    rotate_keyring(own_keyring)
    before = own_keyring.read_bytes()

    with pytest.raises(KeyInUseError) as info:
        retire_key(own_keyring, old_ring.newest.key_id, [repo])

    message = str(info.value)
    # The two artifacts (and the linked model's manifest, which the key also sealed).
    assert str(repo / "linked_model" / "1" / "model.onnx.sealed") in message
    assert str(repo / "policy" / "7" / "model.onnx.sealed") in message
    assert own_keyring.read_bytes() == before
