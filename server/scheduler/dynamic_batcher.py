"""Dynamic batching as Triton's `dynamic_batching` config defines it.

Requests wait in per-priority queues; `instance_count` executors each take a batch, run it on
a worker thread, and hand each request its slice of the outputs. A batch runs as soon as the
requests at the front of the queue add up to a preferred size (the largest they can), when the
next one would take it past the largest preferred size, `max_batch_size` or to another shape,
or when it is full or past the largest preferred size; any other batch (one batch-3 request
with preferred sizes [2, 6], say) waits until the oldest request has waited
`max_queue_delay_microseconds` (the event loop's timers round that up to whole milliseconds; 0
runs at once), as Triton's dynamic batcher does.
A full queue refuses at once (RESOURCE_EXHAUSTED); a request whose timeout (its requested
timeout, the queue policy's default, or the caller's deadline) expires while queued is dropped
before it is computed; a cancelled request is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from forseti.core.errors import InvalidArgument, ModelLoadError, ResourceExhausted, Unavailable
from forseti.core.repository.config import ModelSpec
from forseti.server.backends.base import Backend
from forseti.server.scheduler.base import Execution, Feeds, RequestOptions

log = logging.getLogger(__name__)

_now_ns = time.monotonic_ns
_REJECT = mc.ModelQueuePolicy.REJECT


@dataclass(frozen=True)
class QueuePolicy:
    """One priority level's queue rules (Triton's ModelQueuePolicy)."""

    max_queue_size: int  # 0: unbounded
    default_timeout_ns: int  # 0: none
    allow_timeout_override: bool
    reject_on_timeout: bool

    @classmethod
    def from_config(cls, policy: mc.ModelQueuePolicy) -> QueuePolicy:
        return cls(
            max_queue_size=int(policy.max_queue_size),
            default_timeout_ns=int(policy.default_timeout_microseconds) * 1000,
            allow_timeout_override=bool(policy.allow_timeout_override),
            reject_on_timeout=policy.timeout_action == _REJECT,
        )


@dataclass(frozen=True)
class BatchingSpec:
    """The checked `dynamic_batching` settings of a model."""

    max_batch_size: int
    preferred: tuple[int, ...]
    max_preferred: int  # the largest preferred size; max_batch_size when none
    max_delay_ns: int
    levels: int  # priority levels; 1 when priorities are off
    default_level: int  # 1-based
    policies: tuple[QueuePolicy, ...]  # index = level - 1

    @classmethod
    def from_config(cls, spec: ModelSpec) -> BatchingSpec:
        db = spec.config.dynamic_batching
        if spec.max_batch_size < 1:
            raise ModelLoadError("dynamic_batching needs max_batch_size > 0")
        preferred = tuple(sorted(set(int(p) for p in db.preferred_batch_size)))
        if any(p < 1 or p > spec.max_batch_size for p in preferred):
            raise ModelLoadError(
                f"preferred_batch_size {list(preferred)} must lie in 1..{spec.max_batch_size}"
            )
        levels = max(int(db.priority_levels), 1)
        default_level = int(db.default_priority_level) or (levels + 1) // 2
        if db.priority_levels and not 1 <= default_level <= levels:
            raise ModelLoadError(f"default_priority_level {default_level} must lie in 1..{levels}")
        default_policy = QueuePolicy.from_config(db.default_queue_policy)
        policies = []
        for level in range(1, levels + 1):
            if level in db.priority_queue_policy:
                policies.append(QueuePolicy.from_config(db.priority_queue_policy[level]))
            else:
                policies.append(default_policy)
        return cls(
            max_batch_size=spec.max_batch_size,
            preferred=preferred,
            max_preferred=max(preferred, default=spec.max_batch_size),
            max_delay_ns=int(db.max_queue_delay_microseconds) * 1000,
            levels=levels,
            default_level=default_level if db.priority_levels else 1,
            policies=tuple(policies),
        )


@dataclass(eq=False)
class Pending:
    """A request waiting in a queue."""

    feeds: Feeds
    batch: int
    names: list[str]
    shapes: tuple[tuple[int, ...], ...]
    enqueued_ns: int
    deadline_ns: int  # 0: none
    future: asyncio.Future[Execution] = field(repr=False)
    queue_ns: int = 0


class DynamicBatcher:
    """Queues, forms batches and runs them on `backend.instance_count` executor threads."""

    takes_options = True

    def __init__(self, spec: ModelSpec, backend: Backend) -> None:
        self.spec = spec
        self.settings = BatchingSpec.from_config(spec)
        self.backend = backend
        self.output_names = list(spec.outputs)
        self._queues: list[deque[Pending]] = [deque() for _ in range(self.settings.levels)]
        self._queued = 0  # batch items in the queues, cancelled ones until they are dropped
        self._arrived = asyncio.Event()
        self._pool = ThreadPoolExecutor(
            max_workers=backend.instance_count, thread_name_prefix=f"forseti-batch-{spec.name}"
        )
        self._workers = [
            asyncio.get_running_loop().create_task(self._executor_loop())
            for _ in range(backend.instance_count)
        ]
        self._closed = False

    # ---- submitting ---------------------------------------------------------------------

    def _level_and_deadline(self, options: RequestOptions) -> tuple[int, int]:
        s = self.settings
        level = s.default_level
        if options.priority and s.levels > 1:
            if not 1 <= options.priority <= s.levels:
                raise InvalidArgument(
                    f"priority {options.priority} is outside the model's 1..{s.levels} "
                    "priority levels"
                )
            level = options.priority
        policy = s.policies[level - 1]
        timeout_ns = policy.default_timeout_ns
        requested = options.timeout_ns
        if requested and (policy.allow_timeout_override or not timeout_ns):
            timeout_ns = requested
        elif requested:
            timeout_ns = min(timeout_ns, requested)
        deadline = _now_ns() + timeout_ns if timeout_ns else 0
        if options.deadline_ns and (not deadline or options.deadline_ns < deadline):
            deadline = options.deadline_ns
        return level, deadline

    async def schedule(
        self, feeds: Feeds, batch: int, names: list[str], options: RequestOptions
    ) -> Execution:
        """Queue a request and wait for its slice of a batch."""
        if self._closed:
            raise Unavailable(f"model '{self.spec.name}' version is being unloaded")
        level, deadline = self._level_and_deadline(options)
        queue = self._queues[level - 1]
        limit = self.settings.policies[level - 1].max_queue_size
        if limit and len(queue) >= limit:
            raise ResourceExhausted(
                f"queue of model '{self.spec.name}' is full ({limit} requests waiting); retry later"
            )
        shapes = tuple(arr.shape[1:] for arr in feeds.values())
        pending = Pending(
            feeds=feeds,
            batch=batch,
            names=names,
            shapes=shapes,
            enqueued_ns=_now_ns(),
            deadline_ns=deadline,
            future=asyncio.get_running_loop().create_future(),
        )
        queue.append(pending)
        self._queued += batch
        self._arrived.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            # A cancelled call gives its queue slot back at once and is never computed.
            pending.future.cancel()
            with contextlib.suppress(ValueError):  # already taken into a batch
                queue.remove(pending)
                self._queued -= pending.batch
            raise

    # ---- forming and running batches ----------------------------------------------------

    def _oldest_enqueued(self) -> int | None:
        """Enqueue time of the oldest live request; cancelled heads are dropped on the way."""
        oldest = None
        for q in self._queues:
            while q and q[0].future.done():
                self._queued -= q.popleft().batch
            if q and (oldest is None or q[0].enqueued_ns < oldest):
                oldest = q[0].enqueued_ns
        return oldest

    def _form(self, oldest: int) -> tuple[list[tuple[int, Pending]], int]:
        """The batch to run now, as (level, request) pairs from the queue fronts, or nothing
        and how many ns to wait before looking again.

        Requests join in queue order (highest priority first) while the batch stays within
        max_batch_size and their inner shapes match. It runs at once when it reaches a
        preferred size (the largest prefix that is one), when the next request would take it
        past the largest preferred size, past max_batch_size or to another shape, or when it
        is full or past the largest preferred size; otherwise it waits until the oldest
        request has waited the maximum delay.
        Cancelled and expired requests met on the way leave the queue."""
        s = self.settings
        now = _now_ns()
        picked: list[tuple[int, Pending]] = []
        total = 0
        best = 0  # requests in the preferred cut; 0: none found
        send_now = False
        shapes: tuple[tuple[int, ...], ...] | None = None
        for level, q in enumerate(self._queues):
            reject = s.policies[level].reject_on_timeout
            i = 0
            while i < len(q):
                p = q[i]
                if p.future.done():  # cancelled by its caller
                    del q[i]
                    self._queued -= p.batch
                    continue
                if reject and p.deadline_ns and now >= p.deadline_ns:
                    del q[i]
                    self._queued -= p.batch
                    p.future.set_exception(
                        Unavailable("request timeout expired while queued; it was not computed")
                    )
                    continue
                if picked:
                    grown = total + p.batch
                    if grown > s.max_preferred and not best:
                        best = len(picked)
                    if grown > s.max_batch_size or p.shapes != shapes:
                        send_now = True
                        break
                else:
                    shapes = p.shapes
                picked.append((level, p))
                total += p.batch
                if total in s.preferred:
                    best = len(picked)
                i += 1
            if send_now:
                break
        if not picked:
            return [], 0
        delay = s.max_delay_ns
        waited = now - oldest
        exceeded = delay != 0 and waited >= delay
        if best and not exceeded:
            return picked[:best], 0
        # A batch at or past the largest preferred size cannot become one by waiting.
        at_max = total >= s.max_batch_size or (bool(s.preferred) and total >= s.max_preferred)
        if send_now or at_max or exceeded or delay == 0:
            return picked, 0
        return [], delay - waited

    def _take(self, picked: list[tuple[int, Pending]]) -> list[Pending]:
        """Remove the formed batch from its queues (it is at their fronts, in order)."""
        for level, p in picked:
            self._queues[level].popleft()
            self._queued -= p.batch
        return [p for _, p in picked]

    async def _next_batch(self) -> list[Pending]:
        """Wait until a batch is worth running and take it from the queues."""
        while True:
            oldest = self._oldest_enqueued()
            if oldest is not None:
                picked, wait_ns = self._form(oldest)
                if picked:
                    return self._take(picked)
            self._arrived.clear()
            if oldest is None or not wait_ns:
                await self._arrived.wait()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), wait_ns / 1e9)

    async def _executor_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            batch: list[Pending] = []
            try:
                batch = await self._next_batch()
                started = _now_ns()
                for p in batch:
                    p.queue_ns = started - p.enqueued_ns
                feeds = _concatenate(batch)
                outputs = await loop.run_in_executor(
                    self._pool, self.backend.run, feeds, self.output_names
                )
                infer_ns = _now_ns() - started
                self._deliver(batch, outputs, infer_ns)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("batch execution failed", extra={"model": self.spec.name})
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)

    def _deliver(self, batch: list[Pending], outputs: list[np.ndarray], infer_ns: int) -> None:
        """Hand each request its slice; the first one still waiting accounts for the
        execution in the statistics."""
        unaccounted = sum(p.batch for p in batch)
        index = {name: i for i, name in enumerate(self.output_names)}
        offset = 0
        for p in batch:
            end = offset + p.batch
            if not p.future.done():
                picked = [outputs[index[n]][offset:end] for n in p.names]
                p.future.set_result(Execution(picked, p.queue_ns, infer_ns, unaccounted))
                unaccounted = 0
            offset = end

    def pending_requests(self) -> int:
        """Requests queued and not yet taken into a batch (Triton's pending request count);
        read by the /metrics scrape thread, never on the request path."""
        return sum(1 for q in self._queues for p in list(q) if not p.future.done())

    def close(self) -> None:
        """Stop the executors; requests still queued are refused."""
        self._closed = True
        for w in self._workers:
            w.cancel()
        for q in self._queues:
            while q:
                p = q.popleft()
                if not p.future.done():
                    p.future.set_exception(Unavailable("model version unloaded"))
        self._pool.shutdown(wait=False)


def _concatenate(batch: list[Pending]) -> Feeds:
    if len(batch) == 1:
        return batch[0].feeds
    return {name: np.concatenate([p.feeds[name] for p in batch]) for name in batch[0].feeds}
