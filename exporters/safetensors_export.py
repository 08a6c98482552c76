"""PolicyDescription <-> safetensors: every tensor under a stable name, and the architecture as
metadata strings, so any safetensors reader can rebuild the policy (no pickle anywhere).

Tensor names: ``actor.{i}.weight`` [out, in] / ``actor.{i}.bias`` (float32), the same for
``value.{i}``; ``obs_normalization.mean`` / ``.var`` (float64, as VecNormalize keeps them);
``action.low`` / ``action.high`` (float32). Metadata: see ``_metadata``.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from .errors import ExportError
from .policy_description import (
    ACTIVATIONS,
    DenseLayer,
    ObsNormalization,
    PolicyDescription,
)

FORMAT = "forseti.policy"
FORMAT_VERSION = "1"


def _metadata(desc: PolicyDescription) -> dict[str, str]:
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "algorithm": desc.algorithm,
        "obs_dim": str(desc.obs_dim),
        "obs_shape": json.dumps(list(desc.obs_shape or (desc.obs_dim,))),
        "action_space": desc.action_space,
        "action_transform": desc.action_transform,
        "extra_output": desc.extra_output or "",
        "actor_activations": json.dumps([layer.activation for layer in desc.actor]),
        "activation_semantics": json.dumps(ACTIVATIONS),
    }
    if desc.n_actions is not None:
        meta["n_actions"] = str(desc.n_actions)
    if desc.action_dim is not None:
        meta["action_dim"] = str(desc.action_dim)
    if desc.value is not None:
        meta["value_activations"] = json.dumps([layer.activation for layer in desc.value])
    if desc.obs_normalization is not None:
        meta["obs_normalization.epsilon"] = repr(desc.obs_normalization.epsilon)
        meta["obs_normalization.clip"] = repr(desc.obs_normalization.clip)
    return meta


def export_safetensors(desc: PolicyDescription) -> bytes:
    """The description as safetensors bytes (tensors and metadata as described above)."""
    tensors: dict[str, np.ndarray] = {}
    chains = [("actor", desc.actor)] + ([("value", desc.value)] if desc.value else [])
    for prefix, layers in chains:
        for i, layer in enumerate(layers):
            tensors[f"{prefix}.{i}.weight"] = np.ascontiguousarray(layer.weight)
            tensors[f"{prefix}.{i}.bias"] = np.ascontiguousarray(layer.bias)
    if desc.obs_normalization is not None:
        tensors["obs_normalization.mean"] = np.ascontiguousarray(desc.obs_normalization.mean)
        tensors["obs_normalization.var"] = np.ascontiguousarray(desc.obs_normalization.var)
    if desc.action_low is not None and desc.action_high is not None:
        tensors["action.low"] = np.ascontiguousarray(desc.action_low)
        tensors["action.high"] = np.ascontiguousarray(desc.action_high)
    return st_save(tensors, metadata=_metadata(desc))


def _read_metadata(data: bytes) -> dict[str, str]:
    # The safetensors header: u64 little-endian length, then JSON with "__metadata__".
    if len(data) < 8:
        raise ExportError("not a safetensors file: shorter than its header length")
    (length,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + length])
    except ValueError as exc:
        raise ExportError(f"not a safetensors file: unreadable header ({exc})") from None
    return dict(header.get("__metadata__") or {})


def _chain(
    tensors: dict[str, np.ndarray], prefix: str, activations: list[Any]
) -> tuple[DenseLayer, ...]:
    layers = []
    for i, activation in enumerate(activations):
        try:
            weight, bias = tensors[f"{prefix}.{i}.weight"], tensors[f"{prefix}.{i}.bias"]
        except KeyError as exc:
            raise ExportError(f"policy safetensors lacks tensor {exc}") from None
        layers.append(DenseLayer(weight, bias, str(activation)))
    return tuple(layers)


def description_from_safetensors(data: bytes) -> PolicyDescription:
    """Rebuild a PolicyDescription from ``export_safetensors`` bytes; ExportError if they are
    not a Forseti policy or are inconsistent."""
    meta = _read_metadata(data)
    if meta.get("format") != FORMAT:
        raise ExportError(f"not a Forseti policy safetensors file (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"unsupported policy format_version {meta.get('format_version')!r}")
    try:
        tensors = st_load(data)
        norm = None
        if "obs_normalization.epsilon" in meta:
            norm = ObsNormalization(
                mean=tensors["obs_normalization.mean"],
                var=tensors["obs_normalization.var"],
                epsilon=float(meta["obs_normalization.epsilon"]),
                clip=float(meta["obs_normalization.clip"]),
            )
        value = None
        if "value_activations" in meta:
            value = _chain(tensors, "value", json.loads(meta["value_activations"]))
        return PolicyDescription(
            algorithm=meta["algorithm"],
            obs_dim=int(meta["obs_dim"]),
            action_space=meta["action_space"],
            n_actions=int(meta["n_actions"]) if "n_actions" in meta else None,
            action_dim=int(meta["action_dim"]) if "action_dim" in meta else None,
            action_low=tensors.get("action.low"),
            action_high=tensors.get("action.high"),
            action_transform=meta["action_transform"],
            obs_normalization=norm,
            actor=_chain(tensors, "actor", json.loads(meta["actor_activations"])),
            value=value,
            extra_output=meta["extra_output"] or None,
            obs_shape=tuple(int(s) for s in json.loads(meta["obs_shape"])),
        )
    except KeyError as exc:
        raise ExportError(f"policy safetensors lacks {exc}") from None
    except (ValueError, TypeError) as exc:
        raise ExportError(f"policy safetensors is malformed: {exc}") from None
