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

from forseti.core.storage import is_remote

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


# Each section's fields, with their defaults and what they mean, are defined once below; the
# TOML parser (parse_spec) reads the defaults from here. A field without a default is required,
# unless its docstring names a default derived from other fields.


@dataclass(frozen=True)
class EnvSpec:
    """``[env]``: the gymnasium environment the policy trains on."""

    id: str
    """A registered gymnasium environment id, e.g. ``CartPole-v1``."""
    n_envs: int = 8
    """Environments stepped together (1 to MAX_ENVS)."""
    vectorization: str = "dummy"
    """``dummy`` (all envs in this process) or ``subprocess`` (one worker process per env)."""
    normalize_observations: bool = False
    """Wrap the envs in VecNormalize; its statistics are checkpointed and exported in-graph."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for ``gymnasium.make``."""


@dataclass(frozen=True)
class AlgorithmSpec:
    """``[algorithm]``: the stable-baselines3 algorithm, its network and its run length."""

    name: str
    """One of ALGORITHMS (PPO, A2C, DQN, SAC, TD3)."""
    total_timesteps: int
    """Env steps of the whole run; a multiple of the rollout (see rollout_timesteps)."""
    seed: int = 0
    """Seed of the algorithm and the training envs."""
    policy: str = "MlpPolicy"
    """The SB3 policy class; only ``MlpPolicy`` is exported."""
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    """Passed to the SB3 algorithm as is; ``"lin_X"`` is a linear schedule from X to 0."""
    net_arch: tuple[int, ...] | None = None
    """Hidden layer widths; None: SB3's default for the algorithm."""
    activation: str | None = None
    """One of ACTIVATIONS; None: SB3's default for the algorithm."""
    torch_threads: int = 1
    """torch CPU threads for training (not part of the spec hash)."""

    @property
    def on_policy(self) -> bool:
        return self.name in ON_POLICY


@dataclass(frozen=True)
class PublishedModelSpec:
    """``[model]``: the model the run publishes into the repository (not the server's parsed
    config.pbtxt, which is forseti.core.repository.config.ModelSpec)."""

    name: str
    """The model's folder name in the repository (and the run name's first part)."""
    repository: Path | str
    """The model repository promotions publish into (relative: to the spec file's folder), or
    an object store (``s3://bucket/prefix``; credentials from the AWS environment)."""
    max_batch_size: int = 64
    """The published config's max_batch_size."""
    formats: tuple[str, ...] = ("onnx",)
    """Artifact formats (FORMATS): the first is the model the gate judges and clients call;
    each further one is published as ``<name>_<format>``."""
    gguf_type: str = "F32"
    """GGUF weight type when ``gguf`` is among the formats: F32, F16 or Q8_0."""


@dataclass(frozen=True)
class CheckpointSpec:
    """``[checkpoint]``: where and how often sealed checkpoints are written."""

    directory: Path | str
    """The run directory (checkpoints under it); default ``runs/<model.name>`` beside the
    spec file; or an object store (``s3://bucket/prefix``, credentials from the AWS
    environment)."""
    interval_timesteps: int
    """Env steps between checkpoints; default ``algorithm.total_timesteps`` (one, at the end)."""
    keep: int = 3
    """How many of the newest checkpoints are kept."""


@dataclass(frozen=True)
class EvaluationSpec:
    """``[evaluation]``: the parity check and the gate a candidate must pass to be promoted."""

    episodes: int = 10
    """Fixed-seed episodes the gate plays with the candidate and with the live version."""
    seed: int = 10_000
    """Episode i starts from ``reset(seed=seed + i)``."""
    margin: float = 0.0
    """How much the candidate's mean return must beat the live version's by."""
    parity_observations: int = 1000
    """Observations on which the exported artifact must act like the SB3 policy."""


@dataclass(frozen=True)
class ServerSpec:
    """``[server]``: the live server promotions go to, and the trainer's own endpoints."""

    url: str = "127.0.0.1:8001"
    """The server's gRPC address, host:port: the gate's live server, and the one replica
    promotions go to unless ``endpoints`` or ``replicas_dns`` name several."""
    endpoints: tuple[str, ...] = ()
    """Every replica's gRPC address (host:port); a promotion succeeds only when each one
    answers from the new version. Empty: ``url`` alone."""
    replicas_dns: str | None = None
    """host:port of a DNS name that resolves to every replica (a Kubernetes headless Service),
    resolved again at each promotion (all A and AAAA records); instead of ``endpoints``."""
    keyring: Path = Path("keyring.json")
    """The keyring that seals checkpoints and artifacts (relative: to the spec file's folder)."""
    token_header: str | None = None
    """With token_file: the header carrying the token of a server's restricted protocols."""
    token_file: Path | None = None
    """With token_header: the file holding that token."""
    metrics_port: int | None = None
    """Port of the trainer's own Prometheus /metrics; None: not served."""
    metrics_address: str = "127.0.0.1"
    """Address the trainer's /metrics listens on (loopback unless changed)."""
    audit_log: Path | None = None
    """Hash-chained audit log of training operations; None: none kept."""
    ready_timeout_s: float = 60.0
    """Seconds a published version may take until the server answers with it."""
    # TLS / mutual TLS to the server, named as tritonclient names them.
    ssl: bool = False
    """Connect to the server over TLS."""
    root_certificates: Path | None = None
    """CA bundle that verifies the server (with ssl); None: the system's."""
    private_key: Path | None = None
    """With certificate_chain: the client key for mutual TLS."""
    certificate_chain: Path | None = None
    """With private_key: the client certificate for mutual TLS."""

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
    """``[sidecar]``: continuous training (``forseti train --continuous``)."""

    promote_every_timesteps: int | None = None
    """Env steps between promotion attempts; None: every checkpoint.interval_timesteps."""


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


# get()'s default when the caller passes none: the dataclass field's own default.
_FIELD_DEFAULT: Any = object()


def _field_defaults(cls: type) -> dict[str, Any]:
    """Field name -> its default (default_factory called), or MISSING for a required field."""
    defaults: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
        else:
            defaults[f.name] = dataclasses.MISSING
    return defaults


class _Section:
    """Reads one TOML table into the fields of ``cls``, remembering which keys were used so
    leftovers are reported. A key left out takes its field's default (required without one)."""

    def __init__(self, source: str, name: str, table: Any, cls: type) -> None:
        if not isinstance(table, dict):
            raise SpecError(source, name, f"must be a table, got {type(table).__name__}")
        self.source, self.name, self.table = source, name, table
        self.defaults = _field_defaults(cls)
        self.used: set[str] = set()

    def _field(self, key: str) -> str:
        return f"{self.name}.{key}"

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = _FIELD_DEFAULT) -> Any:
        """The value of ``key``, of type ``kind``; left out: ``default`` (only for a default
        derived from other fields), else the field's default."""
        self.used.add(key)
        if key not in self.table:
            if default is _FIELD_DEFAULT:
                default = self.defaults[key]
            if default is dataclasses.MISSING:
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

    def positive(self, key: str, default: Any = _FIELD_DEFAULT, maximum: int | None = None) -> Any:
        value = self.get(key, int, default)
        if value is not None and value <= 0:
            raise SpecError(self.source, self._field(key), f"must be > 0, got {value}")
        if value is not None and maximum is not None and value > maximum:
            raise SpecError(self.source, self._field(key), f"must be <= {maximum}, got {value}")
        return value

    def choice(self, key: str, choices: tuple[str, ...]) -> Any:
        value = self.get(key, str)
        if value is not None and value not in choices:
            raise SpecError(
                self.source, self._field(key), f"{value!r} is not one of {', '.join(choices)}"
            )
        return value

    def path(self, key: str, base: Path, default: Any = _FIELD_DEFAULT) -> Path | None:
        """A path; a relative one (written or default) is taken from ``base``."""
        value = self.get(key, str, default)
        if value is None:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path

    def required_path(self, key: str, base: Path, default: Any = _FIELD_DEFAULT) -> Path:
        """A path for a field that is never None (required, or with a path default)."""
        path = self.path(key, base, default)
        if path is None:
            raise SpecError(self.source, self._field(key), "is required")
        return path

    def location(self, key: str, base: Path, default: Any = _FIELD_DEFAULT) -> Path | str:
        """A folder path (as `required_path`) or an object-store URL kept as written."""
        value = self.table.get(key)
        if isinstance(value, str) and is_remote(value):
            self.used.add(key)
            return value
        return self.required_path(key, base, default)

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise SpecError(self.source, self._field(unknown[0]), "unknown field")


def _section(
    source: str, data: dict[str, Any], name: str, cls: type, required: bool = True
) -> _Section:
    if name not in data:
        if required:
            raise SpecError(source, name, "table is required")
        return _Section(source, name, {}, cls)
    return _Section(source, name, data[name], cls)


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

    s = _section(source, data, "model", PublishedModelSpec)
    formats = s.get("formats", list)
    for fmt in formats:
        if fmt not in FORMATS:
            raise SpecError(source, "model.formats", f"{fmt!r} is not one of {', '.join(FORMATS)}")
    if not formats:
        raise SpecError(source, "model.formats", "needs at least one format")
    model = PublishedModelSpec(
        name=s.get("name", str),
        repository=s.location("repository", base),
        max_batch_size=s.positive("max_batch_size"),
        formats=tuple(dict.fromkeys(formats)),
        gguf_type=s.choice("gguf_type", GGUF_TYPES),
    )
    if not model.name or "/" in model.name or model.name.startswith("."):
        raise SpecError(source, "model.name", f"{model.name!r} is not a usable folder name")
    s.finish()

    s = _section(source, data, "env", EnvSpec)
    env = EnvSpec(
        id=s.get("id", str),
        n_envs=s.positive("n_envs", maximum=MAX_ENVS),
        vectorization=s.choice("vectorization", VECTORIZATION),
        normalize_observations=s.get("normalize_observations", bool),
        kwargs=s.get("kwargs", dict),
    )
    s.finish()
    _check_env_id(source, env.id)

    s = _section(source, data, "algorithm", AlgorithmSpec)
    net_arch = s.get("net_arch", list)
    if net_arch is not None and (
        not net_arch
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in net_arch)
    ):
        raise SpecError(source, "algorithm.net_arch", "must be a list of positive layer widths")
    algorithm = AlgorithmSpec(
        name=s.choice("name", ALGORITHMS),
        total_timesteps=s.positive("total_timesteps"),
        seed=s.get("seed", int),
        policy=s.choice("policy", ("MlpPolicy",)),
        hyperparameters=s.get("hyperparameters", dict),
        net_arch=tuple(net_arch) if net_arch else None,
        activation=s.choice("activation", ACTIVATIONS),
        torch_threads=s.positive("torch_threads"),
    )
    s.finish()
    _check_hyperparameters(source, algorithm.name, algorithm.hyperparameters)

    s = _section(source, data, "checkpoint", CheckpointSpec, required=False)
    checkpoint = CheckpointSpec(
        # Both defaults derive from other fields, as the fields' docstrings say.
        directory=s.location("directory", base, default=base / "runs" / model.name),
        interval_timesteps=s.positive("interval_timesteps", default=algorithm.total_timesteps),
        keep=s.positive("keep"),
    )
    s.finish()

    s = _section(source, data, "evaluation", EvaluationSpec, required=False)
    evaluation = EvaluationSpec(
        episodes=s.positive("episodes"),
        seed=s.get("seed", int),
        margin=float(s.get("margin", (int, float))),
        parity_observations=s.positive("parity_observations"),
    )
    s.finish()

    s = _section(source, data, "server", ServerSpec, required=False)
    metrics_port = s.get("metrics_port", int)
    if metrics_port is not None and not 0 <= metrics_port < 65536:
        raise SpecError(source, "server.metrics_port", f"{metrics_port} is not a port")
    endpoints = s.get("endpoints", list)
    for endpoint in endpoints:
        if not isinstance(endpoint, str) or ":" not in endpoint:
            raise SpecError(source, "server.endpoints", f"{endpoint!r} is not host:port")
    replicas_dns = s.get("replicas_dns", str)
    if replicas_dns is not None and endpoints:
        raise SpecError(source, "server.replicas_dns", "give endpoints or replicas_dns, not both")
    if replicas_dns is not None and ":" not in replicas_dns:
        raise SpecError(source, "server.replicas_dns", f"{replicas_dns!r} is not host:port")
    server = ServerSpec(
        url=s.get("url", str),
        endpoints=tuple(endpoints),
        replicas_dns=replicas_dns,
        keyring=s.required_path("keyring", base),
        token_header=s.get("token_header", str),
        token_file=s.path("token_file", base),
        metrics_port=metrics_port,
        metrics_address=s.get("metrics_address", str),
        audit_log=s.path("audit_log", base),
        ready_timeout_s=float(s.get("ready_timeout_s", (int, float))),
        ssl=s.get("ssl", bool),
        root_certificates=s.path("root_certificates", base),
        private_key=s.path("private_key", base),
        certificate_chain=s.path("certificate_chain", base),
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

    s = _section(source, data, "sidecar", SidecarSpec, required=False)
    sidecar = SidecarSpec(promote_every_timesteps=s.positive("promote_every_timesteps"))
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
        if set(args) == {Path, str} and isinstance(value, str):
            return value if is_remote(value) else Path(value)  # a folder or a store URL
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
    defaults = _field_defaults(cls)
    unknown = sorted(set(data) - set(defaults))
    if unknown:
        raise SpecError("spec dict", f"{where}.{unknown[0]}".lstrip("."), "unknown field")
    missing = [
        name for name, d in defaults.items() if d is dataclasses.MISSING and name not in data
    ]
    if missing:
        raise SpecError("spec dict", f"{where}.{missing[0]}".lstrip("."), "is required")
    # Fields left out take their defaults.
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
