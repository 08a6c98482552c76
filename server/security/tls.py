"""TLS for the gRPC endpoint (Triton's option names) and for the metrics endpoint.

Triton's semantics: `--grpc-use-ssl` serves TLS with `--grpc-server-cert`/`--grpc-server-key`;
`--grpc-use-ssl-mutual` implies it and also requires every client to present a certificate
signed by `--grpc-root-cert`. The files are checked at start (readable, PEM, key matches the
certificate, certificate currently valid, private key owned by the server's user with mode
0600: a key that group/others can read is refused) so a mistake stops the server with a clear
message instead of failing every handshake later. No message or log line contains key material.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from forseti.core.secret_files import SecretFileError, read_secret_file

log = logging.getLogger(__name__)


class TlsError(Exception):
    """TLS cannot be set up; the message names the option and file to fix."""


@dataclass(frozen=True)
class GrpcTlsOptions:
    """Triton's `--grpc-use-ssl*`, `--grpc-server-cert/-key` and `--grpc-root-cert`."""

    use_ssl: bool = False
    use_ssl_mutual: bool = False
    server_cert: Path | None = None
    server_key: Path | None = None
    root_cert: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.use_ssl or self.use_ssl_mutual

    @property
    def mode(self) -> str:
        """ "mutual", "tls" or "off", for logs."""
        return "mutual" if self.use_ssl_mutual else "tls" if self.use_ssl else "off"


def _read(path: Path | None, option: str, what: str) -> bytes:
    if path is None:
        raise TlsError(f"{option} is required: {what}")
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"{option} {path}: cannot read it ({exc.strerror or exc})") from None


def _certificates(data: bytes, path: Path, option: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise TlsError(f"{option} {path}: no PEM certificate in it")
    now = datetime.datetime.now(datetime.UTC)
    leaf = certs[0]
    if leaf.not_valid_after_utc < now:
        raise TlsError(
            f"{option} {path}: the certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d}"
        )
    if leaf.not_valid_before_utc > now:
        raise TlsError(
            f"{option} {path}: the certificate is not valid before "
            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    return certs


def _check_key(
    key_pem: bytes, key_path: Path, key_option: str, leaf: x509.Certificate, cert_path: Path
) -> None:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TlsError(
            f"{key_option} {key_path}: the key is encrypted; give an unencrypted PEM key "
            "readable only by the server's user"
        ) from None
    except ValueError:
        raise TlsError(f"{key_option} {key_path}: not a PEM private key") from None
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*public) != leaf.public_key().public_bytes(*public):
        raise TlsError(f"{key_option} {key_path} does not belong to the certificate in {cert_path}")


def _read_key(path: Path | None, option: str) -> bytes:
    """The private key's PEM bytes, only from a file owned by the server's user that gives
    group/others no access (0600 or 0400)."""
    if path is None:
        raise TlsError(f"{option} is required: the server certificate's PEM private key")
    try:
        return read_secret_file(path, f"TLS private key ({option})")[0]
    except SecretFileError as exc:
        raise TlsError(str(exc)) from None
    except OSError as exc:
        raise TlsError(f"{option} {path}: cannot read it ({exc.strerror or exc})") from None


def load_server_pair(
    cert_path: Path | None, key_path: Path | None, cert_option: str, key_option: str
) -> tuple[bytes, bytes]:
    """The (key, certificate chain) PEM bytes, checked to belong together and be valid now."""
    cert_pem = _read(cert_path, cert_option, "the server's PEM certificate (chain)")
    key_pem = _read_key(key_path, key_option)
    assert cert_path is not None and key_path is not None
    leaf = _certificates(cert_pem, cert_path, cert_option)[0]
    _check_key(key_pem, key_path, key_option, leaf, cert_path)
    return key_pem, cert_pem


def grpc_server_credentials(options: GrpcTlsOptions) -> grpc.ServerCredentials | None:
    """Server credentials for `add_secure_port`, or None when TLS is off (as in Triton, the
    certificate options are then ignored; a warning says so)."""
    if not options.enabled:
        given = [
            name
            for name, value in (
                ("--grpc-server-cert", options.server_cert),
                ("--grpc-server-key", options.server_key),
                ("--grpc-root-cert", options.root_cert),
            )
            if value is not None
        ]
        if given:
            log.warning(
                "TLS options ignored: TLS is off; add --grpc-use-ssl (or --grpc-use-ssl-mutual)",
                extra={"ignored": ",".join(given)},
            )
        return None
    key_pem, cert_pem = load_server_pair(
        options.server_cert, options.server_key, "--grpc-server-cert", "--grpc-server-key"
    )
    root_pem = None
    if options.use_ssl_mutual:
        root_pem = _read(
            options.root_cert,
            "--grpc-root-cert",
            "with --grpc-use-ssl-mutual, the PEM certificate of the CA that signs clients",
        )
        assert options.root_cert is not None
        _certificates(root_pem, options.root_cert, "--grpc-root-cert")
    elif options.root_cert is not None:
        log.warning(
            "--grpc-root-cert is ignored without --grpc-use-ssl-mutual (clients are not asked "
            "for certificates)"
        )
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)],
        root_certificates=root_pem,
        require_client_auth=options.use_ssl_mutual,
    )


def server_ssl_context(
    cert_path: Path | None, key_path: Path | None, cert_flag: str, key_flag: str
) -> ssl.SSLContext | None:
    """A server-side TLS context (TLS 1.2 or newer) from a certificate and key given by the
    named flags; None when neither file is given."""
    if cert_path is None and key_path is None:
        return None
    # Checked here for clear messages; the ssl module then reads the files itself.
    load_server_pair(cert_path, key_path, cert_flag, key_flag)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(cert_path), keyfile=str(key_path))
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"{cert_flag} {cert_path}: {exc.__class__.__name__}") from None
    return context


def metrics_ssl_context(cert_path: Path | None, key_path: Path | None) -> ssl.SSLContext | None:
    """The metrics endpoint's TLS context; None when neither file is given."""
    return server_ssl_context(cert_path, key_path, "--metrics-ssl-cert", "--metrics-ssl-key")


def is_loopback(address: str) -> bool:
    """Whether a bind address only accepts connections from this host."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False
