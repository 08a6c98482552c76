"""The GGUF policy artifact format: metadata keys, tensor names and limits.

One module that both sides import: ``exporters/gguf_policy.py`` writes it and the server's gguf
backend reads and checks it, so the two cannot drift apart. A policy GGUF file holds:

* ``general.architecture`` = ``forseti-policy``;
* the ``forseti.policy.*`` keys of ``KEYS`` (which apply depends on the action space, the value
  head and the observation normalisation; see ``expected_keys``), and no other key in that
  namespace;
* tensors ``actor.<i>.weight`` [out, in] and ``actor.<i>.bias`` [out] for each dense layer,
  ``value.<i>.*`` likewise when there is a value head, and ``obs_norm.mean`` / ``obs_norm.std``
  [obs_dim] when observations are normalised. Weights may be F32, F16 or Q8_0; biases and the
  normalisation statistics are always F32.

What the network computes:

    x = obs                                         FP32 [batch, obs_dim]
    x = clip((x - obs_norm.mean) / obs_norm.std, -obs_norm_clip, obs_norm_clip)   (if normalised)
    head = chain(actor, x);  value = chain(value, x)
    chain: for each layer, x = activation(x @ weight.T + bias)
    action = argmax(head)                           (action_transform "argmax", INT64 [batch, 1])
           | min(max(head, low), high)              ("clip", FP32 [batch, action_dim])
           | min(max(low + 0.5 * (head + 1) * (high - low), low), high)     ("scale")

GGUF dimensions are written innermost first (a [out, in] weight appears as [in, out] in the
file); ``gguf.GGUFReader`` and ``GGUFWriter`` take care of the order.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType, GGUFValueType

ARCHITECTURE = "forseti-policy"
FORMAT_VERSION = 1
PREFIX = "forseti.policy."

# Activation names and formulas; the exporter refuses a description using anything else.
ACTIVATIONS: tuple[str, ...] = (
    "identity",
    "tanh",
    "relu",
    "elu",  # alpha 1
    "leaky_relu",  # slope 0.01
    "sigmoid",
    "silu",
    "gelu",  # exact (erf) form
)
LEAKY_RELU_SLOPE = 0.01
ELU_ALPHA = 1.0

DISCRETE = "discrete"
BOX = "box"
ACTION_ARGMAX = "argmax"
ACTION_CLIP = "clip"
ACTION_SCALE = "scale"
EXTRA_OUTPUTS: tuple[str, ...] = ("logits", "q_values")

INPUT_NAME = "obs"
ACTION = "action"
VALUE = "value"

WEIGHT_TYPES: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "q8_0": GGMLQuantizationType.Q8_0,
}

# Bounds a file must respect before anything is allocated for it: a policy is small, and a
# hostile file must not make the server allocate or loop without limit.
MAX_DIM = 1 << 16  # obs_dim, layer widths, n_actions, action_dim
MAX_LAYERS = 64  # per chain
MAX_PARAMETERS = 1 << 26  # all weights together: 256 MiB as float32
MAX_TENSORS = 2 * (2 * MAX_LAYERS) + 2
MAX_KV = 256
MAX_ARRAY = MAX_DIM


def key(name: str) -> str:
    return PREFIX + name


@dataclass(frozen=True)
class KeySpec:
    """A metadata key's GGUF type; ``element`` is the item type of an array."""

    vtype: GGUFValueType
    element: GGUFValueType | None = None


K_FORMAT_VERSION = key("format_version")
K_ALGORITHM = key("algorithm")
K_OBS_DIM = key("obs_dim")
K_ACTION_SPACE = key("action_space")
K_ACTION_TRANSFORM = key("action_transform")
K_N_ACTIONS = key("n_actions")
K_ACTION_DIM = key("action_dim")
K_ACTION_LOW = key("action_low")
K_ACTION_HIGH = key("action_high")
K_OBS_NORMALIZATION = key("obs_normalization")
K_OBS_NORM_CLIP = key("obs_norm_clip")
K_ACTOR_LAYERS = key("actor.layer_count")
K_ACTOR_ACTIVATIONS = key("actor.activations")
K_VALUE_LAYERS = key("value.layer_count")
K_VALUE_ACTIVATIONS = key("value.activations")
K_INPUT_NAME = key("input_name")
K_OUTPUT_NAMES = key("output_names")
K_EXTRA_OUTPUT = key("extra_output")
K_WEIGHT_TYPE = key("weight_type")

_T = GGUFValueType
KEYS: dict[str, KeySpec] = {
    K_FORMAT_VERSION: KeySpec(_T.UINT32),
    K_ALGORITHM: KeySpec(_T.STRING),
    K_OBS_DIM: KeySpec(_T.UINT32),
    K_ACTION_SPACE: KeySpec(_T.STRING),
    K_ACTION_TRANSFORM: KeySpec(_T.STRING),
    K_N_ACTIONS: KeySpec(_T.UINT32),
    K_ACTION_DIM: KeySpec(_T.UINT32),
    K_ACTION_LOW: KeySpec(_T.ARRAY, _T.FLOAT32),
    K_ACTION_HIGH: KeySpec(_T.ARRAY, _T.FLOAT32),
    K_OBS_NORMALIZATION: KeySpec(_T.BOOL),
    K_OBS_NORM_CLIP: KeySpec(_T.FLOAT32),
    K_ACTOR_LAYERS: KeySpec(_T.UINT32),
    K_ACTOR_ACTIVATIONS: KeySpec(_T.ARRAY, _T.STRING),
    K_VALUE_LAYERS: KeySpec(_T.UINT32),
    K_VALUE_ACTIVATIONS: KeySpec(_T.ARRAY, _T.STRING),
    K_INPUT_NAME: KeySpec(_T.STRING),
    K_OUTPUT_NAMES: KeySpec(_T.ARRAY, _T.STRING),
    K_EXTRA_OUTPUT: KeySpec(_T.STRING),
    K_WEIGHT_TYPE: KeySpec(_T.STRING),
}

# Present in every policy file.
ALWAYS: tuple[str, ...] = (
    K_FORMAT_VERSION,
    K_ALGORITHM,
    K_OBS_DIM,
    K_ACTION_SPACE,
    K_ACTION_TRANSFORM,
    K_OBS_NORMALIZATION,
    K_ACTOR_LAYERS,
    K_ACTOR_ACTIVATIONS,
    K_VALUE_LAYERS,
    K_INPUT_NAME,
    K_OUTPUT_NAMES,
    K_WEIGHT_TYPE,
)


def expected_keys(
    action_space: str, normalized: bool, value_layers: int, extra_output: bool
) -> set[str]:
    """Exactly the ``forseti.policy.*`` keys a file with these properties carries."""
    keys = set(ALWAYS)
    if action_space == DISCRETE:
        keys.add(K_N_ACTIONS)
    else:
        keys |= {K_ACTION_DIM, K_ACTION_LOW, K_ACTION_HIGH}
    if normalized:
        keys.add(K_OBS_NORM_CLIP)
    if value_layers:
        keys.add(K_VALUE_ACTIVATIONS)
    if extra_output:
        keys.add(K_EXTRA_OUTPUT)
    return keys


def output_names(has_value: bool, extra_output: str | None) -> list[str]:
    """The outputs a policy file offers, in order: action, value, then the extra head."""
    names = [ACTION]
    if has_value:
        names.append(VALUE)
    if extra_output:
        names.append(extra_output)
    return names


def layer_tensor(chain: str, index: int, part: str) -> str:
    """``actor.0.weight``, ``value.2.bias``, ..."""
    return f"{chain}.{index}.{part}"


OBS_MEAN = "obs_norm.mean"
OBS_STD = "obs_norm.std"
