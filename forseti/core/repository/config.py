"""Parse and check a model's `config.pbtxt` (Triton's ModelConfig in protobuf text format)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from forseti.core.datatypes import BY_CONFIG_TYPE, TritonType
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
    """One input or output as the config declares it; `dims` exclude the batch dimension."""

    name: str
    ttype: TritonType
    dims: tuple[int, ...]
    # Bytes of one batch item when the dims are fixed, else 0: the request path checks a raw
    # tensor's size with one comparison.
    item_nbytes: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        nbytes = math.prod(self.dims) * self.ttype.dtype.itemsize if self.fixed else 0
        object.__setattr__(self, "item_nbytes", nbytes)

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
    ttype = BY_CONFIG_TYPE.get(tensor.data_type)
    if ttype is None:
        raise ModelLoadError(
            f"{kind} '{tensor.name}' has unsupported data_type "
            f"{mc.DataType.Name(tensor.data_type)}; numeric types only"
        )
    dims = tuple(int(d) for d in tensor.dims)
    if tensor.HasField("reshape"):
        raise ModelLoadError(f"{kind} '{tensor.name}': reshape is not supported")
    if any(d == 0 or d < -1 for d in dims):
        raise ModelLoadError(f"{kind} '{tensor.name}' has invalid dims {list(dims)}")
    return TensorSpec(tensor.name, ttype, dims)


def model_spec(config: mc.ModelConfig, model_name: str) -> ModelSpec:
    """Check a parsed config and derive the serving spec from it."""
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
    if not config.input:
        raise ModelLoadError("config declares no input")
    if not config.output:
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


def parameter(config: mc.ModelConfig, key: str, default: str | None = None) -> str | None:
    """A string from the config's `parameters` map (Triton's ModelParameter)."""
    if key in config.parameters:
        return config.parameters[key].string_value
    return default
