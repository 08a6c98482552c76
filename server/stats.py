"""Per-version inference statistics: the numbers behind ModelStatistics and /metrics.

Everything here is updated with the GIL held, by the event loop or (native data plane) by a
gRPC thread; plain integers need no lock because no update reads a counter before a call that
could switch threads and writes it after (CPython 3.11 switches threads only at calls and
backward jumps).
The request path pays a handful of integer additions on flat slots; the Duration views that
readers use are built only when statistics are read.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Duration:
    """A count and a total in nanoseconds (Triton's StatisticDuration)."""

    count: int = 0
    ns: int = 0


@dataclass(frozen=True)
class BatchStats:
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


class VersionStats:
    """Counters for one model version; they live as long as the server, across reloads."""

    __slots__ = (
        "_batches",
        "compute_infer_ns",
        "compute_input_ns",
        "compute_output_ns",
        "execution_count",
        "fail_count",
        "fail_ns",
        "inference_count",
        "last_inference_ms",
        "latency_buckets",
        "latency_sum_ns",
        "queue_ns",
        "success_count",
        "success_ns",
    )

    def __init__(self) -> None:
        self.success_count = 0
        self.success_ns = 0
        self.fail_count = 0
        self.fail_ns = 0
        self.queue_ns = 0
        self.compute_input_ns = 0
        self.compute_infer_ns = 0
        self.compute_output_ns = 0
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        # batch size -> [count, input ns, infer ns, output ns]
        self._batches: dict[int, list[int]] = {}
        self.latency_buckets = [0] * (len(_BUCKET_BOUNDS_NS) + 1)
        self.latency_sum_ns = 0

    def record_success(
        self,
        total_ns: int,
        queue_ns: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
        executed: int,
        now_ms: int,
    ) -> None:
        """One request answered. `executed` is the batch size of the model execution it
        accounts for (0 when another request of the same formed batch accounts for it)."""
        self.success_count += 1
        self.success_ns += total_ns
        self.queue_ns += queue_ns
        self.compute_input_ns += input_ns
        self.compute_infer_ns += infer_ns
        self.compute_output_ns += output_ns
        self.last_inference_ms = now_ms
        self.latency_buckets[bisect.bisect_left(_BUCKET_BOUNDS_NS, total_ns)] += 1
        self.latency_sum_ns += total_ns
        if executed:
            self.inference_count += executed
            self.execution_count += 1
            b = self._batches.get(executed)
            if b is None:
                # setdefault, one C call: the native data plane records from gRPC threads
                # (with the GIL), and a thread switch after the get above must not let two
                # writers each install a slot for the same size and lose one's counts.
                b = self._batches.setdefault(executed, [0, 0, 0, 0])
            b[0] += 1
            b[1] += input_ns
            b[2] += infer_ns
            b[3] += output_ns

    def record_failure(self, total_ns: int) -> None:
        self.fail_count += 1
        self.fail_ns += total_ns

    # ---- read side ----------------------------------------------------------------------

    @property
    def success(self) -> Duration:
        return Duration(self.success_count, self.success_ns)

    @property
    def fail(self) -> Duration:
        return Duration(self.fail_count, self.fail_ns)

    @property
    def queue(self) -> Duration:
        return Duration(self.success_count, self.queue_ns)

    @property
    def compute_input(self) -> Duration:
        return Duration(self.success_count, self.compute_input_ns)

    @property
    def compute_infer(self) -> Duration:
        return Duration(self.success_count, self.compute_infer_ns)

    @property
    def compute_output(self) -> Duration:
        return Duration(self.success_count, self.compute_output_ns)

    @property
    def batches(self) -> dict[int, BatchStats]:
        return {
            size: BatchStats(Duration(n, i), Duration(n, f), Duration(n, o))
            for size, (n, i, f, o) in list(self._batches.items())
        }
