"""Folders among the versions whose names are not version numbers (issue 13, finding 6).

`str.isdigit()` took "²" (which int() then refused, so `forseti serve` exited at start and a
poll stopped for every model) and "٣" and "03" (which int() read as 3). A version folder is
named in ASCII digits with no leading zero; anything else is skipped with a warning.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from forseti.core.sealing.key_rotation import rotate_keyring, scan_key_usage
from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.reseal import reseal_repository
from forseti.core.sealing.sealed import seal_bytes
from forseti.trainer_sidecar.checkpoint_format import latest_valid_checkpoint, write_checkpoint
from testkit.model_builders import policy_onnx, publish_sealed
from tests.test_swap import infer_policy, wait_for

ODD = ["²", "٣", "03", "1.5", "-1", "+2", " 4", "1" * 40]


def add_odd_folders(model_dir: Path, keyring: Keyring, names: list[str] = ODD) -> None:
    """Odd folders, each holding a sealed policy that would load if it were taken for a
    version (sealed for version 3, the number "٣" and "03" were read as)."""
    blob = seal_bytes(
        policy_onnx(9), keyring, model=model_dir.name, version=3, filename="model.onnx"
    )
    for name in names:
        folder = model_dir / name
        folder.mkdir()
        (folder / "model.onnx.sealed").write_bytes(blob)


def versions_of(client: grpcclient.InferenceServerClient, name: str) -> list[str]:
    index = client.get_model_repository_index(as_json=True).get("models", [])
    return sorted(m.get("version", "") for m in index if m["name"] == name)


def test_serve_starts_and_serves_with_odd_version_folders(
    repository: Path, keyring: Keyring, start_server
) -> None:
    add_odd_folders(repository / "policy", keyring)
    server = start_server(repository)  # "²" made this exit 1 at start
    client = grpcclient.InferenceServerClient(server.url)
    try:
        assert client.is_model_ready("policy", "1")
        assert not client.is_model_ready("policy", "3")
        assert infer_policy(client) == (1, 1)
        assert versions_of(client, "policy") == ["1"]
        log = server.log()
        for name in ODD:
            assert f"skipping folder {str(repository / 'policy' / name)!r}" in log, name
    finally:
        client.close()


def test_poll_keeps_polling_other_models_when_one_has_an_odd_folder(
    repository: Path, keyring: Keyring, start_server
) -> None:
    server = start_server(
        repository, "--model-control-mode", "poll", "--repository-poll-secs", "0.2"
    )
    client = grpcclient.InferenceServerClient(server.url)
    try:
        assert infer_policy(client) == (1, 1)
        add_odd_folders(repository / "all_types", keyring, ["²"])  # polled first
        time.sleep(0.6)  # a few polls with the odd folder present
        publish_sealed(repository, "policy", policy_onnx(2), keyring, version=2)
        wait_for(lambda: infer_policy(client) == (2, 2), what="policy v2 to be served")
        assert client.is_model_ready("all_types", "1")
        assert server.proc is not None and server.proc.poll() is None
        # Warned about once, not on every poll.
        assert server.log().count(f"skipping folder {str(repository / 'all_types' / '²')!r}") == 1
    finally:
        client.close()


def test_reseal_skips_odd_version_folders(own_repo: Path, own_keyring: Path) -> None:
    add_odd_folders(own_repo / "policy", Keyring.load(own_keyring))
    new_key = rotate_keyring(own_keyring)

    report = reseal_repository(own_repo, Keyring.load(own_keyring))  # "²" raised ValueError

    assert len(report.resealed) == 3 and not report.problems
    resealed = {p.relative_to(own_repo).parts[:2] for p in (r.path for r in report.resealed)}
    assert resealed == {("policy", "1"), ("simple", "1"), ("all_types", "1")}
    # The odd folders' files were left as they were, under the old key.
    # three artifacts and the three models' manifests
    assert scan_key_usage([own_repo]).counts()[new_key.key_id] == 6


STATE = {
    "algorithm": "PPO",
    "num_timesteps": 0,
    "counters": {"episodes": 0},
    "spec": {},
    "spec_hash": "h",
}


def test_checkpoint_scan_skips_odd_folders(tmp_path: Path, keyring: Keyring) -> None:
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for name in ODD:
        (checkpoints / name).mkdir()
    # Only odd folders: no checkpoint at all ("²" raised ValueError, "٣" was tried as 3).
    assert latest_valid_checkpoint(tmp_path / "run", keyring, run_name="r") is None
    # The next checkpoint is number 1, not 4 ("٣" and "03" counted as 3).
    info = write_checkpoint(tmp_path / "run", keyring, run_name="r", files={}, state=STATE)
    assert info.number == 1


@pytest.mark.parametrize("name", ["²", "٣", "03"])
def test_publish_numbers_past_real_versions_only(
    tmp_path: Path, keyring: Keyring, name: str
) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / name).mkdir()
    assert publish_sealed(tmp_path, "m", b"x", keyring) == 1
