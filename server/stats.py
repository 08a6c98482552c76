"""Per-version inference statistics: the numbers behind ModelStatistics and /metrics.

Everything here is updated on the event-loop thread only, so plain integers need no lock and
the request path pays a few additions, not a metrics library call per counter.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Upper bounds of the request latency histogram, in seconds.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
_BUCKET_BOUNDS_NS: tuple[int, ...] = tuple(int(b * 1e9) for b in LATENCY_BUCKETS_S)


@dataclass
class Duration:
    """A count and a total in nanoseconds (Triton's StatisticDuration)."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class VersionStats:
    """Counters for one model version; they live as long as the server, across reloads."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, BatchStats] = field(default_factory=dict)
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(_BUCKET_BOUNDS_NS) + 1))
    latency_sum_ns: int = 0

    def record_success(
        self,
        batch: int,
        total_ns: int,
        queue_ns: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
        now_ms: int,
    ) -> None:
        """One request answered; it ran alone (direct scheduling) as one execution."""
        self.success.add(total_ns)
        self.queue.add(queue_ns)
        self.compute_input.add(input_ns)
        self.compute_infer.add(infer_ns)
        self.compute_output.add(output_ns)
        self.inference_count += batch
        self.execution_count += 1
        self.last_inference_ms = now_ms
        b = self.batches.get(batch)
        if b is None:
            b = self.batches[batch] = BatchStats()
        b.compute_input.add(input_ns)
        b.compute_infer.add(infer_ns)
        b.compute_output.add(output_ns)
        self.latency_buckets[bisect.bisect_left(_BUCKET_BOUNDS_NS, total_ns)] += 1
        self.latency_sum_ns += total_ns

    def record_failure(self, total_ns: int) -> None:
        self.fail.add(total_ns)
