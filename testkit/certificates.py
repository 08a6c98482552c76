"""Certificates made at test time with `cryptography`: a CA, a server certificate for loopback,
client certificates, and a second, unrelated CA whose clients the server must refuse."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = datetime.timedelta(days=2)


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    """A CA: its PEM certificate file, and what it needs to sign more."""

    cert: Path
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Forseti tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_authority(folder: Path, name: str) -> Authority:
    """A self-signed CA that may sign leaf certificates."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = _write(folder / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))
    return Authority(path, cert, key)


def issue(authority: Authority, folder: Path, name: str, *, server: bool) -> Pair:
    """A leaf certificate signed by `authority`: for 127.0.0.1/localhost when `server`, else a
    client certificate whose subject common name is `name`."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(authority.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.private_key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(authority.private_key, hashes.SHA256())
    return Pair(
        cert=_write(folder / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM)),
        key=_write(folder / f"{name}.key", _key_pem(key)),
    )


@dataclass(frozen=True)
class Certificates:
    """Everything the TLS tests need, under one folder."""

    ca: Path  # the CA the server trusts and that signed the server's certificate
    server: Pair
    client: Pair  # signed by `ca`, common name "sidecar"
    other_ca: Path  # an unrelated CA
    stranger: Pair  # a client certificate signed by `other_ca`


def make_certificates(folder: Path) -> Certificates:
    """A CA with a server and a client certificate, and another CA with its own client."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = make_authority(folder, "forseti-test-ca")
    other = make_authority(folder, "other-ca")
    return Certificates(
        ca=ca.cert,
        server=issue(ca, folder, "server", server=True),
        client=issue(ca, folder, "sidecar", server=False),
        other_ca=other.cert,
        stranger=issue(other, folder, "stranger", server=False),
    )
