"""Direct scheduling: no queue, each request runs on the backend as it arrives.

A fast model runs on the event-loop thread itself: handing a few microseconds of work to a
thread costs more than the work. A slower model, or one with several instances, runs on a
pool with one thread per instance so the loop keeps answering meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from forseti.server.backends.base import Backend
from forseti.server.scheduler.result import ExecutionResult

# Models whose slowest warm-up run is under this run inline on the event loop.
INLINE_BUDGET_NS = 1_000_000


class DirectScheduler:
    """Runs requests on the backend without queueing."""

    def __init__(self, backend: Backend, name: str, inline: bool) -> None:
        self.backend = backend
        self.inline = inline
        self._executor: ThreadPoolExecutor | None = None
        if not inline:
            self._executor = ThreadPoolExecutor(
                max_workers=backend.instance_count, thread_name_prefix=f"forseti-{name}"
            )

    def _timed_run(
        self, feeds: dict[str, np.ndarray], names: list[str], submitted: int
    ) -> ExecutionResult:
        started = time.monotonic_ns()
        outputs = self.backend.run(feeds, names)
        return ExecutionResult(outputs, started - submitted, time.monotonic_ns() - started)

    async def execute(self, feeds: dict[str, np.ndarray], names: list[str]) -> ExecutionResult:
        """Run on an instance thread; the wait for a free thread counts as queue time."""
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self._timed_run, feeds, names, time.monotonic_ns()
        )

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
