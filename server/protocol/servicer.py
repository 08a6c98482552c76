"""Triton's `inference.GRPCInferenceService`, answered from the model registry."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg

import forseti
from forseti.core.errors import (
    ForsetiError,
    InvalidArgument,
    new_request_id,
    refusal_message,
    with_request_id,
)
from forseti.core.repository.config import TensorSpec
from forseti.server.inference import InferenceHandler
from forseti.server.model_control import ModelControl
from forseti.server.protocol.load_parameters import load_parameters
from forseti.server.protocol.registration import MALFORMED
from forseti.server.registry.loaded_version import LoadedVersion
from forseti.server.registry.model_registry import ModelRegistry
from forseti.server.security.restricted import caller_identity
from forseti.server.stats import Duration

if TYPE_CHECKING:
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

log = logging.getLogger(__name__)

EXTENSIONS = [
    "model_repository",
    "model_configuration",
    "schedule_policy",
    "statistics",
    "classification",
    "forseti_sealed_artifacts",
]


@dataclass
class ServerState:
    """What ServerReady (and the health service's overall status) reports on top of model
    readiness."""

    started: bool = False
    stopping: bool = False
    strict_readiness: bool = True
    control_mode: str = "none"
    # Strict readiness was met once: a model added later (a poll finding a new folder, an
    # explicit load) is not ready while it loads, but the replica serves the others and
    # stays ready, so a fleet does not lose every endpoint at once while a model loads.
    became_ready: bool = False

    def is_ready(self, registry: ModelRegistry) -> bool:
        """Ready to take traffic: started, not stopping, and (strict readiness) every model
        meant to be served had a ready version."""
        if not self.started or self.stopping:
            return False
        if not self.strict_readiness or self.became_ready:
            return True
        self.became_ready = registry.ready()
        return self.became_ready


async def _abort_internal(context: Context, what: str) -> None:
    rid = new_request_id()
    log.exception("unexpected error", extra={"rpc": what, "request_id": rid})
    await context.abort(grpc.StatusCode.INTERNAL, with_request_id("internal error", rid))


async def _refuse(context: Context, rpc: str, exc: ForsetiError) -> None:
    await context.abort(exc.code, refusal_message(rpc, exc))


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def _version_statistics(lv: LoadedVersion) -> pb.ModelStatistics:
    s = lv.stats
    return pb.ModelStatistics(
        name=lv.model,
        version=lv.version_str,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success),
            fail=_duration(s.fail),
            queue=_duration(s.queue),
            compute_input=_duration(s.compute_input),
            compute_infer=_duration(s.compute_infer),
            compute_output=_duration(s.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
            for size, b in sorted(s.batches.items())
        ],
    )


# tritonclient ships no type information: its generated base class is Any to the checker.
class TritonServicer(pbg.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Every RPC of the service; errors become gRPC statuses, never a crash."""

    def __init__(
        self,
        registry: ModelRegistry,
        state: ServerState,
        handler: InferenceHandler,
        control: ModelControl,
    ) -> None:
        self.registry = registry
        self.state = state
        self.handler = handler
        self.control = control

    # ---- health and metadata ------------------------------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.state.is_ready(self.registry))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="forseti", version=forseti.__version__, extensions=EXTENSIONS
        )

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        try:
            self.registry.route(request.name, request.version)
        except ForsetiError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        try:
            lv = self.registry.route(request.name, request.version)
        except ForsetiError as exc:
            await _refuse(context, "ModelMetadata", exc)
        spec = lv.spec
        batch = [-1] if spec.batched else []

        def meta(tensors: dict[str, TensorSpec]) -> list[Any]:
            return [
                pb.ModelMetadataResponse.TensorMetadata(
                    name=t.name, datatype=t.ttype.name, shape=[*batch, *t.dims]
                )
                for t in tensors.values()
            ]

        return pb.ModelMetadataResponse(
            name=lv.model,
            versions=[v.version_str for v in self.registry.versions_of(lv.model)],
            platform=spec.config.platform or spec.config.backend,
            inputs=meta(spec.inputs),
            outputs=meta(spec.outputs),
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Context
    ) -> pb.ModelConfigResponse:
        try:
            lv = self.registry.route(request.name, request.version)
        except ForsetiError as exc:
            await _refuse(context, "ModelConfig", exc)
        return pb.ModelConfigResponse(config=lv.spec.config)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        try:
            if request.name:
                if request.version:
                    versions = [
                        self.registry.routing.statistics_route(request.name, request.version)
                    ]
                else:
                    self.registry.route(request.name, "")
                    versions = self.registry.versions_of(request.name)
            else:
                versions = list(self.registry.loaded_versions())
        except ForsetiError as exc:
            await _refuse(context, "ModelStatistics", exc)
        versions.sort(key=lambda lv: (lv.model, lv.version))
        return pb.ModelStatisticsResponse(model_stats=[_version_statistics(v) for v in versions])

    # ---- inference ----------------------------------------------------------------------

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        if request is MALFORMED:
            await _refuse(
                context,
                "ModelInfer",
                InvalidArgument("malformed ModelInfer request: it does not parse"),
            )
        try:
            return await self.handler.infer(request, context)
        except ForsetiError as exc:
            await _refuse(context, "ModelInfer", exc)
        except Exception:
            await _abort_internal(context, "ModelInfer")

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            if request is MALFORMED:
                refused = InvalidArgument("malformed ModelInferRequest")
                yield _stream_error(
                    pb.ModelInferRequest(), refusal_message("ModelStreamInfer", refused)
                )
                continue
            try:
                response = await self.handler.infer(request, context)
            except ForsetiError as exc:
                yield _stream_error(request, refusal_message("ModelStreamInfer", exc))
                continue
            except Exception:
                rid = new_request_id()
                log.exception(
                    "unexpected error", extra={"rpc": "ModelStreamInfer", "request_id": rid}
                )
                yield _stream_error(request, with_request_id("internal error", rid))
                continue
            yield pb.ModelStreamInferResponse(infer_response=response)

    # ---- repository ---------------------------------------------------------------------

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        try:
            items = await self.control.index(request.ready, caller_identity(context))
        except Exception:
            await _abort_internal(context, "RepositoryIndex")
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=i.name, version=i.version, state=i.state, reason=i.reason
                )
                for i in items
            ]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        try:
            await self.control.load(
                request.model_name,
                bool(request.parameters),
                caller_identity(context),
                load_parameters(request.parameters),
            )
        except ForsetiError as exc:
            await _refuse(context, "RepositoryModelLoad", exc)
        except Exception:
            await _abort_internal(context, "RepositoryModelLoad")
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        try:
            await self.control.unload(request.model_name, caller_identity(context))
        except ForsetiError as exc:
            await _refuse(context, "RepositoryModelUnload", exc)
        except Exception:
            await _abort_internal(context, "RepositoryModelUnload")
        return pb.RepositoryModelUnloadResponse()

    # ---- what Forseti does not do -------------------------------------------------------

    async def _unsupported(self, context: Context, what: str, hint: str) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, f"Forseti does not support {what}; {hint}"
        )

    async def SystemSharedMemoryStatus(self, request: Any, context: Context) -> None:
        await self._unsupported(context, "system shared memory", "send tensors in the request")

    async def SystemSharedMemoryRegister(self, request: Any, context: Context) -> None:
        await self._unsupported(context, "system shared memory", "send tensors in the request")

    async def SystemSharedMemoryUnregister(self, request: Any, context: Context) -> None:
        await self._unsupported(context, "system shared memory", "send tensors in the request")

    async def CudaSharedMemoryStatus(self, request: Any, context: Context) -> None:
        await self._unsupported(context, "CUDA shared memory", "send tensors in the request")

    async def CudaSharedMemoryRegister(self, request: Any, context: Context) -> None:
        await self._unsupported(context, "CUDA shared memory", "send tensors in the request")

    async def CudaSharedMemoryUnregister(self, request: Any, context: Context) -> None:
        await self._unsupported(context, "CUDA shared memory", "send tensors in the request")

    async def TraceSetting(self, request: Any, context: Context) -> None:
        await self._unsupported(context, "trace settings", "use /metrics and the server log")

    async def LogSettings(self, request: Any, context: Context) -> None:
        await self._unsupported(context, "log settings over gRPC", "use --log-level at start")


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )
