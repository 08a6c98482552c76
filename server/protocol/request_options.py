"""A request's scheduling options, read from Triton's request parameters and the call's
deadline into typed `RequestOptions` for the scheduler."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Protocol

from tritonclient.grpc import service_pb2 as pb

from forseti.core.errors import InvalidArgument
from forseti.server.scheduler.base import NO_OPTIONS, RequestOptions


class CallDeadline(Protocol):
    """The part of a call context that knows the caller's deadline (grpc's ServicerContext)."""

    def time_remaining(self) -> float | None: ...


def _int_parameter(parameters: Mapping[str, pb.InferParameter], key: str) -> int | None:
    if key not in parameters:
        return None
    p = parameters[key]
    which = p.WhichOneof("parameter_choice")
    if which == "int64_param":
        return int(p.int64_param)
    if which == "uint64_param":
        return int(p.uint64_param)
    raise InvalidArgument(f"request parameter '{key}' must be an integer, got {which}")


def deadline_ns(context: CallDeadline | None) -> int:
    """The call's deadline on the monotonic clock, 0 when it has none."""
    if context is None:
        return 0
    remaining = context.time_remaining()
    return 0 if remaining is None else time.monotonic_ns() + int(remaining * 1e9)


def request_options(request: pb.ModelInferRequest, context: CallDeadline | None) -> RequestOptions:
    """`priority` and `timeout` (microseconds) from the request's parameters, and the call's
    deadline; the shared default when there are none."""
    deadline = deadline_ns(context)
    parameters = request.parameters
    if not parameters:
        return NO_OPTIONS if not deadline else RequestOptions(deadline_ns=deadline)
    priority = _int_parameter(parameters, "priority") or 0
    timeout_us = _int_parameter(parameters, "timeout") or 0
    if timeout_us < 0:
        raise InvalidArgument(f"request timeout must be >= 0 microseconds, got {timeout_us}")
    return RequestOptions(priority=priority, timeout_ns=timeout_us * 1000, deadline_ns=deadline)
