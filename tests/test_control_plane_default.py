"""Issue 13, finding 1: model control reachable from the network needs a restriction.

`forseti serve --model-control-mode explicit` on a non-loopback address, with neither a token
on the model-repository group nor mutual TLS, is refused at start (exit 2, naming the fixes)
unless `--allow-unauthenticated-control` is given; then it warns at start and every control
call's audit record carries `unauthenticated_control: true`. Real server processes throughout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tritonclient.utils import InferenceServerException

from testkit.certificates import make_certificates
from testkit.server_process import ServerProcess, run_forseti, serve_args

EXPLICIT = ["--model-control-mode", "explicit", "--load-model", "policy"]


@pytest.mark.parametrize("address", ["0.0.0.0", "::"])
def test_explicit_mode_on_a_public_address_without_restriction_is_refused(
    repository: Path, keyring_path: Path, address: str
) -> None:
    # Before the fix this server started (and run_forseti timed out waiting for it to exit).
    done = run_forseti(
        *serve_args(repository, keyring_path, "--grpc-address", address, *EXPLICIT), timeout=30
    )
    assert done.returncode == 2, done.stderr
    message = done.stderr
    assert "refusing to start" in message
    assert f"--grpc-address {address}" in message
    assert "--grpc-restricted-protocol=model-repository:" in message
    assert "--grpc-use-ssl-mutual" in message
    assert "--grpc-address 127.0.0.1" in message
    assert "--allow-unauthenticated-control" in message
    assert "grpc listening" not in message  # nothing was opened


def test_the_default_address_is_refused_too(repository: Path, keyring_path: Path) -> None:
    """No --grpc-address at all: the default 0.0.0.0 is the README's original example."""
    done = run_forseti(*serve_args(repository, keyring_path, *EXPLICIT), timeout=30)
    assert done.returncode == 2, done.stderr
    assert "--grpc-address 0.0.0.0" in done.stderr


def _audit_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def _ready_record(path: Path) -> dict:
    (ready,) = [r for r in _audit_lines(path) if r["event"] == "server.ready"]
    return ready["fields"]


def test_loopback_starts_and_control_records_carry_no_flag(
    repository: Path, keyring_path: Path, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    server = ServerProcess(
        repository, keyring_path, [*EXPLICIT, "--audit-log", str(audit)]
    ).start()  # testkit binds 127.0.0.1
    try:
        with server.client() as client:
            client.load_model("simple")
    finally:
        assert server.stop() == 0
    loads = [r for r in _audit_lines(audit) if r["event"] == "repository.load"]
    assert loads and "unauthenticated_control" not in loads[0]["fields"]
    assert _ready_record(audit)["control_guard"] == "loopback"
    assert "unauthenticated" not in server.log()


@pytest.mark.parametrize("mode", ["poll", "none"])
def test_modes_that_cannot_change_models_start_on_a_public_address(
    repository: Path, keyring_path: Path, tmp_path: Path, mode: str
) -> None:
    """none and poll mode refuse load/unload from anyone, so the rule does not apply."""
    audit = tmp_path / "audit.jsonl"
    server = ServerProcess(
        repository,
        keyring_path,
        ["--grpc-address", "0.0.0.0", "--model-control-mode", mode, "--audit-log", str(audit)],
    ).start()
    try:
        with server.client() as client, pytest.raises(InferenceServerException) as refused:
            client.unload_model("policy")
        assert "not allowed in model control mode" in str(refused.value)
    finally:
        assert server.stop() == 0
    assert _ready_record(audit)["control_guard"] == "mode"


def test_public_address_with_a_model_repository_token_starts_and_refuses_anonymous_control(
    repository: Path, keyring_path: Path, tmp_path: Path
) -> None:
    tokens = tmp_path / "control-tokens"
    tokens.write_text("s3cret-control-token\n")
    tokens.chmod(0o600)
    server = ServerProcess(
        repository,
        keyring_path,
        [
            "--grpc-address",
            "0.0.0.0",
            *EXPLICIT,
            f"--grpc-restricted-protocol=model-repository:admin=@{tokens}",
            # the HTTP front door on the same address needs its own guard
            f"--http-restricted-api=model-repository:admin=@{tokens}",
            "--audit-log",
            str(tmp_path / "audit.jsonl"),
        ],
    ).start()
    try:
        with server.client() as client:
            # The attack of the issue: no credentials, unload the live policy.
            with pytest.raises(InferenceServerException) as refused:
                client.unload_model("policy")
            assert "UNAUTHENTICATED" in str(refused.value.status())
            assert client.is_model_ready("policy")
            client.unload_model(
                "policy", headers={"triton-grpc-protocol-admin": "s3cret-control-token"}
            )
            assert not client.is_model_ready("policy")
    finally:
        assert server.stop() == 0
    assert _ready_record(tmp_path / "audit.jsonl")["control_guard"] == "token"


def test_opt_out_starts_warns_and_marks_every_control_audit_record(
    repository: Path, keyring_path: Path, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    server = ServerProcess(
        repository,
        keyring_path,
        [
            "--grpc-address",
            "0.0.0.0",
            *EXPLICIT,
            "--allow-unauthenticated-control",
            "--audit-log",
            str(audit),
        ],
    ).start()
    try:
        with server.client() as client:
            client.load_model("simple")
            client.unload_model("simple")
            client.get_model_repository_index()
    finally:
        assert server.stop() == 0
    log = server.log()
    assert any(
        " WARNING " in line
        and "unauthenticated model control (--allow-unauthenticated-control)" in line
        for line in log.splitlines()
    ), log
    records = _audit_lines(audit)
    control = [r for r in records if r["event"].startswith("repository.")]
    assert {r["event"] for r in control} == {
        "repository.load_requested",
        "repository.load",
        "repository.unload_requested",
        "repository.unload",
        "repository.index",
    }
    for record in control:
        assert record["fields"]["unauthenticated_control"] is True, record
    ready = _ready_record(audit)
    assert ready["unauthenticated_control"] is True
    assert ready["control_guard"] == "none"


def test_opt_out_flag_is_in_serve_help() -> None:
    done = run_forseti("serve", "--help")
    assert done.returncode == 0
    assert "--allow-unauthenticated-control" in done.stdout


def test_public_address_with_mutual_tls_starts(
    repository: Path, keyring_path: Path, tmp_path: Path
) -> None:
    certs = make_certificates(tmp_path / "certs")
    audit = tmp_path / "audit.jsonl"
    server = ServerProcess(
        repository,
        keyring_path,
        [
            "--grpc-address",
            "0.0.0.0",
            *EXPLICIT,
            "--grpc-use-ssl-mutual=true",
            "--grpc-server-cert",
            str(certs.server.cert),
            "--grpc-server-key",
            str(certs.server.key),
            "--grpc-root-cert",
            str(certs.ca),
            "--allow-http",  # mutual TLS guards gRPC only
            "false",
            "--audit-log",
            str(audit),
        ],
        client_options={
            "ssl": True,
            "root_certificates": str(certs.ca),
            "private_key": str(certs.client.key),
            "certificate_chain": str(certs.client.cert),
        },
    ).start()
    assert server.stop() == 0
    assert _ready_record(audit)["control_guard"] == "mutual-tls"


def test_one_way_tls_alone_is_no_restriction(
    repository: Path, keyring_path: Path, tmp_path: Path
) -> None:
    """TLS without client certificates hides the wire, not who may call: still refused."""
    certs = make_certificates(tmp_path / "certs")
    done = run_forseti(
        *serve_args(
            repository,
            keyring_path,
            "--grpc-address",
            "0.0.0.0",
            *EXPLICIT,
            "--grpc-use-ssl=true",
            "--grpc-server-cert",
            str(certs.server.cert),
            "--grpc-server-key",
            str(certs.server.key),
        ),
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert "refusing to start" in done.stderr
