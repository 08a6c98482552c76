"""The request path of ModelInfer: route, check, run, answer, count."""

from __future__ import annotations

import time

from tritonclient.grpc import service_pb2 as pb

from forseti.server.protocol.tensors import decode_inputs, requested_outputs
from forseti.server.registry.loaded_version import LoadedVersion
from forseti.server.registry.model_registry import ModelRegistry

_now_ns = time.monotonic_ns


class InferenceHandler:
    """Answers one ModelInferRequest against the registry's live versions."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    async def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """Run the request on the version it routes to; raises ForsetiError on bad input."""
        start = _now_ns()
        lv = self.registry.route(request.model_name, request.model_version)
        if lv.scheduler.inline:
            return self._infer_inline(lv, request, start)
        lv.acquire()
        try:
            spec = lv.spec
            feeds, batch = decode_inputs(request, spec)
            names = requested_outputs(request, spec, lv.output_names)
            decoded = _now_ns()
            results, infer_start = await lv.scheduler.execute(feeds, names)
            infer_end = _now_ns()
            response = lv.responses.build(request.id, names, results)
            end = _now_ns()
        except BaseException:
            lv.stats.record_failure(_now_ns() - start)
            raise
        finally:
            lv.release()
        lv.stats.record_success(
            batch,
            end - start,
            infer_start - decoded,
            decoded - start,
            infer_end - infer_start,
            end - infer_end,
            time.time_ns() // 1_000_000,
        )
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
