"""Restricted protocols: Triton's `--grpc-restricted-protocol`, with secrets kept out of argv.

Triton's form is `<protocol>[,<protocol>...]:<key>=<value>`: a call to any RPC of a listed
protocol group must carry the metadata header `triton-grpc-protocol-<key>` with the value.
A protocol may appear in one group only. Forseti adds:

* the value may name where the tokens are: `<key>=@/path/file` (one token per line; the file
  is re-read when it changes, so a second token can be added, clients moved over, and the old
  one removed without a restart; it must be owned by the server's user with mode 0600, and a
  file that becomes empty, missing, unparsable or readable by others means no valid token,
  so the group's calls are all refused until it is fixed) or `<key>=env:VAR` (one token per
  line); a literal value still works, with a warning, because any local user can read argv
  with `ps`;
* only SHA-256 digests of tokens are kept, compared with `hmac.compare_digest`;
* a missing header is UNAUTHENTICATED, a wrong value PERMISSION_DENIED (Triton answers both
  with UNAVAILABLE); either way the call's handler never runs, and the refusal is logged with
  the peer, method, group and a request id, never with the token.

With no restriction configured no interceptor is installed, so the request path is unchanged.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from forseti.core.errors import new_request_id, with_request_id
from forseti.core.secret_files import SecretFileError, read_secret_file

log = logging.getLogger(__name__)

HEADER_PREFIX = "triton-grpc-protocol-"
SERVICE = "inference.GRPCInferenceService"

# Triton's protocol groups and the RPCs each covers (its grpc_server.cc registers every RPC
# under one of these categories; ModelReady is a health RPC there).
PROTOCOL_METHODS: dict[str, tuple[str, ...]] = {
    "health": ("ServerLive", "ServerReady", "ModelReady"),
    "metadata": ("ServerMetadata", "ModelMetadata"),
    "inference": ("ModelInfer", "ModelStreamInfer"),
    "shared-memory": (
        "SystemSharedMemoryStatus",
        "SystemSharedMemoryRegister",
        "SystemSharedMemoryUnregister",
        "CudaSharedMemoryStatus",
        "CudaSharedMemoryRegister",
        "CudaSharedMemoryUnregister",
    ),
    "model-config": ("ModelConfig",),
    "model-repository": ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"),
    "statistics": ("ModelStatistics",),
    "trace": ("TraceSetting",),
    "logging": ("LogSettings",),
}
PROTOCOLS = tuple(PROTOCOL_METHODS)

# Triton also puts the standard gRPC health service under `health`.
_EXTRA_METHODS = {
    "/grpc.health.v1.Health/Check": "health",
    "/grpc.health.v1.Health/Watch": "health",
}

# gRPC metadata keys: lowercase letters, digits, '-', '_', '.'; '-bin' would make it binary.
_KEY = re.compile(r"[0-9a-z_.-]+")
# gRPC metadata values are printable ASCII; a token also has no spaces (lines are stripped).
_TOKEN = re.compile(r"[\x21-\x7e]+")
SHORT_TOKEN_CHARS = 16
FILE_CHECK_SECS = 2.0

# The group whose token authorised the current call; set by the interceptor in the call's task.
_TOKEN_GROUP: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "forseti_token_group", default=None
)


class RestrictionError(Exception):
    """A --grpc-restricted-protocol setting is unusable; the message says how to fix it and
    never contains a token."""


def method_protocol(method: str) -> str | None:
    """The protocol group of a full method name (`/inference.GRPCInferenceService/ModelInfer`)."""
    return _METHOD_PROTOCOL.get(method)


_METHOD_PROTOCOL: dict[str, str] = {
    f"/{SERVICE}/{name}": protocol for protocol, names in PROTOCOL_METHODS.items() for name in names
} | _EXTRA_METHODS


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii")).digest()


def _parse_tokens(text: str, where: str) -> tuple[bytes, ...]:
    """Digests of the tokens in `text`: one per line; blank lines and `#` comments skipped."""
    digests: list[bytes] = []
    short = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not _TOKEN.fullmatch(line):
            raise RestrictionError(
                f"{where}, line {number}: a token must be printable ASCII without spaces "
                "(gRPC header values are ASCII)"
            )
        short += len(line) < SHORT_TOKEN_CHARS
        digests.append(_digest(line))
    if not digests:
        raise RestrictionError(f"{where} holds no token; write one token per line")
    if short:
        log.warning(
            "short restricted-protocol token: use at least 16 random characters",
            extra={"source": where, "short_tokens": short},
        )
    return tuple(dict.fromkeys(digests))


Stamp = tuple[int, int, int, int]
# The stamp of a token file that cannot be stat'ed (deleted, or its folder unreadable).
_NO_FILE: Stamp = (-1, -1, -1, -1)


def _stamp(st: os.stat_result) -> Stamp:
    # ctime too: a chmod changes neither size nor mtime, but must be noticed.
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _file_stamp(path: Path) -> Stamp:
    return _stamp(path.stat())


def _read_token_file(path: Path) -> tuple[tuple[bytes, ...], Stamp]:
    """The token digests in a private token file, and the stamp of the file they came from.

    The file must be owned by the server's user and give group/others no access (0600)."""
    where = f"token file {path}"
    try:
        data, st = read_secret_file(path, "token file")
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise RestrictionError(f"{where} is not ASCII text") from None
    except SecretFileError as exc:
        raise RestrictionError(str(exc)) from None
    except OSError as exc:
        raise RestrictionError(f"cannot read {where}: {exc.strerror or exc}") from None
    return _parse_tokens(text, where), _stamp(st)


@dataclass
class ProtocolGroup:
    """One `--grpc-restricted-protocol` setting: its protocols, header and accepted tokens."""

    label: str  # the protocols as given, e.g. "model-repository" or "health,metadata"
    protocols: tuple[str, ...]
    header: str  # the full metadata key, `triton-grpc-protocol-<key>`
    source: str  # where the tokens come from, safe to log: "file ...", "env ...", "argv"
    digests: tuple[bytes, ...] = field(repr=False)
    path: Path | None = None  # the token file, re-read when it changes
    stamp: Stamp | None = field(default=None, repr=False)

    def accepts(self, presented: str) -> bool:
        """Whether `presented` is one of the group's tokens, in time independent of where
        (or whether) it differs from them."""
        try:
            digest = _digest(presented)
        except UnicodeEncodeError:
            return False
        matched = False
        for known in self.digests:
            matched |= hmac.compare_digest(digest, known)
        return matched


def parse_restriction(
    setting: str,
    env: Mapping[str, str] | None = None,
    *,
    header_prefix: str = HEADER_PREFIX,
    flag: str = "--grpc-restricted-protocol",
) -> ProtocolGroup:
    """Parse `<protocols>:<key>=<value>`; the value is `@FILE`, `env:VAR` or a literal token.

    The header is `header_prefix` + key: `triton-grpc-protocol-<key>` for gRPC, the key
    itself for HTTP (`--http-restricted-api`, `flag` in messages), as in Triton."""
    env = os.environ if env is None else env
    head, colon, assignment = setting.partition(":")
    key, equals, value = assignment.partition("=")
    # Only the protocols and the key may appear in messages: the rest can be a literal token
    # (and without '=' what follows ':' may be a token the key was forgotten before).
    shown = f"{head}:{key}" if colon and equals else head
    if not colon or not equals:
        raise RestrictionError(
            f"{flag} '{shown}...': expected "
            "<protocol>[,<protocol>...]:<key>=<@token-file | env:VAR | token>"
        )
    protocols = tuple(p.strip() for p in head.split(","))
    for protocol in protocols:
        if protocol not in PROTOCOL_METHODS:
            raise RestrictionError(
                f"unknown restricted protocol '{protocol}'; known: {', '.join(PROTOCOLS)}"
            )
    if len(set(protocols)) != len(protocols):
        raise RestrictionError(f"{flag} '{shown}' lists a protocol twice")
    key = key.strip().lower()
    if not _KEY.fullmatch(key) or key.endswith("-bin"):
        raise RestrictionError(
            f"{flag} '{shown}': the key must be lowercase letters, digits, "
            "'-', '_' or '.' (it becomes the header triton-grpc-protocol-<key>)"
        )
    label = ",".join(protocols)
    header = header_prefix + key
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        digests, stamp = _read_token_file(path)
        return ProtocolGroup(label, protocols, header, f"file {path}", digests, path, stamp)
    if value.startswith("env:"):
        name = value[4:]
        if not name or name not in env:
            raise RestrictionError(f"{flag} '{shown}': environment variable '{name}' is not set")
        digests = _parse_tokens(env[name], f"environment variable {name}")
        return ProtocolGroup(label, protocols, header, f"env {name}", digests)
    log.warning(
        "restricted-protocol token given on the command line, where any local user can read "
        "it with ps; use <key>=@FILE or <key>=env:VAR",
        extra={"group": label},
    )
    return ProtocolGroup(label, protocols, header, "argv", _parse_tokens(value, "the token"))


class RestrictedProtocols:
    """All configured groups, looked up by full method name."""

    def __init__(self, groups: Sequence[ProtocolGroup]) -> None:
        seen: dict[str, str] = {}
        for group in groups:
            for protocol in group.protocols:
                if protocol in seen:
                    raise RestrictionError(
                        f"protocol '{protocol}' can not be specified in multiple config groups "
                        f"('{seen[protocol]}' and '{group.label}')"
                    )
                seen[protocol] = group.label
        self.groups = list(groups)
        by_protocol = {p: g for g in self.groups for p in g.protocols}
        self.by_method: dict[str, ProtocolGroup] = {
            method: by_protocol[protocol]
            for method, protocol in _METHOD_PROTOCOL.items()
            if protocol in by_protocol
        }

    @classmethod
    def from_settings(
        cls,
        settings: Iterable[str],
        env: Mapping[str, str] | None = None,
        *,
        http: bool = False,
    ) -> RestrictedProtocols:
        """From the `--grpc-restricted-protocol` values (`--http-restricted-api` with `http`:
        the header is the key itself), in order."""
        if http:
            groups = [
                parse_restriction(s, env, header_prefix="", flag="--http-restricted-api")
                for s in settings
            ]
        else:
            groups = [parse_restriction(s, env) for s in settings]
        restrictions = cls(groups)
        for group in restrictions.groups:
            log.info(
                "restricted protocol group",
                extra={
                    "group": group.label,
                    "header": group.header,
                    "tokens": len(group.digests),
                    "source": group.source,
                },
            )
        return restrictions

    def __bool__(self) -> bool:
        return bool(self.groups)

    def reload_changed_files(self) -> None:
        """Re-read token files whose inode, size, mtime or ctime changed.

        Fails closed: a token file that has become empty, missing, unreadable, unparsable or
        readable by others leaves its group with no valid token, so every call to it is
        refused until the file is fixed; a warning says why, once per change of the file.
        Replace the file atomically (write a new file, chmod 600, rename it over the old one)
        so that no check can see it half-written."""
        for group in self.groups:
            if group.path is None:
                continue
            try:
                stamp = _file_stamp(group.path)
            except OSError:
                stamp = _NO_FILE
            if stamp == group.stamp:
                continue
            try:
                digests, stamp = _read_token_file(group.path)
            except RestrictionError as exc:
                group.digests, group.stamp = (), stamp
                log.warning(
                    "token file unusable; every call to the group is refused until it is fixed",
                    extra={"group": group.label, "problem": str(exc)},
                )
                continue
            group.digests, group.stamp = digests, stamp
            log.info(
                "token file reloaded",
                extra={"group": group.label, "tokens": len(digests), "source": group.source},
            )

    async def watch_files(self, every: float = FILE_CHECK_SECS) -> None:
        """Reload changed token files every `every` seconds, until cancelled."""
        if not any(g.path is not None for g in self.groups):
            return
        while True:
            await asyncio.sleep(every)
            await asyncio.to_thread(self.reload_changed_files)


def _presented(metadata: Sequence[Any] | None, header: str) -> str | None:
    for key, value in metadata or ():
        if key == header:
            return value if isinstance(value, str) else None
    return None


RefusalHook = Callable[[str, dict[str, str]], Awaitable[None]]

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


def _refusal(
    handler: grpc.RpcMethodHandler[_Request, _Response],
    method: str,
    group: ProtocolGroup,
    missing: bool,
    on_refused: RefusalHook | None = None,
) -> grpc.RpcMethodHandler[_Request, _Response]:
    """The same kind of handler as `handler`, which refuses the call without running it."""
    if missing:
        code = grpc.StatusCode.UNAUTHENTICATED
        reason = "missing header"
        message = (
            f"This protocol is restricted, expecting header '{group.header}' "
            f"({group.label}); send it with a valid token"
        )
    else:
        code = grpc.StatusCode.PERMISSION_DENIED
        reason = "token not accepted"
        message = (
            f"This protocol is restricted, expecting header '{group.header}' "
            f"({group.label}); the value sent is not accepted"
        )

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        request_id = new_request_id()
        caller = caller_identity(context)
        fields = {
            "peer": caller.peer,
            "tls_subject": caller.tls_subject or "",
            "rpc": method.rsplit("/", 1)[-1],
            "group": group.label,
            "reason": reason,
            "request_id": request_id,
        }
        log.warning("restricted call refused", extra=fields)
        if on_refused is not None:
            await on_refused(method, fields)
        await context.abort(code, with_request_id(message, request_id))

    if handler.unary_unary is not None:
        make = grpc.unary_unary_rpc_method_handler
    elif handler.unary_stream is not None:
        make = grpc.unary_stream_rpc_method_handler
    elif handler.stream_unary is not None:
        make = grpc.stream_unary_rpc_method_handler
    else:
        make = grpc.stream_stream_rpc_method_handler
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class RestrictedProtocolInterceptor(grpc.aio.ServerInterceptor):
    """Checks the header of every call to a restricted protocol before its handler runs."""

    def __init__(
        self, restrictions: RestrictedProtocols, on_refused: RefusalHook | None = None
    ) -> None:
        self.by_method = restrictions.by_method
        # Told of every refusal (the audit log records refused control calls).
        self.on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Request, _Response] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Request, _Response] | None:
        group = self.by_method.get(handler_call_details.method)
        if group is None:
            return await continuation(handler_call_details)
        presented = _presented(handler_call_details.invocation_metadata, group.header)
        if presented is not None and group.accepts(presented):
            _TOKEN_GROUP.set(group.label)
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return _refusal(
            handler, handler_call_details.method, group, presented is None, self.on_refused
        )


def mark_token_group(label: str) -> None:
    """Record, for the current call's task, the group whose token authorised it (the HTTP
    front door's twin of what the interceptor does)."""
    _TOKEN_GROUP.set(label)


# ---- who is calling ---------------------------------------------------------------------


@dataclass(frozen=True)
class CallerIdentity:
    """Who made a call, as far as the server can tell; safe to log and audit (no secrets)."""

    peer: str  # gRPC's peer string, e.g. "ipv4:10.0.0.7:53122"
    tls_subject: str | None  # the verified client certificate's subject (mutual TLS), or None
    token_group: str | None  # the restricted group whose token the call presented, or None


def _first(auth: Mapping[str, Iterable[bytes]], key: str) -> str | None:
    value = next(iter(auth.get(key, ())), None)
    if value is None:
        return None
    return value.decode("utf-8", "replace")


def caller_identity(context: grpc.aio.ServicerContext) -> CallerIdentity:
    """The caller of the current RPC: peer address, mTLS subject and token group.

    Call it from inside a servicer method (the token group is recorded in the call's task).
    """
    try:
        auth = context.auth_context() or {}
    except Exception:  # a context that has no transport (in-process use) has no auth either
        auth = {}
    try:
        peer = context.peer() or "unknown"
    except Exception:
        peer = "unknown"
    return CallerIdentity(
        peer=peer,
        tls_subject=_first(auth, "x509_subject") or _first(auth, "x509_common_name"),
        token_group=_TOKEN_GROUP.get(),
    )
