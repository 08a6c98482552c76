"""The ``config.pbtxt`` of a policy model: Triton's ModelConfig, built as a protobuf message
(never by string templates) and written in protobuf text format."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from .errors import ExportError
from .policy_description import IOSpec, PolicyDescription, policy_inputs, policy_outputs

Backend = Literal["onnxruntime", "gguf"]
BACKENDS: tuple[str, ...] = ("onnxruntime", "gguf")


def description_parameters(desc: PolicyDescription) -> dict[str, str]:
    """The config parameters the description itself determines."""
    params = {
        "algorithm": desc.algorithm,
        "action_space": desc.action_space,
        "action_transform": desc.action_transform,
        "obs_dim": str(desc.obs_dim),
        "obs_normalization": str(desc.obs_normalization is not None).lower(),
    }
    if desc.n_actions is not None:
        params["n_actions"] = str(desc.n_actions)
    if desc.action_dim is not None:
        params["action_dim"] = str(desc.action_dim)
    if desc.action_low is not None and desc.action_high is not None:
        params["action_low"] = json.dumps([float(v) for v in desc.action_low])
        params["action_high"] = json.dumps([float(v) for v in desc.action_high])
    return params


def _tensor(message: mc.ModelInput | mc.ModelOutput, spec: IOSpec) -> None:
    message.name = spec.name
    message.data_type = mc.DataType.Value(spec.data_type)
    message.dims.extend(spec.dims)


def policy_config(
    model_name: str,
    desc: PolicyDescription,
    *,
    max_batch_size: int,
    parameters: Mapping[str, str],
    backend: Backend = "onnxruntime",
    dynamic_batching: bool = False,
) -> mc.ModelConfig:
    """The ModelConfig message of a policy model (see ``policy_config_text``)."""
    if backend not in BACKENDS:
        raise ExportError(f"backend must be one of {', '.join(BACKENDS)}, not '{backend}'")
    if max_batch_size < 1:
        # The policy's input is [-1, obs_dim]: the first dimension is always the batch.
        raise ExportError(f"max_batch_size must be >= 1 for a policy, got {max_batch_size}")
    params = description_parameters(desc)
    for key, value in parameters.items():
        if not isinstance(value, str):
            raise ExportError(f"config parameter '{key}' must be a string, got {type(value)}")
        if key in params and params[key] != value:
            raise ExportError(
                f"config parameter '{key}'='{value}' contradicts the policy ('{params[key]}'); "
                "leave it out, it is filled from the policy"
            )
        params[key] = value
    config = mc.ModelConfig(name=model_name, max_batch_size=max_batch_size)
    if backend == "onnxruntime":
        config.platform = "onnxruntime_onnx"
    else:
        config.backend = "gguf"
    for spec in policy_inputs(desc):
        _tensor(config.input.add(), spec)
    for spec in policy_outputs(desc):
        _tensor(config.output.add(), spec)
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    if dynamic_batching:
        config.dynamic_batching.SetInParent()  # Triton's defaults: no delay, no preferred sizes
    for key in sorted(params):
        config.parameters[key].string_value = params[key]
    return config


def policy_config_text(
    model_name: str,
    desc: PolicyDescription,
    *,
    max_batch_size: int,
    parameters: Mapping[str, str],
    backend: Backend = "onnxruntime",
    dynamic_batching: bool = False,
) -> str:
    """``config.pbtxt`` text for a policy: input ``obs``, outputs as ``policy_outputs(desc)``,
    one CPU instance, and ``parameters`` (env id, run id, ... from the caller) merged with the
    policy's own (algorithm, action space and bounds, obs_dim); a caller value that contradicts
    the policy raises ExportError."""
    config = policy_config(
        model_name,
        desc,
        max_batch_size=max_batch_size,
        parameters=parameters,
        backend=backend,
        dynamic_batching=dynamic_batching,
    )
    return text_format.MessageToString(config)
