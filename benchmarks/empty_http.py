"""The HTTP floor: the HTTP front door's own transport (server/http/server.py: uvicorn's
httptools protocol with forseti's limits, on an asyncio loop) serving an ASGI app that reads
the request body and answers a precomputed policy decision, doing no other work. The gap
between it and Forseti's HTTP endpoint is Forseti's request path.

    python -m benchmarks.empty_http --port 8100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import Any

from forseti.server.http.server import start_http

# What Forseti answers for one batch-1 policy decision with JSON outputs.
RESPONSE = json.dumps(
    {
        "model_name": "policy",
        "model_version": "1",
        "outputs": [
            {"name": "action", "datatype": "INT64", "shape": [1, 1], "data": [1]},
            {"name": "logits", "datatype": "FP32", "shape": [1, 4], "data": [0.1, 0.2, 0.3, 0.4]},
        ],
    },
    separators=(",", ":"),
).encode()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(RESPONSE))]


async def empty_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": RESPONSE})


async def main(address: str, port: int) -> None:
    door = await start_http(empty_app, address, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await door.stop(1.0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the empty HTTP floor")
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(main(args.address, args.port))
