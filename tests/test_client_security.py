"""The decision client against a server that requires mutual TLS and a restricted-protocol
token for inference and health: it presents both, and a call without them is refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from forseti.client import DecisionClient, DecisionRejected, TLSConfig
from forseti.core.sealing.keyring import Keyring
from testkit.certificates import Certificates, make_certificates
from testkit.model_builders import build_repository
from testkit.server_process import ServerProcess

OBS = np.full(8, 0.1, np.float32)
TOKEN = "client-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "inference-token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def guarded(
    tmp_path_factory: pytest.TempPathFactory,
    keyring: Keyring,
    keyring_path: Path,
    certs: Certificates,
    token_file: Path,
) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("guarded") / "repo"
    repo.mkdir()
    build_repository(repo, keyring)
    server = ServerProcess(
        repo,
        keyring_path,
        [
            "--grpc-use-ssl-mutual=true",
            "--grpc-server-cert",
            str(certs.server.cert),
            "--grpc-server-key",
            str(certs.server.key),
            "--grpc-root-cert",
            str(certs.ca),
            "--grpc-restricted-protocol",
            f"inference,health:infer=@{token_file}",
        ],
        client_options={
            "ssl": True,
            "root_certificates": str(certs.ca),
            "private_key": str(certs.client.key),
            "certificate_chain": str(certs.client.cert),
        },
        headers={"triton-grpc-protocol-infer": TOKEN},
    ).start()
    yield server
    server.stop()


def _mutual(certs: Certificates) -> TLSConfig:
    return TLSConfig(
        root_certificates=certs.ca,
        certificate_chain=certs.client.cert,
        private_key=certs.client.key,
    )


def test_a_client_with_its_certificate_and_token_gets_decisions(
    guarded: ServerProcess, certs: Certificates, token_file: Path
) -> None:
    with DecisionClient(
        [guarded.url],
        "policy",
        deadline_ms=2000,
        tls=_mutual(certs),
        tokens={"infer": f"@{token_file}"},
        probe_every_s=0.1,
    ) as client:
        decision = client.decide(OBS)
        assert client.check(client.replicas.endpoints[0])  # its health checks pass too
    assert not decision.fallback_used and decision.model_version == "1"


def test_a_call_without_the_token_is_refused_unauthenticated(
    guarded: ServerProcess, certs: Certificates
) -> None:
    with (
        DecisionClient([guarded.url], "policy", deadline_ms=2000, tls=_mutual(certs)) as client,
        pytest.raises(DecisionRejected) as refused,
    ):
        client.decide(OBS)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_a_client_without_a_certificate_gets_the_fallback(
    guarded: ServerProcess, certs: Certificates
) -> None:
    with DecisionClient(
        [guarded.url],
        "policy",
        deadline_ms=2000,
        fallback=-1,
        tls=TLSConfig(root_certificates=certs.ca),
        tokens={"infer": TOKEN},
    ) as client:
        decision = client.decide(OBS)
    # Which comes first is a race: the call's own TLS failure ("unavailable", or "deadline"),
    # or the client's background health check, failing the same handshake, ejecting the only
    # replica before the call is sent ("no_healthy_replica"). Each is the refused handshake.
    assert decision.fallback_used and decision.fallback_reason in (
        "unavailable",
        "deadline",
        "no_healthy_replica",
    )
