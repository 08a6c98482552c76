"""A closed-loop HTTP/1.1 load generator for the HTTP benchmarks.

Each closed loop owns one keep-alive socket and sends the same prepared request bytes again
and again, reading each answer by its Content-Length: the least client work Python can do,
identical for every server measured, so differences between servers are the servers'.
Loops run as threads in spawned worker processes (so 16 loops are not serialised on one GIL).
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import threading
import time
import traceback
from dataclasses import dataclass

import numpy as np


def http_request(
    method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    """The bytes of one HTTP/1.1 request with a Content-Length."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class RawConnection:
    """One keep-alive connection that sends whole requests and reads whole responses."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def call(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send `request`; return (status, headers with lowercase names, body)."""
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buffer += chunk
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection mid-body")
            rest += chunk
        self.buffer = rest[length:]
        return status, headers, rest[:length]

    def close(self) -> None:
        self.sock.close()


def _loop(host: str, port: int, request: bytes, warm_s: float, run_s: float, out: dict) -> None:
    try:
        conn = RawConnection(host, port)
        now = time.perf_counter_ns
        end_warm = now() + int(warm_s * 1e9)
        while now() < end_warm:
            status, _, body = conn.call(request)
            if status != 200:
                raise RuntimeError(f"status {status}: {body[:200]!r}")
        lat: list[int] = []
        end = now() + int(run_s * 1e9)
        t = now()
        while t < end:
            status, _, body = conn.call(request)
            t2 = now()
            if status != 200:
                raise RuntimeError(f"status {status}: {body[:200]!r}")
            lat.append(t2 - t)
            t = t2
        out["lat"] = lat
        conn.close()
    except BaseException:
        out["error"] = traceback.format_exc()


def _worker(args: tuple[str, int, bytes, int, float, float]) -> dict:
    host, port, request, threads, warm_s, run_s = args
    outs: list[dict] = [{} for _ in range(threads)]
    loops = [
        threading.Thread(target=_loop, args=(host, port, request, warm_s, run_s, o)) for o in outs
    ]
    for t in loops:
        t.start()
    for t in loops:
        t.join()
    errors = [o["error"] for o in outs if "error" in o]
    return {"lat": [x for o in outs for x in o.get("lat", [])], "errors": errors}


@dataclass
class HttpMeasurement:
    concurrency: int
    p50_ms: float
    p99_ms: float
    rps: float
    calls: int


class HttpLoad:
    """A pool of spawned worker processes running closed loops against one address."""

    def __init__(self, procs: int = 2) -> None:
        self.pool = mp.get_context("spawn").Pool(procs)
        self.procs = procs

    def run(
        self,
        port: int,
        request: bytes,
        concurrency: int,
        warm_s: float = 0.5,
        run_s: float = 2.0,
        host: str = "127.0.0.1",
    ) -> HttpMeasurement:
        """`concurrency` closed loops sending `request`, spread over the worker processes."""
        n = min(concurrency, self.procs)
        shares = [concurrency // n + (1 if i < concurrency % n else 0) for i in range(n)]
        results = self.pool.map(
            _worker, [(host, port, request, s, warm_s, run_s) for s in shares], chunksize=1
        )
        errors = [e for r in results for e in r["errors"]]
        if errors:
            raise RuntimeError(f"load against port {port} failed:\n{errors[0]}")
        lat = np.array([x for r in results for x in r["lat"]], dtype=np.int64)
        p50, p99 = (float(v) / 1e6 for v in np.percentile(lat, [50, 99]))
        return HttpMeasurement(concurrency, p50, p99, lat.size / run_s, int(lat.size))

    def close(self) -> None:
        self.pool.close()
        self.pool.join()
