"""Batch-1 policy decisions over HTTP/REST against the HTTP floor and against gRPC.

What it does, in one run:

* builds the sealed `policy` repository of bench_latency and starts the real `forseti serve`
  (explicit mode, gRPC and HTTP on free loopback ports);
* starts the *HTTP floor* (`benchmarks/empty_http.py`): the HTTP front door's own transport
  (uvicorn's httptools protocol with forseti's limits) answering a precomputed decision;
* measures the *onnxruntime floor*: p50 of `session.run` in this process (bench_latency's);
* drives, at concurrency 1, 4 and 16, with the same raw keep-alive HTTP client
  (testkit.http_load: closed loops in 2 spawned processes): the floor, Forseti's HTTP with a
  JSON request and JSON outputs (KServe v2), and Forseti's HTTP with Triton's binary tensor
  extension both ways; and Forseti's gRPC with tritonclient.grpc (testkit.load_generator, the
  client bench_latency uses: a heavier client than the raw HTTP one, so compare its row
  with care). Targets alternate per level, over rounds; the table shows the median;
* prints the target:  forseti HTTP JSON p50@c1 <= 1.15 x (HTTP floor p50@c1 + onnxruntime).

It is a benchmark, not a test: it exits 0 whatever the numbers are.

    .venv/bin/python -m benchmarks.bench_http                  # ~1.5 minutes
    .venv/bin/python -m benchmarks.bench_http --rounds 1 --duration 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_latency import OrtFloor, build_policy_repository
from testkit.http_load import HttpLoad, HttpMeasurement, RawConnection, http_request
from testkit.load_generator import MODEL, LoadGenerator
from testkit.server_process import ServerProcess, free_port

P50_TARGET = 1.15
OBS = [0.125, -0.5, 0.75, 0.0, -0.25, 0.5, 0.875, -1.0]
PATH = f"/v2/models/{MODEL}/infer"


def json_request() -> bytes:
    body = json.dumps(
        {"inputs": [{"name": "obs", "shape": [1, 8], "datatype": "FP32", "data": OBS}]}
    ).encode()
    return http_request("POST", PATH, body, {"Content-Type": "application/json"})


def binary_request() -> bytes:
    import numpy as np

    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "obs",
                    "shape": [1, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 32},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    body = header + np.array(OBS, dtype=np.float32).tobytes()
    return http_request(
        "POST",
        PATH,
        body,
        {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        },
    )


def _wait_http(port: int, request: bytes, proc: subprocess.Popen | None, what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            conn = RawConnection("127.0.0.1", port, timeout=5)
            status, _, body = conn.call(request)
            conn.close()
            if status == 200:
                return
            raise RuntimeError(f"{what}: {status} {body[:200]!r}")
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} did not answer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=2.0, help="recorded seconds per run")
    parser.add_argument("--warmup", type=float, default=0.3)
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    names = ["HTTP floor", "forseti HTTP JSON", "forseti HTTP binary", "forseti gRPC"]
    results: dict[tuple[str, int], list[HttpMeasurement]] = {}
    ort_p50: list[float] = []
    with tempfile.TemporaryDirectory(prefix="forseti-bench-http-") as tmp:
        root = Path(tmp)
        repo, keyring_path, model = build_policy_repository(root)
        forseti = ServerProcess(
            repo,
            keyring_path,
            ["--model-control-mode", "explicit", "--load-model", MODEL, "--log-level", "WARNING"],
            log_path=root / "forseti.log",
        )
        floor_port = free_port()
        floor = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.empty_http", "--port", str(floor_port)]
        )
        http_load = HttpLoad(procs=2)
        grpc_load = LoadGenerator(2)
        try:
            forseti.start()
            requests = {
                "HTTP floor": (floor_port, json_request()),
                "forseti HTTP JSON": (forseti.http_port, json_request()),
                "forseti HTTP binary": (forseti.http_port, binary_request()),
            }
            _wait_http(floor_port, json_request(), floor, "HTTP floor")
            for name, (port, request) in requests.items():
                _wait_http(port, request, None, name)
            ort = OrtFloor(model)
            for r in range(args.rounds):
                ort_p50.append(ort.p50_us())
                for c in levels:
                    order = names if r % 2 == 0 else names[::-1]
                    for name in order:
                        if name == "forseti gRPC":
                            g = grpc_load.run([forseti.url], c, args.warmup, args.duration)[0]
                            m = HttpMeasurement(c, g.p50_ms, g.p99_ms, g.rps, g.calls)
                        else:
                            port, request = requests[name]
                            m = http_load.run(port, request, c, args.warmup, args.duration)
                        results.setdefault((name, c), []).append(m)
                        print(
                            f"round {r + 1} {name:<20} c={c:<3} p50 {m.p50_ms:.3f} ms "
                            f"p99 {m.p99_ms:.3f} ms {m.rps:,.0f} req/s",
                            flush=True,
                        )
        finally:
            http_load.close()
            grpc_load.close()
            floor.terminate()
            floor.wait(10)
            forseti.stop()

    def med(name: str, c: int, attr: str) -> float:
        return statistics.median(getattr(m, attr) for m in results[(name, c)])

    ort_us = statistics.median(ort_p50)
    print("\nBatch-1 policy decisions, median over rounds (busy shared 2-core machine)")
    print("| target | c | p50 ms | p99 ms | req/s |")
    print("|---|---|---|---|---|")
    for name in names:
        for c in levels:
            print(
                f"| {name} | {c} | {med(name, c, 'p50_ms'):.3f} | {med(name, c, 'p99_ms'):.3f} "
                f"| {med(name, c, 'rps'):,.0f} |"
            )
    first = levels[0]
    floor_p50 = med("HTTP floor", first, "p50_ms")
    budget = floor_p50 + ort_us / 1e3
    for name in ("forseti HTTP JSON", "forseti HTTP binary"):
        ratio = med(name, first, "p50_ms") / budget
        verdict = "met" if ratio <= P50_TARGET else "missed"
        print(
            f"\n{name}: p50@c{first} / (HTTP floor {floor_p50:.3f} ms + onnxruntime "
            f"{ort_us:.1f} us) = {ratio:.2f} (target <= {P50_TARGET}: {verdict})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
