"""TLS and mutual TLS on the gRPC endpoint with real tritonclient over loopback, HTTPS metrics,
and the start-up checks of certificate files; certificates are made at test time."""

from __future__ import annotations

import datetime
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from forseti.core.sealing.keyring import Keyring
from forseti.server.app import ServerOptions
from forseti.server.cli import serve_parser
from forseti.server.security.tls import (
    GrpcTlsOptions,
    TlsError,
    grpc_server_credentials,
    is_loopback,
    metrics_ssl_context,
)
from testkit import certificates
from testkit.certificates import Certificates, make_certificates
from testkit.model_builders import OBS_DIM, build_repository
from testkit.server_process import ServerProcess


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, keyring: Keyring) -> Path:
    path = tmp_path_factory.mktemp("tls") / "repo"
    path.mkdir()
    build_repository(path, keyring)
    return path


def _tls_args(certs: Certificates) -> list[str]:
    return [
        "--grpc-server-cert",
        str(certs.server.cert),
        "--grpc-server-key",
        str(certs.server.key),
    ]


@pytest.fixture(scope="module")
def tls_server(repo: Path, keyring_path: Path, certs: Certificates) -> Iterator[ServerProcess]:
    """One-way TLS on gRPC, HTTPS on metrics."""
    server = ServerProcess(
        repo,
        keyring_path,
        [
            "--grpc-use-ssl",
            *_tls_args(certs),
            "--metrics-ssl-cert",
            str(certs.server.cert),
            "--metrics-ssl-key",
            str(certs.server.key),
        ],
        client_options={"ssl": True, "root_certificates": str(certs.ca)},
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(repo: Path, keyring_path: Path, certs: Certificates) -> Iterator[ServerProcess]:
    server = ServerProcess(
        repo,
        keyring_path,
        ["--grpc-use-ssl-mutual=true", *_tls_args(certs), "--grpc-root-cert", str(certs.ca)],
        client_options=_mutual(certs, certs.client),
    ).start()
    yield server
    server.stop()


def _mutual(certs: Certificates, pair: certificates.Pair | None) -> dict:
    options: dict = {"ssl": True, "root_certificates": str(certs.ca)}
    if pair is not None:
        options |= {"private_key": str(pair.key), "certificate_chain": str(pair.cert)}
    return options


def _infer(client: grpcclient.InferenceServerClient) -> np.ndarray:
    obs = grpcclient.InferInput("obs", [2, OBS_DIM], "FP32")
    obs.set_data_from_numpy(np.zeros((2, OBS_DIM), np.float32))
    return client.infer("policy", [obs], client_timeout=10).as_numpy("action")


def _refusal(url: str, **options) -> InferenceServerException:
    client = grpcclient.InferenceServerClient(url, **options)
    try:
        with pytest.raises(InferenceServerException) as refused:
            client.is_server_live(client_timeout=5)
    finally:
        client.close()
    return refused.value


# ---- one-way TLS ---------------------------------------------------------------------------


def test_tls_client_checks_health_and_infers(tls_server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(
        tls_server.url,
        ssl=True,
        root_certificates=str(tls_server.client_options["root_certificates"]),
    )
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("policy")
        assert _infer(client).shape == (2, 1)
    finally:
        client.close()


def test_plaintext_client_to_a_tls_port_fails_unavailable_and_the_server_stays_up(
    tls_server: ServerProcess,
) -> None:
    refused = _refusal(tls_server.url)
    assert refused.status() == "StatusCode.UNAVAILABLE"
    assert tls_server.proc is not None and tls_server.proc.poll() is None
    client = tls_server.client()
    try:
        assert _infer(client).shape == (2, 1)
    finally:
        client.close()


def test_client_that_does_not_trust_the_servers_ca_is_refused(
    tls_server: ServerProcess, certs: Certificates
) -> None:
    refused = _refusal(tls_server.url, ssl=True, root_certificates=str(certs.other_ca))
    assert refused.status() == "StatusCode.UNAVAILABLE"


def test_metrics_are_served_over_https(tls_server: ServerProcess, certs: Certificates) -> None:
    context = ssl.create_default_context(cafile=str(certs.ca))
    url = f"https://127.0.0.1:{tls_server.metrics_port}/metrics"
    with urllib.request.urlopen(url, context=context, timeout=10) as response:
        body = response.read().decode()
    assert "nv_inference_request_success" in body


def test_plain_http_to_https_metrics_gets_no_metrics(tls_server: ServerProcess) -> None:
    url = f"http://127.0.0.1:{tls_server.metrics_port}/metrics"
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(url, timeout=10).read()
    assert tls_server.proc is not None and tls_server.proc.poll() is None


# ---- mutual TLS ----------------------------------------------------------------------------


def test_mutual_tls_client_with_its_certificate_checks_health_and_infers(
    mtls_server: ServerProcess,
) -> None:
    client = mtls_server.client()
    try:
        assert client.is_server_ready()
        assert _infer(client).shape == (2, 1)
    finally:
        client.close()


def test_mutual_tls_refuses_a_client_without_a_certificate(
    mtls_server: ServerProcess, certs: Certificates
) -> None:
    refused = _refusal(mtls_server.url, **_mutual(certs, None))
    assert refused.status() == "StatusCode.UNAVAILABLE"


def test_mutual_tls_refuses_a_client_signed_by_another_ca(
    mtls_server: ServerProcess, certs: Certificates
) -> None:
    refused = _refusal(mtls_server.url, **_mutual(certs, certs.stranger))
    assert refused.status() == "StatusCode.UNAVAILABLE"


def test_mutual_tls_server_stays_up_after_refusals(
    mtls_server: ServerProcess, certs: Certificates
) -> None:
    for options in (_mutual(certs, None), _mutual(certs, certs.stranger), {}):
        _refusal(mtls_server.url, **options)
    client = mtls_server.client()
    try:
        assert _infer(client).shape == (2, 1)
    finally:
        client.close()


# ---- start-up checks -----------------------------------------------------------------------


def test_mutual_tls_without_a_root_certificate_is_refused(certs: Certificates) -> None:
    options = GrpcTlsOptions(
        use_ssl_mutual=True, server_cert=certs.server.cert, server_key=certs.server.key
    )
    with pytest.raises(TlsError, match="--grpc-root-cert is required"):
        grpc_server_credentials(options)


def test_tls_without_a_certificate_is_refused(certs: Certificates) -> None:
    with pytest.raises(TlsError, match="--grpc-server-cert is required"):
        grpc_server_credentials(GrpcTlsOptions(use_ssl=True, server_key=certs.server.key))


def test_a_key_that_does_not_belong_to_the_certificate_is_refused(certs: Certificates) -> None:
    options = GrpcTlsOptions(
        use_ssl=True, server_cert=certs.server.cert, server_key=certs.client.key
    )
    with pytest.raises(TlsError, match="does not belong to the certificate"):
        grpc_server_credentials(options)


def test_a_file_that_is_not_a_certificate_is_refused(certs: Certificates) -> None:
    options = GrpcTlsOptions(
        use_ssl=True, server_cert=certs.server.key, server_key=certs.server.key
    )
    with pytest.raises(TlsError, match="no PEM certificate"):
        grpc_server_credentials(options)


def test_an_expired_certificate_is_refused(tmp_path: Path) -> None:
    authority = certificates.make_authority(tmp_path, "ca")
    pair = certificates.issue(authority, tmp_path, "old", server=True)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    issued = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3)
    expired = (
        x509.CertificateBuilder()
        .subject_name(issued.subject)
        .issuer_name(issued.issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(past - datetime.timedelta(days=1))
        .not_valid_after(past)
        .sign(authority.private_key, hashes.SHA256())
    )
    pair.cert.write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(TlsError, match="expired"):
        grpc_server_credentials(
            GrpcTlsOptions(use_ssl=True, server_cert=pair.cert, server_key=pair.key)
        )


def test_certificate_options_without_tls_are_ignored_with_a_warning(
    certs: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    options = GrpcTlsOptions(server_cert=certs.server.cert, server_key=certs.server.key)
    assert grpc_server_credentials(options) is None
    assert "TLS is off" in caplog.text


def test_a_tls_error_stops_the_server_with_exit_code_2(
    tmp_path: Path, repo: Path, certs: Certificates
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "forseti",
            "serve",
            "--model-repository",
            str(repo),
            "--grpc-port",
            "0",
            "--allow-metrics",
            "false",
            "--grpc-use-ssl-mutual",
            *_tls_args(certs),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--grpc-root-cert is required" in result.stderr
    assert "Traceback" not in result.stderr


def test_metrics_key_without_a_certificate_is_refused(certs: Certificates) -> None:
    with pytest.raises(TlsError, match="--metrics-ssl-cert is required"):
        metrics_ssl_context(None, certs.server.key)


def test_metrics_bind_to_loopback_by_default() -> None:
    args = serve_parser().parse_args(["--model-repository", "r"])
    assert args.metrics_address == "127.0.0.1"
    assert ServerOptions(model_repository=Path("r")).metrics_address == "127.0.0.1"
    assert is_loopback(args.metrics_address)
    assert not is_loopback("0.0.0.0")


def test_grpc_use_ssl_takes_triton_style_booleans() -> None:
    parse = serve_parser().parse_args
    base = ["--model-repository", "r"]
    assert parse([*base, "--grpc-use-ssl"]).grpc_use_ssl is True
    assert parse([*base, "--grpc-use-ssl=true"]).grpc_use_ssl is True
    assert parse([*base, "--grpc-use-ssl", "false"]).grpc_use_ssl is False
    assert parse(base).grpc_use_ssl_mutual is False
