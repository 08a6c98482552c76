"""Hot swaps under load: 16+ concurrent decision clients while 50+ new versions go live.

What it does, per control mode (`--mode explicit|poll|both`):

* builds a temporary sealed repository holding `policy` v1 and starts the real `forseti serve`
  on free loopback ports: explicit mode (`--load-model policy`), or poll mode with a short
  poll interval (`--repository-poll-secs 0.2`); the default version policy (`latest 1`)
  applies, so every swap releases the version it replaces;
* keeps `--clients` closed-loop clients calling `policy` with no version named, spread over
  client worker *processes* (spawned; default 4 x 4 threads, because one Python process is
  GIL-bound on a 2-CPU box), each thread with its own `tritonclient.grpc` client and
  connection; every answer is recorded with its start/end time, `model_version` and action;
* measures a steady window first (no swaps), then publishes `--swaps` new versions one after
  the other, each with `testkit.model_builders.publish_sealed` (hidden temporary folder, then
  one rename): version N is `policy_onnx(N)`, whose action is N % 4, so every answer names
  the version that produced it twice. Explicit mode calls RepositoryModelLoad after each
  publish; poll mode only waits. The next version is published once every client has been
  answered by the new one (in poll mode after a random part of the poll interval, so that
  publishes do not fall in step with the poller);
* reads the server's RSS and open file descriptors (psutil on the server pid) before the
  swaps, after each swap, and after the last one once the released versions are gone;
* prints a table: total and failed calls, wrong answers (action != version % 4), versions a
  client never saw, p50/p99/max latency in the steady window vs during the swaps, swap time
  (publish -> first answer from the new version, and -> every client on it), versions
  released (server log), RSS and fds before/after and their growth.

It exits 1 when a call failed, an answer was wrong, a client missed a version, a swap timed
out, or RSS / fds grew past the tolerances; 2 when the run itself failed.

    .venv/bin/python -m benchmarks.swap_under_load                     # both modes, ~1 minute
    .venv/bin/python -m benchmarks.swap_under_load --mode poll --swaps 100 --json swap.json

The harness lives in `testkit/swap_harness.py`; tests/test_swap_under_load.py runs it with
fewer swaps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

from testkit.swap_harness import MODEL, MODES, ClientPool, ModeResult, Tolerances, run_mode

# ---- report -----------------------------------------------------------------------------


def _mean(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else float("nan")


def _max(xs: list[float]) -> float:
    return float(np.max(xs)) if xs else float("nan")


def table(results: list[ModeResult]) -> str:
    def mib(b: int) -> str:
        return f"{b / 2**20:.1f}"

    rows: list[tuple[str, Callable[[ModeResult], str]]] = [
        ("clients", lambda r: r.clients),
        ("swaps done", lambda r: f"{len(r.swaps)}/{r.swaps_requested}"),
        ("total calls", lambda r: f"{r.total_calls}"),
        ("failed calls", lambda r: f"{r.failed_calls}"),
        ("wrong answers", lambda r: f"{r.wrong_answers}"),
        ("versions missed by a client", lambda r: f"{len(r.missed)}"),
        ("steady: calls/s", lambda r: f"{r.steady.rps:.0f}"),
        ("steady: p50 ms", lambda r: f"{r.steady.p50_ms:.2f}"),
        ("steady: p99 ms", lambda r: f"{r.steady.p99_ms:.2f}"),
        ("steady: max ms", lambda r: f"{r.steady.max_ms:.1f}"),
        ("during swaps: calls/s", lambda r: f"{r.during.rps:.0f}"),
        ("during swaps: p50 ms", lambda r: f"{r.during.p50_ms:.2f}"),
        ("during swaps: p99 ms", lambda r: f"{r.during.p99_ms:.2f}"),
        ("during swaps: max ms", lambda r: f"{r.during.max_ms:.1f}"),
        (
            "publish (seal+write) mean ms",
            lambda r: f"{_mean([s.published_s for s in r.swaps]) * 1e3:.1f}",
        ),
        (
            "load_model returned mean ms",
            lambda r: (
                f"{_mean([s.loaded_s for s in r.swaps if s.loaded_s is not None]) * 1e3:.1f}"
                if r.mode == "explicit"
                else "-"
            ),
        ),
        (
            "swap: publish->first answer mean ms",
            lambda r: f"{_mean([s.first_answer_s for s in r.swaps if s.first_answer_s]) * 1e3:.1f}",
        ),
        (
            "swap: publish->first answer max ms",
            lambda r: f"{_max([s.first_answer_s for s in r.swaps if s.first_answer_s]) * 1e3:.1f}",
        ),
        (
            "swap: publish->all clients mean ms",
            lambda r: f"{_mean([s.all_clients_s for s in r.swaps]) * 1e3:.1f}",
        ),
        ("versions released (log)", lambda r: f"{r.released}"),
        ("server RSS before MiB", lambda r: mib(r.rss_before)),
        ("server RSS half-way MiB", lambda r: mib(r.rss_mid)),
        ("server RSS after MiB", lambda r: mib(r.rss_after)),
        ("server RSS growth MiB", lambda r: f"{r.rss_growth_mib:+.1f}"),
        ("server open fds before", lambda r: f"{r.fds_before}"),
        ("server open fds after", lambda r: f"{r.fds_after}"),
        ("server open fds growth", lambda r: f"{r.fd_growth:+d}"),
        ("verdict", lambda r: "PASS" if r.ok else "FAIL"),
    ]
    width = max(len(name) for name, _ in rows)
    cols = [max(12, len(r.clients) + 1) for r in results]
    lines = [
        f"{'':<{width}}" + "".join(f" {r.mode:>{c}}" for r, c in zip(results, cols, strict=True))
    ]
    lines.append("-" * len(lines[0]))
    for name, fmt in rows:
        lines.append(
            f"{name:<{width}}"
            + "".join(f" {fmt(r):>{c}}" for r, c in zip(results, cols, strict=True))
        )
    return "\n".join(lines)


# ---- command line -----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.swap_under_load",
        description=(
            "Publish and hot-swap many policy versions into `forseti serve` while concurrent "
            "clients make decision calls; report failed calls, latency steady vs during swaps, "
            "swap times and server RSS / open fds before and after."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--mode", choices=("explicit", "poll", "both"), default="both")
    p.add_argument("--swaps", type=int, default=50, help="versions published and swapped in")
    p.add_argument("--clients", type=int, default=16, help="concurrent closed-loop clients")
    p.add_argument("--procs", type=int, default=4, help="client worker processes")
    p.add_argument("--steady", type=float, default=5.0, help="seconds of steady window")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before the steady window")
    p.add_argument("--poll-secs", type=float, default=0.2, help="poll mode's poll interval")
    p.add_argument(
        "--swap-timeout", type=float, default=20.0, help="seconds one swap may take at most"
    )
    p.add_argument(
        "--rss-tolerance-mib",
        type=float,
        default=Tolerances.rss_mib,
        help="server RSS growth (after - before the swaps) allowed before the run fails",
    )
    p.add_argument(
        "--fd-tolerance",
        type=int,
        default=Tolerances.fds,
        help="growth of the server's open file descriptors allowed before the run fails",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.swaps < 1 or args.clients < 1 or args.procs < 1 or args.steady <= 0:
        print(
            "swap_under_load: --swaps, --clients, --procs and --steady must be > 0", file=sys.stderr
        )
        return 2
    modes = list(MODES) if args.mode == "both" else [args.mode]
    tol = Tolerances(rss_mib=args.rss_tolerance_mib, fds=args.fd_tolerance)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop server and workers
    started = time.monotonic()
    results: list[ModeResult] = []
    try:
        with (
            tempfile.TemporaryDirectory(prefix="forseti-swap-") as tmp,
            ClientPool(args.clients, args.procs) as pool,
        ):
            for mode in modes:
                results.append(
                    run_mode(
                        pool,
                        Path(tmp),
                        mode,
                        args.swaps,
                        steady_s=args.steady,
                        warmup_s=args.warmup,
                        poll_secs=args.poll_secs,
                        swap_timeout_s=args.swap_timeout,
                        tolerances=tol,
                        log=lambda msg: print(msg, flush=True),
                    )
                )
    except Exception as exc:
        traceback.print_exc()
        print(f"swap_under_load: the run failed: {exc}", file=sys.stderr)
        return 2
    print()
    print(
        f"hot swaps of '{MODEL}' under load: {args.clients} closed-loop tritonclient.grpc "
        f"clients, {args.steady:g}s steady window, poll interval {args.poll_secs:g}s, "
        f"{os.cpu_count()} CPUs"
    )
    print(table(results))
    for r in results:
        for problem in r.problems():
            print(f"{r.mode}: {problem}")
    print(f"\n(total {time.monotonic() - started:.0f}s)")
    if args.json is not None:
        doc = {
            "settings": vars(args) | {"json": str(args.json)},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "results": [r.summary() for r in results],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
