"""The dynamic batcher in process, on a real onnxruntime backend: when batches run."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from onnx import TensorProto

from forseti.core.repository.config import model_spec, parse_config_text
from forseti.server.backends.onnxruntime_backend import OnnxRuntimeBackend
from forseti.server.scheduler.base import NO_OPTIONS, Execution
from forseti.server.scheduler.dynamic_batcher import DynamicBatcher
from testkit.model_builders import POLICY_CONFIG, policy_onnx
from testkit.triton_models import identity_onnx

PREFERRED = (
    "dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100000 }"
)


async def _schedule_together(
    batcher: DynamicBatcher, obs: np.ndarray
) -> tuple[list[Execution], float]:
    started = time.monotonic()
    results = await asyncio.gather(
        *(batcher.schedule({"obs": o[None, :]}, 1, ["logits"], NO_OPTIONS) for o in obs)
    )
    return results, time.monotonic() - started


def _run(n: int) -> tuple[list[Execution], float, dict[int, int], np.ndarray, OnnxRuntimeBackend]:
    spec = model_spec(parse_config_text(POLICY_CONFIG + PREFERRED, "policy"), "policy")
    backend = OnnxRuntimeBackend(spec, policy_onnx(1))
    obs = np.random.default_rng(n).uniform(-1, 1, (n, 8)).astype(np.float32)

    async def main() -> tuple[list[Execution], float]:
        batcher = DynamicBatcher(spec, backend)
        try:
            return await _schedule_together(batcher, obs)
        finally:
            batcher.close()

    results, elapsed = asyncio.run(main())
    # Executions as the statistics count them: one request of each batch accounts for it.
    executed: dict[int, int] = {}
    for r in results:
        if r.executed:
            executed[r.executed] = executed.get(r.executed, 0) + 1
    return results, elapsed, executed, obs, backend


def test_a_preferred_size_runs_at_once_without_waiting_for_the_delay() -> None:
    _, elapsed, executed, _, _ = _run(4)
    assert executed == {4: 1}
    assert elapsed < 0.05


def test_the_largest_fillable_preferred_size_runs_and_the_rest_waits_the_delay() -> None:
    results, elapsed, executed, _, _ = _run(5)
    assert executed == {4: 1, 1: 1}
    assert sorted(r.queue_ns for r in results)[-1] >= 90_000_000
    assert elapsed >= 0.09


def test_each_request_gets_its_own_rows_of_the_batch() -> None:
    results, _, _, obs, backend = _run(8)
    (expected,) = backend.run({"obs": obs}, ["logits"])
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r.outputs[0], expected[i : i + 1])


# ---- Triton's batch formation with requests of several items (its L0_batcher cases) ----

VARIABLE_CONFIG = """
name: "var"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] } ]
dynamic_batching { preferred_batch_size: [ 2, 6 ] max_queue_delay_microseconds: 600000 }
"""
DELAY_S = 0.6


def _batcher_timings(requests: list[tuple[float, int, int]]) -> tuple[list[float], dict[int, int]]:
    """Send (start offset s, batch, width) requests to a [2, 6]-preferred batcher with a 0.6 s
    delay; (each request's answer time from the first start, executions by batch size)."""
    spec = model_spec(parse_config_text(VARIABLE_CONFIG, "var"), "var")
    backend = OnnxRuntimeBackend(
        spec, identity_onnx([("x", "y", TensorProto.FLOAT, ["batch", "width"])])
    )

    async def one(
        batcher: DynamicBatcher, t0: float, offset: float, batch: int, width: int
    ) -> tuple[float, Execution]:
        await asyncio.sleep(offset)
        x = np.full((batch, width), batch, np.float32)
        done = await batcher.schedule({"x": x}, batch, ["y"], NO_OPTIONS)
        np.testing.assert_array_equal(done.outputs[0], x)
        return time.monotonic() - t0, done

    async def main() -> list[tuple[float, Execution]]:
        batcher = DynamicBatcher(spec, backend)
        t0 = time.monotonic()
        try:
            return await asyncio.gather(*(one(batcher, t0, *r) for r in requests))
        finally:
            batcher.close()

    results = asyncio.run(main())
    executed: dict[int, int] = {}
    for _, r in results:
        if r.executed:
            executed[r.executed] = executed.get(r.executed, 0) + 1
    return [t for t, _ in results], executed


def test_a_request_of_a_size_between_preferred_sizes_waits_the_delay() -> None:
    (answered,), executed = _batcher_timings([(0.0, 3, 4)])
    assert answered >= DELAY_S * 0.9
    assert executed == {3: 1}


def test_requests_adding_up_to_a_preferred_size_run_at_once() -> None:
    answered, executed = _batcher_timings([(0.0, 1, 4), (0.0, 5, 4)])
    assert max(answered) < DELAY_S * 0.5
    assert executed == {6: 1}


def test_a_request_that_would_pass_the_largest_preferred_size_sends_the_waiting_batch() -> None:
    # 3 waits; 4 arriving would make 7 > 6: the 3 runs then, the 4 waits its own delay.
    answered, executed = _batcher_timings([(0.0, 3, 4), (0.1, 4, 4)])
    assert answered[0] < 0.1 + DELAY_S * 0.5
    assert answered[1] >= 0.1 + DELAY_S * 0.9
    assert executed == {3: 1, 4: 1}


def test_a_request_of_another_shape_sends_the_waiting_batch_and_waits_itself() -> None:
    answered, executed = _batcher_timings([(0.0, 1, 4), (0.0, 3, 4), (0.1, 1, 8)])
    assert max(answered[:2]) < 0.1 + DELAY_S * 0.5
    assert answered[2] >= 0.1 + DELAY_S * 0.9
    assert executed == {4: 1, 1: 1}


def test_a_request_past_the_largest_preferred_size_runs_at_once() -> None:
    (answered,), executed = _batcher_timings([(0.0, 7, 4)])
    assert answered < DELAY_S * 0.5
    assert executed == {7: 1}
