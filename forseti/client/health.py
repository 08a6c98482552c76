"""The health check of one replica for one model: the standard grpc.health.v1 service with the
model's name (SERVING while the model has a ready version, NOT_SERVING once the replica
drains), or, where a server does not offer it, KServe's ModelReady."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from tritonclient.grpc import service_pb2 as pb

from forseti.client.endpoints import Endpoint

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NO_HEALTH_SERVICE = "no_health_v1"  # Endpoint.extra flag: use ModelReady from now on


def health_request(ep: Endpoint, model: str) -> tuple[str, Any]:
    """Which RPC checks `ep` ("health" or "ready") and its request."""
    if ep.extra.get(_NO_HEALTH_SERVICE):
        return "ready", pb.ModelReadyRequest(name=model)
    return "health", health_pb2.HealthCheckRequest(service=model)


def is_healthy(kind: str, response: Any) -> bool:
    if kind == "health":
        return bool(response.status == _SERVING)
    return bool(response.ready)


def health_unimplemented(ep: Endpoint, kind: str, error: grpc.RpcError) -> bool:
    """True when the replica has no grpc.health.v1 service (ask ModelReady instead)."""
    if kind == "health" and error.code() == grpc.StatusCode.UNIMPLEMENTED:
        ep.extra[_NO_HEALTH_SERVICE] = True
        return True
    return False
