"""The native data plane against the Python one and against both empty-call floors.

One run, four servers, interleaved in short counterbalanced slices (ABCDDCBA) by the
closed-loop tritonclient load generator (testkit.load_generator), at concurrency 1, 4 and 16:

* C++ floor: the native data plane's gRPC server answering a canned response
  (benchmarks/native_floor.py);
* Python floor: a grpc.aio servicer answering the same canned response
  (benchmarks/empty_servicer.py);
* Forseti native: `forseti serve --data-plane native`, a batch-1 policy decision;
* Forseti python: `forseti serve --data-plane python`, the same decision.

Then server CPU per call: each server alone under 4 client threads for a fixed number of calls,
its utime + stime from /proc/<pid>/stat before and after, divided by the calls. And the
in-process onnxruntime p50 of the same model, for the issue's target: c=1 p50 of Forseti
native <= 1.15 x (C++ floor p50 + in-process onnxruntime p50).

    python -m benchmarks.bench_native [--duration 1.0] [--levels 1,4,16] [--json out.json]

Needs the native extension (`make native`). The client is Python (tritonclient, ~300 us of
CPU per call): at c=16 the client, not the server, may be the limit on a small machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.bench_latency import (
    REPO_ROOT,
    EmptyFloorProcess,
    OrtFloor,
    _wait_live,
    build_policy_repository,
    check_answers,
)
from testkit.load_generator import MODEL, LoadGenerator, own_client, policy_input

TARGETS = ("C++ floor", "Python floor", "Forseti native", "Forseti python")
CLK_TCK = os.sysconf("SC_CLK_TCK")


class NativeFloorProcess(EmptyFloorProcess):
    """`python -m benchmarks.native_floor` on a free port."""

    def start(self) -> NativeFloorProcess:
        args = [sys.executable, "-m", "benchmarks.native_floor", "--port", str(self.port)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT
            )
        _wait_live(self.url, self.proc, 30.0, "native floor", self.log_path)
        return self


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of the file


def cpu_per_call_us(url: str, pid: int, calls: int, threads: int = 4) -> float:
    """Server CPU per call under `threads` closed-loop clients making `calls` calls in all."""
    per_thread = calls // threads
    clients = [own_client(url) for _ in range(threads)]
    inputs = [policy_input(i) for i in range(threads)]
    for client, inp in zip(clients, inputs, strict=True):
        for _ in range(50):
            client.infer(MODEL, [inp])

    def loop(i: int) -> None:
        for _ in range(per_thread):
            clients[i].infer(MODEL, [inputs[i]])

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    before = cpu_seconds(pid)
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    used = cpu_seconds(pid) - before
    for client in clients:
        client.close()
    return used / (per_thread * threads) * 1e6


def policy_request_bytes() -> bytes:
    """A batch-1 policy decision as the load generators send it (raw FP32 obs [1, 8])."""
    import numpy as np
    from tritonclient.grpc import service_pb2 as pb

    from testkit.load_generator import OBS_DIM

    request = pb.ModelInferRequest(model_name=MODEL)
    x = np.random.default_rng(0).uniform(-1, 1, (1, OBS_DIM)).astype(np.float32)
    request.inputs.add(name="obs", datatype="FP32", shape=[1, OBS_DIM])
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


def native_load(urls: list[str], levels: list[int], seconds: float, slice_s: float) -> list[Row]:
    """The native load generator (forseti_native.closed_loop: C++ threads, a connection each)
    against every target, in ABCDDCBA slices of `slice_s` until each has `seconds`."""
    import forseti_native  # type: ignore[import-not-found]
    import numpy as np

    payload = policy_request_bytes()
    rows = []
    for c in levels:
        lat: dict[int, list[int]] = {i: [] for i in range(len(urls))}
        recorded = dict.fromkeys(range(len(urls)), 0.0)
        order = list(range(len(urls)))
        rounds = max(1, round(seconds / slice_s / 2))
        for _ in range(rounds):
            for i in order + order[::-1]:
                result = forseti_native.closed_loop(urls[i], payload, c, 0.1, slice_s)
                if result["errors"]:
                    raise RuntimeError(f"{result['errors']} failed calls against {urls[i]}")
                lat[i].extend(result["latencies_ns"])
                recorded[i] += result["seconds"]
        for i, target in enumerate(TARGETS):
            values = np.array(lat[i], dtype=np.int64)
            p50, p99 = (float(v) / 1e3 for v in np.percentile(values, [50, 99]))
            rows.append(Row(target, c, p50, p99, values.size / recorded[i], int(values.size)))
            print(
                f"native load  {target:<15} c={c:<3} p50 {p50:7.0f} us  p99 {p99:7.0f} us  "
                f"{values.size / recorded[i]:7.0f} calls/s",
                flush=True,
            )
    return rows


@dataclass
class Row:
    target: str
    concurrency: int
    p50_us: float
    p99_us: float
    rps: float
    calls: int


def run(args: argparse.Namespace) -> dict:
    from testkit.server_process import ServerProcess

    levels = sorted({int(x) for x in args.levels.split(",")})
    rows: list[Row] = []
    native_rows: list[Row] = []
    cpu: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="forseti-bench-native-") as tmp:
        root = Path(tmp)
        repo, keyring_path, model = build_policy_repository(root)
        common = ["--model-control-mode", "explicit", "--load-model", MODEL, "--log-level"]
        native = ServerProcess(
            repo,
            keyring_path,
            [*common, "WARNING", "--data-plane", "native"],
            log_path=root / "native.log",
        )
        python = ServerProcess(
            repo,
            keyring_path,
            [*common, "WARNING", "--data-plane", "python"],
            log_path=root / "python.log",
        )
        cpp_floor, py_floor = NativeFloorProcess(root), EmptyFloorProcess(root)
        load = None
        try:
            load = LoadGenerator(min(4, max(levels)))
            for server in (native, python, cpp_floor, py_floor):
                server.start()
            urls = [cpp_floor.url, py_floor.url, native.url, python.url]
            for url in urls:
                check_answers(url)
            ort_p50_us = OrtFloor(model).p50_us(5000)
            load.run(urls, levels[0], 0.3, 0.3, args.slice, args.settle)  # discarded warm-up
            for c in levels:
                ms = load.run(urls, c, 0.3, args.duration, args.slice, args.settle)
                for target, m in zip(TARGETS, ms, strict=True):
                    rows.append(Row(target, c, m.p50_ms * 1e3, m.p99_ms * 1e3, m.rps, m.calls))
                    print(
                        f"{target:<15} c={c:<3} p50 {m.p50_ms * 1e3:7.0f} us  "
                        f"p99 {m.p99_ms * 1e3:7.0f} us  {m.rps:7.0f} calls/s",
                        flush=True,
                    )
            native_rows = native_load(urls, levels, args.duration, args.slice * 2)
            pids = [cpp_floor.proc.pid, py_floor.proc.pid, native.pid, python.pid]  # type: ignore[union-attr]
            for target, url, pid in zip(TARGETS, urls, pids, strict=True):
                cpu[target] = cpu_per_call_us(url, pid, args.cpu_calls)
                print(f"{target:<15} server CPU per call {cpu[target]:6.0f} us", flush=True)
        finally:
            if load is not None:
                load.close()
            for floor in (cpp_floor, py_floor):
                floor.stop()
            for server in (native, python):
                server.stop()
    top = {r.target: r for r in native_rows if r.concurrency == levels[-1]}
    n1 = {r.target: r for r in native_rows if r.concurrency == levels[0]}
    c1 = {r.target: r for r in rows if r.concurrency == levels[0]}
    target_us = 1.15 * (c1["C++ floor"].p50_us + ort_p50_us)
    return {
        "machine": f"{platform.node()} {os.cpu_count()} cpus (busy shared machine)",
        "ort_in_process_p50_us": ort_p50_us,
        "rows": [asdict(r) for r in rows],
        "native_load_rows": [asdict(r) for r in native_rows],
        "server_cpu_per_call_us": cpu,
        "target_c1_p50_us": target_us,
        "native_c1_p50_us": c1["Forseti native"].p50_us,
        "target_met_c1_p50": c1["Forseti native"].p50_us <= target_us,
        "target_met_cpu_200us": cpu["Forseti native"] <= 200.0,
        "top_level": levels[-1],
        "native_load_top_native_over_python": top["Forseti native"].rps / top["Forseti python"].rps,
        "native_load_target_c1_p50_us": 1.15 * (n1["C++ floor"].p50_us + ort_p50_us),
        "native_load_native_c1_p50_us": n1["Forseti native"].p50_us,
    }


def print_table(result: dict, levels: list[int]) -> None:
    _table(result, levels, "rows", "tritonclient (Python) load generator")
    _table(result, levels, "native_load_rows", "native (C++) load generator")
    _summary(result)


def _table(result: dict, levels: list[int], key: str, title: str) -> None:
    rows = result[key]
    print(f"\n{title}")
    print(
        "\n| target | "
        + " | ".join(f"c={c} p50 / p99 (us), calls/s" for c in levels)
        + " | server CPU per call (us) |"
    )
    print("|---|" + "---|" * len(levels) + "---|")
    for target in TARGETS:
        cells = []
        for c in levels:
            [r] = [r for r in rows if r["target"] == target and r["concurrency"] == c]
            cells.append(f"{r['p50_us']:.0f} / {r['p99_us']:.0f}, {r['rps']:.0f}")
        cpu = result["server_cpu_per_call_us"][target]
        print(f"| {target} | " + " | ".join(cells) + f" | {cpu:.0f} |")


def _summary(result: dict) -> None:
    print(
        f"\nin-process onnxruntime p50 {result['ort_in_process_p50_us']:.1f} us; target c=1 p50 "
        f"<= 1.15 x (C++ floor + onnxruntime) = {result['target_c1_p50_us']:.0f} us; Forseti "
        f"native c=1 p50 {result['native_c1_p50_us']:.0f} us "
        f"({'met' if result['target_met_c1_p50'] else 'missed'}); server CPU per decision "
        f"<= 200 us: {'met' if result['target_met_cpu_200us'] else 'missed'}"
    )
    met = result["native_load_native_c1_p50_us"] <= result["native_load_target_c1_p50_us"]
    print(
        "with the native load generator: target c=1 p50 <= 1.15 x (C++ floor + onnxruntime) = "
        f"{result['native_load_target_c1_p50_us']:.0f} us; Forseti native c=1 p50 "
        f"{result['native_load_native_c1_p50_us']:.0f} us ({'met' if met else 'missed'})"
    )
    print(
        f"native load generator, c={result['top_level']}: Forseti native answers "
        f"{result['native_load_top_native_over_python']:.1f}x the calls/s of Forseti python "
        "(target >= 3x)"
    )
    print(f"measured on {result['machine']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--duration", type=float, default=1.0, help="recorded s per target")
    parser.add_argument("--slice", type=float, default=0.25)
    parser.add_argument("--settle", type=float, default=0.05)
    parser.add_argument("--cpu-calls", type=int, default=2000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if importlib.util.find_spec("forseti_native") is None:
        print("the native extension is not built (`make native`)", file=sys.stderr)
        return 2
    started = time.monotonic()
    result = run(args)
    print_table(result, sorted({int(x) for x in args.levels.split(",")}))
    print(f"({time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
