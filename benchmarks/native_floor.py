"""The C++ empty-call floor: the native data plane's gRPC server (native/, the same C++ stubs
and server options as `forseti serve --data-plane native`) answering every ModelInfer with a
canned policy response, parsing nothing and entering no Python.

The health calls a client makes before it starts (ServerLive, ServerReady, ModelReady) are
answered by a Python callable on the server's thread, as the native data plane hands calls it
does not answer itself to Python.

    python -m benchmarks.native_floor --port 8102 [--address 127.0.0.1]
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from tritonclient.grpc import service_pb2 as pb

from benchmarks.empty_servicer import MAX_REQUEST_BYTES, policy_response

_ANSWERS = {
    "/inference.GRPCInferenceService/ServerLive": pb.ServerLiveResponse(live=True),
    "/inference.GRPCInferenceService/ServerReady": pb.ServerReadyResponse(ready=True),
    "/inference.GRPCInferenceService/ModelReady": pb.ModelReadyResponse(ready=True),
}


def _answer(link: Any, method: str, payload: bytes | None, *rest: Any) -> None:
    answer = _ANSWERS.get(method)
    if answer is None:
        link.answer(12, "Method not found!")  # UNIMPLEMENTED
    else:
        link.answer(0, "", answer.SerializeToString())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--address", default="127.0.0.1")
    args = parser.parse_args(argv)
    import forseti_native  # type: ignore[import-not-found]  # built by `make native`

    options = forseti_native.ServerOptions()
    options.max_receive_bytes = MAX_REQUEST_BYTES
    server = forseti_native.Server(options)
    server.set_fallback(_answer)
    server.set_canned(policy_response().SerializeToString())
    port = server.start(f"{args.address}:{args.port}")
    print(f"native floor listening on {args.address}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    server.shutdown(1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
