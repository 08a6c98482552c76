"""An SB3 policy as plain numpy data: the single source every exporter (ONNX, GGUF, safetensors)
builds from, so the artifacts cannot disagree about weights, normalisation or action scaling.

Every SB3 ``MlpPolicy`` actor is a chain of dense layers on the (flattened, float) observation:

    obs --(obs_normalization)--> x --actor layers--> head --(action_transform)--> action
    x --value layers--> value                     (PPO/A2C only)

``head`` is the logits (PPO/A2C discrete), the Q-values (DQN), the Gaussian mean (PPO/A2C Box) or
the already tanh-squashed mean in [-1, 1] (SAC/TD3: the tanh is the last actor layer's activation).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ExportError

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm

log = logging.getLogger(__name__)

# What each activation computes, element-wise. Every exporter and backend implements exactly
# these; non-default variants (ELU alpha != 1, another leaky slope, tanh-GELU) are refused.
ACTIVATIONS: dict[str, str] = {
    "identity": "x",
    "tanh": "tanh(x)",
    "relu": "max(x, 0)",
    "elu": "x if x > 0 else exp(x) - 1",
    "leaky_relu": "x if x >= 0 else 0.01 * x",
    "sigmoid": "1 / (1 + exp(-x))",
    "silu": "x * sigmoid(x)",
    "gelu": "0.5 * x * (1 + erf(x / sqrt(2)))",
}
LEAKY_RELU_SLOPE = 0.01
ELU_ALPHA = 1.0

DISCRETE = "discrete"
BOX = "box"
# action_transform: how the actor's head becomes the env-ready action.
ACTION_ARGMAX = "argmax"  # discrete: index of the largest head value, first one on ties
ACTION_CLIP = "clip"  # Box, unsquashed (PPO/A2C): min(max(head, low), high), as SB3's predict
# Box, squashed (SAC/TD3): clip(low + 0.5 * (head + 1) * (high - low), low, high); SB3 does not
# clip, but float32 rounding can land an ulp outside the bounds, which an env may reject.
ACTION_SCALE = "scale"
EXTRA_LOGITS = "logits"
EXTRA_Q_VALUES = "q_values"

# Tensor names of the served contract (DESIGN.md, "Policy models").
OBS = "obs"
ACTION = "action"
VALUE = "value"


@dataclass(frozen=True, eq=False)
class DenseLayer:
    """``activation(x @ weight.T + bias)``; weight in torch's Linear layout."""

    weight: np.ndarray  # float32 [out, in]
    bias: np.ndarray  # float32 [out]
    activation: str  # a key of ACTIVATIONS

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])


@dataclass(frozen=True, eq=False)
class ObsNormalization:
    """VecNormalize's observation statistics:
    ``clip((obs - mean) / sqrt(var + epsilon), -clip, clip)``."""

    mean: np.ndarray  # float64 [obs_dim], as VecNormalize keeps it
    var: np.ndarray  # float64 [obs_dim]
    epsilon: float
    clip: float

    def apply(self, obs: np.ndarray) -> np.ndarray:
        """Normalise a batch [n, obs_dim] exactly as ``VecNormalize.normalize_obs`` does."""
        obs = np.asarray(obs, dtype=np.float32)
        scaled = (obs - self.mean) / np.sqrt(self.var + self.epsilon)
        return np.clip(scaled, -self.clip, self.clip).astype(np.float32)


@dataclass(frozen=True)
class IOSpec:
    """One input or output of a policy artifact; ``dims`` exclude the batch dimension."""

    name: str
    data_type: str  # Triton config type: "TYPE_FP32" | "TYPE_INT64"
    dims: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class PolicyDescription:
    """A deterministic SB3 policy as data; checked for consistency on construction."""

    algorithm: str  # SB3 class name: "PPO" | "A2C" | "DQN" | "SAC" | "TD3" (or a subclass's)
    obs_dim: int
    action_space: str  # DISCRETE | BOX
    n_actions: int | None  # discrete only
    action_dim: int | None  # box only
    action_low: np.ndarray | None  # box only, float32 [action_dim]
    action_high: np.ndarray | None  # box only, float32 [action_dim]
    action_transform: str  # ACTION_ARGMAX | ACTION_CLIP | ACTION_SCALE
    obs_normalization: ObsNormalization | None
    actor: tuple[DenseLayer, ...]  # normalised obs -> head
    value: tuple[DenseLayer, ...] | None  # normalised obs -> value [1]; PPO/A2C only
    extra_output: str | None  # EXTRA_LOGITS | EXTRA_Q_VALUES | None: the head, exposed as is
    obs_shape: tuple[int, ...] = ()  # the env's observation shape; () means (obs_dim,)

    def __post_init__(self) -> None:
        _check_description(self)

    @property
    def head_dim(self) -> int:
        return self.actor[-1].out_features


def _check_chain(layers: tuple[DenseLayer, ...], in_dim: int, what: str) -> None:
    if not layers:
        raise ExportError(f"{what} has no dense layer")
    expected = in_dim
    for i, layer in enumerate(layers):
        w, b = layer.weight, layer.bias
        if w.dtype != np.float32 or b.dtype != np.float32 or w.ndim != 2 or b.ndim != 1:
            raise ExportError(f"{what} layer {i}: weight/bias must be float32 [out, in] / [out]")
        if w.shape[1] != expected or b.shape[0] != w.shape[0]:
            raise ExportError(
                f"{what} layer {i}: weight {list(w.shape)} and bias {list(b.shape)} do not "
                f"chain from {expected} inputs"
            )
        if layer.activation not in ACTIVATIONS:
            raise ExportError(
                f"{what} layer {i}: unknown activation '{layer.activation}'; "
                f"known: {', '.join(ACTIVATIONS)}"
            )
        expected = w.shape[0]


def _check_description(d: PolicyDescription) -> None:
    if d.obs_dim < 1:
        raise ExportError(f"obs_dim must be >= 1, got {d.obs_dim}")
    if d.obs_shape and math.prod(d.obs_shape) != d.obs_dim:
        raise ExportError(f"obs_shape {list(d.obs_shape)} does not hold obs_dim {d.obs_dim}")
    _check_chain(d.actor, d.obs_dim, "actor")
    if d.value is not None:
        _check_chain(d.value, d.obs_dim, "value")
        if d.value[-1].out_features != 1:
            raise ExportError(f"value head has {d.value[-1].out_features} outputs, expected 1")
    if d.action_space == DISCRETE:
        if d.n_actions is None or d.n_actions < 1 or d.action_dim is not None:
            raise ExportError("a discrete policy needs n_actions >= 1 and no action_dim")
        if d.action_transform != ACTION_ARGMAX:
            raise ExportError(f"a discrete policy's action_transform must be '{ACTION_ARGMAX}'")
        if d.head_dim != d.n_actions:
            raise ExportError(f"actor head has {d.head_dim} outputs for {d.n_actions} actions")
        if d.extra_output not in (None, EXTRA_LOGITS, EXTRA_Q_VALUES):
            raise ExportError(f"unknown extra_output '{d.extra_output}'")
    elif d.action_space == BOX:
        if d.action_dim is None or d.action_dim < 1 or d.n_actions is not None:
            raise ExportError("a Box policy needs action_dim >= 1 and no n_actions")
        for name, bound in (("action_low", d.action_low), ("action_high", d.action_high)):
            if bound is None or bound.dtype != np.float32 or bound.shape != (d.action_dim,):
                raise ExportError(f"{name} must be float32 [{d.action_dim}]")
        assert d.action_low is not None and d.action_high is not None  # checked just above
        if d.action_transform not in (ACTION_CLIP, ACTION_SCALE):
            raise ExportError(
                f"a Box policy's action_transform must be '{ACTION_CLIP}' or '{ACTION_SCALE}'"
            )
        if d.action_transform == ACTION_SCALE and not (
            np.isfinite(d.action_low).all() and np.isfinite(d.action_high).all()
        ):
            raise ExportError("squashed actions need finite action bounds to be scaled")
        if d.head_dim != d.action_dim:
            raise ExportError(f"actor head has {d.head_dim} outputs for action_dim {d.action_dim}")
        if d.extra_output is not None:
            raise ExportError("a Box policy exposes no extra output")
    else:
        raise ExportError(f"action_space must be '{DISCRETE}' or '{BOX}', not '{d.action_space}'")
    norm = d.obs_normalization
    if norm is not None and (norm.mean.shape != (d.obs_dim,) or norm.var.shape != (d.obs_dim,)):
        raise ExportError(
            f"observation normalisation has mean {list(norm.mean.shape)} / var "
            f"{list(norm.var.shape)} for obs_dim {d.obs_dim}"
        )


def policy_inputs(desc: PolicyDescription) -> list[IOSpec]:
    """The artifact's inputs: raw observations, FP32 [-1, obs_dim]."""
    return [IOSpec(OBS, "TYPE_FP32", (desc.obs_dim,))]


def policy_outputs(desc: PolicyDescription) -> list[IOSpec]:
    """The artifact's outputs, in order: action, then value (if any), then the extra head."""
    if desc.action_space == DISCRETE:
        outputs = [IOSpec(ACTION, "TYPE_INT64", (1,))]
    else:
        outputs = [IOSpec(ACTION, "TYPE_FP32", (int(desc.action_dim or 0),))]
    if desc.value is not None:
        outputs.append(IOSpec(VALUE, "TYPE_FP32", (1,)))
    if desc.extra_output is not None:
        outputs.append(IOSpec(desc.extra_output, "TYPE_FP32", (desc.head_dim,)))
    return outputs


# ---- a numpy reference of the description (for tests and other exporters' checks) ----


def _activate(x: np.ndarray, name: str) -> np.ndarray:
    if name == "identity":
        return x
    if name == "tanh":
        return np.tanh(x)
    if name == "relu":
        return np.maximum(x, 0)
    if name == "elu":
        return np.where(x > 0, x, ELU_ALPHA * np.expm1(np.minimum(x, 0)))
    if name == "leaky_relu":
        return np.where(x >= 0, x, LEAKY_RELU_SLOPE * x)
    if name == "sigmoid":
        return 1 / (1 + np.exp(-x))
    if name == "silu":
        return x / (1 + np.exp(-x))
    if name == "gelu":
        erf = np.vectorize(math.erf, otypes=[np.float64])
        return 0.5 * x * (1 + erf(x / math.sqrt(2)))
    raise ExportError(f"unknown activation '{name}'")


def _run_chain(x: np.ndarray, layers: tuple[DenseLayer, ...]) -> np.ndarray:
    for layer in layers:
        x = _activate(x @ layer.weight.T.astype(np.float64) + layer.bias, layer.activation)
    return x


def evaluate(desc: PolicyDescription, obs: np.ndarray) -> dict[str, np.ndarray]:
    """Run the description in float64 numpy on raw observations [n, obs_dim]; returns the
    outputs by name as the artifacts compute them (action int64 [n, 1] or float32 [n, dim])."""
    obs = np.asarray(obs, dtype=np.float32).reshape(-1, desc.obs_dim)
    x = obs if desc.obs_normalization is None else desc.obs_normalization.apply(obs)
    x = x.astype(np.float64)
    head = _run_chain(x, desc.actor)
    out: dict[str, np.ndarray] = {}
    if desc.action_transform == ACTION_ARGMAX:
        out[ACTION] = head.argmax(axis=1).astype(np.int64).reshape(-1, 1)
    elif desc.action_transform == ACTION_CLIP:
        assert desc.action_low is not None and desc.action_high is not None
        out[ACTION] = np.minimum(np.maximum(head, desc.action_low), desc.action_high).astype(
            np.float32
        )
    else:
        low = np.asarray(desc.action_low, np.float64)
        high = np.asarray(desc.action_high, np.float64)
        scaled = np.clip(low + 0.5 * (head + 1.0) * (high - low), low, high)
        out[ACTION] = scaled.astype(np.float32)
    if desc.value is not None:
        out[VALUE] = _run_chain(x, desc.value).astype(np.float32)
    if desc.extra_output is not None:
        out[desc.extra_output] = head.astype(np.float32)
    return out


# ---- from SB3 ----


def obs_normalization_from(vec_normalize: Any) -> ObsNormalization | None:
    """The observation statistics of a ``VecNormalize`` (None if it does not normalise
    observations, or if ``vec_normalize`` is None)."""
    if vec_normalize is None or not getattr(vec_normalize, "norm_obs", False):
        return None
    rms = vec_normalize.obs_rms
    if isinstance(rms, dict):
        raise ExportError(
            "VecNormalize over a Dict observation space cannot be exported; "
            "use a Box observation space"
        )
    return ObsNormalization(
        mean=np.asarray(rms.mean, dtype=np.float64).reshape(-1).copy(),
        var=np.asarray(rms.var, dtype=np.float64).reshape(-1).copy(),
        epsilon=float(vec_normalize.epsilon),
        clip=float(vec_normalize.clip_obs),
    )


def _activation_name(module: Any) -> str | None:
    """The ACTIVATIONS name of a torch activation module, None if it is not one; raises for
    a known activation with non-default parameters."""
    from torch import nn

    if isinstance(module, nn.Tanh):
        return "tanh"
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.Sigmoid):
        return "sigmoid"
    if isinstance(module, nn.SiLU):
        return "silu"
    if isinstance(module, nn.ELU):
        if module.alpha != ELU_ALPHA:
            raise ExportError(f"ELU(alpha={module.alpha}) is not exportable; only alpha=1.0")
        return "elu"
    if isinstance(module, nn.LeakyReLU):
        if module.negative_slope != LEAKY_RELU_SLOPE:
            raise ExportError(
                f"LeakyReLU(negative_slope={module.negative_slope}) is not exportable; "
                f"only the default {LEAKY_RELU_SLOPE}"
            )
        return "leaky_relu"
    if isinstance(module, nn.GELU):
        if module.approximate != "none":
            raise ExportError("GELU(approximate='tanh') is not exportable; only exact GELU")
        return "gelu"
    return None


def _leaves(module: Any) -> Iterator[Any]:
    from torch import nn

    if isinstance(module, nn.Sequential):
        for child in module:
            yield from _leaves(child)
    else:
        yield module


def _dense_chain(modules: list[Any], where: str) -> list[DenseLayer]:
    """Dense layers of a torch module chain: each Linear, with the activation that follows it."""
    from torch import nn

    weights: list[tuple[np.ndarray, np.ndarray]] = []
    activations: list[str] = []
    for module in (leaf for m in modules for leaf in _leaves(m)):
        if isinstance(module, nn.Linear):
            weight = module.weight.detach().cpu().numpy().astype(np.float32, copy=True)
            if module.bias is None:
                bias = np.zeros(weight.shape[0], np.float32)
            else:
                bias = module.bias.detach().cpu().numpy().astype(np.float32, copy=True)
            weights.append((weight, bias))
            activations.append("identity")
        elif isinstance(module, nn.Identity | nn.Dropout):
            continue  # predict() runs in eval mode, where dropout is the identity
        else:
            name = _activation_name(module)
            if name is None:
                raise ExportError(
                    f"{where}: layer {type(module).__name__} is not exportable; "
                    f"only Linear layers and the activations {', '.join(ACTIVATIONS)}"
                )
            if not activations or activations[-1] != "identity":
                raise ExportError(
                    f"{where}: activation {type(module).__name__} does not follow a Linear "
                    "layer; only Linear -> activation chains are exportable"
                )
            activations[-1] = name
    return [DenseLayer(w, b, a) for (w, b), a in zip(weights, activations, strict=True)]


def _require_flatten(extractor: Any, where: str) -> None:
    from stable_baselines3.common.torch_layers import FlattenExtractor

    if type(extractor) is not FlattenExtractor:
        raise ExportError(
            f"{where} is {type(extractor).__name__}; only MlpPolicy's FlattenExtractor is "
            "exportable (CNN, Dict/MultiInput and custom extractors are not)"
        )


def _observation(model: BaseAlgorithm) -> tuple[int, tuple[int, ...]]:
    from gymnasium import spaces
    from stable_baselines3.common.preprocessing import is_image_space

    space = model.observation_space
    if not isinstance(space, spaces.Box):
        raise ExportError(
            f"observation space {type(space).__name__} is not exportable; "
            "only Box observations (sent as FP32 [-1, obs_dim])"
        )
    if is_image_space(space, check_channels=False) and model.policy.normalize_images:
        raise ExportError(
            "image observation space (uint8 Box, scaled by 1/255 in SB3) is not exportable; "
            "use a float Box observation space"
        )
    return math.prod(space.shape), tuple(int(s) for s in space.shape)


def _box_bounds(model: BaseAlgorithm) -> tuple[int, np.ndarray, np.ndarray]:
    from gymnasium import spaces

    space = model.action_space
    assert isinstance(space, spaces.Box), "_check_action_space found a Box"
    if len(space.shape) != 1:
        raise ExportError(f"Box action space of shape {list(space.shape)}: only 1-D is exportable")
    low = np.asarray(space.low, dtype=np.float32).copy()
    high = np.asarray(space.high, dtype=np.float32).copy()
    return int(space.shape[0]), low, high


def _check_action_space(model: BaseAlgorithm) -> str:
    from gymnasium import spaces

    space = model.action_space
    if isinstance(space, spaces.Discrete):
        if int(space.start) != 0:
            raise ExportError(f"Discrete action space with start={space.start}: only start=0")
        return DISCRETE
    if isinstance(space, spaces.Box):
        return BOX
    raise ExportError(
        f"action space {type(space).__name__} is not exportable; only Discrete and 1-D Box "
        "(MultiDiscrete, MultiBinary and Dict actions are not)"
    )


def _describe_actor_critic(model: BaseAlgorithm, space: str) -> dict[str, Any]:
    from stable_baselines3.common.distributions import (
        CategoricalDistribution,
        DiagGaussianDistribution,
    )
    from stable_baselines3.common.policies import ActorCriticPolicy
    from stable_baselines3.common.torch_layers import MlpExtractor

    policy = model.policy
    if not isinstance(policy, ActorCriticPolicy):
        raise ExportError(f"policy {type(policy).__name__} is not an ActorCriticPolicy")
    if getattr(model, "use_sde", False) or getattr(policy, "use_sde", False):
        raise ExportError(
            "state-dependent exploration (use_sde=True) is not exportable; train with use_sde=False"
        )
    _require_flatten(policy.pi_features_extractor, "the policy's features extractor")
    _require_flatten(policy.vf_features_extractor, "the value's features extractor")
    extractor = policy.mlp_extractor
    if type(extractor) is not MlpExtractor:
        raise ExportError(
            f"mlp_extractor {type(extractor).__name__} is not exportable; only SB3's MlpExtractor"
        )
    actor = _dense_chain([extractor.policy_net, policy.action_net], "actor")
    value = _dense_chain([extractor.value_net, policy.value_net], "value")
    dist = policy.action_dist
    if space == DISCRETE and type(dist) is CategoricalDistribution:
        return dict(actor=actor, value=value, transform=ACTION_ARGMAX, extra=EXTRA_LOGITS)
    if space == BOX and type(dist) is DiagGaussianDistribution and not policy.squash_output:
        return dict(actor=actor, value=value, transform=ACTION_CLIP, extra=None)
    raise ExportError(f"action distribution {type(dist).__name__} is not exportable")


def _describe_off_policy(model: BaseAlgorithm, space: str) -> dict[str, Any]:
    from stable_baselines3 import DQN, SAC, TD3

    name = type(model).__name__
    if isinstance(model, DQN):
        q_net = model.policy.q_net
        _require_flatten(q_net.features_extractor, "the Q-network's features extractor")
        actor = _dense_chain([q_net.q_net], "q_net")
        return dict(actor=actor, value=None, transform=ACTION_ARGMAX, extra=EXTRA_Q_VALUES)
    if space != BOX:
        raise ExportError(f"{name} with a {space} action space is not exportable")
    if isinstance(model, SAC):
        sac_actor = model.policy.actor
        _require_flatten(sac_actor.features_extractor, "the actor's features extractor")
        if sac_actor.use_sde:
            raise ExportError("SAC with use_sde=True is not exportable; train with use_sde=False")
        actor = _dense_chain([sac_actor.latent_pi, sac_actor.mu], "actor")
        if actor[-1].activation != "identity":
            raise ExportError("SAC actor's mean layer unexpectedly ends in an activation")
        # SAC's deterministic action is tanh(mean): the squashing belongs to the head.
        last = actor[-1]
        actor[-1] = DenseLayer(last.weight, last.bias, "tanh")
    elif isinstance(model, TD3):
        td3_actor = model.policy.actor
        _require_flatten(td3_actor.features_extractor, "the actor's features extractor")
        actor = _dense_chain([td3_actor.mu], "actor")
        if actor[-1].activation != "tanh":
            raise ExportError("TD3 actor does not end in tanh; cannot scale its actions")
    else:
        raise ExportError(f"algorithm {name} is not exportable; PPO, A2C, DQN, SAC or TD3")
    return dict(actor=actor, value=None, transform=ACTION_SCALE, extra=None)


def describe_policy(
    model: BaseAlgorithm, obs_normalization: ObsNormalization | None = None
) -> PolicyDescription:
    """Describe a trained SB3 model's deterministic policy (what ``predict(deterministic=True)``
    computes on observations normalised by ``obs_normalization``). Raises ExportError naming
    whatever is not representable as a dense chain."""
    from gymnasium import spaces
    from stable_baselines3 import A2C, DQN, PPO, SAC, TD3

    if not isinstance(model, PPO | A2C | DQN | SAC | TD3):
        raise ExportError(
            f"algorithm {type(model).__name__} is not exportable; PPO, A2C, DQN, SAC or TD3"
        )
    space = _check_action_space(model)
    # The network first, so a CNN policy is refused as a CNN rather than as an image space.
    if isinstance(model, PPO | A2C):
        parts = _describe_actor_critic(model, space)
    else:
        parts = _describe_off_policy(model, space)
    obs_dim, obs_shape = _observation(model)
    n_actions = action_dim = low = high = None
    if space == DISCRETE:
        assert isinstance(model.action_space, spaces.Discrete)  # as _check_action_space found
        n_actions = int(model.action_space.n)
    else:
        action_dim, low, high = _box_bounds(model)
    desc = PolicyDescription(
        algorithm=type(model).__name__,
        obs_dim=obs_dim,
        action_space=space,
        n_actions=n_actions,
        action_dim=action_dim,
        action_low=low,
        action_high=high,
        action_transform=parts["transform"],
        obs_normalization=obs_normalization,
        actor=tuple(parts["actor"]),
        value=None if parts["value"] is None else tuple(parts["value"]),
        extra_output=parts["extra"],
        obs_shape=obs_shape,
    )
    log.debug(
        "described policy algorithm=%s obs_dim=%d action_space=%s actor_layers=%d normalized=%s",
        desc.algorithm,
        desc.obs_dim,
        desc.action_space,
        len(desc.actor),
        obs_normalization is not None,
    )
    return desc
