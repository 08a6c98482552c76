"""`forseti loadtest`: a bounded, headless locust run against a server, checked against targets.

It runs the users of `loadtests/locustfile.py` (unary ModelInfer or ModelStreamInfer decision
calls through tritonclient.grpc) with locust's own machinery -- `locust.env.Environment`, a
`LocalRunner` in this process, or a `MasterRunner` here plus K `locust --worker` processes --
for --duration seconds (counted from the start, ramp-up included, as locust's --run-time), then
prints locust's statistics as a percentile table and checks two targets on the aggregate:

    p99 <= --p99-ms (default 10)          failure rate <= --max-failure-rate (default 0)

Exit status: 0 both targets met; 1 a target missed (or no call completed, or the load generator
raised); 2 the test could not run (bad option, server unreachable, workers did not connect).

    forseti loadtest --model policy --users 16 --duration 20
    forseti loadtest --model policy --users 64 --stream --csv results/policy --plot results/p.png

Locust (and matplotlib, for --plot) are imported only when the command runs: they come with
the `load` extra (`pip install 'forseti[load]'`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import faulthandler
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

USERS_PER_PROCESS = 16  # --workers auto: one process up to this many users
DEFAULT_HOST = "127.0.0.1:8001"
LATENCY_WINDOW_S = 2  # window of the latency-over-time curves (locust's default is 10 s)
WORKER_CONNECT_TIMEOUT_S = 60.0


# ---- options ---------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """`20`, `20s`, `1.5m`, `1h` -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 20, 20s, 2m or 1h, got '{text}'"
        )
    value = float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2) or "s"]
    if value <= 0:
        raise argparse.ArgumentTypeError("the duration must be more than 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _workers(text: str) -> int | None:
    if text == "auto":
        return None
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected auto or a count >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="forseti loadtest",
        description=(
            "Run a bounded locust load test of decision calls (tritonclient.grpc, unary or "
            "streaming) against a Triton-protocol server, print p50/p90/p99/max, req/s and "
            "failures, and exit 1 when a target is missed (0 when both are met, 2 when the test "
            "could not run)."
        ),
    )
    target = p.add_argument_group("what to call")
    target.add_argument(
        "--url",
        "--host",
        dest="url",
        default=DEFAULT_HOST,
        help=f"server's gRPC host:port (default {DEFAULT_HOST})",
    )
    target.add_argument(
        "--model", default="", help="model to call (default: the server's only ready model)"
    )
    target.add_argument("--model-version", default="", help="version (default: newest ready)")
    target.add_argument(
        "--batch-size", type=_positive_int, default=1, help="rows per call (default 1)"
    )
    target.add_argument(
        "--input-npy",
        default="",
        metavar="FILE | NAME=FILE[,NAME=FILE]",
        help="input rows from .npy files ([N, *dims] each) instead of random data of the "
        "shape and datatype ModelMetadata gives",
    )
    target.add_argument(
        "--stream",
        action="store_true",
        help="call over ModelStreamInfer (one bidirectional stream per user) instead of unary "
        "ModelInfer",
    )
    target.add_argument(
        "--call-timeout",
        type=float,
        default=10.0,
        help="seconds before a call counts as failed (default 10)",
    )
    load = p.add_argument_group("load")
    load.add_argument(
        "--users", type=_positive_int, default=16, help="concurrent users (default 16)"
    )
    load.add_argument(
        "--spawn-rate",
        type=float,
        default=None,
        help="users started per second (default: all of them within one second)",
    )
    load.add_argument(
        "--duration",
        type=parse_duration,
        default=30.0,
        help="length of the test from its start, ramp-up included: 20, 20s, 2m (default 30 s)",
    )
    load.add_argument(
        "--workers",
        type=_workers,
        default=None,
        metavar="auto|K",
        help=f"locust worker processes (plus a master); 0: all users in this process; "
        f"auto (default): one process up to {USERS_PER_PROCESS} users, else "
        f"min(cpu count, users // {USERS_PER_PROCESS})",
    )
    targets = p.add_argument_group("targets (exit 1 when one is missed)")
    targets.add_argument(
        "--p99-ms", type=float, default=10.0, help="highest acceptable p99, ms (default 10)"
    )
    targets.add_argument(
        "--max-failure-rate",
        type=float,
        default=0.0,
        help="highest acceptable share of failed calls, 0.01 = 1%% (default 0)",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--csv",
        metavar="PREFIX",
        default=None,
        help="write locust's PREFIX_stats.csv, _stats_history.csv, _failures.csv and "
        "_exceptions.csv, and PREFIX_summary.csv with the printed table",
    )
    out.add_argument(
        "--plot",
        metavar="FILE.png",
        type=Path,
        default=None,
        help="write a latency-over-time plot (needs matplotlib)",
    )
    out.add_argument(
        "--loglevel",
        default="WARNING",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="locust's log level (default WARNING)",
    )
    return p


def auto_workers(users: int, cpus: int | None = None) -> int:
    """0 (one process) up to USERS_PER_PROCESS users, else min(cpus, users // 16) workers."""
    if users <= USERS_PER_PROCESS:
        return 0
    k = min(cpus or os.cpu_count() or 1, users // USERS_PER_PROCESS)
    return k if k > 1 else 0


# ---- results ---------------------------------------------------------------------------------


@dataclass
class Row:
    type: str
    name: str
    requests: int
    failures: int
    rps: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    avg_ms: float | None

    @property
    def failure_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


@dataclass
class Result:
    model: str
    rows: list[Row]
    total: Row
    errors: list[tuple[str, str, str, int]]  # (type, name, error, occurrences)
    exceptions: list[tuple[int, str, str]]  # (count, message, traceback)
    peak_in_flight: int
    peak_cpu: float
    processes: str
    timeline: list[dict] = field(default_factory=list)  # per second: t, users, p50, p99, rps
    checks: list[tuple[str, bool]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(ok for _, ok in self.checks)


def _row(entry, type_: str, name: str) -> Row:
    n = entry.num_requests
    return Row(
        type=type_,
        name=name,
        requests=n,
        failures=entry.num_failures,
        rps=entry.total_rps,
        p50_ms=entry.get_response_time_percentile(0.50) if n else None,
        p90_ms=entry.get_response_time_percentile(0.90) if n else None,
        p99_ms=entry.get_response_time_percentile(0.99) if n else None,
        max_ms=entry.max_response_time if n else None,
        avg_ms=entry.avg_response_time if n else None,
    )


def _ms(value: float | None) -> str:
    """Three significant digits, the resolution of the histogram below 100 ms."""
    if value is None:
        return "-"
    for limit, digits in ((1, 3), (10, 2), (100, 1)):
        if value < limit:
            return f"{value:.{digits}f}"
    return f"{value:.0f}"


def format_table(result: Result) -> str:
    rows = [*result.rows, result.total]
    headers = (
        "type",
        "name",
        "reqs",
        "fails",
        "fail %",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
    )
    cells = [
        (
            r.type,
            r.name,
            str(r.requests),
            str(r.failures),
            f"{100 * r.failure_rate:.2f}",
            f"{r.rps:.1f}",
            _ms(r.p50_ms),
            _ms(r.p90_ms),
            _ms(r.p99_ms),
            _ms(r.max_ms),
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    left = 2  # type and name are left-aligned

    def line(values) -> str:
        return "  ".join(
            v.ljust(w) if i < left else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(c) for c in cells[:-1]]
    if len(cells) > 1:
        out.append("  ".join("-" * w for w in widths))
    out.append(line(cells[-1]))
    return "\n".join(out)


def write_summary_csv(path: Path, result: Result) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "type",
                "name",
                "requests",
                "failures",
                "failure_rate",
                "requests_per_s",
                "p50_ms",
                "p90_ms",
                "p99_ms",
                "max_ms",
                "avg_ms",
            ]
        )
        for r in [*result.rows, result.total]:
            w.writerow(
                [
                    r.type,
                    r.name,
                    r.requests,
                    r.failures,
                    f"{r.failure_rate:.6f}",
                    f"{r.rps:.3f}",
                    *("" if v is None else f"{v:.3f}" for v in (r.p50_ms, r.p90_ms, r.p99_ms)),
                    "" if r.max_ms is None else f"{r.max_ms:.3f}",
                    "" if r.avg_ms is None else f"{r.avg_ms:.3f}",
                ]
            )


def check_matplotlib() -> str | None:
    """None when matplotlib can be imported, else what to do about it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return (
            "--plot needs matplotlib, which is not installed; install it with "
            "`pip install matplotlib` (or the load extra: `pip install 'forseti[load]'`)"
        )
    return None


def write_plot(path: Path, result: Result, title: str, p99_target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in result.timeline]
    fig, (lat, thr) = plt.subplots(2, 1, sharex=True, figsize=(10, 7), constrained_layout=True)
    for key, label, style in (("p50", "p50", "-"), ("p99", "p99", "-")):
        pts = [(s["t"], s[key]) for s in result.timeline if s.get(key) is not None]
        if pts:
            lat.plot([x for x, _ in pts], [y for _, y in pts], style, label=label)
    lat.axhline(p99_target, color="red", linestyle="--", linewidth=1, label="p99 target")
    lat.set_ylabel(f"latency, ms (last {LATENCY_WINDOW_S} s)")
    lat.set_ylim(bottom=0)
    lat.grid(True, alpha=0.3)
    lat.legend(loc="upper left")
    thr.plot(t, [s["rps"] for s in result.timeline], label="calls/s")
    if any(s["fails"] for s in result.timeline):
        thr.plot(t, [s["fails"] for s in result.timeline], color="red", label="failures/s")
    thr.set_ylabel("per second")
    thr.set_xlabel("seconds since start")
    thr.set_ylim(bottom=0)
    thr.grid(True, alpha=0.3)
    users = thr.twinx()
    users.plot(t, [s["users"] for s in result.timeline], color="gray", linestyle=":", label="users")
    users.set_ylabel("users")
    users.set_ylim(bottom=0)
    lines = thr.get_legend_handles_labels()
    more = users.get_legend_handles_labels()
    thr.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- the run ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SetupError(Exception):
    """The test could not run (exit 2)."""


def _preflight(args, lf) -> str:
    """Reach the server, resolve the model, and build one user's input data, so that a wrong
    option fails at once. A model the server cannot serve is only warned about: the test runs
    and counts the failures."""
    from tritonclient.utils import InferenceServerException

    client = lf.make_client(args.url)
    try:
        try:
            live = client.is_server_live(client_timeout=10)
        except InferenceServerException as exc:
            raise SetupError(f"cannot reach a server at {args.url}: {exc}") from None
        if not live:
            raise SetupError(f"the server at {args.url} says it is not live")
        model = args.model
        try:
            if not model:
                model = lf.resolve_model(client)
            lf.build_input_data(
                client,
                model,
                args.model_version,
                args.batch_size,
                args.input_npy,
                seed=0,
                timeout=10,
            )
        except ValueError as exc:
            raise SetupError(str(exc)) from None
        except InferenceServerException as exc:
            print(
                f"warning: model '{model}' at {args.url}: {exc}; running anyway, every call "
                "will count as a failure",
                file=sys.stderr,
            )
        return model
    finally:
        client.close()


def _stop_timeout(args) -> int:
    """Seconds a stopping user may take to finish its call: every call ends or times out."""
    return math.ceil(args.call_timeout) + 1


def _locust_args(args, model: str) -> list[str]:
    """The locustfile's own options, as locust's command line takes them (workers too)."""
    return [
        "--host",
        args.url,
        "--model",
        model,
        "--model-version",
        args.model_version,
        "--batch-size",
        str(args.batch_size),
        "--input-npy",
        args.input_npy,
        "--call-timeout",
        str(args.call_timeout),
        "--stop-timeout",
        str(_stop_timeout(args)),
    ]


def run(args) -> Result:
    import gevent
    import locust
    import locust.argument_parser
    import locust.log
    import locust.runners
    import locust.stats
    from locust.env import Environment

    from forseti.loadtests import locustfile as lf

    locust.log.setup_logging(args.loglevel)
    # SIGTERM ends the run as Ctrl-C does: the workers are stopped, nothing is left behind.
    gevent.signal_handler(signal.SIGTERM, gevent.kill, gevent.getcurrent(), KeyboardInterrupt)
    locust.stats.CURRENT_RESPONSE_TIME_PERCENTILE_WINDOW = LATENCY_WINDOW_S

    model = _preflight(args, lf)
    spawn_rate = args.spawn_rate or float(args.users)
    workers = auto_workers(args.users) if args.workers is None else args.workers
    user_class = lf.TritonStreamUser if args.stream else lf.TritonUnaryUser
    locust_args = _locust_args(args, model)
    parser = locust.argument_parser.get_parser(default_config_files=[])
    options = parser.parse_args([*locust_args, user_class.__name__])
    env = Environment(
        user_classes=[user_class],
        events=locust.events,
        host=args.url,
        parsed_options=options,
        stop_timeout=_stop_timeout(args),
    )
    procs: list[subprocess.Popen] = []
    runner: locust.runners.Runner
    master: locust.runners.MasterRunner | None = None  # with worker processes
    if workers:
        port = _free_port()
        runner = master = env.create_master_runner(
            master_bind_host="127.0.0.1", master_bind_port=port
        )
        command = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            lf.__file__,
            "--worker",
            "--master-host",
            "127.0.0.1",
            "--master-port",
            str(port),
            "--loglevel",
            args.loglevel,
            *locust_args,
        ]
        procs = [subprocess.Popen(command, stdin=subprocess.DEVNULL) for _ in range(workers)]
        processes = f"{workers} locust worker processes + master"
    else:
        runner = env.create_local_runner()
        processes = "1 process"
    helpers: list = []
    finished = False
    try:
        if master is not None:
            deadline = time.monotonic() + WORKER_CONNECT_TIMEOUT_S
            while len(master.clients.ready) < workers:
                dead = [p.returncode for p in procs if p.poll() is not None]
                if dead:
                    raise SetupError(f"a locust worker exited with status {dead[0]} at start")
                if time.monotonic() > deadline:
                    raise SetupError(
                        f"only {len(master.clients.ready)} of {workers} locust workers connected "
                        f"in {WORKER_CONNECT_TIMEOUT_S:.0f} s"
                    )
                gevent.sleep(0.1)

        csv_writer = None
        if args.csv:
            Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
            csv_writer = locust.stats.StatsCSVFileWriter(
                env, locust.stats.PERCENTILES_TO_REPORT, args.csv, full_history=False
            )
            helpers.append(gevent.spawn(csv_writer.stats_writer))

        timeline: list[dict] = []
        peak_cpu = [0.0]
        started = time.time()

        def sample() -> None:
            while True:
                gevent.sleep(1.0)
                total = runner.stats.total  # a new object after start() clears the stats
                cpu = (
                    [w.cpu_usage for w in master.clients.values()]
                    if master is not None
                    else [runner.current_cpu_usage]
                )
                peak_cpu[0] = max([peak_cpu[0], *cpu])
                now = time.time()
                timeline.append(
                    {
                        "t": round(now - started, 3),
                        "second": int(now) - 1,  # the last whole second, for the counts
                        "users": runner.user_count,
                        "p50": total.get_current_response_time_percentile(0.5),
                        "p99": total.get_current_response_time_percentile(0.99),
                    }
                )

        helpers.append(gevent.spawn(sample))
        helpers.append(gevent.spawn(runner.start, args.users, spawn_rate))
        gevent.sleep(args.duration)
        if master is not None:
            _quit_master(master, procs, _stop_timeout(args) + 10)
        else:
            runner.quit()
        finished = True
    finally:
        for g in helpers:
            g.kill(block=True)
        if not finished:  # a set-up error or an interrupt: stop everything now
            with contextlib.suppress(Exception):
                runner.quit()
        for p in procs:  # after a finished run they are exiting already
            try:
                p.wait(timeout=15 if finished else 0.5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    stats = runner.stats
    # per-second counts of locust's own counters, keyed by epoch second
    for s in timeline:
        s["rps"] = stats.total.num_reqs_per_sec.get(s["second"], 0)
        s["fails"] = stats.total.num_fail_per_sec.get(s["second"], 0)
    if csv_writer is not None:
        _final_csv(csv_writer, env)

    rows = [_row(e, e.method or "", e.name) for e in locust.stats.sort_stats(stats.entries)]
    result = Result(
        model=model,
        rows=rows,
        total=_row(stats.total, "Aggregated", ""),
        errors=[
            (e.method or "", e.name, str(e.error), e.occurrences)
            for e in sorted(stats.errors.values(), key=lambda e: -e.occurrences)
        ],
        exceptions=[(x["count"], x["msg"], x["traceback"]) for x in runner.exceptions.values()],
        peak_in_flight=lf.peak_in_flight(),
        peak_cpu=peak_cpu[0],
        processes=processes,
        timeline=timeline,
    )
    t = result.total
    result.checks = [
        (f"calls made: {t.requests}", t.requests > 0),
        (
            f"p99 {_ms(t.p99_ms)} ms <= {args.p99_ms:g} ms",
            t.p99_ms is not None and t.p99_ms <= args.p99_ms,
        ),
        (
            f"failure rate {t.failure_rate:.2%} ({t.failures} of {t.requests}) "
            f"<= {args.max_failure_rate:.2%}",
            t.requests > 0 and t.failure_rate <= args.max_failure_rate,
        ),
        (
            f"load generator exceptions: {sum(c for c, _, _ in result.exceptions)}",
            not result.exceptions,
        ),
    ]
    return result


def _quit_master(runner, procs: list[subprocess.Popen], timeout: float) -> None:
    """MasterRunner.quit(), but waiting for the workers' final reports: it tells the workers to
    quit (each stops its users, sends its last statistics, and exits) and then waits only
    0.5 s, and `stop()` first would lose the last second (a stopped worker's reports are
    discarded until it is ready again)."""
    import gevent
    from locust.rpc import Message

    runner.stop(send_stop_to_client=False)
    for client in list(runner.clients.all):
        runner.server.send_to_client(Message("quit", None, client.id))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        gevent.sleep(0.1)
    gevent.sleep(0.2)  # let the last messages in
    runner.greenlet.kill(block=True)


def _final_csv(writer, env) -> None:
    """Rewrite locust's snapshot CSVs once after the run (its writer updates them once a second
    while running, so the last second would otherwise be missing)."""
    import locust.stats

    writer.close_files()
    final = locust.stats.StatsCSV(env, locust.stats.PERCENTILES_TO_REPORT)
    base = writer.base_filepath
    for suffix, write in (
        ("_stats.csv", final.requests_csv),
        ("_failures.csv", final.failures_csv),
        ("_exceptions.csv", final.exceptions_csv),
    ):
        with open(base + suffix, "w", newline="") as f:
            write(csv.writer(f))


def report(args, result: Result, model: str) -> str:
    mode = "ModelStreamInfer (stream)" if args.stream else "ModelInfer (unary)"
    lines = [
        f"forseti loadtest: {args.url}, model {model}, batch {args.batch_size}, "
        f"{mode}, {args.users} users, {args.duration:g} s, {result.processes}",
        "",
        format_table(result),
        "",
        "latency: locust's histogram (3 significant digits below 100 ms); req/s over the whole "
        "run, ramp-up included",
        f"load generator: peak {result.peak_in_flight} calls in flight in one process, "
        + (
            f"peak CPU of a load process {result.peak_cpu:.0f}%"
            if result.peak_cpu > 0
            else "CPU not sampled yet (runs shorter than ~3 s)"
        ),
    ]
    if result.peak_cpu >= 90:
        lines.append(
            "  warning: a load process was CPU-bound, so latencies include client-side queueing; "
            "use more --workers (or another machine)"
        )
    if result.errors:
        lines += ["", "failures:"]
        for type_, name, error, n in result.errors[:10]:
            lines.append(f"  {n:>8}  {type_} {name}: {error}")
        if len(result.errors) > 10:
            lines.append(f"  ... and {len(result.errors) - 10} more kinds (see --csv)")
    if result.exceptions:
        lines += ["", "load generator exceptions:"]
        for count, msg, tb in result.exceptions[:5]:
            lines.append(f"  {count:>8}  {msg}")
            lines += [f"            {x}" for x in tb.strip().splitlines()[-3:]]
    lines += ["", "targets:"]
    lines += [f"  {'ok    ' if ok else 'MISSED'}  {text}" for text, ok in result.checks]
    lines.append("PASS" if result.passed else "FAIL")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.call_timeout <= 0:
        print("forseti loadtest: --call-timeout must be more than 0", file=sys.stderr)
        return 2
    if args.spawn_rate is not None and args.spawn_rate <= 0:
        print("forseti loadtest: --spawn-rate must be more than 0", file=sys.stderr)
        return 2
    if not 0 <= args.max_failure_rate <= 1:
        print("forseti loadtest: --max-failure-rate must be between 0 and 1", file=sys.stderr)
        return 2
    if args.plot is not None and (problem := check_matplotlib()):
        print(f"forseti loadtest: {problem}", file=sys.stderr)
        return 2
    try:
        import locust  # noqa: F401 - monkey-patches this process with gevent
    except ImportError:
        print(
            "forseti loadtest needs locust: pip install 'forseti[load]' (or pip install locust)",
            file=sys.stderr,
        )
        return 2
    # `kill -USR1 <pid>` prints every thread's stack; and a hard stop, should anything
    # deadlock (it prints them too, and exits 1).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    ramp = args.users / (args.spawn_rate or args.users)
    faulthandler.dump_traceback_later(
        args.duration + ramp + 2 * args.call_timeout + WORKER_CONNECT_TIMEOUT_S + 60, exit=True
    )
    try:
        result = run(args)
    except SetupError as exc:
        print(f"forseti loadtest: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("forseti loadtest: interrupted", file=sys.stderr)
        return 130
    finally:
        faulthandler.cancel_dump_traceback_later()
    model = result.model
    print(report(args, result, model))
    if args.csv:
        summary = Path(args.csv + "_summary.csv")
        write_summary_csv(summary, result)
        print(
            f"wrote {args.csv}_stats.csv, _stats_history.csv, _failures.csv, _exceptions.csv, "
            f"{summary.name}"
        )
    if args.plot is not None:
        mode = "stream" if args.stream else "unary"
        t = result.total
        title = (
            f"{model or '?'} b{args.batch_size}, {mode}, {args.users} users: p50 "
            f"{_ms(t.p50_ms)} ms, p99 {_ms(t.p99_ms)} ms, {t.rps:.0f} req/s, "
            f"{t.failures} failures"
        )
        write_plot(args.plot, result, title, args.p99_ms)
        print(f"wrote {args.plot}")
    sys.stdout.flush()
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
