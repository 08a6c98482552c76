"""The decision client's cost and what it buys, measured against raw tritonclient.

One run (about a minute on 2 cores):

* **overhead**: `DecisionClient.decide` against `tritonclient.grpc.InferenceServerClient.infer`
  on the same server and model (`policy`, obs FP32 [1, 8]): at concurrency 1 call by call in
  one loop (A, B, A, B...), at 16 (threads in this process, each with its own client and so
  its own channel and HTTP/2 connection) in slices of `--slice-s` alternating ABBA over
  `--rounds` rounds (each slice's first 0.3 s not recorded); the table gives p50 and p99 over
  all recorded calls and the added p50 in percent (target: <= 5%), and this process's CPU
  time per call (the median over slices; at c=1 per call), steadier than latency on a busy
  machine;
* **local mode**: `decide` answered in process by a `LocalPolicy` (onnxruntime), beside the
  bare onnxruntime session it runs;
* **hedging**: two replicas, one behind a DelayProxy adding `--slow-ms`; p50/p99 without
  hedging, with a fixed hedge delay, and with the adaptive one (the recent p95).

It prints a markdown table (and `--json` writes the figures). A benchmark, not a test: it
exits 0 whatever the numbers are.

    .venv/bin/python -m benchmarks.bench_client
    .venv/bin/python -m benchmarks.bench_client --rounds 5 --slice-s 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient

from forseti.client import DecisionClient, Hedging, LocalPolicy
from forseti.core.sealing.keyring import Keyring
from forseti.loadtests.connections import own_connection_options
from testkit.delay_proxy import DelayProxy
from testkit.model_builders import build_repository, policy_onnx
from testkit.server_process import ServerProcess

OBS = np.full(8, 0.1, np.float32)
WARMUP_S = 0.3


def _closed_loop(
    call: Callable[[], object], stop_at: float, record_after: float
) -> tuple[list[float], int]:
    """Latencies recorded after `record_after`, and how many calls were made in all."""
    latencies: list[float] = []
    calls = 0
    while True:
        started = time.perf_counter()
        if started >= stop_at:
            return latencies, calls
        call()
        calls += 1
        if started >= record_after:
            latencies.append(time.perf_counter() - started)


def _slice(calls: list[Callable[[], object]], seconds: float) -> tuple[list[float], float]:
    """Run one closed loop per callable in its own thread for `seconds`: the recorded
    latencies, and this process's CPU seconds per call (every thread, gRPC's included; the
    server is another process). CPU per call is steadier than latency on a busy machine."""
    now = time.perf_counter()
    stop_at, record_after = now + seconds, now + WARMUP_S
    results: list[tuple[list[float], int]] = [([], 0) for _ in calls]

    def run(i: int) -> None:
        results[i] = _closed_loop(calls[i], stop_at, record_after)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    cpu = time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu = time.process_time() - cpu
    made = sum(n for _, n in results)
    return [x for r, _ in results for x in r], cpu / max(made, 1)


def _triton_call(url: str) -> tuple[Callable[[], object], Callable[[], None]]:
    # Its own HTTP/2 connection, as each DecisionClient has (gRPC would otherwise share one
    # connection between the sixteen clients of the c=16 runs).
    client = grpcclient.InferenceServerClient(url, channel_args=own_connection_options())
    inp = grpcclient.InferInput("obs", [1, 8], "FP32")

    def call() -> object:
        # As a caller would: each decision has its observation (the input object is reused,
        # the cheapest way tritonclient allows), and it reads the action.
        inp.set_data_from_numpy(OBS[None])
        return client.infer("policy", [inp]).as_numpy("action")

    return call, client.close


def _decide_call(url: str) -> tuple[Callable[[], object], Callable[[], None]]:
    client = DecisionClient([url], "policy", deadline_ms=5000, fallback=-1)

    def call() -> object:
        return client.decide(OBS).action

    return call, client.close


def _stats(latencies: list[float], cpu_s: list[float] | None = None) -> dict[str, float]:
    a = np.asarray(latencies)
    stats = {
        "calls": float(len(a)),
        "p50_ms": float(np.percentile(a, 50) * 1e3),
        "p99_ms": float(np.percentile(a, 99) * 1e3),
    }
    if cpu_s:
        stats["cpu_us"] = float(np.median(cpu_s) * 1e6)
    return stats


def overhead(url: str, concurrency: int, rounds: int, slice_s: float) -> dict[str, dict]:
    """At concurrency 1 the two alternate call by call in one loop, so both see the same
    machine; at higher concurrency they alternate in slices, ABBA, so that drift cancels."""
    makers = {"tritonclient.infer": _triton_call, "DecisionClient.decide": _decide_call}
    samples: dict[str, list[float]] = {name: [] for name in makers}
    cpu: dict[str, list[float]] = {name: [] for name in makers}
    if concurrency == 1:
        alternating = {name: make(url) for name, make in makers.items()}
        for call, _ in alternating.values():
            call()
        stop_at = time.perf_counter() + rounds * slice_s * 2
        record_after = time.perf_counter() + WARMUP_S
        while time.perf_counter() < stop_at:
            for name, (call, _) in alternating.items():
                started, cpu_started = time.perf_counter(), time.process_time()
                call()
                if started >= record_after:
                    samples[name].append(time.perf_counter() - started)
                    cpu[name].append(time.process_time() - cpu_started)
        for _, close in alternating.values():
            close()
        return {name: _stats(s, cpu[name]) for name, s in samples.items()}
    # The way a service would use it: one client (one channel) shared by every thread.
    shared_name = "DecisionClient.decide, one client shared"
    samples[shared_name] = []
    cpu[shared_name] = []
    names = [*makers, shared_name]
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            pairs: list[tuple[Callable[[], object], Callable[[], None]]]
            if name == shared_name:
                shared, close = _decide_call(url)
                pairs = [(shared, close)] + [(shared, lambda: None)] * (concurrency - 1)
            else:
                pairs = [makers[name](url) for _ in range(concurrency)]
            for warm, _ in pairs:  # connect and warm each channel
                warm()
            latencies, cpu_per_call = _slice([c for c, _ in pairs], slice_s)
            samples[name] += latencies
            cpu[name].append(cpu_per_call)
            for _, close in pairs:
                close()
    return {name: _stats(s, cpu[name]) for name, s in samples.items()}


def local_mode(repo: Path, keyring: Path, calls: int) -> dict[str, dict]:
    local = LocalPolicy(repo, "policy", keyring, poll_s=0)
    client = DecisionClient([], "policy", local=local)
    session = ort.InferenceSession(policy_onnx(1), providers=["CPUExecutionProvider"])
    feeds = {"obs": OBS[None]}
    for _ in range(200):
        client.decide(OBS)
        session.run(None, feeds)
    out: dict[str, dict] = {}
    for name, call in (
        ("onnxruntime session.run", lambda: session.run(None, feeds)),
        ("decide, local mode", lambda: client.decide(OBS)),
    ):
        latencies = []
        for _ in range(calls):
            started = time.perf_counter()
            call()
            latencies.append(time.perf_counter() - started)
        out[name] = _stats(latencies)
    client.close()
    return out


def hedging(fast: str, slow_target: str, slow_ms: float, calls: int) -> dict[str, dict]:
    out: dict[str, dict] = {}
    with DelayProxy(slow_target) as slow:
        endpoints = [fast, slow.address]
        variants = {
            "no hedging": None,
            "hedging after 2 ms": Hedging(after_ms=2),
            "hedging after the recent p95": Hedging(),
        }
        for name, hedge in variants.items():
            slow.delay_s = 0.0
            with DecisionClient(endpoints, "policy", deadline_ms=5000, hedging=hedge) as client:
                for _ in range(100):  # connect both channels; fill the p95 window
                    client.decide(OBS)
                slow.delay_s = slow_ms / 1000
                for _ in range(64):
                    client.decide(OBS)  # the adaptive delay learns the slow replica's share
                latencies = [client.decide(OBS).latency_s for _ in range(calls)]
            out[name] = _stats(latencies)
    return out


def _table(results: dict[str, dict[str, dict]]) -> str:
    lines = [
        "| measurement | variant | calls | p50 ms | p99 ms | p50 added | client CPU us/call |",
        "|---|---|---|---|---|---|---|",
    ]
    for section, rows in results.items():
        base = next(iter(rows.values()))["p50_ms"]
        for i, (name, s) in enumerate(rows.items()):
            added = "" if i == 0 else f"{(s['p50_ms'] / base - 1) * 100:+.1f}%"
            cpu = f"{s['cpu_us']:.0f}" if "cpu_us" in s else ""
            lines.append(
                f"| {section} | {name} | {int(s['calls'])} | {s['p50_ms']:.3f} | "
                f"{s['p99_ms']:.3f} | {added} | {cpu} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--slice-s", type=float, default=1.5)
    parser.add_argument("--local-calls", type=int, default=5000)
    parser.add_argument("--hedge-calls", type=int, default=400)
    parser.add_argument("--slow-ms", type=float, default=20.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        keyring = root / "keyring.json"
        Keyring.generate().save(keyring)
        repo = root / "repo"
        repo.mkdir()
        build_repository(repo, Keyring.load(keyring))
        flags = ["--model-control-mode", "explicit", "--load-model", "policy"]
        servers = [ServerProcess(repo, keyring, flags).start() for _ in range(2)]
        try:
            results = {
                "overhead c=1": overhead(servers[0].url, 1, args.rounds, args.slice_s),
                "overhead c=16": overhead(servers[0].url, 16, args.rounds, args.slice_s),
                "local mode": local_mode(repo, keyring, args.local_calls),
                f"one replica of two {args.slow_ms:g} ms slow": hedging(
                    servers[0].url, servers[1].url, args.slow_ms, args.hedge_calls
                ),
            }
        finally:
            for server in servers:
                server.stop()
    print(_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
