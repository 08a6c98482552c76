"""`forseti serve`: its options, parsed into ServerOptions."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from forseti.core.logs import configure_logging
from forseti.core.repository.layout import DEFAULT_MAX_ARTIFACT_BYTES

log = logging.getLogger(__name__)


def serve_parser() -> argparse.ArgumentParser:
    """The command line of `forseti serve`: its flags, defaults and help."""
    p = argparse.ArgumentParser(
        prog="forseti serve",
        description=(
            "Serve a Triton-layout model repository over Triton's gRPC protocol "
            "(inference.GRPCInferenceService). Any tritonclient works unchanged."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model-repository",
        type=_repository,
        required=True,
        help="repository folder, or an object store: s3://bucket/prefix, "
        "s3://host:port/bucket/prefix (credentials and endpoint from the AWS environment, "
        "AWS_ENDPOINT_URL included), gs://, az://",
    )
    p.add_argument(
        "--keyring",
        type=Path,
        default=None,
        help="keyring file that opens sealed artifacts; without it, $FORSETI_KEYRING (a file "
        "path, or the keyring JSON itself) or $FORSETI_KEYRING_FD (an open descriptor holding "
        "the JSON, for containers)",
    )
    p.add_argument(
        "--audit-log",
        type=Path,
        default=None,
        metavar="PATH",
        help="append-only, hash-chained audit log of model-repository control calls and "
        "loads/swaps/unloads (check it with `forseti audit verify PATH`)",
    )
    p.add_argument("--grpc-address", default="0.0.0.0", help="address to listen on")
    p.add_argument("--grpc-port", type=int, default=8001)
    _add_http_flags(p)
    _add_security_flags(p)
    p.add_argument("--metrics-address", default="127.0.0.1", help="metrics bind address")
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument(
        "--metrics-ssl-cert",
        type=Path,
        help="serve /metrics over HTTPS with this PEM certificate (chain); with --metrics-ssl-key",
    )
    p.add_argument("--metrics-ssl-key", type=Path, help="PEM private key of --metrics-ssl-cert")
    p.add_argument(
        "--allow-metrics",
        type=_bool,
        default=True,
        metavar="BOOL",
        help="serve Prometheus metrics on /metrics",
    )
    p.add_argument(
        "--model-control-mode",
        choices=("none", "poll", "explicit"),
        default="none",
        help="none: load all at start; poll: also pick up changes; explicit: load on request",
    )
    p.add_argument("--repository-poll-secs", type=float, default=15.0, help="poll interval")
    p.add_argument(
        "--load-model",
        action="append",
        default=[],
        metavar="NAME",
        help="model to load at start in explicit mode (repeatable; '*' for all)",
    )
    p.add_argument(
        "--allow-plaintext",
        action="store_true",
        help="also serve unsealed model files (off: only *.sealed artifacts load)",
    )
    p.add_argument(
        "--strict-readiness",
        type=_bool,
        default=True,
        metavar="BOOL",
        help="ServerReady only when every model meant to be served has a ready version",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=8 * 1024 * 1024,
        help="largest request accepted; bigger ones get RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--max-artifact-bytes",
        type=int,
        default=DEFAULT_MAX_ARTIFACT_BYTES,
        help="largest model file a version may have; a bigger one is refused before it is read "
        "(default %(default)s, 2 GiB)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=4096,
        help="largest max_batch_size a model config may declare",
    )
    p.add_argument(
        "--max-inflight-requests",
        type=int,
        default=1024,
        help="server-wide limit of queued/running inference requests; more get "
        "RESOURCE_EXHAUSTED at once (0: no limit)",
    )
    p.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=4096,
        help="calls of any kind open at once (gRPC's maximum_concurrent_rpcs); more get "
        "RESOURCE_EXHAUSTED from gRPC itself, streams and control calls included (0: no limit)",
    )
    p.add_argument(
        "--max-streams-per-connection",
        type=int,
        default=256,
        help="HTTP/2 streams one client connection may hold open at once (0: gRPC's default)",
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=5.0,
        help="on SIGTERM/SIGINT: report NOT_SERVING (grpc.health.v1) and not ready at once, "
        "keep answering every call this long so load balancers stop sending, then stop; a "
        "second signal ends the drain early",
    )
    p.add_argument(
        "--exit-timeout-secs",
        type=float,
        default=30.0,
        help="after the drain, how long running requests may take to finish",
    )
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def _add_security_flags(p: argparse.ArgumentParser) -> None:
    """Triton's TLS and restricted-protocol options, with the same names and meaning."""
    p.add_argument(
        "--grpc-use-ssl",
        type=_bool,
        nargs="?",
        const=True,
        default=False,
        metavar="BOOL",
        help="serve gRPC over TLS with --grpc-server-cert and --grpc-server-key",
    )
    p.add_argument(
        "--grpc-use-ssl-mutual",
        type=_bool,
        nargs="?",
        const=True,
        default=False,
        metavar="BOOL",
        help="mutual TLS: also require a client certificate signed by --grpc-root-cert "
        "(implies --grpc-use-ssl)",
    )
    p.add_argument("--grpc-server-cert", type=Path, help="PEM server certificate (chain)")
    p.add_argument("--grpc-server-key", type=Path, help="PEM private key of the certificate")
    p.add_argument(
        "--grpc-root-cert",
        type=Path,
        help="PEM certificate of the CA that signs client certificates (mutual TLS)",
    )
    p.add_argument(
        "--data-plane",
        choices=("python", "native", "auto"),
        default=os.environ.get("FORSETI_DATA_PLANE", "python"),
        help="what answers the gRPC port: the Python data plane (default), the native C++ "
        "one (`make native` builds it; ModelInfer for onnxruntime models runs in C++, "
        "everything else in Python), or auto: native when it is built, else python; "
        "$FORSETI_DATA_PLANE sets the default",
    )
    p.add_argument(
        "--allow-unauthenticated-control",
        action="store_true",
        help="start even though model control (--model-control-mode explicit) is reachable "
        "on a non-loopback --grpc-address with neither a model-repository token "
        "(--grpc-restricted-protocol model-repository:...) nor mutual TLS; without it that "
        "setup is refused. Logged as a warning, and on every control call's audit record",
    )
    p.add_argument(
        "--grpc-restricted-protocol",
        action="append",
        default=[],
        metavar="PROTOCOLS:KEY=VALUE",
        help="require the header triton-grpc-protocol-KEY on calls to these protocols "
        "(comma-separated: health, metadata, inference, shared-memory, model-config, "
        "model-repository, statistics, trace, logging). VALUE is @FILE (tokens, one a line; "
        "re-read when it changes), env:VAR, or a literal token (visible in ps). Repeatable; "
        "a protocol may be in one group only",
    )


def _repository(text: str) -> Path | str:
    """A folder path, or an object-store URL kept as written (a Path would fold its "//")."""
    from forseti.core.storage import is_remote

    return text if is_remote(text) else Path(text)


def _add_http_flags(p: argparse.ArgumentParser) -> None:
    """Triton's HTTP/REST endpoint options (KServe v2 REST: server/http)."""
    p.add_argument("--allow-grpc", type=_bool, default=True, metavar="BOOL", help="serve gRPC")
    p.add_argument("--allow-http", type=_bool, default=True, metavar="BOOL", help="serve HTTP/REST")
    p.add_argument(
        "--http-address",
        default=None,
        help="HTTP/REST bind address (default: the --grpc-address)",
    )
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument(
        "--http-restricted-api",
        action="append",
        default=[],
        metavar="APIS:KEY=VALUE",
        help="require the HTTP header KEY on requests to these APIs (the groups of "
        "--grpc-restricted-protocol); VALUE is @FILE, env:VAR or a literal token. Repeatable",
    )
    p.add_argument("--http-ssl-cert", type=Path, help="serve HTTP over TLS: PEM certificate")
    p.add_argument("--http-ssl-key", type=Path, help="PEM private key of --http-ssl-cert")
    p.add_argument(
        "--http-request-timeout-secs",
        type=float,
        default=30.0,
        help="time an HTTP client has to send a request's line and headers, and again its "
        "body; a slower one gets 408 and is disconnected",
    )


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def main_serve(argv: list[str]) -> int:
    args = serve_parser().parse_args(argv)
    configure_logging(args.log_level)
    from forseti.server.app import ServerOptions, StartupError, run
    from forseti.server.security.tls import GrpcTlsOptions

    options = ServerOptions(
        model_repository=args.model_repository,
        keyring=args.keyring,
        audit_log=args.audit_log,
        grpc_address=args.grpc_address,
        grpc_port=args.grpc_port,
        metrics_address=args.metrics_address,
        metrics_port=args.metrics_port,
        allow_metrics=args.allow_metrics,
        control_mode=args.model_control_mode,
        poll_secs=args.repository_poll_secs,
        load_models=args.load_model,
        allow_plaintext=args.allow_plaintext,
        strict_readiness=args.strict_readiness,
        max_request_bytes=args.max_request_bytes,
        max_batch_size=args.max_batch_size,
        max_artifact_bytes=args.max_artifact_bytes,
        max_inflight_requests=args.max_inflight_requests,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_streams_per_connection=args.max_streams_per_connection,
        exit_timeout_secs=args.exit_timeout_secs,
        drain_secs=args.drain_seconds,
        grpc_tls=GrpcTlsOptions(
            use_ssl=args.grpc_use_ssl,
            use_ssl_mutual=args.grpc_use_ssl_mutual,
            server_cert=args.grpc_server_cert,
            server_key=args.grpc_server_key,
            root_cert=args.grpc_root_cert,
        ),
        restricted_protocols=args.grpc_restricted_protocol,
        allow_grpc=args.allow_grpc,
        allow_http=args.allow_http,
        http_address=args.http_address,
        http_port=args.http_port,
        http_restricted_api=args.http_restricted_api,
        http_ssl_cert=args.http_ssl_cert,
        http_ssl_key=args.http_ssl_key,
        http_request_timeout_secs=args.http_request_timeout_secs,
        allow_unauthenticated_control=args.allow_unauthenticated_control,
        data_plane=args.data_plane,
        metrics_ssl_cert=args.metrics_ssl_cert,
        metrics_ssl_key=args.metrics_ssl_key,
    )
    try:
        return run(options)
    except StartupError as exc:
        print(f"forseti serve: {exc}", file=sys.stderr)
        return 2
