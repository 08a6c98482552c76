"""Inline scheduling: the request runs on the event-loop thread as it arrives.

For a fast single-instance model (a batch-1 policy decision is microseconds of work) handing
the work to a thread costs more than the work itself. `schedule` never suspends, so no swap
can interleave between routing and answering.
"""

from __future__ import annotations

import time

from forseti.server.backends.base import Backend
from forseti.server.scheduler.base import Execution, Feeds, RequestOptions

_now_ns = time.monotonic_ns


class InlineScheduler:
    """Runs each request on the backend at once, on the calling thread."""

    takes_options = False

    def __init__(self, backend: Backend) -> None:
        self._run = backend.run

    async def schedule(
        self, feeds: Feeds, batch: int, names: list[str], options: RequestOptions
    ) -> Execution:
        started = _now_ns()
        outputs = self._run(feeds, names)
        return Execution(outputs, 0, _now_ns() - started, batch)

    def close(self) -> None:
        pass
