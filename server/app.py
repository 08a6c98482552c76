"""Start the gRPC server and the metrics endpoint, run until SIGTERM/SIGINT, drain, exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import grpc

from forseti.core.audit import AuditError, AuditLog
from forseti.core.repository.layout import DEFAULT_MAX_ARTIFACT_BYTES
from forseti.core.sealing.keyring import (
    Keyring,
    KeyringError,
    keyring_from_environment,
    load_keyring,
)
from forseti.core.storage import is_remote
from forseti.server.audit_trail import AuditTrail
from forseti.server.dataplane import DEFAULT_DATA_PLANE, DataPlaneError, use_native
from forseti.server.health import ServingHealth
from forseti.server.http.routes import HttpLimits, TritonHttpApp
from forseti.server.http.server import (
    HttpFrontDoor,
    HttpStartError,
    TransportLimits,
    http_control_guard,
    http_exposure_fixes,
    http_ssl_context,
    start_http,
)
from forseti.server.inference import InferenceHandler
from forseti.server.metrics import start_metrics_server
from forseti.server.model_control import ModelControl
from forseti.server.protocol.registration import add_servicer
from forseti.server.protocol.servicer import ServerState, TritonServicer
from forseti.server.registry.lifecycle import LifecycleHooks
from forseti.server.registry.model_registry import ModelRegistry
from forseti.server.registry.repository_watcher import RepositoryWatcher
from forseti.server.security.restricted import (
    RestrictedProtocolInterceptor,
    RestrictedProtocols,
    RestrictionError,
)
from forseti.server.security.tls import (
    GrpcTlsOptions,
    TlsError,
    grpc_server_credentials,
    is_loopback,
    metrics_ssl_context,
)

log = logging.getLogger(__name__)

CONTROL_MODES = ("none", "poll", "explicit")


@dataclass
class ServerOptions:
    """Everything `forseti serve` can be told."""

    model_repository: Path | str  # a folder, or an object-store URL (s3://...)
    keyring: Path | None = None
    audit_log: Path | None = None
    grpc_address: str = "0.0.0.0"
    grpc_port: int = 8001
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 8002
    allow_metrics: bool = True
    control_mode: str = "none"
    poll_secs: float = 15.0
    load_models: list[str] = field(default_factory=list)
    allow_plaintext: bool = False
    strict_readiness: bool = True
    max_request_bytes: int = 8 * 1024 * 1024
    max_batch_size: int = 4096
    max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES
    max_inflight_requests: int = 1024
    max_concurrent_rpcs: int = 4096  # 0: no limit
    max_streams_per_connection: int = 256  # 0: gRPC's default
    exit_timeout_secs: float = 30.0
    # On a stop signal: health NOT_SERVING and ServerReady false at once, every call still
    # answered for this long (load balancers and Kubernetes endpoints catch up), then stop.
    drain_secs: float = 5.0
    grpc_tls: GrpcTlsOptions = field(default_factory=GrpcTlsOptions)
    restricted_protocols: list[str] = field(default_factory=list)  # Triton's settings, in order
    metrics_ssl_cert: Path | None = None
    metrics_ssl_key: Path | None = None
    # Serve model control (explicit mode) on a non-loopback address with neither a
    # model-repository token nor mutual TLS; refused at start without it.
    allow_unauthenticated_control: bool = False
    # Which data plane owns the gRPC port: "python", "native" or "auto" (server/dataplane).
    data_plane: str = DEFAULT_DATA_PLANE
    # The HTTP/REST front door (server/http), as Triton's --allow-http/--http-* options;
    # http_address None: the --grpc-address.
    allow_grpc: bool = True
    allow_http: bool = True
    http_address: str | None = None
    http_port: int = 8000
    http_restricted_api: list[str] = field(default_factory=list)
    http_ssl_cert: Path | None = None
    http_ssl_key: Path | None = None
    http_request_timeout_secs: float = 30.0  # to send a request's head, and its body


AUDITED_REFUSALS = frozenset({"RepositoryModelLoad", "RepositoryModelUnload", "RepositoryIndex"})


class StartupError(Exception):
    """The server cannot start; the message says what to fix."""


def control_guard(options: ServerOptions, restrictions: RestrictedProtocols) -> str:
    """What keeps callers who reach the gRPC port from changing the served models.

    "mode": none and poll mode refuse RepositoryModelLoad/Unload whoever sends them, so the
    rule does not apply; "token": the model-repository group needs a token; "mutual-tls":
    every client needs a certificate from --grpc-root-cert; "loopback": only this host can
    connect; "none": nothing, anyone who reaches the port can load and unload models.
    """
    if options.control_mode != "explicit":
        return "mode"
    if any("model-repository" in group.protocols for group in restrictions.groups):
        return "token"
    if options.grpc_tls.use_ssl_mutual:
        return "mutual-tls"
    if is_loopback(options.grpc_address):
        return "loopback"
    return "none"


def control_exposure_fixes() -> str:
    """The ways out of an exposed control plane, for the start-up refusal."""
    return (
        "add a token to the model-repository group "
        "(--grpc-restricted-protocol=model-repository:<key>=@<token-file>), or require client "
        "certificates (--grpc-use-ssl-mutual --grpc-server-cert <pem> --grpc-server-key <pem> "
        "--grpc-root-cert <ca-pem>), or bind to loopback (--grpc-address 127.0.0.1); "
        "--allow-unauthenticated-control accepts the risk and serves it anyway"
    )


def _repository_location(location: Path | str) -> Path | str:
    """The folder (resolved, checked) or the object-store URL as given."""
    if is_remote(location):
        return str(location)
    folder = Path(location)
    if not folder.is_dir():
        raise StartupError(f"model repository {folder} is not a folder")
    return folder.resolve()


def _open_keyring(options: ServerOptions) -> Keyring | None:
    try:
        if options.keyring is not None:
            return load_keyring(options.keyring)
        keyring = keyring_from_environment()
    except KeyringError as exc:
        raise StartupError(str(exc)) from None
    if keyring is None and not options.allow_plaintext:
        log.warning(
            "no keyring (--keyring, $FORSETI_KEYRING or $FORSETI_KEYRING_FD): "
            "sealed artifacts cannot be opened"
        )
    return keyring


def _open_audit(options: ServerOptions) -> AuditLog | None:
    if options.audit_log is None:
        return None
    try:
        return AuditLog.open(options.audit_log, component="server")
    except AuditError as exc:
        raise StartupError(str(exc)) from None


@dataclass
class Service:
    """The serving parts of one server, wired together, before any front door is opened."""

    registry: ModelRegistry
    handler: InferenceHandler
    control: ModelControl
    watcher: RepositoryWatcher
    audit: AuditTrail
    state: ServerState
    health: ServingHealth

    def servicer(self) -> TritonServicer:
        """The gRPC front door over these parts."""
        return TritonServicer(self.registry, self.state, self.handler, self.control)

    def busy(self) -> bool:
        """A request is being handled (an inference or a load/unload, either front door)."""
        return self.handler.inflight > 0 or self.control.running > 0


def assemble(
    repository: Path | str,
    keyring: Keyring | None,
    *,
    allow_plaintext: bool = False,
    max_batch_size: int = 4096,
    max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
    max_inflight: int = 1024,
    control_mode: str = "none",
    strict_readiness: bool = True,
    audit: AuditLog | None = None,
    unauthenticated_control: bool = False,
) -> Service:
    """Wire the registry, its lifecycle listeners, the request handler and model control."""
    trail = AuditTrail(audit)
    hooks = LifecycleHooks()
    hooks.subscribe(trail)
    state = ServerState(strict_readiness=strict_readiness, control_mode=control_mode)
    registry = ModelRegistry(
        repository,
        keyring,
        allow_plaintext,
        max_batch_size=max_batch_size,
        hooks=hooks,
        max_artifact_bytes=max_artifact_bytes,
    )
    health = ServingHealth(registry, state)
    hooks.subscribe(health)
    return Service(
        registry=registry,
        handler=InferenceHandler(registry, max_inflight),
        control=ModelControl(
            registry, trail, control_mode, unauthenticated=unauthenticated_control
        ),
        watcher=RepositoryWatcher(registry),
        audit=trail,
        state=state,
        health=health,
    )


async def initial_load(service: Service, load_models: list[str]) -> None:
    """What the control mode loads at start: everything, the poll's view, or the named models
    (explicit mode; a failure is logged and the server starts anyway)."""
    mode = service.state.control_mode
    if mode == "poll":
        await service.watcher.poll_once()
    elif mode == "none" or "*" in load_models:
        await service.registry.load_all()
    else:
        for name in load_models:
            try:
                await service.registry.load_model(name)
            except Exception as exc:
                log.warning("startup load failed", extra={"model": name, "error": str(exc)})


async def serve(options: ServerOptions) -> int:
    """Run the server until a stop signal; returns the process exit code."""
    if options.control_mode not in CONTROL_MODES:
        raise StartupError(f"--model-control-mode must be one of {', '.join(CONTROL_MODES)}")
    repository = _repository_location(options.model_repository)
    if options.allow_plaintext:
        log.warning(
            "--allow-plaintext: models without a sealed manifest are served as Triton serves "
            "them; their config.pbtxt and version folders are not authenticated, so whoever "
            "can write the repository decides what they serve"
        )
    try:
        credentials = grpc_server_credentials(options.grpc_tls)
        restrictions = RestrictedProtocols.from_settings(options.restricted_protocols)
        metrics_tls = metrics_ssl_context(options.metrics_ssl_cert, options.metrics_ssl_key)
        http_restrictions = RestrictedProtocols.from_settings(
            options.http_restricted_api, http=True
        )
        http_tls = http_ssl_context(options.http_ssl_cert, options.http_ssl_key)
    except (TlsError, RestrictionError) as exc:
        raise StartupError(str(exc)) from None
    if not (options.allow_grpc or options.allow_http):
        raise StartupError("--allow-grpc false and --allow-http false leave nothing to serve")
    http_address = options.http_address or options.grpc_address
    guard = control_guard(options, restrictions) if options.allow_grpc else "off"
    http_guard = "off"
    if options.allow_http:
        http_guard = http_control_guard(options.control_mode, http_address, http_restrictions)
    exposed = "none" in (guard, http_guard)
    if exposed:
        if guard == "none":
            exposure = (
                f"--model-control-mode explicit on --grpc-address {options.grpc_address} with "
                f"no restriction: anyone who reaches port {options.grpc_port} can load and "
                "unload models (RepositoryModelLoad/Unload)"
            )
            fixes = control_exposure_fixes()
        else:
            exposure = (
                f"--model-control-mode explicit on --http-address {http_address} with no "
                f"restriction: anyone who reaches port {options.http_port} can load and "
                "unload models (POST /v2/repository/models/<model>/load, /unload)"
            )
            fixes = http_exposure_fixes()
        if not options.allow_unauthenticated_control:
            raise StartupError(f"refusing to start: {exposure}. To fix it, {fixes}")
        log.warning(
            "unauthenticated model control (--allow-unauthenticated-control): "
            f"{exposure}; each control call's audit record carries unauthenticated_control"
        )
    elif options.allow_unauthenticated_control:
        log.info(
            "--allow-unauthenticated-control has no effect: model control is guarded",
            extra={"control_guard": guard},
        )
    keyring = _open_keyring(options)
    service = assemble(
        repository,
        keyring,
        allow_plaintext=options.allow_plaintext,
        max_batch_size=options.max_batch_size,
        max_artifact_bytes=options.max_artifact_bytes,
        max_inflight=options.max_inflight_requests,
        control_mode=options.control_mode,
        strict_readiness=options.strict_readiness,
        audit=_open_audit(options),
        unauthenticated_control=exposed,
    )
    registry, state, audit = service.registry, service.state, service.audit

    async def audit_refusal(method: str, fields: dict[str, str]) -> None:
        # Refused control calls are counted into the audit log (one record per caller,
        # method and reason a window); refused inference calls only logged, so a flood of
        # bad calls cannot turn into a flood of fsyncs.
        if method.rsplit("/", 1)[-1] in AUDITED_REFUSALS:
            audit.tally_refusal(fields)

    interceptor = RestrictedProtocolInterceptor(restrictions, audit_refusal)
    grpc_options: list[tuple[str, int]] = [
        ("grpc.max_receive_message_length", options.max_request_bytes),
        ("grpc.max_send_message_length", -1),
        # A second server on the same port must fail, not share it silently.
        ("grpc.so_reuseport", 0),
    ]
    if options.max_streams_per_connection:
        # One client cannot hold more streams than this open on its connection.
        grpc_options.append(("grpc.max_concurrent_streams", options.max_streams_per_connection))
    try:
        native = use_native(options.data_plane)
    except DataPlaneError as exc:
        raise StartupError(str(exc)) from None
    if native:
        from forseti.server.dataplane.native import NativeGrpcServer

        # The same interface as grpc.aio.Server for what follows (see server/dataplane).
        server = cast(
            grpc.aio.Server,
            NativeGrpcServer(
                registry,
                interceptors=[interceptor] if restrictions else [],
                restricted_methods=list(restrictions.by_method),
                max_request_bytes=options.max_request_bytes,
                max_streams_per_connection=options.max_streams_per_connection,
                max_concurrent_rpcs=options.max_concurrent_rpcs,
                max_inflight=options.max_inflight_requests,
                tls=options.grpc_tls,
            ),
        )
    else:
        server = grpc.aio.server(
            # No restriction, no interceptor: the request path stays as it was.
            interceptors=[interceptor] if restrictions else None,
            options=grpc_options,
            # Bounds the calls (and their memory) open at once, whatever they are; the
            # in-flight limit above bounds inference alone, with the server's own message.
            maximum_concurrent_rpcs=options.max_concurrent_rpcs or None,
        )
    add_servicer(service.servicer(), server)
    service.health.add_to(server)
    await service.health.refresh()  # NOT_SERVING until the start-up load is done
    address = f"{options.grpc_address}:{options.grpc_port}"
    try:
        if not options.allow_grpc:
            pass  # the servicer still answers the HTTP front door; no gRPC port
        elif credentials is None:
            server.add_insecure_port(address)
        else:
            server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {address}: {exc}") from None
    await server.start()
    if options.allow_grpc:
        log.info("grpc listening", extra={"address": address, "tls": options.grpc_tls.mode})
    http_door = None
    if options.allow_http:
        http_app = TritonHttpApp(
            service.servicer(),
            http_restrictions,
            HttpLimits(max_body_bytes=options.max_request_bytes),
            audit_refusal,
        )
        try:
            http_door = await start_http(
                http_app,
                http_address,
                options.http_port,
                http_tls,
                TransportLimits(
                    head_timeout_s=options.http_request_timeout_secs,
                    max_connections=options.max_concurrent_rpcs or 1 << 30,
                ),
            )
        except HttpStartError as exc:
            await server.stop(None)
            raise StartupError(str(exc)) from None
        log.info(
            "http listening",
            extra={"address": f"{http_address}:{options.http_port}", "tls": http_tls is not None},
        )
    if options.allow_metrics:
        try:
            start_metrics_server(
                registry, options.metrics_address, options.metrics_port, metrics_tls
            )
        except OSError as exc:
            await server.stop(None)
            raise StartupError(
                f"cannot serve metrics on {options.metrics_address}:{options.metrics_port}: "
                f"{exc.strerror}"
            ) from None

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    await initial_load(service, options.load_models)
    state.started = True
    await service.health.refresh()
    unauthenticated: dict[str, object] = {"unauthenticated_control": True} if exposed else {}
    await audit.record(
        "server.ready",
        repository=str(options.model_repository),
        address=address,
        tls=options.grpc_tls.mode,
        control_mode=options.control_mode,
        models=registry.model_names()[:64],
        control_guard=guard,
        http_address=f"{http_address}:{options.http_port}" if options.allow_http else "off",
        http_control_guard=http_guard,
        **unauthenticated,
    )
    log.info(
        "server ready",
        extra={
            "mode": options.control_mode,
            "control_guard": guard,
            "models": len(registry.model_names()),
        },
    )
    poller = None
    if options.control_mode == "poll":
        poller = asyncio.create_task(service.watcher.run(options.poll_secs))
    token_watch = asyncio.create_task(restrictions.watch_files())
    http_token_watch = asyncio.create_task(http_restrictions.watch_files())

    await stop.wait()
    state.stopping = True
    await service.health.drain()
    if options.drain_secs > 0:
        # Still answering every call; a second stop signal ends the drain early.
        log.info("draining: NOT_SERVING, still answering", extra={"drain_s": options.drain_secs})
        stop.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), options.drain_secs)
    log.info("stopping: finishing running requests", extra={"grace_s": options.exit_timeout_secs})
    service.health.close()
    for task in (poller, token_watch, http_token_watch):
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    await _stop_front_doors(service, server, http_door, options.exit_timeout_secs, native)
    registry.release_all()
    if audit.enabled:
        await audit.flush()  # counts still in their window
        await audit.record("server.stop")
        audit.close()
    log.info("stopped")
    return 0


# Once no request is being handled, how long a stop still leaves connections to deliver the
# last answers before it closes them.
SETTLE_S = 1.0


async def _stop_front_doors(
    service: Service,
    server: grpc.aio.Server,
    http_door: HttpFrontDoor | None,
    grace_s: float,
    native: bool,
) -> None:
    """Stop both front doors: no new calls, the requests being handled get up to `grace_s`.

    The grace is for requests being handled, not for connections: one that sent part of a
    request (or nothing) and stalls held the stop to the whole grace, or ~20 s with gRPC,
    which waits that long for a peer to answer its GOAWAY ping. So once nothing is handled
    (and SETTLE_S has passed for the answers to go out), the connections left are closed."""
    stops = [asyncio.create_task(server.stop(grace_s))]
    if http_door is not None:
        stops.append(asyncio.create_task(http_door.stop(grace_s)))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    # Calls accepted just before the stop reach their handler.
    await asyncio.sleep(min(0.1, grace_s))
    while service.busy() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    settle = max(0.0, min(SETTLE_S, deadline - loop.time()))
    _, pending = await asyncio.wait(stops, timeout=settle)
    if pending:
        log.info("stopping: requests answered; closing the connections still open")
        if not native:
            await server.stop(0)  # gRPC: a second, shorter grace replaces the first
        if http_door is not None:
            http_door.end_grace()
    await asyncio.gather(*stops)


def run(options: ServerOptions) -> int:
    """Blocking entry point for the CLI."""
    return asyncio.run(serve(options))
