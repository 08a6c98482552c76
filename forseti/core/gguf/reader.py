"""Read a GGUF policy artifact (``policy_format``) into a numpy MLP.

Parsing never writes plaintext to disk: the bytes go into an anonymous in-memory file
(``memfd_create``) whose ``/proc/self/fd`` path ``gguf.GGUFReader`` memory-maps. Before the
reader sees the bytes, a bounded walk of the GGUF structure (``structure``) checks every count,
length, type and offset against the file size and the format's limits, so a hostile file is
refused with a reason instead of making the reader loop or allocate without bound. Then every
metadata key and tensor shape is checked against the others, the weights are dequantised once to
float32, and inference is plain numpy (no torch, no onnxruntime). The server's gguf backend, the
exporters' round-trip check and the trainer's gate all run policies through this one reader.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from forseti.core.errors import ModelLoadError, library_failure
from forseti.core.gguf import policy_format as fmt
from forseti.core.gguf.structure import WEIGHT_QTYPES, check_structure
from forseti.core.gguf.structure import refuse as _refuse

log = logging.getLogger(__name__)

# ---- reading through gguf.GGUFReader from an in-memory file ----


@dataclass
class _RawPolicy:
    fields: dict[str, tuple[list[GGUFValueType], Any]]  # key -> (types, contents)
    tensors: dict[str, tuple[GGMLQuantizationType, tuple[int, ...], np.ndarray]]


def _read(data: bytes) -> _RawPolicy:
    """Parse with gguf.GGUFReader from an anonymous memory file; dequantise every tensor."""
    fd = os.memfd_create("forseti-gguf", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as fh:
            fh.write(data)
        try:
            reader = GGUFReader(f"/proc/self/fd/{fd}")
            fields = {
                name: (list(f.types), f.contents())
                for name, f in reader.fields.items()
                if not name.startswith("GGUF.")
            }
            tensors = {}
            for t in reader.tensors:
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))
                values = dequantize(np.asarray(t.data), t.tensor_type)
                # F32 dequantises to a view of the map: copy so the map can go.
                tensors[t.name] = (
                    t.tensor_type,
                    shape,
                    np.array(values, dtype=np.float32, copy=True).reshape(shape),
                )
            del reader
        except ModelLoadError:
            raise
        except Exception as exc:  # GGUFReader raises ValueError, KeyError, IndexError, ...
            # The library's text can quote file contents: it goes to the log under an error
            # id, the reason (shown to clients in RepositoryIndex) names only the id.
            raise library_failure("gguf could not parse the file", exc) from None
    finally:
        os.close(fd)
    return _RawPolicy(fields, tensors)


# ---- the network ----


def _erf(x: np.ndarray) -> np.ndarray:
    # numpy has no erf; Abramowitz & Stegun 7.1.26 in float64 is within 1.5e-7 of it.
    z = np.abs(x.astype(np.float64))
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    return (np.sign(x) * (1.0 - poly * np.exp(-z * z))).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32, copy=False)


# Each takes the layer's fresh pre-activation array and may overwrite it (in place where
# numpy can: a batch-1 decision is a few microseconds, and allocations are a good part of it).
_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda x: x,
    "tanh": lambda x: np.tanh(x, out=x),
    "relu": lambda x: np.maximum(x, np.float32(0), out=x),
    "elu": lambda x: np.where(x > 0, x, np.float32(fmt.ELU_ALPHA) * np.expm1(np.minimum(x, 0))),
    "leaky_relu": lambda x: np.where(x >= 0, x, np.float32(fmt.LEAKY_RELU_SLOPE) * x),
    "sigmoid": _sigmoid,
    "silu": lambda x: x * _sigmoid(x),
    "gelu": lambda x: np.float32(0.5) * x * (np.float32(1) + _erf(x / np.float32(math.sqrt(2)))),
}
assert set(_ACTIVATIONS) == set(fmt.ACTIVATIONS), "every format activation needs an implementation"


@dataclass(frozen=True)
class Dense:
    """``activation(x @ weight_t + bias)``; ``weight_t`` is [in, out], float32, contiguous."""

    weight_t: np.ndarray
    bias: np.ndarray
    activation: str

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.weight_t
        y += self.bias
        return _ACTIVATIONS[self.activation](y)


@dataclass(frozen=True)
class PolicyNetwork:
    """A checked policy: what it computes and the outputs it offers."""

    algorithm: str
    obs_dim: int
    action_space: str
    action_transform: str
    norm: tuple[np.ndarray, np.ndarray, np.float32] | None  # mean, std, clip
    actor: tuple[Dense, ...]
    value: tuple[Dense, ...]
    low: np.ndarray | None
    high: np.ndarray | None
    outputs: dict[str, tuple[str, tuple[int, ...]]]  # name -> (Triton type, dims w/o batch)
    extra_output: str | None
    head_dim: int  # n_actions or action_dim

    def forward(self, obs: np.ndarray, names: list[str]) -> list[np.ndarray]:
        """Outputs ``names`` for a batch of raw observations [n, obs_dim]."""
        x = np.asarray(obs, dtype=np.float32).reshape(-1, self.obs_dim)
        if self.norm is not None:
            mean, std, clip = self.norm
            x = np.clip((x - mean) / std, -clip, clip)
        out: dict[str, np.ndarray] = {}
        if fmt.ACTION in names or (self.extra_output is not None and self.extra_output in names):
            head = x
            for layer in self.actor:
                head = layer(head)
            if self.extra_output is not None:
                out[self.extra_output] = head
            out[fmt.ACTION] = self._action(head)
        if fmt.VALUE in names:
            v = x
            for layer in self.value:
                v = layer(v)
            out[fmt.VALUE] = v
        return [out[n] for n in names]

    def _action(self, head: np.ndarray) -> np.ndarray:
        if self.action_transform == fmt.ACTION_ARGMAX:
            return np.argmax(head, axis=1).astype(np.int64).reshape(-1, 1)
        assert self.low is not None and self.high is not None
        if self.action_transform == fmt.ACTION_CLIP:
            return np.minimum(np.maximum(head, self.low), self.high)
        # The ONNX export's order: low + (0.5 * (head + 1)) * span, then clipped to the bounds.
        span = (self.high - self.low).astype(np.float32)
        scaled = self.low + (np.float32(0.5) * (head + np.float32(1))) * span
        return np.minimum(np.maximum(scaled, self.low), self.high)


class _Fields:
    """Typed access to the ``forseti.policy.*`` keys, each checked against the format."""

    def __init__(self, fields: dict[str, tuple[list[GGUFValueType], Any]]) -> None:
        self._fields = fields

    def get(self, key: str) -> Any:
        if key not in self._fields:
            raise _refuse(f"missing metadata key '{key}'")
        types, value = self._fields[key]
        spec = fmt.KEYS[key]
        want = [spec.vtype] + ([spec.element] if spec.element is not None else [])
        if types[: len(want)] != want or (spec.element is None and len(types) != 1):
            got = "/".join(t.name for t in types) or "empty array"
            raise _refuse(f"metadata '{key}' is {got}; expected {'/'.join(t.name for t in want)}")
        return value

    def count(self, key: str, low: int, high: int) -> int:
        value = int(self.get(key))
        if not low <= value <= high:
            raise _refuse(f"metadata '{key}' = {value} outside {low}..{high}")
        return value

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        value = str(self.get(key))
        if value not in allowed:
            raise _refuse(f"metadata '{key}' = '{value}'; expected one of {', '.join(allowed)}")
        return value


def _check_keys(raw: _RawPolicy) -> _Fields:
    arch = raw.fields.get("general.architecture")
    if arch is None or arch[1] != fmt.ARCHITECTURE:
        got = "none" if arch is None else repr(arch[1])
        raise _refuse(f"general.architecture is {got}, not '{fmt.ARCHITECTURE}': not a policy")
    ours = {k for k in raw.fields if k.startswith(fmt.PREFIX)}
    unknown = sorted(ours - set(fmt.KEYS))
    if unknown:
        raise _refuse(f"unknown metadata keys {unknown} (a newer format?)")
    return _Fields(raw.fields)


def _bounds(f: _Fields, key: str, dim: int) -> np.ndarray:
    values = np.asarray(f.get(key), dtype=np.float32)
    if values.shape != (dim,):
        raise _refuse(f"metadata '{key}' has {values.size} values for action_dim {dim}")
    if np.isnan(values).any():
        raise _refuse(f"metadata '{key}' contains NaN")
    return values


def _chain(
    raw: _RawPolicy, chain: str, activations: list[str], in_dim: int
) -> tuple[tuple[Dense, ...], int]:
    layers = []
    width = in_dim
    for i, activation in enumerate(activations):
        if activation not in fmt.ACTIVATIONS:
            raise _refuse(
                f"{chain} layer {i}: unknown activation '{activation}'; "
                f"known: {', '.join(fmt.ACTIVATIONS)}"
            )
        w_name = fmt.layer_tensor(chain, i, "weight")
        b_name = fmt.layer_tensor(chain, i, "bias")
        qtype, w_shape, weight = _tensor(raw, w_name)
        if qtype not in WEIGHT_QTYPES or len(w_shape) != 2 or w_shape[1] != width:
            raise _refuse(
                f"tensor '{w_name}' is {qtype.name} {list(w_shape)}; expected a weight "
                f"[out, {width}] (F32, F16 or Q8_0)"
            )
        out_dim = w_shape[0]
        bias = _f32_vector(raw, b_name, out_dim)
        layers.append(Dense(np.ascontiguousarray(weight.T), bias, activation))
        width = out_dim
    return tuple(layers), width


def _tensor(raw: _RawPolicy, name: str) -> tuple[GGMLQuantizationType, tuple[int, ...], np.ndarray]:
    if name not in raw.tensors:
        raise _refuse(f"missing tensor '{name}'")
    qtype, shape, values = raw.tensors[name]
    if not np.isfinite(values).all():
        raise _refuse(f"tensor '{name}' holds NaN or infinite values")
    return qtype, shape, values


def _f32_vector(raw: _RawPolicy, name: str, dim: int) -> np.ndarray:
    qtype, shape, values = _tensor(raw, name)
    if qtype != GGMLQuantizationType.F32 or shape != (dim,):
        raise _refuse(f"tensor '{name}' is {qtype.name} {list(shape)}; expected F32 [{dim}]")
    return values


def build_network(raw: _RawPolicy) -> PolicyNetwork:
    """Check every key and tensor against each other and build the network."""
    f = _check_keys(raw)
    version = int(f.get(fmt.K_FORMAT_VERSION))
    if version != fmt.FORMAT_VERSION:
        raise _refuse(f"policy format version {version}; this server reads {fmt.FORMAT_VERSION}")
    algorithm = str(f.get(fmt.K_ALGORITHM))
    obs_dim = f.count(fmt.K_OBS_DIM, 1, fmt.MAX_DIM)
    space = f.choice(fmt.K_ACTION_SPACE, (fmt.DISCRETE, fmt.BOX))
    if space == fmt.DISCRETE:
        transform = f.choice(fmt.K_ACTION_TRANSFORM, (fmt.ACTION_ARGMAX,))
    else:
        transform = f.choice(fmt.K_ACTION_TRANSFORM, (fmt.ACTION_CLIP, fmt.ACTION_SCALE))
    normalized = bool(f.get(fmt.K_OBS_NORMALIZATION))
    actor_layers = f.count(fmt.K_ACTOR_LAYERS, 1, fmt.MAX_LAYERS)
    value_layers = f.count(fmt.K_VALUE_LAYERS, 0, fmt.MAX_LAYERS)
    has_extra = fmt.K_EXTRA_OUTPUT in raw.fields
    extra = f.choice(fmt.K_EXTRA_OUTPUT, fmt.EXTRA_OUTPUTS) if has_extra else None
    if extra is not None and space != fmt.DISCRETE:
        raise _refuse(f"a {space} policy exposes no '{extra}' output")
    present = {k for k in raw.fields if k.startswith(fmt.PREFIX)}
    wanted = fmt.expected_keys(space, normalized, value_layers, has_extra)
    if present - wanted:
        raise _refuse(f"metadata keys {sorted(present - wanted)} do not belong to this policy")
    for k in sorted(wanted - present):
        f.get(k)  # raises "missing metadata key"
    f.choice(fmt.K_WEIGHT_TYPE, tuple(fmt.WEIGHT_TYPES))
    if f.get(fmt.K_INPUT_NAME) != fmt.INPUT_NAME:
        raise _refuse(f"input_name is '{f.get(fmt.K_INPUT_NAME)}', expected '{fmt.INPUT_NAME}'")
    outputs = fmt.output_names(value_layers > 0, extra)
    if list(f.get(fmt.K_OUTPUT_NAMES)) != outputs:
        raise _refuse(
            f"output_names {f.get(fmt.K_OUTPUT_NAMES)} do not match the structure {outputs}"
        )

    actor_acts = list(f.get(fmt.K_ACTOR_ACTIVATIONS))
    if len(actor_acts) != actor_layers:
        raise _refuse(f"{len(actor_acts)} actor activations for {actor_layers} layers")
    value_acts = list(f.get(fmt.K_VALUE_ACTIVATIONS)) if value_layers else []
    if len(value_acts) != value_layers:
        raise _refuse(f"{len(value_acts)} value activations for {value_layers} layers")

    norm = None
    expected_tensors = set()
    if normalized:
        clip = float(f.get(fmt.K_OBS_NORM_CLIP))
        if not (math.isfinite(clip) and clip > 0):
            raise _refuse(f"obs_norm_clip {clip} must be finite and > 0")
        std = _f32_vector(raw, fmt.OBS_STD, obs_dim)
        if (std <= 0).any():
            raise _refuse("obs_norm.std has values <= 0")
        norm = (_f32_vector(raw, fmt.OBS_MEAN, obs_dim), std, np.float32(clip))
        expected_tensors |= {fmt.OBS_MEAN, fmt.OBS_STD}
    actor, head_dim = _chain(raw, "actor", actor_acts, obs_dim)
    value, value_dim = _chain(raw, "value", value_acts, obs_dim)
    if value_layers and value_dim != 1:
        raise _refuse(f"value head has {value_dim} outputs, expected 1")
    for chain, n in (("actor", actor_layers), ("value", value_layers)):
        for i in range(n):
            expected_tensors |= {fmt.layer_tensor(chain, i, p) for p in ("weight", "bias")}
    extra_tensors = sorted(set(raw.tensors) - expected_tensors)
    if extra_tensors:
        raise _refuse(f"unexpected tensors {extra_tensors}")
    parameters = sum(layer.weight_t.size for layer in actor + value)
    if parameters > fmt.MAX_PARAMETERS:
        raise _refuse(f"{parameters} weights exceed {fmt.MAX_PARAMETERS}")

    low = high = None
    io: dict[str, tuple[str, tuple[int, ...]]] = {}
    if space == fmt.DISCRETE:
        n_actions = f.count(fmt.K_N_ACTIONS, 1, fmt.MAX_DIM)
        if head_dim != n_actions:
            raise _refuse(f"actor head has {head_dim} outputs for n_actions {n_actions}")
        io[fmt.ACTION] = ("INT64", (1,))
    else:
        action_dim = f.count(fmt.K_ACTION_DIM, 1, fmt.MAX_DIM)
        if head_dim != action_dim:
            raise _refuse(f"actor head has {head_dim} outputs for action_dim {action_dim}")
        low = _bounds(f, fmt.K_ACTION_LOW, action_dim)
        high = _bounds(f, fmt.K_ACTION_HIGH, action_dim)
        if (low > high).any():
            raise _refuse("action_low is above action_high")
        if transform == fmt.ACTION_SCALE and not (
            np.isfinite(low).all() and np.isfinite(high).all()
        ):
            raise _refuse("scaled actions need finite action_low/action_high")
        io[fmt.ACTION] = ("FP32", (action_dim,))
    if value_layers:
        io[fmt.VALUE] = ("FP32", (1,))
    if extra is not None:
        io[extra] = ("FP32", (head_dim,))
    return PolicyNetwork(
        algorithm=algorithm,
        obs_dim=obs_dim,
        action_space=space,
        action_transform=transform,
        norm=norm,
        actor=actor,
        value=value,
        low=low,
        high=high,
        outputs=io,
        extra_output=extra,
        head_dim=head_dim,
    )


def load_policy(data: bytes) -> PolicyNetwork:
    """Check, parse and build a GGUF policy from its plaintext bytes (held in memory only)."""
    check_structure(data)
    return build_network(_read(data))
