"""Batch-1 policy-decision latency and throughput of Forseti against two floors.

What it does, in one run:

* builds a temporary sealed repository holding the `policy` model (obs FP32 [1,8] -> action
  INT64, logits FP32) and starts the real `forseti serve` on free loopback ports (explicit
  mode, `--load-model policy`);
* starts the *empty-call floor* (`benchmarks/empty_servicer.py`): a grpc.aio servicer on the
  same tritonclient stubs and server options whose ModelInfer returns a precomputed response
  of the policy's shape without doing any work;
* measures the *onnxruntime floor*: p50 of `session.run` in this process, on a session built
  from the same model bytes with the server backend's own session options;
* drives both servers with the same load generator -- client worker *processes* (spawned, so
  16 in-flight calls are not serialised on one GIL; default 4 processes, so c=16 is 4
  processes x 4 threads, the layout that gave the empty floor its highest req/s on a 2-CPU
  box), each thread a closed loop with its own `tritonclient.grpc.InferenceServerClient`
  (own channel, own connection and one per target) -- at each concurrency level floor and
  Forseti alternate in short slices (ABBA order, the first part of each slice not recorded),
  for several rounds; the table shows the median over rounds;
* reads Forseti's own per-stage times (Triton ModelStatistics deltas over each run: input =
  route + decode, infer = backend.run, output = response encode) and prints their means;
* prints the table and two targets:
    p50@c1:  forseti / (empty floor + onnxruntime)   <= 1.15
    req/s@c16: forseti / empty floor                 >= 0.85
  both computed per round (within a round both targets share the same slices of time) and
  reported as the median over rounds.

It is a benchmark, not a test: it exits 0 whatever the numbers are, unless the run itself
failed, or `--check` is given and a target is missed (exit 1).

    .venv/bin/python -m benchmarks.bench_latency                      # ~1.5 minutes
    .venv/bin/python -m benchmarks.bench_latency --duration 4 --rounds 7 --json out.json
    .venv/bin/python -m benchmarks.bench_latency --check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from testkit.load_generator import MODEL, OBS_DIM, LoadGenerator, Measurement, policy_input

REPO_ROOT = Path(__file__).resolve().parent.parent

P50_TARGET = 1.15  # forseti p50@c1 <= 1.15 x (empty floor p50@c1 + onnxruntime p50)
THROUGHPUT_TARGET = 0.85  # forseti req/s@c16 >= 0.85 x empty floor req/s@c16
TARGET_NAMES = ("empty floor", "forseti")


# ---- the two servers ----------------------------------------------------------------------


def _wait_live(url: str, proc: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    client = grpcclient.InferenceServerClient(url)
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}: {_tail(log)}")
            try:
                if client.is_server_ready() and client.is_model_ready(MODEL):
                    return
            except Exception:
                pass
            time.sleep(0.05)
    finally:
        client.close()
    raise TimeoutError(f"{what} not ready after {timeout}s: {_tail(log)}")


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


class EmptyFloorProcess:
    """`python -m benchmarks.empty_servicer` on a free port."""

    def __init__(self, workdir: Path) -> None:
        from testkit.server_process import free_port

        self.port = free_port()
        self.log_path = workdir / f"empty-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> EmptyFloorProcess:
        args = [sys.executable, "-m", "benchmarks.empty_servicer", "--port", str(self.port)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT
            )
        _wait_live(self.url, self.proc, 30.0, "empty servicer", self.log_path)
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def build_policy_repository(root: Path) -> tuple[Path, Path, bytes]:
    """(repository, keyring file, plaintext model bytes) for the sealed policy model."""
    from forseti.core.sealing.keyring import Keyring
    from testkit.model_builders import POLICY_CONFIG, policy_onnx, publish_sealed, write_config

    keyring_path = root / "keyring.json"
    keyring = Keyring.generate()
    keyring.save(keyring_path)
    repo = root / "repo"
    repo.mkdir()
    model = policy_onnx(1)
    write_config(repo, MODEL, POLICY_CONFIG)
    publish_sealed(repo, MODEL, model, keyring, version=1)
    return repo, keyring_path, model


def check_answers(url: str) -> None:
    """Both servers must answer a real decision of the right shape before they are timed."""
    with grpcclient.InferenceServerClient(url) as client:
        result = client.infer(MODEL, [policy_input(0)])
        action, logits = result.as_numpy("action"), result.as_numpy("logits")
    if action is None or action.shape != (1, 1) or action.dtype != np.int64:
        raise RuntimeError(f"{url}: bad 'action' output {action!r}")
    if logits is None or logits.shape != (1, 4) or logits.dtype != np.float32:
        raise RuntimeError(f"{url}: bad 'logits' output {logits!r}")


_STAT_FIELDS = ("success", "compute_input", "compute_infer", "compute_output")


def server_statistics(url: str) -> dict[str, tuple[int, int]]:
    """Forseti's cumulative (count, ns) per stage for the policy model (Triton's statistics)."""
    with grpcclient.InferenceServerClient(url) as client:
        response = client.get_inference_statistics(MODEL)
    stats = response.model_stats[0].inference_stats
    return {f: (getattr(stats, f).count, getattr(stats, f).ns) for f in _STAT_FIELDS}


def stage_means_us(before: dict, after: dict) -> dict[str, float]:
    """Mean microseconds per request of each stage between two snapshots."""
    calls = after["success"][0] - before["success"][0]
    if calls <= 0:
        return {}
    names = {
        "success": "handler",
        "compute_input": "input",
        "compute_infer": "infer",
        "compute_output": "output",
    }
    return {names[f]: (after[f][1] - before[f][1]) / calls / 1e3 for f in _STAT_FIELDS}


# ---- the onnxruntime floor ----------------------------------------------------------------


class OrtFloor:
    """session.run of the same model bytes with the server backend's session options."""

    def __init__(self, model: bytes) -> None:
        import onnxruntime as ort

        from forseti.core.repository.config import parse_config_text
        from forseti.server.backends.onnxruntime_backend import choose_providers, session_options
        from testkit.model_builders import POLICY_CONFIG

        config = parse_config_text(POLICY_CONFIG, MODEL)
        providers = choose_providers(config, ort.get_available_providers())
        self.session = ort.InferenceSession(model, session_options(config), providers=providers)
        self.names = [o.name for o in config.output]
        obs = np.random.default_rng(0).uniform(-1, 1, (1, OBS_DIM)).astype(np.float32)
        self.feeds = {"obs": obs}

    def p50_us(self, calls: int = 20000) -> float:
        run, names, feeds, now = self.session.run, self.names, self.feeds, time.perf_counter_ns
        for _ in range(1000):
            run(names, feeds)
        samples = np.empty(calls, dtype=np.int64)
        for i in range(calls):
            t = now()
            run(names, feeds)
            samples[i] = now() - t
        return float(np.median(samples)) / 1e3


# ---- the benchmark ------------------------------------------------------------------------


@dataclass
class Round:
    index: int
    ort_p50_us: float
    results: dict[str, dict[int, Measurement]] = field(default_factory=dict)


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def summarise(rounds: list[Round], levels: list[int]) -> dict:
    table: dict[str, dict[int, dict[str, object]]] = {}
    for target in TARGET_NAMES:
        table[target] = {}
        for c in levels:
            ms = [r.results[target][c] for r in rounds]
            table[target][c] = {
                "p50_ms": _median([m.p50_ms for m in ms]),
                "p90_ms": _median([m.p90_ms for m in ms]),
                "p99_ms": _median([m.p99_ms for m in ms]),
                "rps": _median([m.rps for m in ms]),
                "calls": int(_median([m.calls for m in ms])),
                "layout": ms[0].layout,
            }
            stages = [m.server_us for m in ms if m.server_us]
            if len(stages) == len(ms):
                table[target][c]["server_us"] = {
                    k: _median([s[k] for s in stages]) for k in stages[0]
                }
    targets = {}
    lo, hi = min(levels), max(levels)
    if lo == 1:
        per_round = [
            r.results["forseti"][1].p50_ms
            / (r.results["empty floor"][1].p50_ms + r.ort_p50_us / 1e3)
            for r in rounds
        ]
        ratio = _median(per_round)
        targets["p50_c1"] = {
            "description": "p50@c1 forseti / (empty floor p50 + onnxruntime p50)",
            "per_round": per_round,
            "ratio": ratio,
            "limit": f"<= {P50_TARGET}",
            "pass": ratio <= P50_TARGET,
        }
    if hi == 16:
        per_round = [
            r.results["forseti"][16].rps / r.results["empty floor"][16].rps for r in rounds
        ]
        ratio = _median(per_round)
        targets["rps_c16"] = {
            "description": "throughput@c16 forseti / empty floor",
            "per_round": per_round,
            "ratio": ratio,
            "limit": f">= {THROUGHPUT_TARGET}",
            "pass": ratio >= THROUGHPUT_TARGET,
        }
    return {
        "ort_p50_us": _median([r.ort_p50_us for r in rounds]),
        "table": table,
        "targets": targets,
    }


def print_report(summary: dict, rounds: list[Round], args: argparse.Namespace) -> None:
    print()
    print(
        f"batch-1 '{MODEL}' decisions, tritonclient.grpc, {args.duration:g}s recorded per "
        f"target and level in {args.slice:g}s ABBA slices, {args.rounds} rounds (median "
        f"shown), {os.cpu_count()} CPUs"
    )
    header = f"{'target':<12} {'conc':>4} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'req/s':>9}"
    print(header + f"  {'clients':>9}")
    print("-" * (len(header) + 11))
    for target in TARGET_NAMES:
        for c, row in summary["table"][target].items():
            print(
                f"{target:<12} {c:>4} {row['p50_ms']:>8.3f} {row['p90_ms']:>8.3f} "
                f"{row['p99_ms']:>8.3f} {row['rps']:>9.0f}  {row['layout']:>9}"
            )
    ort = summary["ort_p50_us"]
    print(f"{'onnxruntime':<12} {'-':>4} {ort / 1e3:>8.3f}   (session.run p50 = {ort:.1f} us)")
    print()
    print("forseti's own stage times, mean us per request (ModelStatistics deltas, median round):")
    print("  conc  handler  (input = route+decode, infer = backend.run, output = encode)")
    for c, row in summary["table"]["forseti"].items():
        st = row.get("server_us")
        if st:
            print(
                f"  {c:>4} {st['handler']:>8.1f}  (input {st['input']:.1f}, "
                f"infer {st['infer']:.1f}, output {st['output']:.1f})"
            )
    print()
    for t in summary["targets"].values():
        rounds_text = ", ".join(f"{x:.3f}" for x in t["per_round"])
        verdict = "PASS" if t["pass"] else "FAIL"
        print(
            f"{t['description']}: {t['ratio']:.3f} (target {t['limit']}) {verdict}"
            f"   [rounds: {rounds_text}]"
        )


def run_benchmark(args: argparse.Namespace) -> tuple[dict, list[Round]]:
    from testkit.server_process import ServerProcess

    levels = sorted({int(x) for x in args.levels.split(",")})
    with tempfile.TemporaryDirectory(prefix="forseti-bench-") as tmp:
        root = Path(tmp)
        repo, keyring_path, model = build_policy_repository(root)
        forseti = ServerProcess(
            repo,
            keyring_path,
            ["--model-control-mode", "explicit", "--load-model", MODEL, "--log-level", "WARNING"],
            log_path=root / "forseti.log",
        )
        floor = EmptyFloorProcess(root)
        load = None
        try:
            load = LoadGenerator(min(args.procs, max(levels)))
            forseti.start()
            floor.start()
            urls = {"empty floor": floor.url, "forseti": forseti.url}
            for url in urls.values():
                check_answers(url)
            ort = OrtFloor(model)
            targets = [urls[t] for t in TARGET_NAMES]
            # One discarded pass: the first runs after start-up are slow on a small VM.
            for c in sorted({levels[0], levels[-1]}):
                load.run(targets, c, args.warmup, 0.5, args.slice, args.settle)
            rounds: list[Round] = []
            for r in range(args.rounds):
                rnd = Round(index=r, ort_p50_us=ort.p50_us())
                rnd.results = {t: {} for t in TARGET_NAMES}
                for c in levels:
                    before = server_statistics(forseti.url)
                    ms = load.run(
                        targets, c, args.warmup, args.duration, args.slice, args.settle, r % 2
                    )
                    ms[TARGET_NAMES.index("forseti")].server_us = stage_means_us(
                        before, server_statistics(forseti.url)
                    )
                    for target, m in zip(TARGET_NAMES, ms, strict=True):
                        rnd.results[target][c] = m
                        print(
                            f"round {r + 1}/{args.rounds} {target:<12} c={c:<3} "
                            f"p50 {m.p50_ms:.3f} ms  p99 {m.p99_ms:.3f} ms  {m.rps:.0f} req/s",
                            flush=True,
                        )
                rounds.append(rnd)
        finally:
            if load is not None:
                load.close()
            floor.stop()
            code = forseti.stop()
            if code not in (0, None):
                print(f"forseti exited with {code}:\n{forseti.log()}")
    return summarise(rounds, levels), rounds


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_latency",
        description=(
            "Batch-1 policy latency (p50/p90/p99) and throughput of `forseti serve` at several "
            "concurrencies, against an empty-call gRPC floor and the bare onnxruntime call."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--duration", type=float, default=2.0, help="recorded seconds per target per level"
    )
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per level")
    p.add_argument(
        "--slice",
        type=float,
        default=0.5,
        help="the two targets alternate in slices this long (ABBA order) within a level",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=0.1,
        help="seconds at the start of each slice that are not recorded (the switch-over)",
    )
    p.add_argument("--rounds", type=int, default=5, help="alternating floor/forseti rounds")
    p.add_argument("--levels", default="1,4,16", help="concurrency levels, comma separated")
    p.add_argument(
        "--procs",
        type=int,
        default=4,
        help=(
            "most client worker processes; a level of c uses min(c, procs) of them, each with "
            "c/procs threads (4 gave the highest empty-floor req/s at c=16 on a 2-CPU box)"
        ),
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        levels = [int(x) for x in args.levels.split(",")]
    except ValueError:
        levels = []
    if (
        args.duration <= 0
        or args.rounds < 1
        or args.procs < 1
        or not levels
        or min(levels) < 1
        or not 0 <= args.settle < args.slice
    ):
        print(
            "bench_latency: --duration must be > 0, --rounds and --procs >= 1, 0 <= --settle "
            "< --slice, and --levels a comma-separated list of positive integers",
            file=sys.stderr,
        )
        return 2
    started = time.monotonic()
    # SIGTERM unwinds like Ctrl-C, so the servers and workers are always stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        summary, rounds = run_benchmark(args)
    except Exception as exc:
        traceback.print_exc()
        print(f"bench_latency: the run failed: {exc}", file=sys.stderr)
        return 2
    print_report(summary, rounds, args)
    print(f"\n(total {time.monotonic() - started:.0f}s)")
    if args.json is not None:
        doc = {
            "settings": vars(args) | {"json": str(args.json)},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "summary": summary,
            "rounds": [
                {
                    "index": r.index,
                    "ort_p50_us": r.ort_p50_us,
                    "results": {
                        t: {c: asdict(m) for c, m in per.items()} for t, per in r.results.items()
                    },
                }
                for r in rounds
            ],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, default=str))
        print(f"wrote {args.json}")
    if args.check and not all(t["pass"] for t in summary["targets"].values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
