"""The dynamic batcher in process, on a real onnxruntime backend: when batches run."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from forseti.core.repository.config import model_spec, parse_config_text
from forseti.server.backends.onnxruntime_backend import OnnxRuntimeBackend
from forseti.server.scheduler.base import NO_OPTIONS, Execution
from forseti.server.scheduler.dynamic_batcher import DynamicBatcher
from testkit.model_builders import POLICY_CONFIG, policy_onnx

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
