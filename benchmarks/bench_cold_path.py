"""Each step of a batch-1 decision, warm (back to back) and cold (caches flushed between calls).

A server answers one decision between stretches of gRPC work that push the request path out
of the CPU's caches, so a step costs what it costs cold, not what a tight loop shows. This
times each step of the request path on the server's own code (the `policy` test model,
obs FP32 [1, 8]), in this process:

* warm: the step repeated back to back;
* cold: before each call, a fresh request is parsed and `--flush-mb` of memory is read, which
  evicts the caches the way the work between two decisions does.

It prints the median of each in microseconds. A benchmark, not a test: it exits 0 unless the
run failed.

    .venv/bin/python -m benchmarks.bench_cold_path                 # ~20 s
    .venv/bin/python -m benchmarks.bench_cold_path --calls 3000 --flush-mb 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from forseti.core.repository.config import model_spec, parse_config_text
from forseti.server.backends.onnxruntime_backend import OnnxRuntimeBackend
from forseti.server.protocol.request_options import request_options
from forseti.server.protocol.tensors import ResponseEncoder, decode_inputs, requested_outputs
from testkit.model_builders import OBS_DIM, POLICY_CONFIG, policy_onnx

Step = Callable[[Any], object]


def _request_bytes() -> bytes:
    request = pb.ModelInferRequest(model_name="policy", id="bench")
    request.inputs.add(name="obs", datatype="FP32", shape=[1, OBS_DIM])
    request.raw_input_contents.append(np.zeros((1, OBS_DIM), np.float32).tobytes())
    return bytes(request.SerializeToString())


def _steps() -> dict[str, Step]:
    spec = model_spec(parse_config_text(POLICY_CONFIG, "policy"), "policy")
    backend = OnnxRuntimeBackend(spec, policy_onnx(1))
    names = list(spec.outputs)
    feeds = {"obs": np.zeros((1, OBS_DIM), np.float32)}
    outputs = backend.run(feeds, names)
    encoder = ResponseEncoder("policy", "1")
    return {
        "decode (fast path)": lambda r: decode_inputs(r, spec),
        "requested outputs": lambda r: requested_outputs(r, spec, names),
        "request options": lambda r: request_options(r, None),
        "onnxruntime run": lambda r: backend.run(feeds, names),
        "encode response": lambda r: encoder.encode(r.id, names, outputs),
        "serialize response": lambda r: encoder.encode(r.id, names, outputs).SerializeToString(),
    }


def _median_us(step: Step, wire: bytes, calls: int, flush: np.ndarray | None) -> float:
    parse = pb.ModelInferRequest.FromString
    times = []
    request = parse(wire)
    for _ in range(calls):
        if flush is not None:
            flush.sum()
            request = parse(wire)
        started = time.perf_counter_ns()
        step(request)
        times.append(time.perf_counter_ns() - started)
    return statistics.median(times) / 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_cold_path", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--calls", type=int, default=1500, help="calls per step and mode")
    parser.add_argument("--flush-mb", type=int, default=8, help="memory read between cold calls")
    args = parser.parse_args(argv)
    wire = _request_bytes()
    flush = np.random.default_rng(0).random(args.flush_mb * 1024 * 1024 // 8)
    print(
        f"batch-1 'policy' request path steps, median of {args.calls} calls, "
        f"{args.flush_mb} MB read between cold calls"
    )
    print(f"{'step':<22}{'warm us':>10}{'cold us':>10}")
    print("-" * 42)
    total_warm = total_cold = 0.0
    for name, step in _steps().items():
        warm = _median_us(step, wire, args.calls, None)
        cold = _median_us(step, wire, args.calls, flush)
        if name != "serialize response":  # grpc serializes; the floor pays that too
            total_warm += warm
            total_cold += cold
        print(f"{name:<22}{warm:>10.1f}{cold:>10.1f}")
    print("-" * 42)
    print(f"{'handler steps, sum':<22}{total_warm:>10.1f}{total_cold:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
