"""onnxruntime backend: sessions built from in-memory bytes, tuned for batch-1 latency."""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from tritonclient.grpc import model_config_pb2 as mc

from forseti.core.datatypes import ORT_TYPE_NAMES
from forseti.core.errors import ModelLoadError, library_failure
from forseti.core.repository.config import ModelSpec, TensorSpec, parameter
from forseti.server.backends.onnx_external_data import parse_model, refuse_external_data

log = logging.getLogger(__name__)


def choose_providers(config: mc.ModelConfig, available: list[str]) -> list[str]:
    """Execution providers allowed by the config's instance_group and present in this build."""
    kinds = {g.kind for g in config.instance_group} or {mc.ModelInstanceGroup.KIND_AUTO}
    wants_gpu = mc.ModelInstanceGroup.KIND_GPU in kinds
    cpu_only = kinds == {mc.ModelInstanceGroup.KIND_CPU}
    accelerators = {
        a.name for a in config.optimization.execution_accelerators.gpu_execution_accelerator
    }
    providers: list[str] = []
    if not cpu_only:
        if "tensorrt" in accelerators and "TensorrtExecutionProvider" in available:
            providers.append("TensorrtExecutionProvider")
        if "CUDAExecutionProvider" in available:
            providers.append("CUDAExecutionProvider")
    if wants_gpu and not providers:
        raise ModelLoadError(
            "instance_group asks for KIND_GPU but onnxruntime has no GPU execution provider "
            f"here (available: {', '.join(available)})"
        )
    providers.append("CPUExecutionProvider")
    return providers


def instance_count(config: mc.ModelConfig) -> int:
    """Total instances over the config's instance groups (Triton's default is one)."""
    total = sum(max(g.count, 1) for g in config.instance_group)
    return max(total, 1)


def session_options(config: mc.ModelConfig) -> ort.SessionOptions:
    """The options every session of `config` is built with (the latency benchmark's
    onnxruntime floor builds its session with the same)."""
    so = ort.SessionOptions()
    # One intra-op thread: a batch-1 policy decision is microseconds of work, and waking a
    # thread pool costs more than it saves. Triton's parameter names override.
    so.intra_op_num_threads = int(parameter(config, "intra_op_thread_count", "1") or 1)
    so.inter_op_num_threads = int(parameter(config, "inter_op_thread_count", "1") or 1)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Never write an optimised copy of the model or a profile: no plaintext on disk.
    so.optimized_model_filepath = ""
    so.enable_profiling = False
    so.log_severity_level = 3
    return so


def _dims_compatible(model_dims: list, spec: TensorSpec, max_batch_size: int) -> bool:
    """Config dims (the reshape, where there is one) fit the model's: a fixed model dim must
    be matched exactly by the config."""
    want = ([-1] if max_batch_size > 0 else []) + list(spec.model_dims or ())
    if len(model_dims) != len(want):
        return False
    for position, (got, expected) in enumerate(zip(model_dims, want, strict=True)):
        fixed = got if isinstance(got, int) and got > 0 else None
        if fixed is None:
            continue
        if position == 0 and max_batch_size > 0:
            # Only a batch-of-one model may fix its batch dimension.
            if not (fixed == 1 and max_batch_size == 1):
                return False
        elif expected != fixed:
            return False
    return True


def _is_scalar_as_one(model_dims: list, spec: TensorSpec, max_batch_size: int) -> bool:
    """A rank-0 model tensor that a non-batching config declares with dims of ones ([1],
    [1, 1]), as Triton accepts: clients send and receive that shape."""
    return (
        not model_dims
        and max_batch_size == 0
        and bool(spec.dims)
        and all(d == 1 for d in spec.dims)
        and not spec.reshaped
    )


@dataclass(frozen=True)
class Signature:
    """What the model's own signature asks of the feeds beyond the config: tensors whose
    model shape differs from the config's dims (a `reshape`, or a rank-0 tensor declared as
    [1]) by their model-side dims, and optional config inputs the model does not have."""

    reshape_inputs: dict[str, tuple[int, ...]]  # name -> model dims (batch excluded)
    reshape_outputs: dict[str, tuple[int, ...]]  # name -> config dims (batch excluded)
    absent_optional: frozenset[str]


def check_signature(session: ort.InferenceSession, spec: ModelSpec) -> Signature:
    """Refuse a model whose inputs/outputs disagree with the config."""
    model_inputs = {i.name: i for i in session.get_inputs()}
    # Inputs with a default (initializers a request may override) are optional in the model.
    overridable = {i.name: i for i in session.get_overridable_initializers()}
    model_outputs = {o.name: o for o in session.get_outputs()}
    reshape: dict[str, dict[str, tuple[int, ...]]] = {"input": {}, "output": {}}
    absent: set[str] = set()
    for kind, declared, actual in (
        ("input", spec.inputs, {**overridable, **model_inputs}),
        ("output", spec.outputs, model_outputs),
    ):
        for name, ts in declared.items():
            node = actual.get(name)
            if node is None:
                if ts.optional:
                    absent.add(name)
                    continue
                raise ModelLoadError(
                    f"config {kind} '{name}' is not in the model; model has {sorted(actual)}"
                )
            got = ORT_TYPE_NAMES.get(node.type, node.type)
            if got != ts.ttype.name:
                raise ModelLoadError(
                    f"{kind} '{name}': config says {ts.ttype.name}, model has {got}"
                )
            shape = list(node.shape)
            if _is_scalar_as_one(shape, ts, spec.max_batch_size):
                reshape[kind][name] = () if kind == "input" else ts.dims
                continue
            if ts.reshaped:
                reshape[kind][name] = (ts.model_dims or ()) if kind == "input" else ts.dims
            if not _dims_compatible(shape, ts, spec.max_batch_size):
                raise ModelLoadError(
                    f"{kind} '{name}': config shape {ts.describe(spec.batched)} does not fit "
                    f"the model's {shape}"
                )
    missing = sorted(set(model_inputs) - set(spec.inputs))
    if missing:
        raise ModelLoadError(f"model inputs {missing} are not declared in the config")
    return Signature(reshape["input"], reshape["output"], frozenset(absent))


class OnnxRuntimeBackend:
    """One onnxruntime session per instance; `run` borrows a free one."""

    def __init__(self, spec: ModelSpec, model_bytes: bytes) -> None:
        # Before any session is built: onnxruntime would read a tensor's external data from a
        # path relative to the working directory and could serve that file's bytes.
        try:
            model = parse_model(model_bytes)
        except Exception as exc:  # google.protobuf's DecodeError: not an ONNX model
            raise library_failure("onnxruntime could not load the model", exc) from None
        refuse_external_data(model)
        del model
        self.providers = choose_providers(spec.config, ort.get_available_providers())
        self.instance_count = instance_count(spec.config)
        options = session_options(spec.config)
        try:
            sessions = [
                ort.InferenceSession(model_bytes, options, providers=self.providers)
                for _ in range(self.instance_count)
            ]
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise library_failure("onnxruntime could not load the model", exc) from None
        signature = check_signature(sessions[0], spec)
        self._batched = spec.batched
        self._reshape_inputs = signature.reshape_inputs
        self._reshape_outputs = signature.reshape_outputs
        self._absent = signature.absent_optional
        # Reshaped tensors and optional inputs the model lacks need the feeds adjusted; the
        # common model needs nothing, and its run pays one truth test.
        self._adjust = bool(self._reshape_inputs or self._reshape_outputs or self._absent)
        self._sessions = sessions
        self._free: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
        for s in sessions:
            self._free.put(s)
        self._first: ort.InferenceSession | None = sessions[0]
        # InferenceSession.run checks the feed's names against the model on every call (a few
        # pybind calls, ~3 us of a cold batch-1 decision); the config was checked against the
        # model's signature above and every request is checked against the config, so a
        # single-instance model calls the bound session's run directly where it exists.
        bound = getattr(sessions[0], "_sess", None)
        self._run_one = bound.run if bound is not None and hasattr(bound, "run") else None
        log.debug("onnxruntime sessions ready", extra={"providers": self.providers})

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
        if self._adjust:
            return self._run_adjusted(feeds, output_names)
        # The plain run inline: one Python call less on every request of a common model.
        if self.instance_count == 1 and self._run_one is not None:
            return self._run_one(output_names, feeds, None)
        return self._run(feeds, output_names)

    def _run_adjusted(
        self, feeds: dict[str, np.ndarray], output_names: list[str]
    ) -> list[np.ndarray]:
        """Feeds in the model's shapes, outputs in the config's (batch dimension kept)."""
        batch: tuple[int, ...] = ()
        if self._batched and feeds:
            batch = (next(iter(feeds.values())).shape[0],)
        reshape_in = self._reshape_inputs
        model_feeds = {}
        for name, arr in feeds.items():
            if name in self._absent:
                continue
            dims = reshape_in.get(name)
            model_feeds[name] = arr if dims is None else arr.reshape(batch + dims)
        outputs = self._run(model_feeds, output_names)
        reshape_out = self._reshape_outputs
        if not reshape_out:
            return outputs
        if self._batched and not batch and outputs:
            batch = (np.asarray(outputs[0]).shape[0],)
        return [
            out if name not in reshape_out else np.asarray(out).reshape(batch + reshape_out[name])
            for name, out in zip(output_names, outputs, strict=True)
        ]

    def _run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
        if self.instance_count == 1:
            if self._run_one is not None:
                return self._run_one(output_names, feeds, None)
            assert self._first is not None, "backend used after close"
            return self._first.run(output_names, feeds)
        session = self._free.get()
        try:
            return session.run(output_names, feeds)
        finally:
            self._free.put(session)

    def close(self) -> None:
        self._sessions.clear()
        self._first = None
        self._run_one = None
