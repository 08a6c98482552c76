"""Which HTTP stack for the HTTP front door: each candidate serving an *empty* infer handler
(read the body, answer a fixed policy-shaped JSON response), and JSON parsers on the bodies
the front door reads and writes.

Every stack runs in its own server process on the default asyncio loop where it has one (the
loop the grpc.aio server runs on), one worker; the same raw keep-alive client
(testkit.http_load) drives each at concurrency 1, 4 and 16. Stacks alternate over rounds;
the table shows the median over rounds.

    .venv/bin/python -m benchmarks.bench_http_stacks                 # ~1.5 minutes
    .venv/bin/python -m benchmarks.bench_http_stacks --serve uvicorn-httptools --port 8123
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import timeit
from typing import Any

from testkit.http_load import HttpLoad, RawConnection, http_request
from testkit.server_process import free_port

REQUEST_BODY = json.dumps(
    {
        "inputs": [
            {
                "name": "obs",
                "shape": [1, 8],
                "datatype": "FP32",
                "data": [0.125, -0.5, 0.75, 0.0, -0.25, 0.5, 0.875, -1.0],
            }
        ]
    }
).encode()
RESPONSE_BODY = json.dumps(
    {
        "model_name": "policy",
        "model_version": "1",
        "outputs": [
            {"name": "action", "datatype": "INT64", "shape": [1, 1], "data": [1]},
            {
                "name": "logits",
                "datatype": "FP32",
                "shape": [1, 4],
                "data": [0.1, 100.2, -0.3, 0.4],
            },
        ],
    },
    separators=(",", ":"),
).encode()
STACKS = ("uvicorn-httptools", "uvicorn-h11", "aiohttp", "aiohttp-lowlevel", "granian-rsgi")


# ---- the empty servers ----------------------------------------------------------------------


async def _asgi_app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] != "http":  # lifespan
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(RESPONSE_BODY)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": RESPONSE_BODY})


def _serve_uvicorn(port: int, http: str) -> None:
    import uvicorn

    config = uvicorn.Config(
        _asgi_app, host="127.0.0.1", port=port, http=http, loop="asyncio", log_level="error"
    )
    asyncio.run(uvicorn.Server(config).serve())


def _serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def infer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=RESPONSE_BODY, content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v2/models/{model}/infer", infer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    asyncio.run(main())


def _serve_aiohttp_lowlevel(port: int) -> None:
    from aiohttp import web, web_server

    async def handler(request: web.BaseRequest) -> web.Response:
        await request.read()
        return web.Response(body=RESPONSE_BODY, content_type="application/json")

    async def main() -> None:
        server = web_server.Server(handler, access_log=None)
        runner = web.ServerRunner(server)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    asyncio.run(main())


class _RsgiApp:
    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        await protocol()
        protocol.response_bytes(200, [("content-type", "application/json")], RESPONSE_BODY)


rsgi_app = _RsgiApp()


def _serve_granian(port: int) -> None:
    # Granian runs the app on its own runtime: it cannot share the grpc.aio loop.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "granian",
            "--interface",
            "rsgi",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--log-level",
            "error",
            "--no-ws",
            "benchmarks.bench_http_stacks:rsgi_app",
        ],
        check=False,
    )


def serve(stack: str, port: int) -> None:
    if stack == "uvicorn-httptools":
        _serve_uvicorn(port, "httptools")
    elif stack == "uvicorn-h11":
        _serve_uvicorn(port, "h11")
    elif stack == "aiohttp":
        _serve_aiohttp(port)
    elif stack == "aiohttp-lowlevel":
        _serve_aiohttp_lowlevel(port)
    elif stack == "granian-rsgi":
        _serve_granian(port)
    else:
        raise SystemExit(f"unknown stack {stack}")


# ---- measuring ------------------------------------------------------------------------------


def start_empty_server(stack: str) -> tuple[subprocess.Popen, int]:
    """Start one empty server in its own process; returns it and its port once it answers."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.bench_http_stacks",
            "--serve",
            stack,
            "--port",
            str(port),
        ]
    )
    deadline = time.monotonic() + 30
    request = http_request("POST", "/v2/models/policy/infer", REQUEST_BODY)
    while time.monotonic() < deadline:
        try:
            conn = RawConnection("127.0.0.1", port, timeout=5)
            status, _, _ = conn.call(request)
            conn.close()
            if status == 200:
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{stack} did not start")


def json_parsers() -> list[tuple[str, float, float]]:
    """(parser, decode us, encode us) on the request and response bodies above."""
    import orjson
    import rapidjson

    obj = json.loads(RESPONSE_BODY)
    rows = []
    for name, loads, dumps in (
        ("json (stdlib)", json.loads, json.dumps),
        ("orjson", orjson.loads, orjson.dumps),
        ("python-rapidjson", rapidjson.loads, rapidjson.dumps),
    ):
        n = 20000
        decode = functools.partial(loads, REQUEST_BODY)
        encode = functools.partial(dumps, obj)
        dec = min(timeit.repeat(decode, number=n, repeat=5)) / n * 1e6
        enc = min(timeit.repeat(encode, number=n, repeat=5)) / n * 1e6
        rows.append((name, dec, enc))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", choices=STACKS, help="run one empty server (internal)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--stacks", nargs="*", default=list(STACKS))
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=2.0, help="recorded seconds per run")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return 0

    results: dict[tuple[str, int], list[Any]] = {}
    load = HttpLoad(procs=2)
    request = http_request(
        "POST", "/v2/models/policy/infer", REQUEST_BODY, {"Content-Type": "application/json"}
    )
    try:
        for r in range(args.rounds):
            order = args.stacks if r % 2 == 0 else list(reversed(args.stacks))
            for stack in order:
                proc, port = start_empty_server(stack)
                try:
                    for c in args.concurrency:
                        m = load.run(port, request, c, warm_s=0.3, run_s=args.duration)
                        results.setdefault((stack, c), []).append(m)
                finally:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(10)
    finally:
        load.close()

    print("\nEmpty infer handler, raw keep-alive client, median over rounds")
    print("| stack | c | p50 ms | p99 ms | req/s |")
    print("|---|---|---|---|---|")
    for stack in args.stacks:
        for c in args.concurrency:
            ms = results[(stack, c)]
            p50 = statistics.median(m.p50_ms for m in ms)
            p99 = statistics.median(m.p99_ms for m in ms)
            rps = statistics.median(m.rps for m in ms)
            print(f"| {stack} | {c} | {p50:.3f} | {p99:.3f} | {rps:,.0f} |")
    print("\nJSON parsers (best of 5 x 20,000; request body decode, response object encode)")
    print("| parser | decode us | encode us |")
    print("|---|---|---|")
    for name, dec, enc in json_parsers():
        print(f"| {name} | {dec:.2f} | {enc:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
