"""What a client presents to the server: TLS roots, a client certificate for mutual TLS, and
restricted-protocol tokens (the `triton-grpc-protocol-<key>` headers the server checks, see
server/security/restricted.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from forseti.client.errors import ClientConfigError
from forseti.core.secret_files import SecretFileError, read_secret_file

PROTOCOL_HEADER_PREFIX = "triton-grpc-protocol-"


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


@dataclass(frozen=True)
class TLSConfig:
    """TLS to the server (`root_certificates`: the CA that signed the server's certificate;
    None uses the system's roots) and, for mutual TLS, the client's own certificate chain and
    private key (the key file must be private: owner-only, mode 0600). `server_name` overrides
    the name checked against the server's certificate (needed when the replicas are addressed
    by IP, as those of a DNS name are)."""

    root_certificates: str | Path | None = None
    certificate_chain: str | Path | None = None
    private_key: str | Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ClientConfigError(
                "mutual TLS needs both certificate_chain and private_key (or neither)"
            )

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials, read from the files now."""
        key = None
        if self.private_key is not None:
            try:
                key, _ = read_secret_file(self.private_key, "client private key")
            except SecretFileError as exc:
                raise ClientConfigError(str(exc)) from None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.root_certificates),
            private_key=key,
            certificate_chain=_read(self.certificate_chain),
        )


def token_metadata(tokens: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    """The headers for restricted-protocol tokens: `{key: token}` (the key as in the server's
    `--grpc-restricted-protocol <protocols>:<key>=...`) becomes `triton-grpc-protocol-<key>`.
    A token written `@/path/file` is read from that file, which must be private (0600); its
    first non-empty, non-comment line is the token."""
    headers: list[tuple[str, str]] = []
    for key, value in (tokens or {}).items():
        token = _read_token(value, key) if value.startswith("@") else value
        headers.append((PROTOCOL_HEADER_PREFIX + key.lower(), token))
    return tuple(headers)


def _read_token(value: str, key: str) -> str:
    path = Path(value[1:]).expanduser()
    try:
        data, _ = read_secret_file(path, "token file")
    except (OSError, SecretFileError) as exc:
        raise ClientConfigError(f"token for '{key}': {exc}") from None
    for line in data.decode("ascii", errors="strict").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line
    raise ClientConfigError(f"token file {path} for '{key}' holds no token")
