"""The server replicas a promotion must reach: the `[server]` section's endpoints, or every
address a DNS name resolves to (a Kubernetes headless service), found again at each promotion
so that replicas added or replaced since the last one are included."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import tritonclient.grpc as grpcclient


class ReplicaError(Exception):
    """The replicas could not be found (a DNS name that does not resolve, a bad address)."""


@dataclass
class Replica:
    """One server replica: the address it is named by in errors and the audit log."""

    address: str
    client: grpcclient.InferenceServerClient


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); raises ReplicaError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ReplicaError(f"'{address}' is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def join_address(host: str, port: int) -> str:
    """The gRPC target for host and port (an IPv6 literal in brackets)."""
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def resolve_all(name: str) -> list[str]:
    """Every address ``name`` (host:port) resolves to, IPv4 and IPv6, each once, in the
    resolver's order; a headless Service's name gives one record per ready pod."""
    host, port = split_address(name)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ReplicaError(f"cannot resolve the replicas' name '{host}': {exc.strerror}") from None
    addresses: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = join_address(str(sockaddr[0]), port)
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise ReplicaError(f"the replicas' name '{host}' resolves to no address")
    return addresses


def replica_addresses(url: str, endpoints: tuple[str, ...], dns_name: str | None) -> list[str]:
    """The addresses to promote to: the DNS name's records, else the endpoints, else url."""
    if dns_name is not None:
        return resolve_all(dns_name)
    if endpoints:
        return list(dict.fromkeys(endpoints))
    return [url]


@contextmanager
def open_replicas(
    addresses: list[str], client_options: dict[str, Any], tls_name: str | None = None
) -> Iterator[list[Replica]]:
    """A client for each replica, closed afterwards. ``tls_name``: the name the servers'
    certificate is for, when they are reached by resolved IP address."""
    options = dict(client_options)
    if tls_name is not None and options.get("ssl"):
        options["channel_args"] = [("grpc.ssl_target_name_override", tls_name)]
    replicas = [Replica(a, grpcclient.InferenceServerClient(a, **options)) for a in addresses]
    try:
        yield replicas
    finally:
        for replica in replicas:
            replica.client.close()
