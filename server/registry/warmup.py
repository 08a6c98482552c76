"""Warm a freshly loaded version up and check its outputs against the config."""

from __future__ import annotations

import time

import numpy as np

from forseti.core.datatypes import BYTES
from forseti.core.errors import ModelLoadError, library_failure
from forseti.core.repository.config import ModelSpec
from forseti.server.backends.base import Backend


def _zeros(spec: ModelSpec, batch: int) -> dict[str, np.ndarray]:
    """Zeros ("0" strings for BYTES) for every required input; optional ones are left out,
    as a request may leave them out."""
    feeds = {}
    for name, ts in spec.inputs.items():
        if ts.optional:
            continue
        dims = tuple(1 if d == -1 else d for d in ts.dims)
        shape = (batch, *dims) if spec.batched else dims
        if ts.ttype is BYTES:
            # "0" rather than "": models that parse their strings as numbers take it too.
            feeds[name] = np.full(shape, "0", dtype=np.object_)
        else:
            feeds[name] = np.zeros(shape, dtype=ts.ttype.dtype)
    return feeds


def warm_up(spec: ModelSpec, backend: Backend, runs: int = 3) -> int:
    """Run zero inputs at batch 1 and the largest batch; refuse outputs the config does not
    describe. A version only takes requests after this passes. Returns the slowest of the
    last runs at each batch size, in nanoseconds."""
    slowest = 0
    batches = [1, spec.max_batch_size] if spec.max_batch_size > 1 else [1]
    names = list(spec.outputs)
    for batch in batches:
        feeds = _zeros(spec, batch)
        for _ in range(runs):
            started = time.monotonic_ns()
            try:
                results = backend.run(feeds, names)
            except Exception as exc:
                raise library_failure(
                    f"warm-up inference failed at batch {batch}", exc, model=spec.name
                ) from None
            elapsed = time.monotonic_ns() - started
        slowest = max(slowest, elapsed)
        for name, arr in zip(names, results, strict=True):
            ts = spec.outputs[name]
            if arr.dtype != ts.ttype.dtype:
                raise ModelLoadError(
                    f"output '{name}': model returns {arr.dtype}, config says {ts.ttype.name}"
                )
            want = ((batch,) if spec.batched else ()) + ts.dims
            if len(arr.shape) != len(want) or any(
                w != -1 and w != g for w, g in zip(want, arr.shape, strict=True)
            ):
                raise ModelLoadError(
                    f"output '{name}': model returns shape {list(arr.shape)} at batch {batch}, "
                    f"config says {ts.describe(spec.batched)}"
                )
    return slowest
