"""Hot swaps under load, the harness: closed-loop decision clients in spawned worker processes
(`ClientPool`), and one run of a server over a fresh repository while new versions are
published and swapped in (`run_mode`), measured into a `ModeResult` checked against
`Tolerances`.

`benchmarks/swap_under_load.py` runs it with 50+ swaps and prints the table;
tests/test_swap_under_load.py runs it with fewer swaps, and tests/test_faults.py uses the
client pool as its load.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import re
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

# Kept light on purpose: every client worker process imports this module when it is spawned.
import numpy as np
import tritonclient.grpc as grpcclient

from testkit.load_generator import own_client, policy_input, stop_workers

MODEL = "policy"
MODES = ("explicit", "poll")
CALL_TIMEOUT_S = 10.0  # a call that hangs this long counts as failed
RELEASED = re.compile(rb"version released .*model=policy version=(\d+)\b")


# ---- client workers (run in the spawned processes) ---------------------------------------


@dataclass
class _Record:
    """One client thread's calls, in the order it made them."""

    start: list[int] = field(default_factory=list)
    end: list[int] = field(default_factory=list)
    version: list[int] = field(default_factory=list)
    action: list[int] = field(default_factory=list)
    failures: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, why)


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    message = getattr(exc, "message", None)
    if callable(status) and callable(message):
        return f"{status()}: {message()}"
    return f"{exc.__class__.__name__}: {exc}"


def _call_loop(url: str, slot: int, seen, stop: threading.Event, rec: _Record) -> None:
    """Closed loop: one decision call at a time, no version named, until stopped."""
    client = own_client(url)
    inputs = [policy_input(1000 + slot)]
    now = time.monotonic_ns  # CLOCK_MONOTONIC: comparable across the processes
    try:
        while not stop.is_set():
            t = now()
            try:
                result = client.infer(MODEL, inputs, client_timeout=CALL_TIMEOUT_S)
                t2 = now()
                version = int(result.get_response().model_version)
                action = int(result.as_numpy("action")[0, 0])
            except Exception as exc:  # every failure counts, whatever raised it
                rec.failures.append((t, now(), _describe(exc)))
                time.sleep(0.005)
                continue
            rec.start.append(t)
            rec.end.append(t2)
            rec.version.append(version)
            rec.action.append(action)
            seen[slot] = version
    finally:
        client.close()


def _worker_main(conn, slots: list[int], seen) -> None:
    """A client worker process. Commands: ("start", url) -> "started" once its threads run;
    ("stop",) -> its records; None -> exit."""
    conn.send("hello")
    stop = threading.Event()
    threads: list[threading.Thread] = []
    records: dict[int, _Record] = {}
    while True:
        cmd = conn.recv()
        if cmd is None:
            return
        try:
            if cmd[0] == "start":
                stop = threading.Event()
                records = {slot: _Record() for slot in slots}
                threads = [
                    threading.Thread(
                        target=_call_loop, args=(cmd[1], s, seen, stop, records[s]), daemon=True
                    )
                    for s in slots
                ]
                for t in threads:
                    t.start()
                conn.send("started")
            else:
                stop.set()
                for t in threads:
                    t.join(CALL_TIMEOUT_S + 5)
                stuck = [t.name for t in threads if t.is_alive()]
                conn.send({"records": records, "errors": [f"stuck: {stuck}"] if stuck else []})
        except BaseException:
            conn.send({"records": {}, "errors": [traceback.format_exc()]})


# ---- the client pool (main process) ------------------------------------------------------


@dataclass
class Calls:
    """Every call of every client thread of one run, as flat arrays (one row per answer)."""

    slot: np.ndarray
    start: np.ndarray
    end: np.ndarray
    version: np.ndarray
    action: np.ndarray
    failures: list[tuple[int, int, int, str]]  # (slot, start, end, why)

    @property
    def total(self) -> int:
        return int(self.slot.size) + len(self.failures)

    def latencies_ms(self, t0: int, t1: int) -> np.ndarray:
        """Latencies of the calls that started in [t0, t1)."""
        mask = (self.start >= t0) & (self.start < t1)
        return (self.end[mask] - self.start[mask]) / 1e6

    def first_answer(self, version: int) -> int | None:
        ends = self.end[self.version == version]
        return int(ends.min()) if ends.size else None


class ClientPool:
    """`clients` closed-loop client threads over `procs` spawned processes; reusable for
    several runs. `seen[slot]` is the version that slot's last answer came from, live."""

    def __init__(self, clients: int = 16, procs: int = 4, timeout: float = 60.0) -> None:
        procs = max(1, min(procs, clients))
        ctx = mp.get_context("spawn")  # no fork after grpc channels exist in the parent
        self.clients = clients
        self.timeout = timeout
        self.seen = ctx.Array("q", clients, lock=False)
        self.layout = [list(range(clients))[i::procs] for i in range(procs)]  # slots per process
        self.procs: list[tuple[mp.process.BaseProcess, Connection]] = []
        try:
            for slots in self.layout:
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker_main, args=(child, slots, self.seen), daemon=True)
                p.start()
                child.close()
                self.procs.append((p, parent))
            for _, conn in self.procs:
                self._recv(conn)  # "hello": imports done
        except BaseException:
            self.close()
            raise

    def describe(self) -> str:
        return f"{self.clients} ({len(self.layout)} processes x {max(map(len, self.layout))})"

    def _recv(self, conn, timeout: float | None = None):
        try:
            if not conn.poll(timeout or self.timeout):
                raise TimeoutError(f"a client worker did not answer in {timeout or self.timeout}s")
            return conn.recv()
        except EOFError:
            raise RuntimeError("a client worker process exited (its error is above)") from None

    def start(self, url: str) -> None:
        for i in range(self.clients):
            self.seen[i] = 0
        for _, conn in self.procs:
            conn.send(("start", url))
        for _, conn in self.procs:
            answer = self._recv(conn)
            if answer != "started":
                raise RuntimeError(f"a client worker failed to start:\n{answer}")

    def versions(self) -> list[int]:
        return list(self.seen)

    def all_seen(self, version: int) -> bool:
        return min(self.seen) >= version

    def stop(self) -> Calls:
        for _, conn in self.procs:
            conn.send(("stop",))
        results = [self._recv(conn, CALL_TIMEOUT_S + 30) for _, conn in self.procs]
        errors = [e for r in results for e in r["errors"]]
        if errors:
            raise RuntimeError(f"client workers failed:\n{errors[0]}")
        records: dict[int, _Record] = {}
        for r in results:
            records.update(r["records"])

        def flat(attr: str, dtype) -> np.ndarray:
            parts = [np.asarray(getattr(records[s], attr), dtype=dtype) for s in sorted(records)]
            return np.concatenate(parts) if parts else np.empty(0, dtype)

        slots = [np.full(len(records[s].start), s, np.int32) for s in sorted(records)]
        return Calls(
            slot=np.concatenate(slots) if slots else np.empty(0, np.int32),
            start=flat("start", np.int64),
            end=flat("end", np.int64),
            version=flat("version", np.int64),
            action=flat("action", np.int64),
            failures=[(s, *f) for s in sorted(records) for f in records[s].failures],
        )

    def close(self) -> None:
        stop_workers(self.procs)
        self.procs = []

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- one run ----------------------------------------------------------------------------


@dataclass
class Swap:
    version: int
    publish_ns: int  # publishing began (sealing included)
    published_s: float  # publish_version returned
    loaded_s: float | None  # explicit mode: RepositoryModelLoad returned
    first_answer_s: float | None  # a client was first answered by the new version
    all_clients_s: float  # every client has been answered by it
    rss: int
    fds: int


@dataclass
class Window:
    calls: int
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, lat_ms: np.ndarray, seconds: float) -> Window:
        if lat_ms.size == 0:
            return cls(0, 0.0, float("nan"), float("nan"), float("nan"))
        p50, p99 = np.percentile(lat_ms, [50, 99])
        return cls(
            int(lat_ms.size), lat_ms.size / seconds, float(p50), float(p99), float(lat_ms.max())
        )


@dataclass
class Tolerances:
    rss_mib: float = 24.0  # RSS growth allowed over the whole run
    fds: int = 2  # open-fd growth allowed


@dataclass
class ModeResult:
    mode: str
    clients: str
    swaps_requested: int
    swaps: list[Swap]
    total_calls: int
    failed_calls: int
    failure_samples: list[str]
    wrong_answers: int
    went_back: int  # client threads whose answers went back to an older version
    missed: list[tuple[int, int]]  # (slot, version) pairs a client was never answered by
    steady: Window
    during: Window
    released: int  # "version released" lines in the server log
    rss_before: int
    rss_after: int
    rss_mid: int  # after half the swaps: growth after it is the per-swap trend
    fds_before: int
    fds_after: int
    error: str = ""
    tolerances: Tolerances = field(default_factory=Tolerances)

    @property
    def rss_growth_mib(self) -> float:
        return (self.rss_after - self.rss_before) / 2**20

    @property
    def fd_growth(self) -> int:
        return self.fds_after - self.fds_before

    def problems(self) -> list[str]:
        out = []
        if self.error:
            out.append(self.error)
        if self.failed_calls:
            out.append(f"{self.failed_calls} failed calls, e.g. {self.failure_samples[:3]}")
        if self.wrong_answers:
            out.append(f"{self.wrong_answers} answers whose action is not their version's")
        if self.went_back:
            out.append(f"{self.went_back} clients went back to an older version")
        if self.missed:
            out.append(
                f"{len(self.missed)} (client, version) pairs never answered: {self.missed[:5]}"
            )
        if len(self.swaps) < self.swaps_requested:
            out.append(f"only {len(self.swaps)} of {self.swaps_requested} swaps done")
        if self.released < len(self.swaps):
            out.append(f"only {self.released} of {len(self.swaps)} swapped-out versions released")
        if self.fd_growth > self.tolerances.fds:
            out.append(f"open fds grew by {self.fd_growth} (tolerance {self.tolerances.fds})")
        if self.rss_growth_mib > self.tolerances.rss_mib:
            out.append(
                f"RSS grew by {self.rss_growth_mib:.1f} MiB "
                f"(tolerance {self.tolerances.rss_mib:g} MiB)"
            )
        return out

    @property
    def ok(self) -> bool:
        return not self.problems()

    def summary(self) -> dict:
        doc = asdict(self)
        doc["swaps"] = [asdict(s) for s in self.swaps]
        doc.update(
            rss_growth_mib=self.rss_growth_mib,
            fd_growth=self.fd_growth,
            problems=self.problems(),
            ok=self.ok,
        )
        return doc


def _wait(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.002)
    return check()


def _server_args(mode: str, poll_secs: float) -> list[str]:
    if mode == "explicit":
        return ["--model-control-mode", "explicit", "--load-model", MODEL]
    if mode == "poll":
        return ["--model-control-mode", "poll", "--repository-poll-secs", f"{poll_secs:g}"]
    raise ValueError(f"mode must be one of {MODES}, not {mode!r}")


def run_mode(
    pool: ClientPool,
    workdir: Path,
    mode: str,
    swaps: int = 50,
    *,
    steady_s: float = 5.0,
    warmup_s: float = 1.0,
    poll_secs: float = 0.2,
    swap_timeout_s: float = 20.0,
    keyring_path: Path | None = None,
    tolerances: Tolerances | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> ModeResult:
    """Start a server over a fresh repository in `workdir`, run the pool's clients against
    it, publish and swap in `swaps` versions, and measure. Never raises for what the
    server did (a timeout is reported in `error`); raises when the harness itself fails."""
    import psutil

    from forseti.core.sealing.keyring import Keyring
    from testkit.model_builders import POLICY_CONFIG, policy_onnx, publish_sealed, write_config
    from testkit.server_process import ServerProcess

    workdir = workdir / mode
    workdir.mkdir(parents=True, exist_ok=True)
    if keyring_path is None:
        keyring_path = workdir / "keyring.json"
        Keyring.generate().save(keyring_path)
    keyring = Keyring.load(keyring_path)
    repo = workdir / "repo"
    repo.mkdir()
    write_config(repo, MODEL, POLICY_CONFIG)
    publish_sealed(repo, MODEL, policy_onnx(1), keyring, version=1)
    models = {v: policy_onnx(v) for v in range(2, swaps + 2)}  # built before the clock runs

    server = ServerProcess(
        repo, keyring_path, _server_args(mode, poll_secs), log_path=workdir / "server.log"
    )
    now = time.monotonic_ns
    rng = np.random.default_rng(0)
    done: list[Swap] = []
    error = ""
    control = None
    started = False
    try:
        server.start()
        proc = psutil.Process(server.pid)
        control = grpcclient.InferenceServerClient(server.url)
        control.is_server_live()  # connect now: its socket is in the fds baseline
        pool.start(server.url)
        started = True
        if not _wait(lambda: pool.all_seen(1), 30):
            raise RuntimeError(f"clients were not answered: {pool.versions()}\n{server.log()}")
        time.sleep(warmup_s)
        steady_from = now()
        time.sleep(steady_s)
        rss_before, fds_before = proc.memory_info().rss, proc.num_fds()
        rss_mid = rss_before
        swaps_from = steady_to = now()
        log(f"{mode}: steady window done, swapping {swaps} versions")
        for v in range(2, swaps + 2):
            if mode == "poll":
                # Publish at a random point of the poll cycle: right after the previous swap
                # would be phase-locked to the poller and always wait a whole interval.
                time.sleep(float(rng.uniform(0, poll_secs)))
            t0 = now()
            number = publish_sealed(repo, MODEL, models[v], keyring)
            if number != v:
                raise RuntimeError(f"publish claimed version {number}, expected {v}")
            t_pub = now()
            t_load = None
            if mode == "explicit":
                control.load_model(MODEL)
                t_load = now()
            if not _wait(functools.partial(pool.all_seen, v), swap_timeout_s):
                error = (
                    f"version {v}: not every client answered by it after {swap_timeout_s:g}s "
                    f"(clients at {pool.versions()})"
                )
                break
            t_all = now()
            done.append(
                Swap(
                    version=v,
                    publish_ns=t0,
                    published_s=(t_pub - t0) / 1e9,
                    loaded_s=None if t_load is None else (t_load - t0) / 1e9,
                    first_answer_s=None,
                    all_clients_s=(t_all - t0) / 1e9,
                    rss=proc.memory_info().rss,
                    fds=proc.num_fds(),
                )
            )
            if len(done) == swaps // 2:
                rss_mid = done[-1].rss
            if len(done) % 10 == 0:
                log(f"{mode}: {len(done)}/{swaps} swaps")
        swaps_to = now()
        # The last swapped-out version drains and is released; then the after-reading.
        assert server.log_path is not None
        log_path = server.log_path

        def released() -> int:
            return len(RELEASED.findall(log_path.read_bytes()))

        _wait(lambda: released() >= len(done), 10)
        time.sleep(0.5)
        rss_after, fds_after = proc.memory_info().rss, proc.num_fds()
        n_released = released()
    finally:
        calls = pool.stop() if started else None
        if control is not None:
            control.close()
        code = server.stop()
    if code not in (0, None):
        error = (error + f"; server exited with {code}").lstrip("; ")

    assert calls is not None
    for s in done:
        first = calls.first_answer(s.version)
        s.first_answer_s = None if first is None else (first - s.publish_ns) / 1e9
    wrong = int(np.count_nonzero(calls.action != calls.version % 4))
    went_back = 0
    missed = []
    expected = set(range(1, len(done) + 2))
    for slot in range(pool.clients):
        seq = calls.version[calls.slot == slot]
        went_back += int(np.any(np.diff(seq) < 0))
        missed += [(slot, v) for v in sorted(expected - set(seq.tolist()))]
    return ModeResult(
        mode=mode,
        clients=pool.describe(),
        swaps_requested=swaps,
        swaps=done,
        total_calls=calls.total,
        failed_calls=len(calls.failures),
        failure_samples=sorted({f[3] for f in calls.failures})[:10],
        wrong_answers=wrong,
        went_back=went_back,
        missed=missed,
        steady=Window.of(
            calls.latencies_ms(steady_from, steady_to), (steady_to - steady_from) / 1e9
        ),
        during=Window.of(calls.latencies_ms(swaps_from, swaps_to), (swaps_to - swaps_from) / 1e9),
        released=n_released,
        rss_before=rss_before,
        rss_after=rss_after,
        rss_mid=rss_mid,
        fds_before=fds_before,
        fds_after=fds_after,
        error=error,
        tolerances=tolerances or Tolerances(),
    )
