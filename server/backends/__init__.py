"""Backends that run a model's artifact: chosen by the config's platform/backend."""

from __future__ import annotations

from forseti.core.errors import ModelLoadError
from forseti.core.repository.config import ModelSpec
from forseti.server.backends.base import Backend


def create_backend(spec: ModelSpec, model_bytes: bytes) -> Backend:
    """Build the backend for `spec` from the opened artifact, in memory."""
    if spec.backend == "onnxruntime":
        from forseti.server.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(spec, model_bytes)
    if spec.backend == "gguf":
        from forseti.server.backends.gguf_backend import GGUFPolicyBackend

        return GGUFPolicyBackend(spec, model_bytes)
    raise ModelLoadError(f"backend '{spec.backend}' is not available in this server build")
