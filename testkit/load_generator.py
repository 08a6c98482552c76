"""The closed-loop gRPC load generator of the latency and batching benchmarks.

Client worker *processes* (spawned, so that many in-flight calls are not serialised on one
GIL), each running closed-loop threads with their own `tritonclient.grpc` client and
connection; the targets of one measurement alternate in short counterbalanced slices (ABBA,
ABCCBA) so that all of them see the same machine. `own_client`, `policy_input` and
`stop_workers` are shared with the hot-swap harness (`testkit.swap_harness`).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Kept light on purpose: every worker process imports this module when it is spawned.
import numpy as np
import tritonclient.grpc as grpcclient

from forseti.loadtests.connections import own_connection_options

MODEL = "policy"
OBS_DIM = 8


# ---- load generator (runs in the worker processes) ------------------------------------------


def own_client(url: str) -> grpcclient.InferenceServerClient:
    """A client with its own HTTP/2 connection (see `own_connection_options`)."""
    return grpcclient.InferenceServerClient(url, channel_args=own_connection_options())


@dataclass(frozen=True)
class Target:
    """What a closed loop calls: a model on a server, with one FP32 input tensor of `shape`
    (batch dimension included) filled with seeded uniform(-1, 1) values."""

    url: str
    model: str = MODEL
    input_name: str = "obs"
    shape: tuple[int, ...] = (1, OBS_DIM)

    def make_input(self, seed: int) -> grpcclient.InferInput:
        data = np.random.default_rng(seed).uniform(-1, 1, self.shape).astype(np.float32)
        inp = grpcclient.InferInput(self.input_name, list(self.shape), "FP32")
        inp.set_data_from_numpy(data)
        return inp


def policy_input(seed: int) -> grpcclient.InferInput:
    """The policy model's `obs` input, batch 1, seeded as `Target.make_input` fills it."""
    return Target("").make_input(seed)


# A slice of the schedule: (target index, start ns, record-from ns, end ns).
Slice = tuple[int, int, int, int]


def _closed_loop(
    clients: list[grpcclient.InferenceServerClient],
    calls: list[tuple[str, list]],
    warm_until_ns: int,
    schedule: list[Slice],
    out: dict,
    fail_fast: bool = True,
) -> None:
    """One in-flight call at a time. Until warm_until_ns it warms every target in turn; then
    it follows the schedule: in each slice it calls that slice's target on its own client,
    records the latency of calls started after the slice's settle time and counts the calls
    that complete inside the recorded part of the slice. `calls[t]` is target t's (model,
    inputs). A failed call ends the loop with its error, unless `fail_fast` is off: then
    calls that fail in the recorded part are counted per target and the loop goes on."""
    lat: list[list[int]] = [[] for _ in clients]
    done = [0] * len(clients)
    failed = [0] * len(clients)
    try:
        now = time.perf_counter_ns
        infers = [c.infer for c in clients]
        i = 0
        while now() < warm_until_ns:
            k = i % len(infers)
            try:
                infers[k](*calls[k])
            except grpcclient.InferenceServerException:
                if fail_fast:
                    raise
            i += 1
        for target, _start, record_from, end in schedule:
            infer, record = infers[target], lat[target]
            model, inputs = calls[target]
            t = now()
            while t < end:
                try:
                    infer(model, inputs)
                except grpcclient.InferenceServerException:
                    if fail_fast:
                        raise
                    if t >= record_from:
                        failed[target] += 1
                    t = now()
                    continue
                t2 = now()
                if t >= record_from:
                    record.append(t2 - t)
                if record_from <= t2 <= end:
                    done[target] += 1
                t = t2
    except BaseException:
        out["error"] = traceback.format_exc()
    out["lat"] = lat
    out["done"] = done
    out["failed"] = failed


class _WorkerSession:
    """The clients of one worker process for one measurement: per thread, one client (own
    connection) per target."""

    def __init__(self, targets: list[Target], threads: int, seed: int) -> None:
        self.clients = [[own_client(t.url) for t in targets] for _ in range(threads)]
        self.calls = [
            [(t.model, [t.make_input(seed * 1000 + i)]) for t in targets] for i in range(threads)
        ]
        for clients, calls in zip(self.clients, self.calls, strict=True):
            for client, call in zip(clients, calls, strict=True):
                client.infer(*call)  # connect before the clock starts

    def go(self, warm_until_ns: int, schedule: list[Slice], fail_fast: bool = True) -> dict:
        outs: list[dict] = [{} for _ in self.clients]
        workers = [
            threading.Thread(
                target=_closed_loop,
                args=(c, k, warm_until_ns, schedule, o, fail_fast),
                daemon=True,
            )
            for c, k, o in zip(self.clients, self.calls, outs, strict=True)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        targets = len(self.clients[0])
        return {
            "lat": [
                [x for o in outs for x in o.get("lat", [[]] * targets)[t]] for t in range(targets)
            ],
            "done": [sum(o.get("done", [0] * targets)[t] for o in outs) for t in range(targets)],
            "failed": [
                sum(o.get("failed", [0] * targets)[t] for o in outs) for t in range(targets)
            ],
            "errors": [o["error"] for o in outs if "error" in o],
        }

    def close(self) -> None:
        for clients in self.clients:
            for c in clients:
                c.close()


def _worker_main(conn, index: int) -> None:
    """A client worker process. Commands: ("prepare", targets, threads) -> "ready" once its
    clients are connected; ("go", warm_until_ns, schedule, fail_fast) -> its latencies and
    counts per target; None -> exit."""
    conn.send("hello")
    session: _WorkerSession | None = None
    while True:
        cmd = conn.recv()
        if cmd is None:
            return
        try:
            if cmd[0] == "prepare":
                if session is not None:
                    session.close()
                session = _WorkerSession(cmd[1], cmd[2], index)
                conn.send("ready")
            else:
                assert session is not None
                result = session.go(*cmd[1:])
                session.close()
                session = None
                conn.send(result)
        except BaseException:
            conn.send({"lat": [], "done": [], "failed": [], "errors": [traceback.format_exc()]})


def abba(first: int, pairs: int) -> list[int]:
    """Target order over 2 * pairs slices, counterbalanced against drift: ABBA ABBA ..."""
    return counterbalanced(2, first, pairs)


def counterbalanced(n: int, first: int, rounds: int) -> list[int]:
    """Order of n targets over n * rounds slices, counterbalanced against drift: the targets
    from `first` on, then the same in reverse (ABCCBA ABCCBA ...); for n = 2 this is ABBA."""
    forward = [(first + i) % n for i in range(n)]
    pattern = forward + forward[::-1]
    return [pattern[i % (2 * n)] for i in range(n * rounds)]


class LoadGenerator:
    """A pool of spawned client processes; a level of concurrency c uses min(c, procs) of them,
    each running its share of the c closed-loop threads. The targets of one measurement are
    interleaved in short slices (ABBA order, ABCCBA for more) so that all see the same
    machine."""

    def __init__(self, procs: int, timeout: float = 120.0) -> None:
        ctx = mp.get_context("spawn")  # no fork after grpc channels exist in the parent
        self.timeout = timeout
        self.procs = []
        for i in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(child, i), daemon=True)
            p.start()
            child.close()
            self.procs.append((p, parent))
        for _, conn in self.procs:
            self._recv(conn)  # "hello": imports done

    def _recv(self, conn):
        if not conn.poll(self.timeout):
            raise TimeoutError(f"a load-generator worker did not answer in {self.timeout}s")
        return conn.recv()

    def layout(self, concurrency: int) -> list[int]:
        n = min(concurrency, len(self.procs))
        return [concurrency // n + (1 if i < concurrency % n else 0) for i in range(n)]

    def run(
        self,
        urls: Sequence[str | Target],
        concurrency: int,
        warmup_s: float,
        duration_s: float,
        slice_s: float = 0.5,
        settle_s: float = 0.1,
        first: int = 0,
        fail_fast: bool = True,
        on_schedule: Callable[[int], None] | None = None,
    ) -> list[Measurement]:
        """Measure the targets (a URL means the policy model there) at one concurrency,
        `duration_s` of recorded time each. With `fail_fast` off, failed calls are counted in
        each Measurement's `failures` instead of failing the run. `on_schedule`, if given, is
        called with the perf_counter_ns at which the warm-up ends, once the workers have it."""
        targets = [Target(u) if isinstance(u, str) else u for u in urls]
        assert targets
        shares = self.layout(concurrency)
        conns = [conn for (_, conn), _ in zip(self.procs, shares, strict=False)]
        for conn, threads in zip(conns, shares, strict=True):
            conn.send(("prepare", targets, threads))
        for conn in conns:
            answer = self._recv(conn)
            if answer != "ready":
                raise RuntimeError(f"load generator could not connect to {urls}:\n{answer}")
        recorded_ns = int((slice_s - settle_s) * 1e9)
        pairs = max(1, math.ceil(duration_s / (slice_s - settle_s)))
        order = counterbalanced(len(targets), first, pairs)
        start = time.perf_counter_ns() + int(warmup_s * 1e9)
        schedule: list[Slice] = []
        for k, index in enumerate(order):
            s0 = start + k * int(slice_s * 1e9)
            s1 = s0 + int(slice_s * 1e9)
            schedule.append((index, s0, s1 - recorded_ns, s1))
        for conn in conns:
            conn.send(("go", start, schedule, fail_fast))
        if on_schedule is not None:
            on_schedule(start)
        results = [self._recv(conn) for conn in conns]
        errors = [e for r in results for e in r["errors"]]
        if errors:
            raise RuntimeError(f"load generator failed against {urls}:\n{errors[0]}")
        measurements = []
        for t, target in enumerate(targets):
            lat = np.array([x for r in results for x in r["lat"][t]], dtype=np.int64)
            if lat.size == 0:
                where = target.url if target.model == MODEL else f"{target.model}@{target.url}"
                raise RuntimeError(
                    f"no call completed against {where} at concurrency {concurrency}"
                )
            p50, p90, p99 = (float(v) / 1e6 for v in np.percentile(lat, [50, 90, 99]))
            done = sum(r["done"][t] for r in results)
            measurements.append(
                Measurement(
                    concurrency=concurrency,
                    p50_ms=p50,
                    p90_ms=p90,
                    p99_ms=p99,
                    rps=done / (order.count(t) * recorded_ns / 1e9),
                    calls=int(lat.size),
                    layout=f"{len(shares)}p x {max(shares)}t",
                    failures=sum(r["failed"][t] for r in results),
                )
            )
        return measurements

    def close(self) -> None:
        stop_workers(self.procs)


def stop_workers(procs: list) -> None:
    """Ask each (process, pipe) worker to stop, then join it, terminating a stuck one."""
    for _, conn in procs:
        with contextlib.suppress(BrokenPipeError, OSError):
            conn.send(None)
    for p, conn in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
        conn.close()


@dataclass
class Measurement:
    concurrency: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    rps: float
    calls: int
    layout: str
    # Forseti only: its own per-request stage times (ModelStatistics deltas over the run), us.
    server_us: dict[str, float] | None = None
    # Calls that failed in the recorded part (only counted when the run is not fail-fast).
    failures: int = 0
