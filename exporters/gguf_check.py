"""A GGUF policy artifact, checked by the server's own reader against the policy it came from."""

from __future__ import annotations

import numpy as np

from forseti.core.errors import ModelLoadError
from forseti.core.gguf.reader import load_policy

from .errors import ExportError
from .gguf_policy import export_gguf
from .parity import ACTION_ATOL
from .policy_description import ACTION, DISCRETE, PolicyDescription, evaluate


def checked_gguf(
    description: PolicyDescription, obs: np.ndarray, gguf_type: str
) -> tuple[bytes, str]:
    """The GGUF bytes and how well they agree with the policy on ``obs``.

    F32 must reproduce the actions (discrete: identical; Box: within the parity tolerance);
    F16 and Q8_0 round the weights, so their agreement is reported, not enforced."""
    artifact = export_gguf(description, weight_type=gguf_type)
    try:
        network = load_policy(artifact)
    except ModelLoadError as exc:
        raise ExportError(f"the server's gguf backend refuses the GGUF written: {exc}") from None
    got = network.forward(obs, [ACTION])[0]
    expected = evaluate(description, obs)[ACTION]
    if description.action_space == DISCRETE:
        same = int((got.reshape(-1) == expected.reshape(-1)).sum())
        agreement = f"{same} of {len(obs)} actions equal the policy's"
        ok = same == len(obs)
    else:
        error = float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max())
        agreement = f"action max abs error {error:.3g}"
        ok = error <= ACTION_ATOL
    if gguf_type.upper() == "F32" and not ok:
        raise ExportError(f"the F32 GGUF does not reproduce the policy: {agreement}")
    return artifact, agreement
