"""Errors that carry the gRPC status a client should see."""

from __future__ import annotations

import grpc


class ForsetiError(Exception):
    """An error with a gRPC status code and a message that is safe to send to a client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
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
