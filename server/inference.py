"""The request path of ModelInfer: route, check, run, answer, count."""

from __future__ import annotations

import time

import grpc
from tritonclient.grpc import service_pb2 as pb

from forseti.core.errors import ResourceExhausted
from forseti.server.protocol.tensors import decode_inputs, requested_outputs
from forseti.server.registry.loaded_version import LoadedVersion
from forseti.server.registry.model_registry import ModelRegistry

_now_ns = time.monotonic_ns


class InferenceHandler:
    """Answers one ModelInferRequest against the registry's live versions."""

    def __init__(self, registry: ModelRegistry, max_inflight: int = 0) -> None:
        self.registry = registry
        self.max_inflight = max_inflight  # 0: no server-wide limit
        self.inflight = 0  # requests waiting on a queue or a worker thread

    async def infer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext | None = None
    ) -> pb.ModelInferResponse:
        """Run the request on the version it routes to; raises ForsetiError on bad input."""
        start = _now_ns()
        lv = self.registry.route(request.model_name, request.model_version)
        if self.max_inflight and self.inflight >= self.max_inflight:
            raise ResourceExhausted(
                f"server is at its limit of {self.max_inflight} in-flight requests; retry later"
            )
        if lv.scheduler.inline:
            return self._infer_inline(lv, request, start)
        return await self._infer_awaited(lv, request, start, context)

    async def _infer_awaited(
        self,
        lv: LoadedVersion,
        request: pb.ModelInferRequest,
        start: int,
        context: grpc.aio.ServicerContext | None,
    ) -> pb.ModelInferResponse:
        """Through the dynamic batcher or an instance thread; while this awaits, the version
        counts the request as in flight, so a swap drains it before releasing the version."""
        lv.acquire()
        self.inflight += 1
        try:
            spec = lv.spec
            feeds, batch = decode_inputs(request, spec)
            names = requested_outputs(request, spec, lv.output_names)
            decoded = _now_ns()
            if lv.batcher is not None:
                result = await lv.batcher.submit(
                    feeds, batch, names, request.parameters, _grpc_deadline_ns(context)
                )
            else:
                result = await lv.scheduler.execute(feeds, names)
            answered = _now_ns()
            response = lv.responses.build(request.id, names, result.outputs)
            end = _now_ns()
        except BaseException:
            lv.stats.record_failure(_now_ns() - start)
            raise
        finally:
            self.inflight -= 1
            lv.release()
        stats = lv.stats
        stats.record_request(
            end - start,
            result.queue_ns,
            decoded - start,
            result.infer_ns,
            end - answered,
            time.time_ns() // 1_000_000,
        )
        if lv.batcher is None:  # the batcher counts its own executions
            stats.record_execution(batch, decoded - start, result.infer_ns, end - answered)
        return response

    @staticmethod
    def _infer_inline(
        lv: LoadedVersion, request: pb.ModelInferRequest, start: int
    ) -> pb.ModelInferResponse:
        """The fast path: no await between routing and answering, so no swap can interleave
        and the version needs no in-flight count to drain."""
        try:
            spec = lv.spec
            feeds, batch = decode_inputs(request, spec)
            names = requested_outputs(request, spec, lv.output_names)
            decoded = _now_ns()
            results = lv.backend.run(feeds, names)
            infer_end = _now_ns()
            response = lv.responses.build(request.id, names, results)
            end = _now_ns()
        except BaseException:
            lv.stats.record_failure(_now_ns() - start)
            raise
        lv.stats.record_success(
            batch,
            end - start,
            0,
            decoded - start,
            infer_end - decoded,
            end - infer_end,
            time.time_ns() // 1_000_000,
        )
        return response


def _grpc_deadline_ns(context: grpc.aio.ServicerContext | None) -> int:
    """The call's gRPC deadline on the monotonic clock, 0 when it has none."""
    if context is None:
        return 0
    remaining = context.time_remaining()
    return 0 if remaining is None else _now_ns() + int(remaining * 1e9)
