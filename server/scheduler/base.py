"""The one interface between the request handler and whatever runs the model.

The handler decodes a request, hands the scheduler its feeds, its batch size, the outputs it
wants and typed options, and gets outputs back; it encodes the answer and records statistics.
Inline, threaded and dynamic-batching schedulers differ only in where and when `backend.run`
happens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class RequestOptions:
    """What a caller may ask of the scheduling of its request (Triton's request parameters
    and the call's deadline), already checked for type by the protocol layer."""

    priority: int = 0  # 0: the model's default priority level
    timeout_ns: int = 0  # the requested queue timeout; 0: none requested
    deadline_ns: int = 0  # the caller's deadline on the monotonic clock; 0: none


NO_OPTIONS = RequestOptions()


@dataclass(slots=True)
class Execution:
    """One request's outputs and how they were computed.

    `executed` is the batch size of the model execution this request accounts for in the
    statistics: its own batch when it ran alone, the whole batch for the one request of a
    formed batch that counts it, 0 for the others.
    """

    outputs: list[np.ndarray]
    queue_ns: int
    infer_ns: int
    executed: int


class Scheduler(Protocol):
    """Runs decoded requests on a version's backend."""

    # Whether `schedule` reads its options (queueing schedulers); the handler spares the
    # others reading the request's parameters and deadline.
    takes_options: bool

    async def schedule(
        self, feeds: Feeds, batch: int, names: list[str], options: RequestOptions
    ) -> Execution:
        """Compute `names` for `feeds` (a batch of `batch` items); raises ForsetiError when the
        request cannot be scheduled (queue full, timeout expired, version closing)."""
        ...

    def close(self) -> None:
        """Stop taking requests and release threads; queued requests are refused."""
        ...
