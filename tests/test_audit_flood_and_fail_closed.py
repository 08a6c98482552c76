"""Audit log under pressure (issue 13, finding 4): calls that change nothing (token-less control
calls, repository reads) are counted into a few records instead of one fsync each, and a load
or unload is refused, changing nothing, when its audit record cannot be written."""

from __future__ import annotations

import asyncio
import json
import resource
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from forseti.core.audit import AuditLog, verify_file
from forseti.core.sealing.keyring import Keyring
from forseti.server import audit_trail
from forseti.server.audit_trail import AuditTrail, peer_address
from testkit.model_builders import build_repository
from testkit.server_process import ServerProcess
from tests.test_swap import infer_policy

HEADER = "triton-grpc-protocol-admin"
TOKEN = "sidecar-token-0123456789abcdef"
CALLS_PER_RPC = 100  # x3 RPCs: 300 token-less control calls


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture(scope="module")
def flooded_audit(tmp_path_factory: pytest.TempPathFactory, keyring: Keyring, keyring_path: Path):
    """A token-guarded server that took 300 token-less control calls and 60 token-bearing
    index reads, then stopped; its audit log's records."""
    base = tmp_path_factory.mktemp("flood")
    repo = base / "repo"
    repo.mkdir()
    build_repository(repo, keyring)
    tokens = base / "tokens"
    tokens.write_text(TOKEN + "\n")
    tokens.chmod(0o600)
    audit = base / "audit.jsonl"
    server = ServerProcess(
        repo,
        keyring_path,
        [
            "--model-control-mode",
            "explicit",
            "--audit-log",
            str(audit),
            f"--grpc-restricted-protocol=model-repository:admin=@{tokens}",
        ],
    ).start()
    try:
        # A fresh connection for each batch: the source port changes, the caller does not.
        for rpc in ("index", "load", "unload"):
            client = grpcclient.InferenceServerClient(server.url)
            for _ in range(CALLS_PER_RPC):
                with pytest.raises(InferenceServerException, match="restricted"):
                    if rpc == "index":
                        client.get_model_repository_index()
                    elif rpc == "load":
                        client.load_model("policy")
                    else:
                        client.unload_model("policy")
            client.close()
        client = grpcclient.InferenceServerClient(server.url)
        for _ in range(60):
            client.get_model_repository_index(headers={HEADER: TOKEN})
        client.close()
    finally:
        assert server.stop() == 0
    return audit, _records(audit)


def test_300_token_less_control_calls_are_counted_in_a_few_records(flooded_audit) -> None:
    audit, docs = flooded_audit
    refused = [d["fields"] for d in docs if d["event"] == "repository.refused"]
    assert 1 <= len(refused) <= 6, refused
    assert sum(r["count"] for r in refused) == 3 * CALLS_PER_RPC
    per_rpc: dict[str, int] = {}
    for r in refused:
        per_rpc[r["rpc"]] = per_rpc.get(r["rpc"], 0) + r["count"]
        assert r["peer"] == "ipv4:127.0.0.1" and r["reason"] == "missing header"
        assert r["first"] <= r["last"] and r["first_request_id"] and r["last_request_id"]
    assert per_rpc == {
        "RepositoryIndex": CALLS_PER_RPC,
        "RepositoryModelLoad": CALLS_PER_RPC,
        "RepositoryModelUnload": CALLS_PER_RPC,
    }
    # The pending counts were written at shutdown, before the stop record; the chain holds.
    events = [d["event"] for d in docs]
    assert events[-1] == "server.stop"
    assert max(i for i, e in enumerate(events) if e == "repository.refused") < len(events) - 1
    assert verify_file(audit).ok
    assert len(docs) < 20


def test_repository_index_reads_are_counted_not_written_one_by_one(flooded_audit) -> None:
    _, docs = flooded_audit
    reads = [d["fields"] for d in docs if d["event"] == "repository.index"]
    assert 1 <= len(reads) <= 2, reads
    assert sum(r["count"] for r in reads) == 60
    assert all(r["token_group"] == "model-repository" for r in reads)


def test_a_count_is_written_when_its_window_ends(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"

    async def scenario() -> list[str]:
        trail = AuditTrail(AuditLog.open(path), window_s=0.05)
        for i in range(5):
            trail.tally("repository.refused", f"id{i}", peer="ipv4:10.0.0.7", reason="r")
        trail.tally("repository.refused", "other", peer="ipv4:10.0.0.8", reason="r")
        for _ in range(100):  # no sleep-and-hope: poll until the window's record lands
            await asyncio.sleep(0.02)
            if len(_records(path)) == 3:
                break
        trail.close()
        return [d["event"] for d in _records(path)]

    assert asyncio.run(scenario()) == ["audit.open", "repository.refused", "repository.refused"]
    first = _records(path)[1]["fields"]
    assert (first["count"], first["first_request_id"], first["last_request_id"]) == (
        5,
        "id0",
        "id4",
    )


def test_counts_from_too_many_addresses_share_one_overflow_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory stays bounded whatever the number of source addresses (MAX_PENDING)."""
    monkeypatch.setattr(audit_trail, "MAX_PENDING", 3)
    path = tmp_path / "audit.jsonl"

    async def scenario() -> None:
        trail = AuditTrail(AuditLog.open(path))
        for i in range(10):
            trail.tally("repository.refused", f"id{i}", peer=f"ipv4:10.0.0.{i}", reason="r")
        await trail.flush()
        trail.close()

    asyncio.run(scenario())
    counts = {
        d["fields"]["peer"]: d["fields"]["count"]
        for d in _records(path)
        if d["event"] == "repository.refused"
    }
    assert counts == {
        "ipv4:10.0.0.0": 1,
        "ipv4:10.0.0.1": 1,
        "ipv4:10.0.0.2": 1,
        audit_trail.OVERFLOW_PEER: 7,
    }


def test_peer_address_drops_the_source_port() -> None:
    assert peer_address("ipv4:10.0.0.7:53122") == "ipv4:10.0.0.7"
    assert peer_address("ipv6:[::1]:5001") == "ipv6:[::1]"
    assert peer_address("unix:/tmp/s") == "unix:/tmp/s"


def test_control_calls_refused_by_the_control_mode_are_counted(
    repository: Path, start_server, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    server = start_server(repository, "--audit-log", str(audit))  # mode none: no load/unload
    client = grpcclient.InferenceServerClient(server.url)
    for _ in range(40):
        with pytest.raises(InferenceServerException, match="not allowed in model control mode"):
            client.unload_model("policy")
    client.close()
    assert server.stop() == 0
    rejected = [d["fields"] for d in _records(audit) if d["event"] == "repository.rejected"]
    assert [(r["rpc"], r["count"]) for r in rejected] == [("RepositoryModelUnload", 40)]
    assert not [d for d in _records(audit) if d["event"].startswith("repository.unload")]


# ---- fail closed ----------------------------------------------------------------------------


def test_unload_is_refused_unavailable_when_the_audit_log_cannot_be_written(
    repository: Path, start_server, tmp_path: Path
) -> None:
    """A real write failure that root hits too: the server's file size limit (RLIMIT_FSIZE,
    set from outside with prlimit) at the audit log's current size makes every append fail
    with EFBIG, as a full disk would with ENOSPC. (Making the folder read-only does not stop
    root, and replacing the path does not touch the descriptor the server holds.)"""
    audit = tmp_path / "audit.jsonl"
    server = start_server(
        repository, "--model-control-mode", "explicit", "--load-model", "policy",
        "--audit-log", str(audit),
    )  # fmt: skip
    client = grpcclient.InferenceServerClient(server.url)
    assert client.is_model_ready("policy")
    size = audit.stat().st_size
    unlimited = resource.prlimit(server.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(server.pid, resource.RLIMIT_FSIZE, (size, unlimited[1]))
    try:
        with pytest.raises(InferenceServerException) as refused:
            client.unload_model("policy")
        assert refused.value.status() == str(grpc.StatusCode.UNAVAILABLE)
        assert "audit log cannot be written" in refused.value.message()
        assert "request id" in refused.value.message()
        with pytest.raises(InferenceServerException, match="audit log cannot be written"):
            client.load_model("simple")
        # Nothing changed: the policy still serves, the other model was not loaded.
        assert client.is_model_ready("policy")
        assert infer_policy(client)[1] == 1
        assert not client.is_model_ready("simple")
        assert audit.stat().st_size == size
    finally:
        resource.prlimit(server.pid, resource.RLIMIT_FSIZE, unlimited)
    client.unload_model("policy")  # the log writes again: the call goes through
    assert not client.is_model_ready("policy")
    client.close()
    assert server.stop() == 0
    docs = _records(audit)
    events = [d["event"] for d in docs]
    assert events.count("repository.unload_requested") == 1
    assert [d["fields"]["result"] for d in docs if d["event"] == "repository.unload"] == ["OK"]
    assert verify_file(audit).ok
