"""Parse and check a model's `config.pbtxt` (Triton's ModelConfig in protobuf text format)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from forseti.core.datatypes import ANY_BY_CONFIG_TYPE, BYTES, TritonType
from forseti.core.errors import ModelLoadError, library_failure

CONFIG_FILENAME = "config.pbtxt"

# platform / backend names we accept, mapped to the backend that runs them.
PLATFORM_BACKENDS: dict[str, str] = {
    "onnxruntime_onnx": "onnxruntime",
    "onnxruntime": "onnxruntime",
    "tensorrt_plan": "tensorrt",
    "tensorrt": "tensorrt",
    "gguf": "gguf",
}

DEFAULT_FILENAMES: dict[str, str] = {
    "onnxruntime": "model.onnx",
    "tensorrt": "model.plan",
    "gguf": "model.gguf",
}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as the config declares it; `dims` exclude the batch dimension.

    `model_dims` are the dims the model itself has: the config's `reshape` when it gives one,
    else `dims` (a client sends and receives `dims`). An `optional` input may be left out of a
    request. `label_filename` names an output's class labels (the classification
    extension)."""

    name: str
    ttype: TritonType
    dims: tuple[int, ...]
    model_dims: tuple[int, ...] | None = None
    optional: bool = False
    label_filename: str = ""
    # Bytes of one batch item when the dims are fixed, the type numeric and nothing is
    # reshaped, else 0: the request path checks such a raw tensor's size with one comparison.
    item_nbytes: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.model_dims is None:
            object.__setattr__(self, "model_dims", self.dims)
        plain = self.fixed and self.ttype is not BYTES and self.model_dims == self.dims
        nbytes = math.prod(self.dims) * self.ttype.dtype.itemsize if plain else 0
        object.__setattr__(self, "item_nbytes", nbytes)

    @property
    def reshaped(self) -> bool:
        return self.model_dims != self.dims

    @property
    def fixed(self) -> bool:
        """No variable (-1) dimension besides the batch."""
        return -1 not in self.dims

    @property
    def inner_count(self) -> int:
        """Elements per batch item when the dims are fixed."""
        return math.prod(self.dims)

    def describe(self, batched: bool) -> str:
        dims = ("-1", *map(str, self.dims)) if batched else tuple(map(str, self.dims))
        return f"{self.ttype.name} [{', '.join(dims)}]"


@dataclass(frozen=True)
class ModelSpec:
    """What the server needs from a config, checked once at load."""

    name: str
    backend: str
    max_batch_size: int
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    artifact_filename: str
    config: mc.ModelConfig
    # Class labels of outputs that name a label_filename, read from the model folder.
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def required_inputs(self) -> list[str]:
        return [n for n, t in self.inputs.items() if not t.optional]

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0


def parse_config_text(text: str, model_name: str) -> mc.ModelConfig:
    """Parse config text; fill the name from the folder like Triton does."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        # protobuf's message quotes the config's own text; the reason (shown to clients in
        # RepositoryIndex) gives the position, the log the whole message under an error id.
        where = f" at line {exc.GetLine()}, column {exc.GetColumn()}" if exc.GetLine() else ""
        raise library_failure(f"invalid {CONFIG_FILENAME}{where}", exc, model=model_name) from None
    if not config.name:
        config.name = model_name
    return config


def read_model_config(model_dir: Path) -> mc.ModelConfig:
    """Read `<model_dir>/config.pbtxt`; a missing or unparsable file is a ModelLoadError."""
    path = model_dir / CONFIG_FILENAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelLoadError(f"missing {CONFIG_FILENAME} in model folder") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read {CONFIG_FILENAME}: {exc.__class__.__name__}") from None
    return parse_config_text(text, model_dir.name)


def _tensor_spec(tensor: mc.ModelInput | mc.ModelOutput, kind: str) -> TensorSpec:
    if not tensor.name:
        raise ModelLoadError(f"an {kind} has no name")
    ttype = ANY_BY_CONFIG_TYPE.get(tensor.data_type)
    if ttype is None:
        raise ModelLoadError(
            f"{kind} '{tensor.name}' has unsupported data_type {mc.DataType.Name(tensor.data_type)}"
        )
    dims = tuple(int(d) for d in tensor.dims)
    if any(d == 0 or d < -1 for d in dims):
        raise ModelLoadError(f"{kind} '{tensor.name}' has invalid dims {list(dims)}")
    model_dims = dims
    if tensor.HasField("reshape"):
        model_dims = tuple(int(d) for d in tensor.reshape.shape)
        if any(d == 0 or d < -1 for d in model_dims):
            raise ModelLoadError(f"{kind} '{tensor.name}' has invalid reshape {list(model_dims)}")
        fixed = -1 not in dims and -1 not in model_dims
        if fixed and math.prod(dims) != math.prod(model_dims):
            raise ModelLoadError(
                f"{kind} '{tensor.name}': reshape {list(model_dims)} does not hold the "
                f"{math.prod(dims)} elements of dims {list(dims)}"
            )
        if not fixed and (dims.count(-1) > 1 or model_dims.count(-1) > 1):
            raise ModelLoadError(
                f"{kind} '{tensor.name}': a reshape may leave at most one dimension "
                "variable on each side"
            )
    optional = isinstance(tensor, mc.ModelInput) and tensor.optional
    label = tensor.label_filename if isinstance(tensor, mc.ModelOutput) else ""
    if label and ("/" in label or label.startswith(".")):
        raise ModelLoadError(f"{kind} '{tensor.name}': invalid label_filename '{label}'")
    return TensorSpec(tensor.name, ttype, dims, model_dims, optional, label)


def model_spec(config: mc.ModelConfig, model_name: str, complete_later: bool = False) -> ModelSpec:
    """Check a parsed config and derive the serving spec from it. `complete_later`: the
    inputs and outputs may be missing, to be completed from the model (auto-complete)."""
    if config.name != model_name:
        raise ModelLoadError(
            f"config name '{config.name}' does not match model folder '{model_name}'"
        )
    key = config.backend or config.platform
    backend = PLATFORM_BACKENDS.get(key)
    if backend is None:
        raise ModelLoadError(
            f"unsupported platform/backend '{key}'; "
            f"expected one of {', '.join(sorted(PLATFORM_BACKENDS))}"
        )
    if config.max_batch_size < 0:
        raise ModelLoadError(f"max_batch_size must be >= 0, got {config.max_batch_size}")
    if not config.input and not complete_later:
        raise ModelLoadError("config declares no input")
    if not config.output and not complete_later:
        raise ModelLoadError("config declares no output")
    inputs = {t.name: _tensor_spec(t, "input") for t in config.input}
    outputs = {t.name: _tensor_spec(t, "output") for t in config.output}
    if len(inputs) != len(config.input):
        raise ModelLoadError("duplicate input names in config")
    if len(outputs) != len(config.output):
        raise ModelLoadError("duplicate output names in config")
    if config.sequence_batching.ListFields() or config.ensemble_scheduling.ListFields():
        raise ModelLoadError("sequence batching and ensembles are not supported")
    filename = config.default_model_filename or DEFAULT_FILENAMES[backend]
    if "/" in filename or filename.startswith("."):
        raise ModelLoadError(f"invalid default_model_filename '{filename}'")
    return ModelSpec(
        name=model_name,
        backend=backend,
        max_batch_size=int(config.max_batch_size),
        inputs=inputs,
        outputs=outputs,
        artifact_filename=filename,
        config=config,
    )


def read_labels(model_dir: Path, spec: ModelSpec) -> ModelSpec:
    """The spec with the class labels of its outputs' label_filename files (one label a
    line), read from the model folder; a missing or unreadable file is a ModelLoadError."""
    labels: dict[str, tuple[str, ...]] = {}
    for out in spec.outputs.values():
        if not out.label_filename:
            continue
        try:
            text = (model_dir / out.label_filename).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(
                f"output '{out.name}': cannot read label_filename '{out.label_filename}' "
                f"({exc.__class__.__name__})"
            ) from None
        labels[out.name] = tuple(text.splitlines())
    return replace(spec, labels=labels) if labels else spec


def parameter(config: mc.ModelConfig, key: str, default: str | None = None) -> str | None:
    """A string from the config's `parameters` map (Triton's ModelParameter)."""
    if key in config.parameters:
        return config.parameters[key].string_value
    return default
