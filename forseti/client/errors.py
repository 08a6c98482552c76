"""The client's errors, and which gRPC statuses are worth another replica."""

from __future__ import annotations

import grpc

from forseti.core.errors import ForsetiError

# Statuses that say "this replica, now" rather than "this request": another replica (or the
# same one later) may answer. DEADLINE_EXCEEDED counts only for an attempt cut short while its
# replica was still connecting (the call's own deadline ends the call instead).
RETRYABLE: frozenset[grpc.StatusCode] = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
# Statuses that say the replica itself is unwell: it is ejected and probed back.
EJECTING: frozenset[grpc.StatusCode] = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
)


class ClientConfigError(ValueError):
    """A client setting is unusable; the message names it and what was expected."""


class DecisionRejected(ForsetiError):
    """The server refused the request itself (INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED...):
    retrying cannot help, so it is never retried. `code` is the gRPC status; `endpoint` the
    replica that answered ("local" for local mode)."""

    def __init__(self, message: str, code: grpc.StatusCode, endpoint: str) -> None:
        super().__init__(message, code)
        self.endpoint = endpoint


def status_of(error: grpc.RpcError) -> grpc.StatusCode:
    """The status of a failed call (UNKNOWN where the error carries none)."""
    code = getattr(error, "code", None)
    status = code() if callable(code) else None
    return status if isinstance(status, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
