"""Threaded scheduling: no queue of its own, each request runs on one of the model's instance
threads (one per instance), so the event loop keeps answering while a slow model computes."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from forseti.server.backends.base import Backend
from forseti.server.scheduler.base import Execution, Feeds, RequestOptions

_now_ns = time.monotonic_ns


class ThreadedScheduler:
    """Runs requests on a pool of `backend.instance_count` threads; the wait for a free
    thread counts as queue time."""

    takes_options = False

    def __init__(self, backend: Backend, name: str) -> None:
        self._run = backend.run
        self._executor = ThreadPoolExecutor(
            max_workers=backend.instance_count, thread_name_prefix=f"forseti-{name}"
        )

    def _timed_run(
        self, feeds: Feeds, names: list[str], submitted: int
    ) -> tuple[list[np.ndarray], int, int]:
        started = _now_ns()
        outputs = self._run(feeds, names)
        return outputs, started - submitted, _now_ns() - started

    async def schedule(
        self, feeds: Feeds, batch: int, names: list[str], options: RequestOptions
    ) -> Execution:
        loop = asyncio.get_running_loop()
        outputs, queue_ns, infer_ns = await loop.run_in_executor(
            self._executor, self._timed_run, feeds, names, _now_ns()
        )
        return Execution(outputs, queue_ns, infer_ns, batch)

    def close(self) -> None:
        self._executor.shutdown(wait=False)
