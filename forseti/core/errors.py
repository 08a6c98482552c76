"""Errors that carry the gRPC status a client should see."""

from __future__ import annotations

import logging
import uuid

import grpc

log = logging.getLogger(__name__)

# gRPC carries a status message in trailing metadata, which clients drop past 8-16 KiB, losing
# the status itself; messages quote client strings, so they are capped well below that.
MAX_MESSAGE_CHARS = 1024


def shown(text: str, limit: int = 64) -> str:
    """A client-supplied string as it may appear in a message: shortened, printable."""
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= limit else text[:limit] + "..."


def new_request_id() -> str:
    """A short random id that links an error a client sees to the server's log line."""
    return uuid.uuid4().hex[:12]


def with_request_id(message: str, request_id: str) -> str:
    """The client-visible form of an error message: the message and its request id."""
    return f"{message} (request id {request_id})"


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


class Refused(ForsetiError):
    """A refusal already logged under a request id: its message carries the id and goes to
    the client as it is."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message, code)


def refusal_message(rpc: str, exc: ForsetiError) -> str:
    """Log a refused call under a new request id; the message to send, carrying that id."""
    if isinstance(exc, Refused):
        return exc.message
    rid = new_request_id()
    log.info(
        "request refused",
        extra={"rpc": rpc, "code": exc.code.name, "reason": exc.message, "request_id": rid},
    )
    return with_request_id(exc.message, rid)


class ModelLoadError(Exception):
    """A model or version could not be loaded; `reason` is shown in RepositoryIndex."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def library_failure(what: str, exc: BaseException, **fields: object) -> ModelLoadError:
    """A ModelLoadError for a failure inside a library (onnxruntime, gguf, ...).

    Library messages can hold source file paths and tensor contents, and a load failure's
    reason is shown to clients (RepositoryIndex, RepositoryModelLoad); so the full text goes to
    the server log under an error id and the reason names only `what` and that id.
    """
    error_id = new_request_id()
    log.warning(
        what,
        extra={
            **fields,
            "error_id": error_id,
            "error_type": exc.__class__.__name__,
            "detail": str(exc)[:2000],
        },
    )
    return ModelLoadError(
        f"{what} ({exc.__class__.__name__}; error id {error_id} in the server log)"
    )
