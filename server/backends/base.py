"""What every backend offers the scheduler."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    """A loaded model that turns named input arrays into output arrays."""

    instance_count: int

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
        """Run once; safe to call from up to `instance_count` threads at a time."""
        ...

    def close(self) -> None:
        """Release sessions and memory; the backend is not used afterwards."""
        ...
