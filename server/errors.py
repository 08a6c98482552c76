"""Errors that carry the gRPC status a client should see."""

from __future__ import annotations

import grpc

# gRPC carries a status message in trailing metadata, which clients drop past 8-16 KiB, losing
# the status itself; messages quote client strings, so they are capped well below that.
MAX_MESSAGE_CHARS = 1024


def shown(text: str, limit: int = 64) -> str:
    """A client-supplied string as it may appear in a message: shortened, printable."""
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= limit else text[:limit] + "..."


class ForsetiError(Exception):
    """An error with a gRPC status code and a message that is safe to send to a client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgument(ForsetiError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ForsetiError):
    code = grpc.StatusCode.NOT_FOUND


class Unavailable(ForsetiError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ForsetiError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ForsetiError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ModelLoadError(Exception):
    """A model or version could not be loaded; `reason` is shown in RepositoryIndex."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
