"""Training specs: a TOML file, validated into plain dataclasses with errors naming the field.

The spec hash covers what makes two runs' checkpoints interchangeable (model, environment,
algorithm and its hyperparameters) and deliberately not the run length, paths or serving
address, so a run can be resumed with a larger ``total_timesteps`` or another server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ALGORITHMS = ("PPO", "A2C", "DQN", "SAC", "TD3")
ON_POLICY = ("PPO", "A2C")
MAX_ENVS = 32
VECTORIZATION = ("dummy", "subprocess")
FORMATS = ("onnx", "gguf")
GGUF_TYPES = ("F32", "F16", "Q8_0")
ACTIVATIONS = ("tanh", "relu", "elu", "leaky_relu", "silu", "gelu")


class SpecError(ValueError):
    """A training spec is missing a field or has a bad value; the message names the field."""

    def __init__(self, source: str, field_name: str, problem: str) -> None:
        self.field_name = field_name
        super().__init__(f"{source}: {field_name}: {problem}")


@dataclass(frozen=True)
class EnvSpec:
    id: str
    n_envs: int = 8
    vectorization: str = "dummy"
    normalize_observations: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AlgorithmSpec:
    name: str
    total_timesteps: int
    seed: int = 0
    policy: str = "MlpPolicy"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    net_arch: tuple[int, ...] | None = None
    activation: str | None = None
    torch_threads: int = 1

    @property
    def on_policy(self) -> bool:
        return self.name in ON_POLICY


@dataclass(frozen=True)
class PublishedModelSpec:
    """``[model]``: the model the run publishes into the repository (not the server's parsed
    config.pbtxt, which is forseti.core.repository.config.ModelSpec)."""

    name: str
    repository: Path
    max_batch_size: int = 64
    formats: tuple[str, ...] = ("onnx",)
    gguf_type: str = "F32"


@dataclass(frozen=True)
class CheckpointSpec:
    directory: Path
    interval_timesteps: int
    keep: int = 3


@dataclass(frozen=True)
class EvaluationSpec:
    episodes: int = 10
    seed: int = 10_000
    margin: float = 0.0
    parity_observations: int = 1000


@dataclass(frozen=True)
class ServerSpec:
    url: str = "127.0.0.1:8001"
    keyring: Path = Path("keyring.json")
    token_header: str | None = None
    token_file: Path | None = None
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"
    audit_log: Path | None = None
    ready_timeout_s: float = 60.0
    # TLS / mutual TLS to the server, named as tritonclient names them.
    ssl: bool = False
    root_certificates: Path | None = None
    private_key: Path | None = None
    certificate_chain: Path | None = None

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for tritonclient.grpc.InferenceServerClient."""
        if not self.ssl:
            return {}
        options: dict[str, Any] = {"ssl": True}
        for name in ("root_certificates", "private_key", "certificate_chain"):
            value = getattr(self, name)
            if value is not None:
                options[name] = str(value)
        return options


@dataclass(frozen=True)
class SidecarSpec:
    promote_every_timesteps: int | None = None


@dataclass(frozen=True)
class TrainingSpec:
    source: str
    model: PublishedModelSpec
    env: EnvSpec
    algorithm: AlgorithmSpec
    checkpoint: CheckpointSpec
    evaluation: EvaluationSpec
    server: ServerSpec
    sidecar: SidecarSpec

    @property
    def run_name(self) -> str:
        return f"{self.model.name}-{self.algorithm.name.lower()}"

    def identity(self) -> dict[str, Any]:
        """What checkpoints of this spec depend on (see the module docstring)."""
        algorithm = asdict(self.algorithm)
        algorithm.pop("total_timesteps")
        algorithm.pop("torch_threads")
        return {"model": self.model.name, "env": asdict(self.env), "algorithm": algorithm}

    @property
    def spec_hash(self) -> str:
        canonical = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def rollout_timesteps(self) -> int:
        """The step all run lengths are multiples of, so totals come out exact on resume."""
        if self.algorithm.on_policy:
            default = 2048 if self.algorithm.name == "PPO" else 5
            return int(self.algorithm.hyperparameters.get("n_steps", default)) * self.env.n_envs
        return self.env.n_envs

    def to_dict(self) -> dict[str, Any]:
        """Plain data (paths as strings) for checkpoints and manifests."""
        return json.loads(json.dumps(asdict(self), default=str))


class _Section:
    """Reads one TOML table, remembering which keys were used so leftovers are reported."""

    def __init__(self, source: str, name: str, table: Any) -> None:
        if not isinstance(table, dict):
            raise SpecError(source, name, f"must be a table, got {type(table).__name__}")
        self.source, self.name, self.table = source, name, table
        self.used: set[str] = set()

    def _field(self, key: str) -> str:
        return f"{self.name}.{key}"

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.table:
            if default is ...:
                raise SpecError(self.source, self._field(key), "is required")
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a flag written as a number (or the reverse) is a mistake.
        if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise SpecError(
                self.source, self._field(key), f"must be {names}, got {type(value).__name__}"
            )
        return value

    def positive(self, key: str, default: Any = ..., maximum: int | None = None) -> Any:
        value = self.get(key, int, default)
        if value is not None and value <= 0:
            raise SpecError(self.source, self._field(key), f"must be > 0, got {value}")
        if value is not None and maximum is not None and value > maximum:
            raise SpecError(self.source, self._field(key), f"must be <= {maximum}, got {value}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> Any:
        value = self.get(key, str, default)
        if value is not None and value not in choices:
            raise SpecError(
                self.source, self._field(key), f"{value!r} is not one of {', '.join(choices)}"
            )
        return value

    def path(self, key: str, base: Path, default: Any = ...) -> Path | None:
        value = self.get(key, str, default)
        if value is None or isinstance(value, Path):
            return value
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise SpecError(self.source, self._field(unknown[0]), "unknown field")


def _section(source: str, data: dict[str, Any], name: str, required: bool = True) -> _Section:
    if name not in data:
        if required:
            raise SpecError(source, name, "table is required")
        return _Section(source, name, {})
    return _Section(source, name, data[name])


def _check_env_id(source: str, env_id: str) -> None:
    import gymnasium

    if env_id not in gymnasium.envs.registry:
        raise SpecError(source, "env.id", f"{env_id!r} is not a registered gymnasium environment")


def _check_hyperparameters(source: str, algorithm: str, params: dict[str, Any]) -> None:
    import inspect

    import stable_baselines3

    cls = getattr(stable_baselines3, algorithm)
    accepted = set(inspect.signature(cls.__init__).parameters) - {
        "self",
        "policy",
        "env",
        "seed",
        "device",
        "verbose",
        "tensorboard_log",
        "_init_setup_model",
        "policy_kwargs",
    }
    for key, value in params.items():
        if key not in accepted:
            raise SpecError(
                source,
                f"algorithm.hyperparameters.{key}",
                f"{algorithm} has no such parameter (see stable-baselines3's {algorithm} docs)",
            )
        if isinstance(value, str) and value.startswith("lin_"):
            try:
                float(value[4:])
            except ValueError:
                raise SpecError(
                    source,
                    f"algorithm.hyperparameters.{key}",
                    f"{value!r}: a linear schedule is written lin_<start>, e.g. lin_0.001",
                ) from None


def _aligned(source: str, field_name: str, value: int, step: int, why: str) -> None:
    if value % step:
        suggestion = (value // step + 1) * step
        raise SpecError(
            source,
            field_name,
            f"{value} is not a multiple of {step} ({why}); use {suggestion}",
        )


def parse_spec(data: dict[str, Any], *, source: str, base: Path) -> TrainingSpec:
    """Validate a parsed TOML document; relative paths are taken from ``base``."""
    allowed = {"model", "env", "algorithm", "checkpoint", "evaluation", "server", "sidecar"}
    for key in data:
        if key not in allowed:
            raise SpecError(source, key, "unknown table")

    s = _section(source, data, "model")
    formats = s.get("formats", list, ["onnx"])
    for fmt in formats:
        if fmt not in FORMATS:
            raise SpecError(source, "model.formats", f"{fmt!r} is not one of {', '.join(FORMATS)}")
    if not formats:
        raise SpecError(source, "model.formats", "needs at least one format")
    model = PublishedModelSpec(
        name=s.get("name", str),
        repository=s.path("repository", base),
        max_batch_size=s.positive("max_batch_size", 64),
        formats=tuple(dict.fromkeys(formats)),
        gguf_type=s.choice("gguf_type", GGUF_TYPES, "F32"),
    )
    if not model.name or "/" in model.name or model.name.startswith("."):
        raise SpecError(source, "model.name", f"{model.name!r} is not a usable folder name")
    s.finish()

    s = _section(source, data, "env")
    env = EnvSpec(
        id=s.get("id", str),
        n_envs=s.positive("n_envs", 8, maximum=MAX_ENVS),
        vectorization=s.choice("vectorization", VECTORIZATION, "dummy"),
        normalize_observations=s.get("normalize_observations", bool, False),
        kwargs=s.get("kwargs", dict, {}),
    )
    s.finish()
    _check_env_id(source, env.id)

    s = _section(source, data, "algorithm")
    net_arch = s.get("net_arch", list, None)
    if net_arch is not None and (
        not net_arch
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in net_arch)
    ):
        raise SpecError(source, "algorithm.net_arch", "must be a list of positive layer widths")
    algorithm = AlgorithmSpec(
        name=s.choice("name", ALGORITHMS),
        total_timesteps=s.positive("total_timesteps"),
        seed=s.get("seed", int, 0),
        policy=s.choice("policy", ("MlpPolicy",), "MlpPolicy"),
        hyperparameters=s.get("hyperparameters", dict, {}),
        net_arch=tuple(net_arch) if net_arch else None,
        activation=s.choice("activation", ACTIVATIONS, None),
        torch_threads=s.positive("torch_threads", 1),
    )
    s.finish()
    _check_hyperparameters(source, algorithm.name, algorithm.hyperparameters)

    base_dir = base / "runs"
    s = _section(source, data, "checkpoint", required=False)
    checkpoint = CheckpointSpec(
        directory=s.path("directory", base, str(base_dir / f"{model.name}")),
        interval_timesteps=s.positive("interval_timesteps", algorithm.total_timesteps),
        keep=s.positive("keep", 3),
    )
    s.finish()

    s = _section(source, data, "evaluation", required=False)
    margin = s.get("margin", (int, float), 0.0)
    evaluation = EvaluationSpec(
        episodes=s.positive("episodes", 10),
        seed=s.get("seed", int, 10_000),
        margin=float(margin),
        parity_observations=s.positive("parity_observations", 1000),
    )
    s.finish()

    s = _section(source, data, "server", required=False)
    metrics_port = s.get("metrics_port", int, None)
    if metrics_port is not None and not 0 <= metrics_port < 65536:
        raise SpecError(source, "server.metrics_port", f"{metrics_port} is not a port")
    ready_timeout = s.get("ready_timeout_s", (int, float), 60.0)
    server = ServerSpec(
        url=s.get("url", str, "127.0.0.1:8001"),
        keyring=s.path("keyring", base, "keyring.json"),
        token_header=s.get("token_header", str, None),
        token_file=s.path("token_file", base, None),
        metrics_port=metrics_port,
        metrics_address=s.get("metrics_address", str, "127.0.0.1"),
        audit_log=s.path("audit_log", base, None),
        ready_timeout_s=float(ready_timeout),
        ssl=s.get("ssl", bool, False),
        root_certificates=s.path("root_certificates", base, None),
        private_key=s.path("private_key", base, None),
        certificate_chain=s.path("certificate_chain", base, None),
    )
    if (server.private_key is None) != (server.certificate_chain is None):
        raise SpecError(
            source, "server.certificate_chain", "private_key and certificate_chain go together"
        )
    if not server.ssl and (server.root_certificates or server.private_key):
        raise SpecError(source, "server.ssl", "certificates are given but ssl is false")
    if (server.token_header is None) != (server.token_file is None):
        raise SpecError(source, "server.token_file", "token_header and token_file go together")
    s.finish()

    s = _section(source, data, "sidecar", required=False)
    sidecar = SidecarSpec(promote_every_timesteps=s.positive("promote_every_timesteps", None))
    s.finish()

    spec = TrainingSpec(
        source=source,
        model=model,
        env=env,
        algorithm=algorithm,
        checkpoint=checkpoint,
        evaluation=evaluation,
        server=server,
        sidecar=sidecar,
    )
    step = spec.rollout_timesteps
    why = (
        "n_steps x n_envs, one rollout" if algorithm.on_policy else "n_envs, one step of every env"
    )
    _aligned(source, "algorithm.total_timesteps", algorithm.total_timesteps, step, why)
    _aligned(source, "checkpoint.interval_timesteps", checkpoint.interval_timesteps, step, why)
    if sidecar.promote_every_timesteps is not None:
        _aligned(
            source, "sidecar.promote_every_timesteps", sidecar.promote_every_timesteps, step, why
        )
    return spec


def load_spec(path: str | Path) -> TrainingSpec:
    """Read and validate a training spec file."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(source, "file", f"cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(source, "file", f"not valid TOML: {exc}") from None
    return parse_spec(data, source=source, base=path.resolve().parent)


def _from_plain(value: Any, hint: Any, where: str) -> Any:
    """``value`` (as ``to_dict`` wrote it) as the type ``hint`` names."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(hint)):
            return None
        return _from_plain(value, args[0], where) if len(args) == 1 else value
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _dataclass_from_dict(hint, value, where)
    if hint is Path:
        if not isinstance(value, str):
            raise SpecError("spec dict", where, f"must be a path string, got {value!r}")
        return Path(value)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise SpecError("spec dict", where, f"must be a list, got {type(value).__name__}")
        return tuple(value)
    return value


def _dataclass_from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise SpecError("spec dict", where or "spec", f"must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SpecError("spec dict", f"{where}.{unknown[0]}".lstrip("."), "unknown field")
    # Fields left out take their defaults; a missing required one fails in cls(...) below.
    kwargs = {
        name: _from_plain(value, hints[name], f"{where}.{name}".lstrip("."))
        for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise SpecError("spec dict", where or "spec", str(exc)) from None


def spec_from_dict(data: dict[str, Any]) -> TrainingSpec:
    """Rebuild the TrainingSpec that ``TrainingSpec.to_dict()`` wrote (e.g. into a checkpoint's
    state): paths back to Path, tuples back to tuples. No validation beyond structure: the
    values were validated when the spec was first loaded."""
    spec = _dataclass_from_dict(TrainingSpec, data, "")
    assert isinstance(spec, TrainingSpec)
    return spec
