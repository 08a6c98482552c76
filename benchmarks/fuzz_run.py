"""Bad input at volume: malformed ModelInfer and ModelStreamInfer requests against a real server.

What it does, in one run:

* builds a temporary sealed repository with the standard test models (`policy`, `simple`,
  `all_types` of `testkit/model_builders.py`) and starts the real `forseti serve` on free
  loopback ports (explicit mode, every model loaded);
* checks each model answers a valid request, then sends a warm-up batch (the biggest
  messages of the run, then drawn ones, unary and stream);
* sends `--count` malformed ModelInfer requests, one at a time, each drawn by hypothesis from
  `testkit/fuzz_requests.malformed_cases` (mutated valid requests: wrong datatypes,
  shapes, huge or negative dims, byte counts, missing / extra / duplicate tensors, raw and
  typed contents mixed, parameters of every kind with odd values, odd model names and
  versions; random requests; invalid UTF-8 in every string field, crafted on the wire;
  random, corrupted and oversized bytes; protobuf framing tricks);
* sends `--stream-count` malformed messages on ModelStreamInfer streams, a few per stream,
  each stream ending with a valid request that must still be answered on it;
* samples the server's RSS (psutil) every 100 requests: "before" is the median of the first
  five samples, "after" of the last five (single readings swing by tens of MB with the big
  messages in flight);
* checks the server still answers a valid request on each model, and prints a table:
  verdicts per status code, server crashes, RSS before / after, latencies.

A verdict is the gRPC status code (unary), ERROR_MESSAGE (a stream's error answer) or OK, or
one of the contract breaches of `fuzz_requests.BAD`: UNKNOWN, INTERNAL, HANG (no answer by the
deadline), STATUS_LOST (the server's status message too big for the client to read),
STREAM_ENDED (a stream ended before answering every message), ACCEPTED_INVALID (OK for a
request that is malformed beyond doubt), REJECTED_VALID (an error for a valid one).

If the server dies, the crash is counted with the request that preceded it, and a new server
is started so the run can go on. It exits 1 if the server crashed, any breach came back, the
final valid request failed, or RSS grew by more than `--max-rss-growth-mb`; otherwise 0.

    .venv/bin/python -m benchmarks.fuzz_run                        # 10,000 of each, ~4 minutes
    .venv/bin/python -m benchmarks.fuzz_run --count 2000 --stream-count 500 --seed 7
    .venv/bin/python -m benchmarks.fuzz_run --save-failures /tmp/fuzz-failures
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
from hypothesis import HealthCheck, Phase, given, seed, settings

from testkit.fuzz_requests import (
    BAD,
    MODEL_NAMES,
    Case,
    Outcome,
    RssSamples,
    malformed_cases,
    send_stream,
    send_unary,
    stream_batches,
    stream_stub,
    unary_stub,
    valid_case,
    warmup_cases,
)

if TYPE_CHECKING:
    from testkit.server_process import ServerProcess

MB = 1024 * 1024


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate],  # every example is a request to send; nothing to shrink
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )


def drive(strategy, examples: int, run_seed: int, send: Callable) -> None:
    """Draw `examples` values of `strategy` with hypothesis and hand each to `send`."""

    @seed(run_seed)
    @_settings(examples)
    @given(strategy)
    def run(value) -> None:
        send(value)

    run()


class Fuzzer:
    """Holds the server (restarting it after a crash), the channel and the outcomes."""

    def __init__(self, workdir: Path, deadline: float) -> None:
        from forseti.core.sealing.keyring import Keyring
        from testkit.model_builders import build_repository

        self.workdir = workdir
        self.deadline = deadline
        self.repo = workdir / "repo"
        self.repo.mkdir()
        self.keyring_path = workdir / "keyring.json"
        keyring = Keyring.generate()
        keyring.save(self.keyring_path)
        build_repository(self.repo, keyring)
        self.crashes: list[tuple[str, Case | None, str]] = []
        self.unary: list[Outcome] = []
        self.stream: list[Outcome] = []  # malformed messages and the valid one closing each stream
        self.streams = 0
        self.last_case: Case | None = None
        self.server: ServerProcess  # set by start()
        self.channel: grpc.Channel | None = None
        self.start()

    def start(self) -> None:
        from testkit.server_process import ServerProcess

        self.server = ServerProcess(
            self.repo,
            self.keyring_path,
            ["--model-control-mode", "explicit", "--load-model", "*"],
            log_path=self.workdir / f"server-{len(self.crashes)}.log",
        ).start()
        self.rss = RssSamples(self.server.pid)
        if self.channel is not None:
            self.channel.close()
        self.channel = grpc.insecure_channel(self.server.url)
        self.unary_call = unary_stub(self.channel)
        self.stream_call = stream_stub(self.channel)

    @property
    def malformed_stream(self) -> list[Outcome]:
        return [o for o in self.stream if o.case.label != "valid"]

    def check_alive(self, where: str) -> bool:
        """If the server has exited, count the crash and start a new one."""
        proc = self.server.proc
        assert proc is not None, "start() started it"
        if proc.poll() is None:
            return True
        code = proc.returncode
        self.crashes.append((f"{where}: exit code {code}", self.last_case, self.server.log()))
        self.start()
        return False

    def send_unary(self, case: Case, record: bool = True) -> None:
        self.last_case = case
        outcome = send_unary(self.unary_call, case, self.deadline)
        if not record:
            return
        self.unary.append(outcome)
        if len(self.unary) % 100 == 0:
            self.rss.sample()
        if outcome.verdict in ("UNAVAILABLE", "HANG") or len(self.unary) % 100 == 0:
            self.check_alive("ModelInfer")

    def send_stream(self, cases: list[Case], record: bool = True) -> None:
        self.last_case = cases[0]
        outcomes = send_stream(self.stream_call, cases, self.deadline * 3)
        if not record:
            return
        before = len(self.stream) // 100
        self.stream.extend(outcomes)
        self.streams += 1
        if len(self.stream) // 100 > before:
            self.rss.sample()
        if any(o.verdict in ("STREAM_ENDED", "HANG") for o in outcomes) or self.streams % 20 == 0:
            self.check_alive("ModelStreamInfer")

    def valid_everywhere(self) -> list[str]:
        """Problems answering one valid request per model, unary and on a stream."""
        problems = []
        for model in MODEL_NAMES:
            case = valid_case(f"check-{model}", model)
            outcome = send_unary(self.unary_call, case, self.deadline)
            if outcome.verdict != "OK":
                problems.append(f"{model} unary: {outcome.verdict} {outcome.detail}")
            [outcome] = send_stream(self.stream_call, [case], self.deadline)
            if outcome.verdict != "OK":
                problems.append(f"{model} stream: {outcome.verdict} {outcome.detail}")
        return problems

    def stop(self) -> int | None:
        if self.channel is not None:
            self.channel.close()
        return self.server.stop()


def _ms(outcomes: list[Outcome], q: float) -> float:
    if not outcomes:
        return float("nan")
    return float(np.percentile([o.seconds for o in outcomes], q)) * 1e3


def print_table(f: Fuzzer, args: argparse.Namespace, final: list[str]) -> None:
    malformed = f.malformed_stream
    unary, stream = Counter(o.verdict for o in f.unary), Counter(o.verdict for o in f.stream)
    print()
    print(
        f"fuzz run, seed {args.seed}: {len(f.unary):,} malformed ModelInfer requests, "
        f"{len(malformed):,} malformed ModelStreamInfer messages on {f.streams:,} streams "
        f"(each stream closed by a valid request: +{len(f.stream) - len(malformed):,})"
    )
    verdicts = sorted(set(unary) | set(stream), key=lambda v: (v in BAD, -unary[v] - stream[v]))
    print(f"{'verdict':<22} {'ModelInfer':>11} {'StreamInfer':>12}")
    print("-" * 47)
    for v in verdicts:
        mark = "  <- breach" if v in BAD else ""
        print(f"{v:<22} {unary[v]:>11,} {stream[v]:>12,}{mark}")
    print("-" * 47)
    print(f"{'total':<22} {len(f.unary):>11,} {len(f.stream):>12,}")
    expect_u = Counter(o.case.expect for o in f.unary)
    expect_s = Counter(o.case.expect for o in f.stream)
    for e in ("invalid", "any", "valid"):
        print(f"{'  of which ' + e:<22} {expect_u[e]:>11,} {expect_s[e]:>12,}")
    print()
    rss = f.rss
    print(f"server crashes (exits)     {len(f.crashes)}")
    print(
        f"server RSS, MB             before {rss.before / MB:.1f}, after {rss.after / MB:.1f}: "
        f"{rss.growth / MB:+.1f} (limit +{args.max_rss_growth_mb:g}; median of "
        f"{rss.window} samples, one per 100 requests; max {max(rss.samples) / MB:.1f})"
    )
    for name, outcomes in (("ModelInfer", f.unary), ("stream message", malformed)):
        print(
            f"latency {name + ',':<18} p50 {_ms(outcomes, 50):.2f} ms, p99 {_ms(outcomes, 99):.2f}"
            f" ms, max {_ms(outcomes, 100):.1f} ms"
        )
    print(f"valid requests at the end  {'answered' if not final else '; '.join(final)}")

    lenient: dict[str, Counter] = {}
    for o in [*f.unary, *malformed]:
        if o.case.expect == "any":
            lenient.setdefault(o.case.why, Counter())[o.verdict] += 1
    if lenient:
        print()
        print("requests a server may take or refuse (expected 'any'), by reason:")
        for why, counts in sorted(lenient.items(), key=lambda kv: -sum(kv[1].values())):
            shown = ", ".join(f"{v} {n}" for v, n in counts.most_common())
            print(f"  {why[:60]:<60} {shown}")
    kinds = Counter(o.case.label.split("+")[0].split(".")[0] for o in [*f.unary, *malformed])
    print()
    print("requests by how they were made (first mutation):")
    print(
        textwrap.fill(
            ", ".join(f"{k} {n}" for k, n in kinds.most_common()),
            96,
            initial_indent="  ",
            subsequent_indent="  ",
        )
    )
    print()
    step = max(len(rss.samples) // 20, 1)
    print(f"server RSS, MB, every {step * 100:,} requests:")
    print(
        textwrap.fill(
            " ".join(f"{r / MB:.0f}" for r in rss.samples[::step]),
            96,
            initial_indent="  ",
            subsequent_indent="  ",
        )
    )
    print("slowest answers:")
    for o in sorted([*f.unary, *malformed], key=lambda o: o.seconds, reverse=True)[:5]:
        label = o.case.label[:40]
        print(
            f"  {o.seconds * 1e3:8.1f} ms  {o.verdict:<18} {label:<40} {len(o.case.payload):>10,} B"
        )


def report_breaches(f: Fuzzer, save: Path | None, per_kind: int = 2) -> list:
    """Print the first breaches of each (call, verdict, kind of request); save them all."""
    breaches = [("unary", o) for o in f.unary if o.bad]
    breaches += [("stream", o) for o in f.stream if o.bad]
    if not breaches and not f.crashes:
        return breaches
    print()
    print(f"breaches ({len(breaches)}; the first {per_kind} of each call, verdict and kind):")
    shown: Counter = Counter()
    for kind, o in breaches:
        key = (kind, o.verdict, o.case.label.split("+")[0].split(".")[0])
        if shown[key] < per_kind:
            shown[key] += 1
            print(f"--- [{kind}] {o.describe()}")
    for what, case, log in f.crashes:
        print(f"--- CRASH {what}; the last request sent:")
        print(case.describe() if case else "(none)")
        print("server log tail:\n" + log[-2000:])
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        for i, (kind, o) in enumerate(breaches):
            stem = save / f"{i:05d}-{kind}-{o.verdict}"
            stem.with_suffix(".bin").write_bytes(o.case.payload)
            stem.with_suffix(".txt").write_text(o.describe() + "\n")
        print(f"\n{len(breaches)} breaches saved in {save} (<n>.bin: the request's bytes)")
    return breaches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=10_000, help="malformed ModelInfer calls")
    parser.add_argument(
        "--stream-count", type=int, help="malformed stream messages (default: --count)"
    )
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    parser.add_argument("--warmup", type=int, default=500, help="drawn unary calls in the warm-up")
    parser.add_argument("--deadline", type=float, default=10.0, help="per-call deadline, s")
    parser.add_argument("--max-rss-growth-mb", type=float, default=20.0)
    parser.add_argument("--save-failures", type=Path, help="folder to write breach payloads to")
    parser.add_argument("--keep", action="store_true", help="keep the repository and server log")
    args = parser.parse_args(argv)
    stream_count = args.count if args.stream_count is None else args.stream_count

    workdir = Path(tempfile.mkdtemp(prefix="forseti-fuzz-"))
    started = time.monotonic()
    f = Fuzzer(workdir, args.deadline)
    failed = True
    try:
        problems = f.valid_everywhere()
        if problems:
            print("the server does not answer valid requests:", *problems, sep="\n  ")
            return 1

        def progress(what: str, done: int, total: int) -> None:
            print(f"  {what}: {done:,}/{total:,} ({time.monotonic() - started:.0f} s)", flush=True)

        print(f"server {f.server.url} (pid {f.server.pid}); warming up", flush=True)
        for case in warmup_cases():
            f.send_unary(case, record=False)
        drive(malformed_cases(), args.warmup, args.seed + 1, lambda c: f.send_unary(c, False))
        drive(
            stream_batches(),
            args.warmup // 10 + 1,
            args.seed + 2,
            lambda b: f.send_stream(b, False),
        )
        f.rss.sample()

        def unary(case: Case) -> None:
            f.send_unary(case)
            if len(f.unary) % 1000 == 0:
                progress("ModelInfer", len(f.unary), args.count)

        drive(malformed_cases(), args.count, args.seed, unary)

        def stream(batch: list[Case]) -> None:
            sent = len(f.malformed_stream)
            if sent < stream_count:
                f.send_stream([*batch[:-1][: stream_count - sent], batch[-1]])
                if len(f.malformed_stream) // 1000 > sent // 1000:
                    progress("ModelStreamInfer messages", len(f.malformed_stream), stream_count)

        round_ = 0
        while len(f.malformed_stream) < stream_count:  # about 4.5 malformed messages a stream
            left = stream_count - len(f.malformed_stream)
            drive(stream_batches(), math.ceil(left / 4) + 1, args.seed + 1000 + round_, stream)
            round_ += 1

        f.rss.sample()
        final = f.valid_everywhere()
        f.check_alive("end of run")
        print_table(f, args, final)
        breaches = report_breaches(f, args.save_failures)
        grew = f.rss.growth / MB > args.max_rss_growth_mb
        failed = bool(breaches or f.crashes or final or grew)
        kept = f"; server log kept in {workdir}" if (args.keep or failed) else ""
        print(f"\n{time.monotonic() - started:.0f} s in all{kept}")
        print("FAIL" if failed else "PASS")
        return 1 if failed else 0
    finally:
        f.stop()
        if not (args.keep or failed):
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
