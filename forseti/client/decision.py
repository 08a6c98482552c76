"""What a decision call returns, and why a fallback was used."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Why a decision came from the fallback instead of a policy (the `reason` label of
# forseti_client_fallbacks_total).
DEADLINE = "deadline"  # no answer before the call's deadline
UNAVAILABLE = "unavailable"  # every replica tried failed with a retryable status
NO_REPLICA = "no_healthy_replica"  # every replica is ejected and being probed
REJECTED = "rejected"  # a non-retryable status, with fallback_on_rejection=True
CLOSED = "closed"  # the client was closed while the call was waiting


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision: the action and the other outputs, who answered and how fast.

    For `decide`, `action` and `outputs` are one row (the batch dimension removed); for
    `decide_batch` they keep it. `outputs` maps every output's name to its array, decoded from
    the response when first read. With a fallback, `outputs` is empty, `model_version` and
    `endpoint` are None and `fallback_reason` says why."""

    action: Any
    outputs: Mapping[str, np.ndarray] = field(default_factory=dict)
    model_version: str | None = None
    endpoint: str | None = None  # "host:port" of the replica, "local" for local mode
    latency_s: float = 0.0
    fallback_used: bool = False
    fallback_reason: str | None = None
