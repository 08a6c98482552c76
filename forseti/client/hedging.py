"""Hedged requests: when a replica has not answered after a delay, the same request goes to a
second replica and the first answer wins (the other call is cancelled).

The delay is fixed (`after_ms`) or follows the recent answers: the `percentile` (p95 by
default) of each replica's last `window` answered calls, and of those the lowest, recomputed
every `every` answers so that the request path pays for a sort only now and then. Taking the
best replica's p95 (not the p95 of all answers) is what makes it work when one replica is slow
throughout: the slow replica's answers would otherwise be the p95 themselves, and no call would
ever be hedged. Until a replica has `min_samples` answers the delay is `initial_ms` (None: no
hedging yet). Hedging adds load: about (100 - percentile)% more calls on an even fleet, and up
to every call that lands on a replica slower than the best. At most one hedge per call.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from forseti.client.errors import ClientConfigError


@dataclass
class Hedging:
    """When to send a hedge. `Hedging(after_ms=5)`: fixed; `Hedging()`: the recent p95 of the
    fastest replica."""

    after_ms: float | None = None
    percentile: float = 95.0
    window: int = 128
    min_samples: int = 32
    initial_ms: float | None = None
    min_ms: float = 0.5  # never hedge sooner than this, however fast the recent answers
    every: int = 32
    _recent: dict[str, deque[float]] = field(init=False, repr=False)
    _seen: itertools.count[int] = field(init=False, repr=False)
    _delay_s: float | None = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.after_ms is not None and self.after_ms < 0:
            raise ClientConfigError(f"hedging after_ms must be >= 0, got {self.after_ms}")
        if not 0 < self.percentile < 100:
            raise ClientConfigError(
                f"hedging percentile must be in (0, 100), got {self.percentile}"
            )
        if self.window < 1 or self.min_samples < 1 or self.every < 1:
            raise ClientConfigError("hedging window, min_samples and every must be >= 1")
        self._recent = {}
        self._seen = itertools.count(1)
        self._delay_s = None if self.initial_ms is None else self.initial_ms / 1000
        self._lock = threading.Lock()

    def delay_s(self) -> float | None:
        """Seconds to wait before hedging; None: do not hedge (not enough answers yet)."""
        if self.after_ms is not None:
            return self.after_ms / 1000
        return self._delay_s

    def observe(self, latency_s: float, endpoint: str = "") -> None:
        """Record an answered call's latency and who answered (the adaptive delay follows
        these)."""
        if self.after_ms is not None:
            return
        recent = self._recent.get(endpoint)
        if recent is None:
            with self._lock:
                recent = self._recent.setdefault(endpoint, deque(maxlen=self.window))
        recent.append(latency_s)
        if next(self._seen) % self.every == 0:
            self._recompute()

    def _recompute(self) -> None:
        with self._lock:
            windows = [list(r) for r in self._recent.values()]
        values = [
            float(np.percentile(np.fromiter(w, float), self.percentile))
            for w in windows
            if len(w) >= self.min_samples
        ]
        if values:
            self._delay_s = max(min(values), self.min_ms / 1000)
