"""The request path of ModelInfer: route, decode, schedule, encode, count.

The handler owns the wire format on both sides (decode and encode, in protocol/tensors.py);
the version's scheduler sees decoded feeds and typed options and returns outputs; statistics
are recorded here, in one place, whatever the scheduler.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from forseti.core.errors import ResourceExhausted
from forseti.server.protocol.request_options import CallDeadline, request_options
from forseti.server.protocol.tensors import (
    PlainTensor,
    ResponseEncoder,
    classifications,
    classify,
    decode_inputs,
    decode_plain,
    requested_outputs,
)
from forseti.server.registry.lifecycle import LifecycleEvent, VersionReleased
from forseti.server.registry.loaded_version import LoadedVersion
from forseti.server.registry.model_registry import ModelRegistry
from forseti.server.scheduler.base import NO_OPTIONS, Execution
from forseti.server.stats import VersionStats

_now_ns = time.monotonic_ns
T = TypeVar("T")


class InferenceHandler:
    """Answers one ModelInferRequest against the registry's live versions."""

    def __init__(self, registry: ModelRegistry, max_inflight: int = 0) -> None:
        self.registry = registry
        self._route = registry.routing.route  # one call less than registry.route per request
        self.max_inflight = max_inflight  # 0: no server-wide limit
        self.inflight = 0  # requests between routing and answering
        self._encoders: dict[LoadedVersion, ResponseEncoder] = {}
        registry.hooks.subscribe(self)

    async def infer(
        self, request: pb.ModelInferRequest, context: CallDeadline | None = None
    ) -> pb.ModelInferResponse:
        """Run the request on the version it routes to; raises ForsetiError on bad input.

        While it runs, the version counts it as in flight, so a swap drains it before the
        version is released."""
        start = _now_ns()
        lv = self._admit(request.model_name, request.model_version)
        stats = lv.stats
        lv.acquire()
        self.inflight += 1
        try:
            spec = lv.spec
            feeds, batch = decode_inputs(request, spec)
            names = requested_outputs(request, spec, lv.output_names)
            # Triton's classification extension: only a request naming outputs can ask.
            classes = classifications(request) if request.outputs else None
            scheduler = lv.scheduler
            options = request_options(request, context) if scheduler.takes_options else NO_OPTIONS
            decoded = _now_ns()
            done = await scheduler.schedule(feeds, batch, names, options)
            answered = _now_ns()
            encoder = self._encoders.get(lv)
            if encoder is None:
                encoder = self._encoders[lv] = ResponseEncoder(lv.model, lv.version_str)
            if classes:
                outputs = classify(names, done.outputs, classes, spec)
                response = encoder.encode(request.id, names, outputs, retyped=True)
            else:
                response = encoder.encode(request.id, names, done.outputs)
            end = _now_ns()
        except BaseException:
            stats.record_failure(_now_ns() - start)
            raise
        finally:
            self.inflight -= 1
            lv.release()
        _record_success(stats, done, start, decoded, answered, end)
        return response

    async def infer_plain(
        self,
        model: str,
        version: str,
        inputs: Sequence[PlainTensor],
        outputs: Sequence[str],
        encode: Callable[[LoadedVersion, list[str], list[np.ndarray]], T],
    ) -> T | None:
        """`infer` for a request with no parameters whose inputs are already split from their
        wire format (the HTTP front door's), answered by `encode(version, names, outputs)`.

        Only the common case is taken: inputs that `decode_plain` accepts and known, distinct
        output names. Anything else returns None before anything is counted, and the caller
        sends the request's protobuf form to `infer`, whose checks word the error."""
        start = _now_ns()
        lv = self._admit(model, version)
        spec = lv.spec
        fast = decode_plain(inputs, spec)
        if fast is None:
            return None
        if outputs:
            names = list(outputs)
            if len(set(names)) != len(names) or any(n not in spec.outputs for n in names):
                return None
        else:
            names = lv.output_names
        feeds, batch = fast
        stats = lv.stats
        lv.acquire()
        self.inflight += 1
        try:
            decoded = _now_ns()
            done = await lv.scheduler.schedule(feeds, batch, names, NO_OPTIONS)
            answered = _now_ns()
            answer = encode(lv, names, done.outputs)
            end = _now_ns()
        except BaseException:
            stats.record_failure(_now_ns() - start)
            raise
        finally:
            self.inflight -= 1
            lv.release()
        _record_success(stats, done, start, decoded, answered, end)
        return answer

    def _admit(self, model: str, version: str) -> LoadedVersion:
        """The version a request routes to, unless the server is at its in-flight limit."""
        lv = self._route(model, version)
        if self.max_inflight and self.inflight >= self.max_inflight:
            raise ResourceExhausted(
                f"server is at its limit of {self.max_inflight} in-flight requests; retry later"
            )
        return lv

    async def on_event(self, event: LifecycleEvent) -> None:
        """A released version's encoder goes with it."""
        if isinstance(event, VersionReleased):
            self._encoders.pop(event.loaded, None)


def _record_success(
    stats: VersionStats, done: Execution, start: int, decoded: int, answered: int, end: int
) -> None:
    """One answered request in the version's statistics (times from `_now_ns`)."""
    stats.record_success(
        end - start,
        done.queue_ns,
        decoded - start,
        done.infer_ns,
        end - answered,
        done.executed,
        time.time_ns() // 1_000_000,
    )
