"""What a scheduler hands back for one request."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ExecutionResult:
    """The request's outputs, the time it waited, and the backend time of its execution."""

    outputs: list[np.ndarray]
    queue_ns: int
    infer_ns: int
