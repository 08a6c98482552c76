"""The "empty-call floor": a Triton gRPC servicer that answers ModelInfer with a precomputed
response shaped like the policy model's, doing no work at all.

It uses the same generated stubs (`tritonclient.grpc.service_pb2_grpc`) and the same grpc.aio
server options as `forseti serve` (server/app.py), so the gap between it and Forseti is the
cost of Forseti's own request path: routing, decoding, the backend call, encoding, statistics.

    python -m benchmarks.empty_servicer --port 8101 [--address 127.0.0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg

# Same default as ServerOptions.max_request_bytes in server/app.py.
MAX_REQUEST_BYTES = 8 * 1024 * 1024


def policy_response() -> pb.ModelInferResponse:
    """What Forseti answers for one batch-1 policy decision: action INT64 [1,1] and
    logits FP32 [1,4], both as raw little-endian bytes."""
    response = pb.ModelInferResponse(model_name="policy", model_version="1")
    action = np.array([[1]], dtype=np.int64)
    logits = np.array([[0.1, 100.2, -0.3, 0.4]], dtype=np.float32)
    for name, datatype, arr in (("action", "INT64", action), ("logits", "FP32", logits)):
        out = response.outputs.add()
        out.name = name
        out.datatype = datatype
        out.shape.extend(arr.shape)
        response.raw_output_contents.append(arr.tobytes())
    return response


class EmptyServicer(pbg.GRPCInferenceServiceServicer):
    """Health RPCs and a ModelInfer that returns the same precomputed message every time."""

    def __init__(self) -> None:
        self._response = policy_response()
        self._live = pb.ServerLiveResponse(live=True)
        self._ready = pb.ServerReadyResponse(ready=True)
        self._model_ready = pb.ModelReadyResponse(ready=True)

    async def ServerLive(self, request, context):
        return self._live

    async def ServerReady(self, request, context):
        return self._ready

    async def ModelReady(self, request, context):
        return self._model_ready

    async def ModelInfer(self, request, context):
        return self._response


async def serve(address: str, port: int) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ]
    )
    pbg.add_GRPCInferenceServiceServicer_to_server(EmptyServicer(), server)
    bound = server.add_insecure_port(f"{address}:{port}")
    await server.start()
    print(f"empty servicer listening on {address}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.empty_servicer",
        description="Triton gRPC servicer whose ModelInfer does no work (latency floor).",
    )
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--address", default="127.0.0.1")
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.address, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
