"""The request path of ModelInfer: route, check, run, answer, count."""

from __future__ import annotations

import time

from tritonclient.grpc import service_pb2 as pb

from forseti.server.protocol.tensors import decode_inputs, encode_outputs, requested_outputs
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
        lv.acquire()
        try:
            spec = lv.spec
            feeds, batch = decode_inputs(request, spec)
            names = requested_outputs(request, spec, lv.output_names)
            scheduler = lv.scheduler
            decoded = _now_ns()
            if scheduler.inline:
                infer_start = decoded
                results = scheduler.backend.run(feeds, names)
            else:
                results, infer_start = await scheduler.execute(feeds, names)
            infer_end = _now_ns()
            response = pb.ModelInferResponse(
                model_name=request.model_name, model_version=lv.version_str, id=request.id
            )
            encode_outputs(response, names, results)
            end = _now_ns()
        except BaseException:
            lv.stats.record_failure(_now_ns() - start)
            raise
        finally:
            lv.release()
        lv.stats.record_success(
            batch=batch,
            total_ns=end - start,
            queue_ns=infer_start - decoded,
            input_ns=decoded - start,
            infer_ns=infer_end - infer_start,
            output_ns=end - infer_end,
            now_ms=time.time_ns() // 1_000_000,
        )
        return response
