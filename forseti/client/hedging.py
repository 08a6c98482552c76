"""Hedged requests: when a replica has not answered after a delay, the same request goes to a
second replica and the first answer wins (the other call is cancelled).

The delay is fixed (`after_ms`) or follows the recent answers: their `percentile` (p95 by
default) over the last `window` answered calls, recomputed every `every` answers so that the
request path pays for a sort only now and then. Until `min_samples` answers have been seen the
delay is `initial_ms` (None: no hedging yet). Hedging adds load, by design about
(100 - percentile)% more calls; at most one hedge is sent per call.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from forseti.client.errors import ClientConfigError


@dataclass
class Hedging:
    """When to send a hedge. `Hedging(after_ms=5)`: fixed; `Hedging()`: the recent p95."""

    after_ms: float | None = None
    percentile: float = 95.0
    window: int = 512
    min_samples: int = 32
    initial_ms: float | None = None
    min_ms: float = 0.5  # never hedge sooner than this, however fast the recent answers
    every: int = 32
    _recent: deque[float] = field(init=False, repr=False)
    _seen: itertools.count[int] = field(init=False, repr=False)
    _delay_s: float | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.after_ms is not None and self.after_ms < 0:
            raise ClientConfigError(f"hedging after_ms must be >= 0, got {self.after_ms}")
        if not 0 < self.percentile < 100:
            raise ClientConfigError(
                f"hedging percentile must be in (0, 100), got {self.percentile}"
            )
        if self.window < 1 or self.min_samples < 1 or self.every < 1:
            raise ClientConfigError("hedging window, min_samples and every must be >= 1")
        self._recent = deque(maxlen=self.window)
        self._seen = itertools.count(1)
        self._delay_s = None if self.initial_ms is None else self.initial_ms / 1000

    def delay_s(self) -> float | None:
        """Seconds to wait before hedging; None: do not hedge (not enough answers yet)."""
        if self.after_ms is not None:
            return self.after_ms / 1000
        return self._delay_s

    def observe(self, latency_s: float) -> None:
        """Record an answered call's latency (the adaptive delay follows these)."""
        if self.after_ms is not None:
            return
        self._recent.append(latency_s)
        n = next(self._seen)
        if n >= self.min_samples and n % self.every == 0:
            value = float(np.percentile(np.fromiter(list(self._recent), float), self.percentile))
            self._delay_s = max(value, self.min_ms / 1000)
