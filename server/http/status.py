"""HTTP status codes for the errors both front doors raise, as Triton's HTTP server maps them.

Triton maps its error codes to HTTP: INTERNAL 500, NOT_FOUND 404, UNAVAILABLE 503,
UNSUPPORTED 501, everything else (invalid argument, already exists, cancelled, unknown)
400; a restricted API without its header is 403. Forseti's errors carry gRPC status codes
(forseti.core.errors), which map the same way; the codes Triton has no twin for get the
HTTP code that says the same thing (RESOURCE_EXHAUSTED: 429, too many requests).
"""

from __future__ import annotations

import grpc

_BY_CODE: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 503,  # Triton: a request timeout is UNAVAILABLE
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAUTHENTICATED: 403,
    grpc.StatusCode.PERMISSION_DENIED: 403,
}


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status of an error with gRPC status `code` (400 where Triton has no match)."""
    return _BY_CODE.get(code, 400)
