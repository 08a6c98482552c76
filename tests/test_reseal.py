"""Reseal: every artifact moves to the newest key atomically, formats and modes are kept,
damaged or foreign files are never replaced, and a server keeps answering throughout."""

from __future__ import annotations

import fcntl
import io
import json
import os
import threading
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from forseti.core.sealing.key_rotation import read_header_key, rotate_keyring, scan_key_usage
from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.reseal import (
    LOCK_NAME,
    ResealError,
    reseal_repository,
)
from forseti.core.sealing.sealed import (
    FORMAT_V2,
    open_sealed,
    open_sealed_stream,
    parse_header,
    seal_stream,
)
from testkit.model_builders import policy_onnx, publish_sealed
from testkit.server_process import run_forseti
from tests.test_swap import infer_policy, wait_for


def sealed_files(repo: Path) -> list[Path]:
    return sorted(repo.glob("*/*/*.sealed"))


def all_files(repo: Path) -> list[str]:
    return sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.name != LOCK_NAME)


def test_reseal_moves_every_artifact_to_the_newest_key_and_each_still_opens(
    own_repo: Path, own_keyring: Path
) -> None:
    plain = {
        p: open_sealed(p.read_bytes(), Keyring.load(own_keyring), **_binding(p))
        for p in sealed_files(own_repo)
    }
    new_key = rotate_keyring(own_keyring)
    only_new = Keyring([new_key])

    report = reseal_repository(own_repo, Keyring.load(own_keyring))

    assert len(report.resealed) == 3 and not report.problems
    # three artifacts and the three models' manifests
    assert len(report.manifests) == 3
    assert scan_key_usage([own_repo]).counts() == {new_key.key_id: 6}
    for path, data in plain.items():
        assert open_sealed(path.read_bytes(), only_new, **_binding(path)) == data


def _binding(path: Path) -> dict:
    return {
        "model": path.parent.parent.name,
        "version": int(path.parent.name),
        "filename": path.name.removesuffix(".sealed"),
    }


def test_format_2_files_stay_format_2_with_their_chunk_size(
    own_repo: Path, own_keyring: Path
) -> None:
    data = os.urandom(10_000)
    path = own_repo / "policy" / "1" / "extra.bin.sealed"
    with open(path, "wb") as out:
        seal_stream(
            io.BytesIO(data),
            out,
            Keyring.load(own_keyring),
            model="policy",
            version=1,
            filename="extra.bin",
            chunk_size=1024,
        )
    new_key = rotate_keyring(own_keyring)

    reseal_repository(own_repo, Keyring.load(own_keyring))

    header = parse_header(path.read_bytes()[:300])
    assert (header.format_version, header.chunk_size) == (FORMAT_V2, 1024)
    assert header.key_id == new_key.key_id
    with open(path, "rb") as fh:
        pieces = open_sealed_stream(
            fh, Keyring([new_key]), model="policy", version=1, filename="extra.bin"
        )
        assert b"".join(pieces) == data


def test_files_already_on_the_newest_key_are_left_untouched(own_repo: Path) -> None:
    inodes = [p.stat().st_ino for p in sealed_files(own_repo)]
    report = reseal_repository(own_repo, Keyring.load(own_repo.parent / "keys" / "keyring.json"))
    assert (len(report.resealed), report.current) == (0, 3)
    assert [p.stat().st_ino for p in sealed_files(own_repo)] == inodes


def test_reseal_keeps_file_modes_and_leaves_no_temporary_files(
    own_repo: Path, own_keyring: Path
) -> None:
    for p in sealed_files(own_repo):
        p.chmod(0o640)
    before = all_files(own_repo)
    rotate_keyring(own_keyring)

    reseal_repository(own_repo, Keyring.load(own_keyring))

    assert all_files(own_repo) == before
    assert {p.stat().st_mode & 0o777 for p in sealed_files(own_repo)} == {0o640}


def test_a_file_whose_key_is_not_in_the_keyring_is_reported_and_the_rest_resealed(
    own_repo: Path, own_keyring: Path
) -> None:
    publish_sealed(
        own_repo,
        "policy",
        policy_onnx(2),
        Keyring.generate(),
        version=2,
        manifest_keyring=Keyring.load(own_keyring),
    )
    foreign = own_repo / "policy" / "2" / "model.onnx.sealed"
    foreign_bytes = foreign.read_bytes()
    rotate_keyring(own_keyring)

    report = reseal_repository(own_repo, Keyring.load(own_keyring))

    assert len(report.resealed) == 3
    assert report.problems == [
        "policy/2/model.onnx.sealed: unknown key id (key "
        f"'{read_header_key(foreign)[0]}' is not in the keyring)"
    ]
    assert foreign.read_bytes() == foreign_bytes


def test_a_damaged_file_is_never_replaced(own_repo: Path, own_keyring: Path) -> None:
    damaged = own_repo / "simple" / "1" / "model.onnx.sealed"
    blob = bytearray(damaged.read_bytes())
    blob[-5] ^= 0xFF
    damaged.write_bytes(bytes(blob))
    before = all_files(own_repo)
    rotate_keyring(own_keyring)

    report = reseal_repository(own_repo, Keyring.load(own_keyring))

    assert [p.split(":")[0] for p in report.problems] == ["simple/1/model.onnx.sealed"]
    assert "authentication failed" in report.problems[0]
    assert damaged.read_bytes() == bytes(blob)
    assert all_files(own_repo) == before  # no temporary file left behind


def test_dry_run_lists_what_would_be_resealed_and_writes_nothing(
    own_repo: Path, own_keyring: Path
) -> None:
    rotate_keyring(own_keyring)
    contents = [p.read_bytes() for p in sealed_files(own_repo)]

    report = reseal_repository(own_repo, Keyring.load(own_keyring), dry_run=True)

    assert report.pending == sealed_files(own_repo)
    assert [p.read_bytes() for p in sealed_files(own_repo)] == contents


def test_a_second_reseal_of_the_same_repository_is_refused(
    own_repo: Path, own_keyring: Path
) -> None:
    with open(own_repo / LOCK_NAME, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ResealError, match="another reseal"):
            reseal_repository(own_repo, Keyring.load(own_keyring))


def test_reseal_command_reports_each_file_and_exits_1_on_problems(
    own_repo: Path, own_keyring: Path, tmp_path: Path
) -> None:
    rotate_keyring(own_keyring)
    audit = tmp_path / "audit.log"
    ok = run_forseti(
        "reseal", "--keyring", str(own_keyring), "--audit-log", str(audit), str(own_repo)
    )
    assert ok.returncode == 0, ok.stderr
    assert "resealed 3 file(s)" in ok.stdout
    assert ok.stdout.count("resealed policy/1/model.onnx.sealed") == 1
    events = [json.loads(x) for x in audit.read_text().splitlines()]
    assert [e["fields"]["model"] for e in events if e["event"] == "reseal.file"] == [
        "all_types",
        "policy",
        "simple",
    ]

    publish_sealed(
        own_repo,
        "policy",
        policy_onnx(2),
        Keyring.generate(),
        version=2,
        manifest_keyring=Keyring.load(own_keyring),
    )
    failed = run_forseti("reseal", "--keyring", str(own_keyring), str(own_repo))
    assert failed.returncode == 1
    assert "policy/2/model.onnx.sealed: unknown key id" in failed.stderr


# ---- end to end: rotation while serving ---------------------------------------------------


@pytest.mark.slow
def test_rotate_reseal_retire_under_steady_decision_calls_then_restart_still_serves(
    own_repo: Path, own_keyring: Path, tmp_path: Path, start_server
) -> None:
    for version in range(2, 6):  # more files to reseal, and the served one is the newest
        publish_sealed(own_repo, "policy", policy_onnx(version), Keyring.load(own_keyring))
    old_key = Keyring.load(own_keyring).newest.key_id
    audit = tmp_path / "server-audit.log"
    server = start_server(
        own_repo,
        "--model-control-mode",
        "poll",
        "--repository-poll-secs",
        "0.1",
        "--audit-log",
        str(audit),
        keyring=own_keyring,
    )

    stop = threading.Event()
    answers: list[int] = []
    failures: list[str] = []

    def decisions() -> None:
        client = grpcclient.InferenceServerClient(server.url)
        while not stop.is_set():
            try:
                answers.append(infer_policy(client)[1])
            except Exception as exc:
                failures.append(str(exc))
        client.close()

    callers = [threading.Thread(target=decisions) for _ in range(2)]
    for t in callers:
        t.start()
    try:
        wait_for(lambda: len(answers) > 20, 20, "first decisions")
        rotated = run_forseti("keys", "rotate", str(own_keyring))
        assert rotated.returncode == 0, rotated.stderr
        new_key = Keyring.load(own_keyring).newest.key_id

        refused = run_forseti(
            "keys", "retire", str(own_keyring), old_key, "--repository", str(own_repo)
        )
        assert refused.returncode == 1
        # seven artifacts and the three models' manifests
        assert f"needed by 10 sealed file(s) (10 in {own_repo})" in refused.stderr

        resealed = run_forseti("reseal", "--keyring", str(own_keyring), str(own_repo))
        assert resealed.returncode == 0, resealed.stderr
        assert "resealed 7 file(s)" in resealed.stdout

        def loaded_with_new_key() -> bool:
            events = [json.loads(x) for x in audit.read_text().splitlines()]
            return any(
                e["event"] == "model.version_loaded"
                and e["fields"]["model"] == "policy"
                and e["fields"]["key_id"] == new_key
                for e in events
            )

        # The poller reloads the resealed files while the calls go on.
        wait_for(loaded_with_new_key, 30, "the server to load the resealed policy")
        calls_at_swap = len(answers)
        wait_for(lambda: len(answers) > calls_at_swap + 20, 20, "decisions after the swap")

        retired = run_forseti(
            "keys", "retire", str(own_keyring), old_key, "--repository", str(own_repo)
        )
        assert retired.returncode == 0, retired.stderr
    finally:
        stop.set()
        for t in callers:
            t.join(30)

    assert failures == []
    assert set(answers) == {5}
    assert Keyring.load(own_keyring).key_ids == [new_key]

    server.stop()
    server.restart()  # only the new key now
    client = grpcclient.InferenceServerClient(server.url)
    assert infer_policy(client)[1] == 5
    assert client.is_model_ready("simple") and client.is_model_ready("all_types")
    client.close()
    server.stop()
    assert run_forseti("audit", "verify", str(audit)).returncode == 0
