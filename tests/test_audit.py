"""Audit log: the hash chain, tamper detection at the right line, torn tails from killed
writers, field rules, and a real server recording every control call."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from forseti.core.audit import (
    GENESIS,
    OPEN_EVENT,
    TORN_EVENT,
    AuditError,
    AuditFieldError,
    AuditLog,
    line_hash,
    parse_head,
    verify_file,
)
from forseti.core.sealing.keyring import Keyring
from testkit.model_builders import POLICY_CONFIG, policy_onnx, publish_sealed, write_config
from testkit.server_process import run_forseti
from tests.test_swap import infer_policy

N_RECORDS = 7  # plus the audit.open line: 8 lines


def write_log(path: Path, n: int = N_RECORDS) -> list[bytes]:
    with AuditLog.open(path, component="test") as audit:
        for i in range(n):
            audit.record("test.step", i=i, note=f"step {i}")
    return path.read_bytes().splitlines(keepends=True)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


# ---- the chain ----------------------------------------------------------------------------


def test_each_line_carries_the_sha256_of_the_line_before(tmp_path: Path) -> None:
    lines = write_log(tmp_path / "audit.log")

    docs = [json.loads(line) for line in lines]
    assert docs[0]["event"] == OPEN_EVENT and docs[0]["prev"] == GENESIS
    for before, doc in zip(lines, docs[1:], strict=False):
        assert doc["prev"] == line_hash(before)
    assert [d["seq"] for d in docs] == list(range(1, N_RECORDS + 2))


def test_verify_accepts_an_untouched_log_and_reports_its_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog.open(path) as audit:
        audit.record("test.step", i=1)
        head = audit.head

    result = verify_file(path)

    assert result.ok and result.lines == 2
    assert (result.head_seq, result.head_hash) == head
    assert parse_head(result.head) == head


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 2)
    with AuditLog.open(path) as audit:
        seq = audit.record("test.more")

    assert seq == 5  # open, 2 steps, open again, this one
    assert verify_file(path).ok
    assert [r["event"] for r in records(path)].count(OPEN_EVENT) == 2


def test_a_second_writer_on_the_same_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog.open(path), pytest.raises(AuditError, match="held by another process"):
        AuditLog.open(path)


def test_new_log_file_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    old = os.umask(0)
    try:
        AuditLog.open(path).close()
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600


def test_concurrent_threads_and_tasks_keep_one_unbroken_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog.open(path)

    def worker(t: int) -> None:
        for i in range(25):
            audit.record("test.thread", t=t, i=i)

    async def tasks() -> None:
        await asyncio.gather(*(audit.arecord("test.task", i=i) for i in range(25)))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    asyncio.run(tasks())
    for t in threads:
        t.join()
    audit.close()

    result = verify_file(path)
    assert result.ok and result.lines == 1 + 4 * 25 + 25


# ---- tampering is found at the line it happened -------------------------------------------

# Positions are 1-based line numbers; the last line is covered by the head tests below.
INNER = list(range(1, N_RECORDS + 1))


@pytest.mark.parametrize("line_no", INNER)
def test_editing_a_line_breaks_verify_at_that_line(tmp_path: Path, line_no: int) -> None:
    path = tmp_path / "audit.log"
    lines = write_log(path)
    doc = json.loads(lines[line_no - 1])
    doc["fields"]["edited"] = True
    lines[line_no - 1] = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))

    result = verify_file(path)

    assert not result.ok
    assert result.broken_line == line_no
    assert "altered" in result.reason


@pytest.mark.parametrize("line_no", INNER)
def test_deleting_a_line_breaks_verify_at_that_line(tmp_path: Path, line_no: int) -> None:
    path = tmp_path / "audit.log"
    lines = write_log(path)
    del lines[line_no - 1]
    path.write_bytes(b"".join(lines))

    result = verify_file(path)

    assert not result.ok
    assert result.broken_line == line_no
    assert "removed" in result.reason


@pytest.mark.parametrize("line_no", INNER)
def test_swapping_a_line_with_the_next_breaks_verify_at_that_line(
    tmp_path: Path, line_no: int
) -> None:
    path = tmp_path / "audit.log"
    lines = write_log(path)
    lines[line_no - 1], lines[line_no] = lines[line_no], lines[line_no - 1]
    path.write_bytes(b"".join(lines))

    result = verify_file(path)

    assert not result.ok
    assert result.broken_line == line_no


def test_editing_a_line_and_recomputing_the_rest_of_the_chain_is_caught_by_the_head(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    write_log(path)
    head = parse_head(verify_file(path).head)
    docs = records(path)
    docs[2]["fields"]["note"] = "rewritten"
    prev, out = GENESIS, b""
    for doc in docs:  # an insider who knows the format recomputes every later prev
        doc["prev"] = prev
        line = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
        prev, out = line_hash(line), out + line
    path.write_bytes(out)

    assert verify_file(path).ok  # the chain alone cannot see a full recomputation
    result = verify_file(path, head)
    assert not result.ok and result.broken_line == len(docs)
    assert "rewritten" in result.reason


@pytest.mark.parametrize("change", ["delete_last", "delete_last_two", "edit_last"])
def test_changing_the_last_lines_is_caught_by_the_recorded_head(
    tmp_path: Path, change: str
) -> None:
    path = tmp_path / "audit.log"
    lines = write_log(path)
    head = parse_head(verify_file(path).head)
    if change == "delete_last":
        lines = lines[:-1]
    elif change == "delete_last_two":
        lines = lines[:-2]
    else:
        lines[-1] = lines[-1].replace(b"step 6", b"step X")
    path.write_bytes(b"".join(lines))

    result = verify_file(path, head)

    assert not result.ok
    if change == "edit_last":
        assert result.broken_line == len(lines)
    else:
        assert "removed" in result.reason


# ---- torn lines from killed writers -------------------------------------------------------


def test_a_torn_last_line_fails_verify_after_the_last_complete_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = write_log(path)
    path.write_bytes(b"".join(lines[:-1]) + lines[-1][:40])

    result = verify_file(path)

    assert not result.ok
    assert result.lines == len(lines) - 1
    assert result.broken_line == len(lines)
    assert result.torn_tail_bytes == 40


def test_bytes_appended_without_a_newline_fail_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = write_log(path)
    with open(path, "ab") as fh:
        fh.write(b'{"seq":999,"event":"model.version_loaded"')

    result = verify_file(path)

    assert not result.ok
    assert result.broken_line == len(lines) + 1
    assert "without a newline" in result.reason


def test_the_next_writer_records_a_torn_tail_and_the_chain_still_verifies(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    lines = write_log(path)
    torn = lines[-1][:40]
    path.write_bytes(b"".join(lines[:-1]) + torn)

    with AuditLog.open(path) as audit:
        audit.record("test.after")

    result = verify_file(path)
    assert result.ok
    assert result.recovered_tears == (len(lines),)
    after = path.read_bytes().splitlines()[len(lines) :]
    tear = json.loads(after[0])
    assert tear["event"] == TORN_EVENT
    assert tear["fields"]["torn_bytes"] == 40
    assert tear["prev"] == line_hash(lines[-2])  # chained to the last complete line
    assert [json.loads(x)["event"] for x in after[1:]] == [OPEN_EVENT, "test.after"]


def test_a_log_ending_in_a_line_that_is_no_record_is_not_continued(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 1)
    with open(path, "ab") as fh:
        fh.write(b"not a record\n")

    with pytest.raises(AuditError, match="audit verify"):
        AuditLog.open(path)


WRITER = """
import sys
from forseti.core.audit import AuditLog
audit = AuditLog.open(sys.argv[1], component="writer")
i = 0
while True:
    # Big records make a write long enough for SIGKILL to land inside it now and then.
    seq = audit.record("test.bulk", i=i, blob=[sys.argv[2]] * 30)
    print(seq, flush=True)
    i += 1
"""


@pytest.mark.parametrize("run", range(4))
def test_kill_9_mid_write_loses_no_acknowledged_record_and_the_next_writer_recovers(
    tmp_path: Path, run: int
) -> None:
    path = tmp_path / "audit.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), "x" * 2000],
        stdout=subprocess.PIPE,
        text=True,
    )
    acked = 0
    try:
        assert proc.stdout is not None
        while acked < 20 + 15 * run:  # every acknowledged record was fsynced
            acked = int(proc.stdout.readline())
        time.sleep(0.003 * run)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    result = verify_file(path)
    # A kill inside a write leaves a torn last line, which fails verify (bytes without a
    # newline look like bytes appended outside the chain) until the next writer records it.
    assert result.ok or (result.torn_tail_bytes > 0 and result.broken_line == result.lines + 1), (
        result.reason
    )
    assert result.head_seq >= acked  # nothing acknowledged was lost
    with AuditLog.open(path) as audit:
        audit.record("test.after_kill")
    after = verify_file(path)
    assert after.ok, after.reason
    assert len(after.recovered_tears) == (0 if result.ok else 1)


# ---- what may go into a line --------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"weights": b"\x00\x01"}, "bytes is not allowed"),
        ({"obs": np.zeros(8, dtype=np.float32)}, "ndarray is not allowed"),
        ({"obs": [0.0] * 1000}, "list of 1000 items"),
        ({"token": "abc"}, "would hold a secret"),
        ({"caller": {"password": "abc"}}, "would hold a secret"),
        ({"ret": float("nan")}, "not a finite number"),
        ({"deep": [[[[["x"]]]]]}, "nested deeper"),
    ],
)
def test_records_refuse_fields_an_audit_line_must_not_hold(
    tmp_path: Path, fields: dict, why: str
) -> None:
    with AuditLog.open(tmp_path / "audit.log") as audit:
        with pytest.raises(AuditFieldError, match=why):
            audit.record("test.bad", **fields)
        audit.record("test.good", ok=True)
    assert verify_file(tmp_path / "audit.log").lines == 2  # the refused one wrote nothing


def test_long_strings_are_cut(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog.open(path) as audit:
        audit.record("test.long", reason="x" * 10_000)
    reason = records(path)[-1]["fields"]["reason"]
    assert len(reason) < 2100 and reason.endswith("(+7952 chars)")


# ---- the command --------------------------------------------------------------------------


def test_audit_verify_prints_ok_and_the_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path)
    result = run_forseti("audit", "verify", str(path))
    assert result.returncode == 0
    assert result.stdout.startswith(f"OK: {N_RECORDS + 1} lines")
    head = result.stdout.split("head ")[1].split()[0]
    assert run_forseti("audit", "verify", str(path), "--head", head).returncode == 0


def test_audit_verify_names_the_first_broken_line_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = write_log(path)
    del lines[3]
    path.write_bytes(b"".join(lines))

    result = run_forseti("audit", "verify", str(path))

    assert result.returncode == 1
    assert result.stdout.startswith("BROKEN at line 4:")


# ---- a real server ------------------------------------------------------------------------


@pytest.fixture
def audited_repo(repository: Path, keyring: Keyring) -> Path:
    """The standard repository plus `damaged`, whose artifact fails authentication."""
    write_config(repository, "damaged", POLICY_CONFIG.replace('"policy"', '"damaged"'))
    publish_sealed(repository, "damaged", policy_onnx(2), keyring, version=1)
    sealed = repository / "damaged" / "1" / "model.onnx.sealed"
    blob = bytearray(sealed.read_bytes())
    blob[-1] ^= 0x01
    sealed.write_bytes(bytes(blob))
    return repository


def test_every_control_call_leaves_a_line_and_inference_leaves_none(
    audited_repo: Path, start_server, tmp_path: Path, keyring_path: Path
) -> None:
    audit_path = tmp_path / "server-audit.log"
    server = start_server(
        audited_repo, "--model-control-mode", "explicit", "--audit-log", str(audit_path)
    )
    client = grpcclient.InferenceServerClient(server.url)
    client.load_model("policy")
    with pytest.raises(InferenceServerException):
        client.load_model("damaged")
    client.get_model_repository_index()
    before = len(records(audit_path))
    for _ in range(50):
        infer_policy(client)
    assert len(records(audit_path)) == before  # the request path never writes audit lines
    client.unload_model("policy")
    client.close()
    server.stop()

    docs = records(audit_path)
    events = [d["event"] for d in docs]
    assert events[0] == OPEN_EVENT and events[-1] == "server.stop"
    calls = [d for d in docs if d["event"].startswith("repository.")]
    # A load or unload: its request before it acts, its outcome after, one request id. The
    # index read is counted (one record at shutdown), not written per call.
    assert [
        (d["event"], d["fields"].get("model", ""), d["fields"].get("result")) for d in calls
    ] == [
        ("repository.load_requested", "policy", None),
        ("repository.load", "policy", "OK"),
        ("repository.load_requested", "damaged", None),
        ("repository.load", "damaged", "INVALID_ARGUMENT"),
        ("repository.unload_requested", "policy", None),
        ("repository.unload", "policy", "OK"),
        ("repository.index", "", None),
    ]
    assert calls[0]["fields"]["request_id"] == calls[1]["fields"]["request_id"]
    assert calls[-1]["fields"]["count"] == 1
    assert all(d["fields"]["peer"].startswith("ipv4:127.0.0.1:") for d in calls[:-1])

    by_event = {d["event"]: d["fields"] for d in docs}
    policy_sha = (audited_repo / "policy" / "1" / "model.onnx.sealed").read_bytes()
    assert by_event["model.version_loaded"]["sha256"] == _sha256(policy_sha)
    assert by_event["model.swap"]["serving"] == {"1": _sha256(policy_sha)}
    damaged = (audited_repo / "damaged" / "1" / "model.onnx.sealed").read_bytes()
    assert by_event["model.version_load_failed"]["sha256"] == _sha256(damaged)
    assert "authentication failed" in by_event["model.version_load_failed"]["reason"]
    assert by_event["model.unload"]["previous"] == {"1": _sha256(policy_sha)}

    assert verify_file(audit_path).ok
    text = audit_path.read_text()
    for key_id in Keyring.load(keyring_path).key_ids:  # key ids yes, key bytes never
        secret = base64.b64encode(Keyring.load(keyring_path).get(key_id).secret).decode()
        assert secret not in text


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_refused_control_call_is_audited_without_its_token(
    audited_repo: Path, start_server, tmp_path: Path
) -> None:
    audit_path = tmp_path / "server-audit.log"
    token_file = tmp_path / "control.tokens"
    token_file.write_text("sidecar-secret-token\n")
    token_file.chmod(0o600)
    server = start_server(
        audited_repo,
        "--model-control-mode",
        "explicit",
        "--audit-log",
        str(audit_path),
        f"--grpc-restricted-protocol=model-repository:admin=@{token_file}",
    )
    client = grpcclient.InferenceServerClient(server.url)
    with pytest.raises(InferenceServerException, match="restricted"):
        client.load_model("policy")
    with pytest.raises(InferenceServerException, match="not accepted"):
        client.load_model("policy", headers={"triton-grpc-protocol-admin": "guess"})
    client.load_model("policy", headers={"triton-grpc-protocol-admin": "sidecar-secret-token"})
    client.close()
    server.stop()

    docs = records(audit_path)
    refused = [d["fields"] for d in docs if d["event"] == "repository.refused"]
    assert [(d["rpc"], d["reason"], d["count"]) for d in refused] == [
        ("RepositoryModelLoad", "missing header", 1),
        ("RepositoryModelLoad", "token not accepted", 1),
    ]
    loaded = [d["fields"] for d in docs if d["event"] == "repository.load"]
    assert loaded and loaded[0]["token_group"]
    assert "sidecar-secret-token" not in audit_path.read_text()
    assert "guess" not in audit_path.read_text()
    assert verify_file(audit_path).ok
