"""Dynamic batching on and off, on models whose compute matters.

What it does, in one run:

* builds a temporary repository, sealed with a keyring made for the run, holding two model
  families with random but seeded weights, each as several models that differ only in their
  scheduling (same ONNX bytes):
    mlp  x FP32 [-1, 1024] -> 4 x (MatMul 1024x1024 + Add + Relu) -> y FP32 [-1, 16]
    cnn  x FP32 [-1, 3, 32, 32] -> 3 x (Conv 3x3 + Relu + MaxPool 2) -> Gemm -> y FP32 [-1, 10]
  both max_batch_size 64; the variants (`--variants`) are
    direct     no dynamic_batching: each request runs as it arrives
    b<D>       dynamic_batching { max_queue_delay_microseconds: D }
    b<D>p<P>   the same with preferred_batch_size P (several joined by '-': b2000p4-16)
    b<D>x<N>   the same with instance_group [ { count: N kind: KIND_CPU } ]
  e.g. `mlp_direct`, `mlp_b500`, `cnn_b0x2`, all served by one `forseti serve`;
* checks that every variant answers a request exactly like its family's `direct` model;
* drives them with the client worker processes of `testkit.load_generator` (real
  `tritonclient.grpc`, one connection per client, closed loops, batch-1 requests): at each
  concurrency level the variants of one family alternate in short slices (ABCCBA order, the
  first part of each slice not recorded) so that all see the same machine;
* reads each model's Triton ModelStatistics when the warm-up ends and when the level ends: the
  mean executed batch size (inference_count / execution_count delta) and, per request, the
  mean time in the server's handler, in the queue and in the backend run of its batch;
* prints a table: model, variant, concurrency, req/s, p50 ms, p99 ms, failures, mean batch,
  server ms, queue ms, infer ms, and req/s relative to `direct` at the same level.

It is a benchmark, not a test: it exits 0 whatever the numbers are, unless the run itself
failed (exit 2).

    .venv/bin/python -m benchmarks.bench_batching                        # ~2.5 minutes
    .venv/bin/python -m benchmarks.bench_batching --duration 4 --json out.json
    .venv/bin/python -m benchmarks.bench_batching --families mlp --variants direct,b0,b500x2
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

# Kept light on purpose: the spawned client workers import this module too.
import numpy as np
import tritonclient.grpc as grpcclient

from testkit.load_generator import LoadGenerator, Target

MAX_BATCH = 64
DEFAULT_VARIANTS = "direct,b0,b500,b2000,b0x2"


# ---- the models ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    name: str
    input_shape: tuple[int, ...]  # without the batch dimension
    outputs: int

    def target(self, url: str, variant: str) -> Target:
        return Target(url, f"{self.name}_{variant}", "x", (1, *self.input_shape))


FAMILIES = {
    "mlp": Family("mlp", (1024,), 16),
    "cnn": Family("cnn", (3, 32, 32), 10),
}


def _model_bytes(graph) -> bytes:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def mlp_onnx(seed: int = 0, width: int = 1024, layers: int = 4, outputs: int = 16) -> bytes:
    """x [-1, width] -> `layers` x (MatMul + Add + Relu), width wide -> MatMul + Add -> y."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "x"
    scale = np.float32(np.sqrt(2.0 / width))  # He init: activations stay O(1) through the stack
    for i in range(layers):
        w = (rng.standard_normal((width, width)) * scale).astype(np.float32)
        b = (rng.standard_normal(width) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"h{i}"]),
        ]
        prev = f"h{i}"
    w = (rng.standard_normal((width, outputs)) * scale).astype(np.float32)
    b = np.zeros(outputs, np.float32)
    inits += [numpy_helper.from_array(w, "wo"), numpy_helper.from_array(b, "bo")]
    nodes += [
        helper.make_node("MatMul", [prev, "wo"], ["mo"]),
        helper.make_node("Add", ["mo", "bo"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", outputs])],
        inits,
    )
    return _model_bytes(graph)


def cnn_onnx(
    seed: int = 0, channels: tuple[int, ...] = (3, 32, 64, 64), classes: int = 10
) -> bytes:
    """x [-1, 3, 32, 32] -> 3 x (Conv 3x3 pad 1 + Relu + MaxPool 2x2) -> Flatten -> Gemm -> y."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "x"
    for i, (cin, cout) in enumerate(itertools.pairwise(channels)):
        w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
        b = (rng.standard_normal(cout) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"k{i}"), numpy_helper.from_array(b, f"c{i}")]
        nodes += [
            helper.make_node("Conv", [prev, f"k{i}", f"c{i}"], [f"v{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"v{i}"], [f"r{i}"]),
            helper.make_node("MaxPool", [f"r{i}"], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2]),
        ]
        prev = f"p{i}"
    side = 32 // 2 ** (len(channels) - 1)
    flat = channels[-1] * side * side
    w = (rng.standard_normal((flat, classes)) * np.sqrt(1.0 / flat)).astype(np.float32)
    b = np.zeros(classes, np.float32)
    inits += [numpy_helper.from_array(w, "wf"), numpy_helper.from_array(b, "bf")]
    nodes += [
        helper.make_node("Flatten", [prev], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    return _model_bytes(graph)


BUILDERS: dict[str, Callable[..., bytes]] = {"mlp": mlp_onnx, "cnn": cnn_onnx}

_VARIANT = re.compile(r"^(?:direct|b(\d+)(?:p(\d+(?:-\d+)*))?)(?:x(\d+))?$")


def parse_variant(variant: str) -> tuple[int | None, int, list[int]]:
    """(max queue delay in us, or None for no dynamic_batching; instance count; preferred
    batch sizes)."""
    m = _VARIANT.match(variant)
    preferred = [int(p) for p in m.group(2).split("-")] if m and m.group(2) else []
    if (
        m is None
        or (m.group(3) is not None and int(m.group(3)) < 1)
        or any(not 1 <= p <= MAX_BATCH for p in preferred)
    ):
        raise ValueError(
            f"variant {variant!r}: expected 'direct', 'b<delay us>' optionally with "
            f"'p<preferred>[-<preferred>...]' (1..{MAX_BATCH}), optionally 'x<instances>'"
        )
    delay = int(m.group(1)) if m.group(1) is not None else None
    return delay, int(m.group(3) or 1), preferred


def model_config(family: Family, variant: str) -> str:
    delay, instances, preferred = parse_variant(variant)
    dims = ", ".join(str(d) for d in family.input_shape)
    text = (
        f'name: "{family.name}_{variant}"\n'
        'backend: "onnxruntime"\n'
        f"max_batch_size: {MAX_BATCH}\n"
        f'input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {dims} ] }} ]\n'
        f'output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {family.outputs} ] }} ]\n'
        f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n"
    )
    if delay is not None:
        sizes = f" preferred_batch_size: {preferred}" if preferred else ""
        text += f"dynamic_batching {{ max_queue_delay_microseconds: {delay}{sizes} }}\n"
    return text


def build_repository(root: Path, families: list[Family], variants: list[str]) -> tuple[Path, Path]:
    """(repository, keyring file): every family x variant, sealed with a fresh keyring."""
    from forseti.core.sealing.keyring import Keyring
    from testkit.model_builders import publish_sealed, write_config

    keyring_path = root / "keyring.json"
    keyring = Keyring.generate()
    keyring.save(keyring_path)
    repo = root / "repo"
    repo.mkdir()
    for family in families:
        model = BUILDERS[family.name](seed=0)
        for variant in variants:
            name = f"{family.name}_{variant}"
            write_config(repo, name, model_config(family, variant))
            publish_sealed(repo, name, model, keyring, version=1)
    return repo, keyring_path


def check_answers(url: str, families: list[Family], variants: list[str]) -> None:
    """Every variant answers a batch-1 request like its family's first variant does."""
    with grpcclient.InferenceServerClient(url) as client:
        for family in families:
            reference = None
            for variant in variants:
                target = family.target(url, variant)
                y = client.infer(target.model, [target.make_input(7)]).as_numpy("y")
                if y is None or y.shape != (1, family.outputs) or not np.isfinite(y).all():
                    raise RuntimeError(f"{target.model}: bad output {y!r}")
                if reference is None:
                    reference = y
                elif not np.allclose(y, reference, rtol=1e-4, atol=1e-4):
                    raise RuntimeError(f"{target.model} answers {y} where {variants[0]} gave")


# ---- statistics ---------------------------------------------------------------------------


def model_statistics(client: grpcclient.InferenceServerClient, model: str) -> dict[str, int]:
    s = client.get_inference_statistics(model).model_stats[0]
    st = s.inference_stats
    return {
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "success": st.success.count,
        "success_ns": st.success.ns,
        "fail": st.fail.count,
        "queue_ns": st.queue.ns,
        "infer_ns": st.compute_infer.ns,
    }


def statistics_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    d = {k: after[k] - before[k] for k in before}
    ok = max(d["success"], 1)
    return {
        "mean_batch": d["inference_count"] / d["execution_count"] if d["execution_count"] else 0.0,
        "server_ms": d["success_ns"] / ok / 1e6,
        "queue_ms": d["queue_ns"] / ok / 1e6,
        "infer_ms": d["infer_ns"] / ok / 1e6,
        "server_failures": d["fail"],
        "executions": d["execution_count"],
    }


class StatsAtStart:
    """Snapshots every model's statistics when the recorded part of a measurement starts
    (after the load generator's warm-up), on a timer thread."""

    def __init__(self, url: str, models: list[str]) -> None:
        self.url, self.models = url, models
        self.snapshot: dict[str, dict[str, int]] | None = None
        self._timer: threading.Timer | None = None

    def __call__(self, start_ns: int) -> None:
        delay = max(0.0, (start_ns - time.perf_counter_ns()) / 1e9)
        self._timer = threading.Timer(delay, self._take)
        self._timer.start()

    def _take(self) -> None:
        with grpcclient.InferenceServerClient(self.url) as client:
            self.snapshot = {m: model_statistics(client, m) for m in self.models}

    def wait(self) -> dict[str, dict[str, int]]:
        assert self._timer is not None
        self._timer.join()
        assert self.snapshot is not None
        return self.snapshot


# ---- the benchmark ------------------------------------------------------------------------


@dataclass
class Row:
    family: str
    variant: str
    concurrency: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    calls: int
    failures: int
    mean_batch: float
    server_ms: float
    queue_ms: float
    infer_ms: float
    server_failures: int
    layout: str
    vs_direct: float | None = None


def run_benchmark(args: argparse.Namespace) -> list[Row]:
    from testkit.server_process import ServerProcess

    families = [FAMILIES[f] for f in args.families]
    variants = args.variants
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="forseti-bench-batching-") as tmp:
        root = Path(tmp)
        print(f"building {len(families) * len(variants)} sealed models ...", flush=True)
        repo, keyring_path = build_repository(root, families, variants)
        server = ServerProcess(
            repo, keyring_path, ["--log-level", "WARNING"], log_path=root / "forseti.log"
        )
        load = None
        try:
            load = LoadGenerator(min(args.procs, max(args.levels)))
            server.start(timeout=120.0)
            check_answers(server.url, families, variants)
            with grpcclient.InferenceServerClient(server.url) as stats_client:
                for family in families:
                    targets = [family.target(server.url, v) for v in variants]
                    models = [t.model for t in targets]
                    for i, c in enumerate(args.levels):
                        at_start = StatsAtStart(server.url, models)
                        ms = load.run(
                            targets,
                            c,
                            args.warmup,
                            args.duration,
                            args.slice,
                            args.settle,
                            first=i % len(targets),
                            fail_fast=False,
                            on_schedule=at_start,
                        )
                        before = at_start.wait()
                        after = {m: model_statistics(stats_client, m) for m in models}
                        level_rows = []
                        for variant, model, m in zip(variants, models, ms, strict=True):
                            st = statistics_delta(before[model], after[model])
                            row = Row(
                                family=family.name,
                                variant=variant,
                                concurrency=c,
                                rps=m.rps,
                                p50_ms=m.p50_ms,
                                p90_ms=m.p90_ms,
                                p99_ms=m.p99_ms,
                                calls=m.calls,
                                failures=m.failures,
                                mean_batch=st["mean_batch"],
                                server_ms=st["server_ms"],
                                queue_ms=st["queue_ms"],
                                infer_ms=st["infer_ms"],
                                server_failures=int(st["server_failures"]),
                                layout=m.layout,
                            )
                            level_rows.append(row)
                            print(
                                f"{model:<14} c={c:<3} {row.rps:7.0f} req/s  p50 "
                                f"{row.p50_ms:7.3f} ms  p99 {row.p99_ms:7.3f} ms  batch "
                                f"{row.mean_batch:5.1f}  failures {row.failures}",
                                flush=True,
                            )
                        direct = next((r for r in level_rows if r.variant == "direct"), None)
                        if direct is not None and direct.rps > 0:
                            for r in level_rows:
                                r.vs_direct = r.rps / direct.rps
                        rows += level_rows
        finally:
            if load is not None:
                load.close()
            code = server.stop()
            if code not in (0, None):
                print(f"forseti exited with {code}:\n{server.log()}")
    return rows


def print_report(rows: list[Row], args: argparse.Namespace) -> None:
    print()
    print(
        f"batch-1 requests, tritonclient.grpc closed loops, {args.duration:g}s recorded per "
        f"model and level in {args.slice:g}s slices (variants interleaved), {os.cpu_count()} CPUs"
    )
    header = (
        f"{'model':<6} {'variant':<10} {'conc':>4} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'fail':>5} {'batch':>6} {'server ms':>9} {'queue ms':>9} {'infer ms':>9} "
        f"{'vs direct':>9}"
    )
    print(header)
    print("-" * len(header))
    last = None
    for r in rows:
        if last is not None and (r.family, r.concurrency) != last:
            print()
        last = (r.family, r.concurrency)
        vs = f"{r.vs_direct:8.2f}x" if r.vs_direct is not None else f"{'-':>9}"
        print(
            f"{r.family:<6} {r.variant:<10} {r.concurrency:>4} {r.rps:>7.0f} {r.p50_ms:>8.3f} "
            f"{r.p99_ms:>8.3f} {r.failures + r.server_failures:>5} {r.mean_batch:>6.1f} "
            f"{r.server_ms:>9.3f} {r.queue_ms:>9.3f} {r.infer_ms:>9.3f} {vs}"
        )
    print()
    print(
        "variant: direct = no dynamic_batching; b<D> = max_queue_delay_microseconds D; p<P> = "
        "preferred_batch_size P; x<N> = instance_group count N.\nbatch = inference_count / "
        "execution_count; server ms (the whole handler), queue ms and infer ms (backend run "
        "of the request's batch) = means per request\n(ModelStatistics deltas after the "
        "warm-up); fail = failed calls seen by the clients (+ failures the server counted)."
    )
    for family in args.families:
        for c in args.levels:
            level = [r for r in rows if r.family == family and r.concurrency == c]
            batched = [r for r in level if r.variant != "direct"]
            direct = next((r for r in level if r.variant == "direct"), None)
            if not batched or direct is None:
                continue
            best = max(batched, key=lambda r: r.rps)
            print(
                f"{family} c={c}: best batched {best.variant} {best.rps:.0f} req/s "
                f"(p99 {best.p99_ms:.2f} ms) vs direct {direct.rps:.0f} req/s "
                f"(p99 {direct.p99_ms:.2f} ms): {best.rps / max(direct.rps, 1e-9):.2f}x"
            )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_batching",
        description=(
            "Throughput and p50/p99 of batch-1 requests with and without dynamic batching, on "
            "an MLP of width 1024 and a small CNN, at several concurrencies."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--duration", type=float, default=3.0, help="recorded seconds per model per level"
    )
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per level")
    p.add_argument(
        "--slice",
        type=float,
        default=0.5,
        help="the variants of a family alternate in slices this long within a level",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=0.1,
        help="seconds at the start of each slice that are not recorded (the switch-over)",
    )
    p.add_argument("--levels", default="1,16,64", help="concurrency levels, comma separated")
    p.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=(
            "comma-separated: direct (no dynamic_batching), b<D> (max_queue_delay_microseconds "
            "D) optionally with p<P>[-<P>...] (preferred_batch_size), either with x<N> "
            "(instance_group count N)"
        ),
    )
    p.add_argument("--families", default="mlp,cnn", help="model families: mlp, cnn")
    p.add_argument(
        "--procs",
        type=int,
        default=4,
        help="most client worker processes; a level of c uses min(c, procs), c/procs threads each",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    return p


def _check_args(args: argparse.Namespace) -> str | None:
    try:
        args.levels = [int(x) for x in args.levels.split(",")]
    except ValueError:
        return "--levels must be a comma-separated list of positive integers"
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    if not args.levels or min(args.levels) < 1:
        return "--levels must be a comma-separated list of positive integers"
    if not args.variants or len(set(args.variants)) != len(args.variants):
        return "--variants must name distinct variants"
    for v in args.variants:
        try:
            parse_variant(v)
        except ValueError as exc:
            return str(exc)
    unknown = [f for f in args.families if f not in FAMILIES]
    if not args.families or unknown:
        return f"--families: unknown {unknown}; choose from {', '.join(FAMILIES)}"
    if args.duration <= 0 or args.warmup < 0 or args.procs < 1:
        return "--duration must be > 0, --warmup >= 0 and --procs >= 1"
    if not 0 <= args.settle < args.slice:
        return "need 0 <= --settle < --slice"
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    problem = _check_args(args)
    if problem:
        print(f"bench_batching: {problem}", file=sys.stderr)
        return 2
    started = time.monotonic()
    # SIGTERM unwinds like Ctrl-C, so the server and workers are always stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        rows = run_benchmark(args)
    except Exception as exc:
        traceback.print_exc()
        print(f"bench_batching: the run failed: {exc}", file=sys.stderr)
        return 2
    print_report(rows, args)
    print(f"\n(total {time.monotonic() - started:.0f}s)")
    if args.json is not None:
        doc = {
            "settings": vars(args) | {"json": str(args.json)},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "rows": [asdict(r) for r in rows],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
