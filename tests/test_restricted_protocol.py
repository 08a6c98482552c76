"""Restricted protocols over real loopback gRPC with tritonclient: every protocol group with a
missing, a wrong and a right token; tokens from a file (two of them), an environment variable
and argv; token files re-read when they change; no token in any log line or error message."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg
from tritonclient.utils import InferenceServerException

from forseti.core.sealing.keyring import Keyring
from forseti.server.security.restricted import (
    HEADER_PREFIX,
    PROTOCOLS,
    SERVICE,
    RestrictedProtocolInterceptor,
    RestrictedProtocols,
    RestrictionError,
    caller_identity,
    method_protocol,
    parse_restriction,
)
from forseti.server.security.tls import GrpcTlsOptions, grpc_server_credentials
from testkit.certificates import make_certificates
from testkit.model_builders import OBS_DIM, build_repository
from testkit.server_process import ServerProcess

# Fresh random tokens each run, so finding one in a log can only mean it leaked.
TOKENS = {protocol: f"{protocol}-{secrets.token_urlsafe(18)}" for protocol in PROTOCOLS}
SECOND_REPOSITORY_TOKEN = f"second-{secrets.token_urlsafe(18)}"
WRONG_TOKEN = f"wrong-{secrets.token_urlsafe(18)}"
INFERENCE_ENV = "FORSETI_TEST_INFERENCE_TOKEN"
DENIED = {"StatusCode.UNAUTHENTICATED", "StatusCode.PERMISSION_DENIED"}
NOT_OFFERED = {"shared-memory", "trace", "logging"}  # Forseti answers UNIMPLEMENTED


def header(protocol: str) -> str:
    return f"{HEADER_PREFIX}{protocol}-key"


def with_token(protocol: str, token: str) -> dict[str, str]:
    return {header(protocol): token}


def _observation() -> list[grpcclient.InferInput]:
    obs = grpcclient.InferInput("obs", [1, OBS_DIM], "FP32")
    obs.set_data_from_numpy(np.zeros((1, OBS_DIM), np.float32))
    return [obs]


CALLS: dict[str, Callable[[grpcclient.InferenceServerClient, dict | None], Any]] = {
    "health": lambda c, h: c.is_server_live(headers=h),
    "metadata": lambda c, h: c.get_server_metadata(headers=h),
    "inference": lambda c, h: c.infer("policy", _observation(), headers=h),
    "shared-memory": lambda c, h: c.get_system_shared_memory_status(headers=h),
    "model-config": lambda c, h: c.get_model_config("policy", headers=h),
    "model-repository": lambda c, h: c.get_model_repository_index(headers=h),
    "statistics": lambda c, h: c.get_inference_statistics(headers=h),
    "trace": lambda c, h: c.get_trace_settings(headers=h),
    "logging": lambda c, h: c.get_log_settings(headers=h),
}


def call(client: grpcclient.InferenceServerClient, protocol: str, headers: dict | None):
    """The call's result, or the InferenceServerException it raised."""
    try:
        return CALLS[protocol](client, headers)
    except InferenceServerException as exc:
        return exc


def _settings(folder: Path) -> list[str]:
    settings = []
    for protocol in PROTOCOLS:
        key = f"{protocol}-key"
        if protocol == "inference":
            settings.append(f"{protocol}:{key}=env:{INFERENCE_ENV}")
        elif protocol == "logging":
            settings.append(f"{protocol}:{key}={TOKENS[protocol]}")  # literal: warned about
        else:
            path = folder / f"{protocol}.tokens"
            lines = [TOKENS[protocol]]
            if protocol == "model-repository":
                lines = ["# two tokens: rotation", TOKENS[protocol], "", SECOND_REPOSITORY_TOKEN]
            path.write_text("\n".join(lines) + "\n")
            path.chmod(0o600)
            settings.append(f"{protocol}:{key}=@{path}")
    return settings


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, keyring: Keyring, keyring_path: Path
) -> Iterator[ServerProcess]:
    """Every protocol in its own group, each with its own header and token."""
    root = tmp_path_factory.mktemp("restricted")
    repo = root / "repo"
    repo.mkdir()
    build_repository(repo, keyring)
    args = ["--model-control-mode", "explicit", "--load-model", "*"]
    for setting in _settings(root):
        args += ["--grpc-restricted-protocol", setting]
    process = ServerProcess(
        repo,
        keyring_path,
        args,
        env={INFERENCE_ENV: TOKENS["inference"]},
        headers=with_token("health", TOKENS["health"]),
    ).start()
    yield process
    process.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = server.client()
    yield c
    c.close()


# ---- the protocol groups, over the wire ---------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_call_without_the_header_is_unauthenticated(client, protocol: str) -> None:
    result = call(client, protocol, None)
    assert isinstance(result, InferenceServerException)
    assert result.status() == "StatusCode.UNAUTHENTICATED"
    # Triton's text, which its clients and QA tests match.
    assert result.message().startswith(
        f"This protocol is restricted, expecting header '{header(protocol)}'"
    )
    assert "request id" in result.message()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_call_with_a_wrong_token_is_permission_denied(client, protocol: str) -> None:
    result = call(client, protocol, with_token(protocol, WRONG_TOKEN))
    assert isinstance(result, InferenceServerException)
    assert result.status() == "StatusCode.PERMISSION_DENIED"
    assert result.message().startswith("This protocol is restricted, expecting header")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_another_groups_token_does_not_open_a_group(client, protocol: str) -> None:
    other = "metadata" if protocol != "metadata" else "health"
    result = call(client, protocol, {header(protocol): TOKENS[other]})
    assert isinstance(result, InferenceServerException)
    assert result.status() == "StatusCode.PERMISSION_DENIED"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_call_with_the_right_token_runs(client, protocol: str) -> None:
    result = call(client, protocol, with_token(protocol, TOKENS[protocol]))
    if protocol in NOT_OFFERED:
        assert isinstance(result, InferenceServerException)
        assert result.status() == "StatusCode.UNIMPLEMENTED"
    else:
        assert not isinstance(result, InferenceServerException), result


def test_both_tokens_of_a_two_token_file_are_accepted(client) -> None:
    for token in (TOKENS["model-repository"], SECOND_REPOSITORY_TOKEN):
        index = client.get_model_repository_index(headers=with_token("model-repository", token))
        assert {m.name for m in index.models} >= {"policy", "simple"}


def test_model_ready_belongs_to_health(client) -> None:
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
        client.is_model_ready("policy")
    assert client.is_model_ready("policy", headers=with_token("health", TOKENS["health"]))


def test_refused_unload_leaves_the_model_loaded(client) -> None:
    with pytest.raises(InferenceServerException) as refused:
        client.unload_model("policy", headers=with_token("model-repository", WRONG_TOKEN))
    assert refused.value.status() == "StatusCode.PERMISSION_DENIED"
    assert client.is_model_ready("policy", headers=with_token("health", TOKENS["health"]))


def test_refused_inference_is_not_counted_as_an_inference(client) -> None:
    def successes() -> int:
        stats = client.get_inference_statistics(
            "policy", headers=with_token("statistics", TOKENS["statistics"])
        )
        return stats.model_stats[0].inference_stats.success.count

    before = successes()
    assert isinstance(call(client, "inference", None), InferenceServerException)
    assert successes() == before


def test_stream_without_the_header_is_refused(server: ServerProcess) -> None:
    client = server.client()
    results: queue.Queue = queue.Queue()
    try:
        client.start_stream(callback=lambda result, error: results.put(error))
        # The server may refuse the stream before this request is even sent.
        with contextlib.suppress(InferenceServerException):
            client.async_stream_infer("policy", _observation())
        error = results.get(timeout=10)
    finally:
        client.stop_stream()
        client.close()
    assert error is not None
    assert error.status() == "StatusCode.UNAUTHENTICATED"


def test_stream_with_the_token_answers(server: ServerProcess) -> None:
    client = server.client()
    results: queue.Queue = queue.Queue()
    try:
        client.start_stream(
            callback=lambda result, error: results.put((result, error)),
            headers=with_token("inference", TOKENS["inference"]),
        )
        client.async_stream_infer("policy", _observation())
        result, error = results.get(timeout=10)
    finally:
        client.stop_stream()
        client.close()
    assert error is None
    assert result.as_numpy("action").shape == (1, 1)


def test_no_token_appears_in_the_log_or_in_any_error(server: ServerProcess) -> None:
    client = server.client()
    messages = []
    try:
        for protocol in PROTOCOLS:
            for headers in (None, with_token(protocol, WRONG_TOKEN), with_token(protocol, "")):
                result = call(client, protocol, headers)
                assert isinstance(result, InferenceServerException)
                messages.append(result.message())
            call(client, protocol, with_token(protocol, TOKENS[protocol]))
    finally:
        client.close()
    assert server.log_path is not None
    log = server.log_path.read_text(errors="replace")
    assert log.count("restricted call refused") >= 3 * len(PROTOCOLS)
    for secret in [*TOKENS.values(), SECOND_REPOSITORY_TOKEN, WRONG_TOKEN]:
        assert secret not in log
        assert all(secret not in message for message in messages)


def test_refusal_is_logged_with_peer_method_group_and_request_id(client, server) -> None:
    result = call(client, "model-config", with_token("model-config", WRONG_TOKEN))
    request_id = result.message().rsplit("request id ", 1)[1].rstrip(")")
    assert server.log_path is not None
    line = next(
        line
        for line in server.log_path.read_text().splitlines()
        if f"request_id={request_id}" in line
    )
    assert "peer=ipv4:127.0.0.1:" in line
    assert "rpc=ModelConfig" in line
    assert "group=model-config" in line
    assert "reason='token not accepted'" in line


def test_a_literal_token_on_the_command_line_is_warned_about(server: ServerProcess) -> None:
    assert server.log_path is not None
    log = server.log_path.read_text()
    assert "token given on the command line" in log
    assert "group=logging" in log


# ---- token files change without a restart --------------------------------------------------


def test_an_edited_token_file_takes_effect_without_restart(
    tmp_path: Path, keyring: Keyring, keyring_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    build_repository(repo, keyring)
    tokens = tmp_path / "admin.tokens"
    old, new = f"old-{secrets.token_urlsafe(18)}", f"new-{secrets.token_urlsafe(18)}"
    tokens.write_text(old + "\n")
    tokens.chmod(0o600)
    server = ServerProcess(
        repo, keyring_path, ["--grpc-restricted-protocol", f"model-repository:admin=@{tokens}"]
    ).start()
    client = server.client()
    try:

        def accepted(token: str) -> bool:
            result = call(client, "model-repository", {f"{HEADER_PREFIX}admin": token})
            return not isinstance(result, InferenceServerException)

        assert accepted(old) and not accepted(new)
        staged = tmp_path / "admin.tokens.new"
        staged.write_text(new + "\n")
        staged.chmod(0o600)
        os.replace(staged, tokens)  # as an operator's atomic edit would
        deadline = time.monotonic() + 15
        while accepted(old) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert accepted(new)
        assert not accepted(old)
    finally:
        client.close()
        server.stop()
    assert "token file reloaded" in server.log()


def _reloaded(tmp_path: Path, change: Callable[[Path], object]) -> bool:
    """Whether the file's old token is still accepted after `change` and a reload."""
    tokens = tmp_path / "t"
    token = secrets.token_urlsafe(18)
    tokens.write_text(token + "\n")
    tokens.chmod(0o600)
    restrictions = RestrictedProtocols.from_settings([f"model-repository:k=@{tokens}"])
    change(tokens)
    restrictions.reload_changed_files()
    return restrictions.groups[0].accepts(token)


def test_an_emptied_token_file_leaves_no_valid_token(tmp_path: Path) -> None:
    assert not _reloaded(tmp_path, lambda t: t.write_text("\n"))


def test_a_deleted_token_file_leaves_no_valid_token(tmp_path: Path) -> None:
    assert not _reloaded(tmp_path, Path.unlink)


def test_a_token_file_of_invalid_lines_leaves_no_valid_token(tmp_path: Path) -> None:
    assert not _reloaded(tmp_path, lambda t: t.write_text("no spaces allowed\n"))


def test_a_token_file_made_group_readable_leaves_no_valid_token(tmp_path: Path) -> None:
    def share(tokens: Path) -> None:
        time.sleep(0.05)  # past the clock tick of the write, so the chmod changes the ctime
        tokens.chmod(0o640)

    assert not _reloaded(tmp_path, share)


# ---- parsing the setting ------------------------------------------------------------------


def test_every_rpc_of_the_service_belongs_to_a_protocol_group() -> None:
    methods = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
    unmapped = [m.name for m in methods if method_protocol(f"/{SERVICE}/{m.name}") is None]
    assert unmapped == []


def test_an_unknown_protocol_is_refused_with_the_known_ones() -> None:
    with pytest.raises(RestrictionError, match="unknown restricted protocol 'model-reposit'") as e:
        parse_restriction("model-reposit,health:k=@/nonexistent", env={})
    assert "model-repository" in str(e.value)


def test_a_protocol_in_two_groups_is_refused() -> None:
    env = {"A": "a" * 20, "B": "b" * 20}
    with pytest.raises(RestrictionError, match="'health' can not be specified in multiple"):
        RestrictedProtocols.from_settings(
            ["model-repository,health:k1=env:A", "metadata,health:k2=env:B"], env=env
        )


def test_a_malformed_setting_does_not_echo_its_value() -> None:
    secret = secrets.token_urlsafe(18)
    for setting in (f"health:{secret}", f"heath:key={secret}", f"health:Key Space={secret}"):
        with pytest.raises(RestrictionError) as refused:
            parse_restriction(setting, env={})
        assert secret not in str(refused.value)


def test_a_setting_without_a_value_names_only_the_protocols_part() -> None:
    with pytest.raises(RestrictionError) as refused:
        parse_restriction("health", env={})
    assert "expected <protocol>" in str(refused.value)


def test_an_unset_environment_variable_is_refused() -> None:
    with pytest.raises(RestrictionError, match="'NOPE' is not set"):
        parse_restriction("inference:k=env:NOPE", env={})


def test_a_missing_token_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RestrictionError, match="cannot read token file"):
        parse_restriction(f"inference:k=@{tmp_path / 'missing'}", env={})


def test_an_empty_token_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("# only a comment\n\n")
    (tmp_path / "t").chmod(0o600)
    with pytest.raises(RestrictionError, match="holds no token"):
        parse_restriction(f"inference:k=@{tmp_path / 't'}", env={})


def test_only_digests_of_tokens_are_kept(tmp_path: Path) -> None:
    token = secrets.token_urlsafe(18)
    (tmp_path / "t").write_text(f"{token}\n")
    (tmp_path / "t").chmod(0o600)
    group = parse_restriction(f"inference:k=@{tmp_path / 't'}", env={})
    assert token not in repr(vars(group))
    assert all(len(d) == 32 for d in group.digests)
    assert group.accepts(token)
    assert not group.accepts(token[:-1])
    assert not group.accepts("é" + token)


def test_a_literal_token_is_accepted_with_a_warning_that_omits_it(caplog) -> None:
    token = secrets.token_urlsafe(18)
    with caplog.at_level(logging.WARNING):
        group = parse_restriction(f"statistics:k={token}", env={})
    assert group.accepts(token)
    assert "ps" in caplog.text
    assert token not in caplog.text


def test_environment_tokens_are_one_per_line() -> None:
    a, b = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    group = parse_restriction("inference:k=env:T", env={"T": f"{a}\n{b}\n"})
    assert group.accepts(a) and group.accepts(b)


def test_the_header_key_is_lowercased_like_grpc_metadata() -> None:
    group = parse_restriction("inference:Admin-Key=env:T", env={"T": "x" * 20})
    assert group.header == "triton-grpc-protocol-admin-key"


# ---- who is calling (for the audit log) -----------------------------------------------------


class _IdentityEcho(pbg.GRPCInferenceServiceServicer):
    """Answers ServerMetadata with the caller's identity, as a servicer sees it."""

    async def ServerMetadata(self, request, context):
        who = caller_identity(context)
        return pb.ServerMetadataResponse(
            name=who.peer, version=who.tls_subject or "-", extensions=[who.token_group or "-"]
        )


def test_caller_identity_has_peer_tls_subject_and_token_group(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    token = secrets.token_urlsafe(18)
    restrictions = RestrictedProtocols.from_settings(["metadata:k=env:T"], env={"T": token})
    credentials = grpc_server_credentials(
        GrpcTlsOptions(
            use_ssl_mutual=True,
            server_cert=certs.server.cert,
            server_key=certs.server.key,
            root_cert=certs.ca,
        )
    )
    assert credentials is not None

    async def main() -> pb.ServerMetadataResponse:
        server = grpc.aio.server(interceptors=[RestrictedProtocolInterceptor(restrictions)])
        pbg.add_GRPCInferenceServiceServicer_to_server(_IdentityEcho(), server)
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        try:

            def ask() -> Any:
                client = grpcclient.InferenceServerClient(
                    f"127.0.0.1:{port}",
                    ssl=True,
                    root_certificates=str(certs.ca),
                    private_key=str(certs.client.key),
                    certificate_chain=str(certs.client.cert),
                )
                try:
                    return client.get_server_metadata(headers={f"{HEADER_PREFIX}k": token})
                finally:
                    client.close()

            return await asyncio.to_thread(ask)
        finally:
            await server.stop(None)

    answer = asyncio.run(main())
    assert answer.name.startswith("ipv4:127.0.0.1:")
    assert "CN=sidecar" in answer.version
    assert list(answer.extensions) == ["metadata"]
