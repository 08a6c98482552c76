"""Key rotation: keyrings from the environment or a descriptor, keyring files re-read after a
rotation, and `keys rotate` / `keys retire` refusing while a sealed file needs the key."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from forseti.core.sealing.key_rotation import (
    KeyInUseError,
    retire_key,
    rotate_keyring,
    scan_key_usage,
)
from forseti.core.sealing.keyring import (
    KEYRING_ENV,
    KEYRING_FD_ENV,
    FileKeyring,
    Keyring,
    KeyringError,
    load_keyring,
)
from forseti.core.sealing.sealed import open_sealed, seal_bytes
from testkit.model_builders import build_repository, policy_onnx
from testkit.server_process import ServerProcess, run_forseti
from tests.test_swap import infer_policy

# ---- where the keyring comes from ---------------------------------------------------------


def test_keyring_json_in_the_environment_is_loaded_and_removed_from_it() -> None:
    ring = Keyring.generate()
    env = {KEYRING_ENV: ring.to_json()}

    loaded = load_keyring(environ=env)

    assert loaded.key_ids == ring.key_ids
    assert loaded.newest.secret == ring.newest.secret
    assert KEYRING_ENV not in env  # child processes do not inherit the keys


def test_keyring_environment_variable_may_name_a_file(own_keyring: Path) -> None:
    loaded = load_keyring(environ={KEYRING_ENV: str(own_keyring)})
    assert isinstance(loaded, FileKeyring)
    assert loaded.key_ids == Keyring.load(own_keyring).key_ids


def test_keyring_is_read_from_a_descriptor_which_is_then_closed() -> None:
    ring = Keyring.generate()
    read_fd, write_fd = os.pipe()
    os.write(write_fd, ring.to_json().encode())
    os.close(write_fd)

    loaded = load_keyring(environ={KEYRING_FD_ENV: str(read_fd)})

    assert loaded.key_ids == ring.key_ids
    with pytest.raises(OSError):
        os.fstat(read_fd)


def test_no_keyring_anywhere_says_every_way_to_give_one() -> None:
    with pytest.raises(KeyringError) as info:
        load_keyring(environ={})
    for hint in ("--keyring", KEYRING_ENV, KEYRING_FD_ENV):
        assert hint in str(info.value)


def test_invalid_keyring_json_in_the_environment_does_not_echo_it() -> None:
    env = {KEYRING_ENV: '{"format": "forseti-keyring/1", "keys": "SECRETSTUFF"'}
    with pytest.raises(KeyringError) as info:
        load_keyring(environ=env)
    assert "SECRETSTUFF" not in str(info.value)
    assert f"${KEYRING_ENV}" in str(info.value)


def test_keyring_descriptor_that_is_not_open_is_reported() -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    os.close(write_fd)
    with pytest.raises(KeyringError, match="cannot read it"):
        load_keyring(environ={KEYRING_FD_ENV: str(read_fd)})


def test_server_starts_with_the_keyring_json_in_its_environment(
    own_repo: Path, own_keyring: Path
) -> None:
    server = ServerProcess(
        own_repo,
        None,
        ["--model-control-mode", "explicit", "--load-model", "policy"],
        env={KEYRING_ENV: own_keyring.read_text()},
    ).start()
    try:
        client = grpcclient.InferenceServerClient(server.url)
        assert infer_policy(client)[1] == 1
        client.close()
    finally:
        server.stop()


# ---- a keyring file re-read after rotation ------------------------------------------------


def test_file_keyring_opens_seals_made_with_a_key_added_after_it_was_loaded(
    own_keyring: Path,
) -> None:
    running = load_keyring(own_keyring)  # what a server holds
    new_key = rotate_keyring(own_keyring)
    blob = seal_bytes(b"weights", Keyring.load(own_keyring), model="m", version=1, filename="f")

    assert open_sealed(blob, running, model="m", version=1, filename="f") == b"weights"
    assert new_key.key_id in running.key_ids


def test_file_keyring_seals_with_the_newest_key_after_a_rotation(own_keyring: Path) -> None:
    publisher = load_keyring(own_keyring)  # what a running sidecar holds
    new_key = rotate_keyring(own_keyring)
    assert publisher.newest.key_id == new_key.key_id


def test_file_keyring_keeps_its_keys_when_the_file_turns_invalid(own_keyring: Path) -> None:
    running = load_keyring(own_keyring)
    ids = running.key_ids
    own_keyring.write_text("{broken")
    assert running.newest.key_id == ids[-1]
    with pytest.raises(KeyringError, match="unknown key id"):
        running.get("k-none")


# ---- rotate and retire --------------------------------------------------------------------


def test_rotate_adds_a_newest_key_and_keeps_the_old_ones(own_keyring: Path) -> None:
    old = Keyring.load(own_keyring).key_ids
    new_key = rotate_keyring(own_keyring)
    ring = Keyring.load(own_keyring)
    assert ring.key_ids == [*old, new_key.key_id]
    assert ring.newest.key_id == new_key.key_id
    assert own_keyring.stat().st_mode & 0o777 == 0o600


def test_scan_counts_sealed_files_per_key(own_repo: Path, own_keyring: Path) -> None:
    usage = scan_key_usage([own_repo])
    # three artifacts and the three models' manifests (they need the key too)
    assert usage.counts() == {Keyring.load(own_keyring).newest.key_id: 6}


def test_retire_is_refused_while_artifacts_need_the_key(
    own_repo: Path, own_keyring: Path, tmp_path: Path
) -> None:
    old = Keyring.load(own_keyring).newest.key_id
    rotate_keyring(own_keyring)
    other = tmp_path / "other-repo"
    other.mkdir()
    build_repository(other, Keyring.load(own_keyring))  # new key: needs nothing old
    before = own_keyring.read_bytes()

    with pytest.raises(KeyInUseError) as info:
        retire_key(own_keyring, old, [own_repo, other])

    message = str(info.value)
    assert f"still needed by 6 sealed file(s) (6 in {own_repo})" in message
    assert "forseti reseal" in message
    assert own_keyring.read_bytes() == before


def test_retire_counts_a_publish_still_in_progress(own_keyring: Path, tmp_path: Path) -> None:
    old_ring = Keyring.load(own_keyring)
    repo = tmp_path / "repo"
    pending = repo / "policy" / ".publish-0123"
    pending.mkdir(parents=True)
    (pending / "model.onnx.sealed").write_bytes(
        seal_bytes(policy_onnx(1), old_ring, model="policy", version=2, filename="model.onnx")
    )
    rotate_keyring(own_keyring)

    with pytest.raises(KeyInUseError, match="needed by 1 sealed file"):
        retire_key(own_keyring, old_ring.newest.key_id, [repo])


def test_retire_refuses_the_newest_key(own_keyring: Path, tmp_path: Path) -> None:
    newest = Keyring.load(own_keyring).newest.key_id
    with pytest.raises(KeyringError, match="newest key"):
        retire_key(own_keyring, newest, [tmp_path])


def test_retire_removes_a_key_nothing_needs(own_repo: Path, own_keyring: Path) -> None:
    first = Keyring.load(own_keyring).newest.key_id
    rotate_keyring(own_keyring)
    unused = rotate_keyring(own_keyring).key_id
    rotate_keyring(own_keyring)

    remaining = retire_key(own_keyring, unused, [own_repo])

    assert unused not in remaining.key_ids
    assert unused not in Keyring.load(own_keyring).key_ids
    assert first in Keyring.load(own_keyring).key_ids


def test_keys_retire_command_exits_1_naming_count_and_repository(
    own_repo: Path, own_keyring: Path
) -> None:
    old = Keyring.load(own_keyring).newest.key_id
    assert run_forseti("keys", "rotate", str(own_keyring)).returncode == 0

    result = run_forseti("keys", "retire", str(own_keyring), old, "--repository", str(own_repo))

    assert result.returncode == 1
    assert f"needed by 6 sealed file(s) (6 in {own_repo})" in result.stderr
    assert old in Keyring.load(own_keyring).key_ids


def test_keys_list_shows_ids_and_usage_but_no_secret(own_repo: Path, own_keyring: Path) -> None:
    old = Keyring.load(own_keyring).newest.key_id
    rotate_keyring(own_keyring)
    result = run_forseti("keys", "list", str(own_keyring), "--repository", str(own_repo))
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith(old) and "6 sealed file(s)" in lines[0]
    assert "0 sealed file(s) (newest: seals)" in lines[1]
    secrets_b64 = [e["secret"] for e in json.loads(own_keyring.read_text())["keys"]]
    assert not any(s in result.stdout for s in secrets_b64)


def test_rotate_and_retire_are_audited(own_repo: Path, own_keyring: Path, tmp_path: Path) -> None:
    audit = tmp_path / "audit.log"
    old = Keyring.load(own_keyring).newest.key_id
    assert (
        run_forseti("keys", "rotate", str(own_keyring), "--audit-log", str(audit)).returncode == 0
    )
    assert run_forseti("reseal", "--keyring", str(own_keyring), str(own_repo)).returncode == 0
    result = run_forseti(
        "keys",
        "retire",
        str(own_keyring),
        old,
        "--repository",
        str(own_repo),
        "--audit-log",
        str(audit),
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [e["event"] for e in events if e["event"].startswith("keys.")] == [
        "keys.rotate",
        "keys.retire",
    ]
    assert events[-1]["fields"]["key_id"] == old
    assert run_forseti("audit", "verify", str(audit)).returncode == 0
