"""gguf backend: a GGUF policy artifact run as a numpy MLP (``forseti.core.gguf.reader``).

The reader opens the bytes in memory only and checks the file's own structure; this module
checks the policy against the model's config and serves it.
"""

from __future__ import annotations

import logging

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from forseti.core.errors import ModelLoadError
from forseti.core.gguf import policy_format as fmt
from forseti.core.gguf.reader import PolicyNetwork, load_policy
from forseti.core.repository.config import ModelSpec, TensorSpec, parameter

log = logging.getLogger(__name__)


# ---- the config ----


def _dims_fit(declared: TensorSpec, inner: tuple[int, ...], batched: bool) -> bool:
    if batched:
        return declared.dims == inner
    # Without Triton batching the config names the batch dimension itself.
    return len(declared.dims) == len(inner) + 1 and declared.dims[1:] == inner


def check_config(net: PolicyNetwork, spec: ModelSpec) -> None:
    """The config's inputs, outputs, instance kinds and policy parameters fit the file."""
    kinds = {g.kind for g in spec.config.instance_group}
    if mc.ModelInstanceGroup.KIND_GPU in kinds:
        raise ModelLoadError("the gguf backend runs on CPU; use instance_group kind KIND_CPU")
    if set(spec.inputs) != {fmt.INPUT_NAME}:
        raise ModelLoadError(
            f"config inputs {sorted(spec.inputs)}; a gguf policy takes exactly '{fmt.INPUT_NAME}'"
        )
    obs = spec.inputs[fmt.INPUT_NAME]
    if obs.ttype.name != "FP32" or not _dims_fit(obs, (net.obs_dim,), spec.batched):
        raise ModelLoadError(
            f"input '{obs.name}': config says {obs.describe(spec.batched)}, "
            f"the policy takes FP32 [-1, {net.obs_dim}]"
        )
    for name, ts in spec.outputs.items():
        if name not in net.outputs:
            raise ModelLoadError(
                f"config output '{name}' is not in the policy; it has {sorted(net.outputs)}"
            )
        ttype, dims = net.outputs[name]
        if ts.ttype.name != ttype or not _dims_fit(ts, dims, spec.batched):
            shown = ", ".join(map(str, dims))
            raise ModelLoadError(
                f"output '{name}': config says {ts.describe(spec.batched)}, "
                f"the policy gives {ttype} [-1, {shown}]"
            )
    model_params = {
        "algorithm": net.algorithm,
        "obs_dim": str(net.obs_dim),
        "action_space": net.action_space,
        "action_transform": net.action_transform,
    }
    model_params["n_actions" if net.action_space == fmt.DISCRETE else "action_dim"] = str(
        net.head_dim
    )
    # Parameters the exporter writes; when the config has one, it must agree with the file.
    for key, value in model_params.items():
        declared = parameter(spec.config, key)
        if declared is not None and declared != value:
            raise ModelLoadError(
                f"config parameter '{key}'='{declared}' contradicts the gguf policy ('{value}')"
            )


def instance_count(config: mc.ModelConfig) -> int:
    """Total instances over the config's instance groups (Triton's default is one)."""
    return max(sum(max(g.count, 1) for g in config.instance_group), 1)


class GGUFPolicyBackend:
    """A checked GGUF policy run with numpy; stateless, so every instance shares the weights."""

    def __init__(self, spec: ModelSpec, model_bytes: bytes) -> None:
        self.network = load_policy(model_bytes)
        check_config(self.network, spec)
        self.instance_count = instance_count(spec.config)
        log.debug(
            "gguf policy ready algorithm=%s obs_dim=%d actor_layers=%d",
            self.network.algorithm,
            self.network.obs_dim,
            len(self.network.actor),
        )

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
        return self.network.forward(feeds[fmt.INPUT_NAME], output_names)

    def close(self) -> None:
        self.network = None  # type: ignore[assignment]
