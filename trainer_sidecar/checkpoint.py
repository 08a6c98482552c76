"""Sealed safetensors checkpoints of a stable-baselines3 run, and resuming from the newest one.

A checkpoint is a folder ``<run_dir>/checkpoints/<N>/`` published like a model version (a
hidden temporary folder renamed to its number in one step, so a reader never sees half of
one, even after kill -9). Every file in it is sealed (AES-256-GCM bound to run name, N and
file name); nothing is ever written in plaintext, and nothing is pickled:

=================================  ==========================================================
``policy.safetensors``             module state dicts (``policy``) and torch variables
                                   (SAC's ``log_ent_coef``), as SB3's
                                   ``_get_torch_save_params`` names them
``optimizer.safetensors``          optimizer state tensors (moments, Adam step counters)
``replay_buffer.safetensors``      off-policy algorithms: the filled part of the buffer
``vecnormalize.safetensors``       VecNormalize running statistics, when one is used
``state.json``                     counters, algorithm progress, optimizer param groups,
                                   the training spec and its hash, SHA-256 of every file
=================================  ==========================================================
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy as st_numpy
import safetensors.torch as st_torch
import torch
from safetensors import SafetensorError
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import VecNormalize

from forseti.core.repository.layout import version_dirs
from forseti.core.repository.publish import TEMP_PREFIX, PublishError, publish_version
from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.sealed import SEALED_SUFFIX, SealError, open_sealed, seal_bytes
from forseti.trainer_sidecar.replay_buffer_state import (
    ReplayBufferStateError,
    arrays_to_buffer,
    buffer_to_arrays,
    check_buffer_fits,
)

log = logging.getLogger(__name__)

FORMAT = "forseti-checkpoint/1"
CHECKPOINTS_DIR = "checkpoints"
POLICY_FILE = "policy.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
REPLAY_BUFFER_FILE = "replay_buffer.safetensors"
VECNORMALIZE_FILE = "vecnormalize.safetensors"
STATE_FILE = "state.json"
DELETE_PREFIX = ".delete-"
# A publisher's temp folder this old was left by a killed process (one trainer owns a run dir,
# and a checkpoint takes seconds to write), so the next save may remove it.
STALE_TEMP_SECONDS = 600.0

# Plain attributes that drive SB3's schedules (learning rate and exploration read
# _current_progress_remaining; DQN's target updates read _n_calls; TD3's policy delay reads
# _n_updates). Only those a model has are saved.
PROGRESS_ATTRIBUTES = (
    "num_timesteps",
    "_total_timesteps",
    "_n_updates",
    "_episode_num",
    "_current_progress_remaining",
    "_n_calls",
    "exploration_rate",
)


class CheckpointError(Exception):
    """A checkpoint could not be written, opened, validated or restored.

    ``reason`` says what was wrong; ``path`` is the checkpoint folder when there is one.
    """

    def __init__(self, reason: str, path: Path | None = None) -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"checkpoint {path}: {reason}" if path is not None else reason)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint is: its number, folder, progress and the spec that made it."""

    number: int
    path: Path
    num_timesteps: int
    counters: dict[str, int | float]
    spec_hash: str
    spec: dict[str, Any]
    algorithm: str = ""
    created: str = ""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """An opened, authenticated and digest-checked checkpoint, held in memory."""

    info: CheckpointInfo
    state: dict[str, Any]
    policy: dict[str, torch.Tensor] = field(repr=False)
    optimizer: dict[str, torch.Tensor] = field(repr=False)
    replay_buffer: dict[str, np.ndarray] | None = field(default=None, repr=False)
    vec_normalize: dict[str, np.ndarray] | None = field(default=None, repr=False)

    def module_state_dict(self, name: str = "policy") -> dict[str, torch.Tensor]:
        """The saved state dict of one module (``policy`` by default), e.g. for an exporter."""
        prefix = f"{name}/"
        found = {k[len(prefix) :]: v for k, v in self.policy.items() if k.startswith(prefix)}
        if not found:
            raise CheckpointError(f"no module {name!r} in this checkpoint", self.info.path)
        return found


# --- gathering the model's torch objects -------------------------------------------------------


@dataclass(frozen=True)
class _TorchObjects:
    modules: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    variables: dict[str, torch.Tensor]


def _attribute(obj: Any, dotted: str) -> Any:
    return functools.reduce(getattr, dotted.split("."), obj)


def _torch_objects(model: BaseAlgorithm) -> _TorchObjects:
    """Every torch object SB3 itself would save for this algorithm, sorted by kind."""
    state_dict_names, variable_names = model._get_torch_save_params()
    modules: dict[str, torch.nn.Module] = {}
    optimizers: dict[str, torch.optim.Optimizer] = {}
    for name in state_dict_names:
        obj = _attribute(model, name)
        if isinstance(obj, torch.optim.Optimizer):
            optimizers[name] = obj
        elif isinstance(obj, torch.nn.Module):
            # A torch.compile'd module keeps its real state dict on _orig_mod.
            modules[name] = getattr(obj, "_orig_mod", obj)
        else:
            raise CheckpointError(
                f"{type(model).__name__}.{name} is a {type(obj).__name__}, neither a module "
                "nor an optimizer; this algorithm cannot be checkpointed"
            )
    variables: dict[str, torch.Tensor] = {}
    for name in variable_names:
        obj = _attribute(model, name)
        if not isinstance(obj, torch.Tensor):
            raise CheckpointError(
                f"{type(model).__name__}.{name} is a {type(obj).__name__}, not a tensor"
            )
        variables[name] = obj
    return _TorchObjects(modules, optimizers, variables)


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    # A copy, because safetensors refuses tensors that share storage (a shared features
    # extractor appears under several state-dict keys).
    return tensor.detach().to("cpu", copy=True).contiguous()


def _policy_tensors(objects: _TorchObjects) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, module in objects.modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{name}/{key}"] = _cpu_copy(value)
    for name, value in objects.variables.items():
        tensors[name] = _cpu_copy(value)
    return tensors


def _optimizer_payload(
    objects: _TorchObjects,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state tensors for safetensors, and the rest (param groups) for state.json."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for name, optimizer in objects.optimizers.items():
        state_dict = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for index, entry in state_dict["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}/state/{index}/{key}"] = _cpu_copy(value)
                else:
                    scalars.setdefault(str(index), {})[key] = value
        meta[name] = {"param_groups": state_dict["param_groups"], "state_scalars": scalars}
    return tensors, meta


def _optimizer_state_dict(
    name: str, optimizer: torch.optim.Optimizer, loaded: LoadedCheckpoint
) -> dict[str, Any]:
    """Rebuild the state dict ``optimizer.load_state_dict`` takes from a checkpoint."""
    meta = loaded.state["optimizers"][name]
    prefix = f"{name}/state/"
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in loaded.optimizer.items():
        if key.startswith(prefix):
            index, _, field_name = key[len(prefix) :].partition("/")
            state.setdefault(int(index), {})[field_name] = tensor
    for index, entries in meta["state_scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    # JSON turned tuples (Adam's betas) into lists; give back the types the optimizer uses.
    groups = []
    for saved, current in zip(meta["param_groups"], optimizer.param_groups, strict=True):
        group = dict(saved)
        for key, value in group.items():
            if isinstance(current.get(key), tuple) and isinstance(value, list):
                group[key] = tuple(value)
        groups.append(group)
    return {"state": state, "param_groups": groups}


# --- VecNormalize statistics --------------------------------------------------------------------


def _running_stats(vec_normalize: VecNormalize) -> dict[str, RunningMeanStd]:
    stats: dict[str, RunningMeanStd] = {}
    obs_rms = getattr(vec_normalize, "obs_rms", None)
    if isinstance(obs_rms, dict):
        stats.update({f"obs_rms/{key}": rms for key, rms in obs_rms.items()})
    elif obs_rms is not None:
        stats["obs_rms"] = obs_rms
    stats["ret_rms"] = vec_normalize.ret_rms
    return stats


def _vec_normalize_arrays(vec_normalize: VecNormalize) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for name, rms in _running_stats(vec_normalize).items():
        # np.array, not ascontiguousarray, which would turn ret_rms's 0-d arrays into 1-d.
        arrays[f"{name}/mean"] = np.array(rms.mean, dtype=np.float64, order="C")
        arrays[f"{name}/var"] = np.array(rms.var, dtype=np.float64, order="C")
        arrays[f"{name}/count"] = np.array(rms.count, dtype=np.float64)
    return arrays


def _vec_normalize_config(vec_normalize: VecNormalize) -> dict[str, Any]:
    # What an exporter needs to put the normalisation inside the graph.
    keys = vec_normalize.norm_obs_keys
    return {
        "norm_obs": bool(vec_normalize.norm_obs),
        "norm_reward": bool(vec_normalize.norm_reward),
        "clip_obs": float(vec_normalize.clip_obs),
        "clip_reward": float(vec_normalize.clip_reward),
        "gamma": float(vec_normalize.gamma),
        "epsilon": float(vec_normalize.epsilon),
        "norm_obs_keys": list(keys) if keys is not None else None,
    }


# --- saving -------------------------------------------------------------------------------------


def _checked_counters(counters: dict[str, Any]) -> dict[str, int | float]:
    checked: dict[str, int | float] = {}
    for key, value in counters.items():
        if not isinstance(key, str) or isinstance(value, bool):
            raise CheckpointError(f"counter {key!r}={value!r}: counters map names to numbers")
        if not isinstance(value, int | float):
            raise CheckpointError(f"counter {key!r}={value!r}: counters map names to numbers")
        checked[key] = value
    return checked


def _plain(value: Any) -> Any:
    # numpy scalars (an exploration schedule may return one) are not JSON.
    return value.item() if isinstance(value, np.generic) else value


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(
    model: BaseAlgorithm,
    run_dir: Path,
    keyring: Keyring,
    *,
    run_name: str,
    spec: dict[str, Any],
    spec_hash: str,
    counters: dict[str, Any],
    vec_normalize: VecNormalize | None = None,
    include_replay_buffer: bool = True,
    keep: int = 3,
) -> CheckpointInfo:
    """Write the next sealed checkpoint of ``model`` atomically, then keep only the newest
    ``keep``. Raises CheckpointError; on error no new checkpoint becomes visible."""
    if keep < 1:
        raise CheckpointError(f"keep={keep}: at least the newest checkpoint must be kept")
    started = time.perf_counter()
    run_dir = Path(run_dir)
    objects = _torch_objects(model)
    optimizer_tensors, optimizer_meta = _optimizer_payload(objects)
    plaintexts: dict[str, bytes] = {
        POLICY_FILE: st_torch.save(_policy_tensors(objects)),
        OPTIMIZER_FILE: st_torch.save(optimizer_tensors),
    }
    state: dict[str, Any] = {
        "format": FORMAT,
        "run_name": run_name,
        "algorithm": type(model).__name__,
        "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "num_timesteps": int(model.num_timesteps),
        "progress": {
            a: _plain(getattr(model, a)) for a in PROGRESS_ATTRIBUTES if hasattr(model, a)
        },
        "counters": _checked_counters(counters),
        "spec": spec,
        "spec_hash": spec_hash,
        "torch": {
            "modules": sorted(objects.modules),
            "variables": sorted(objects.variables),
            "optimizers": sorted(objects.optimizers),
        },
        "optimizers": optimizer_meta,
    }
    buffer = getattr(model, "replay_buffer", None)
    if include_replay_buffer and buffer is not None:
        try:
            arrays, state["replay_buffer"] = buffer_to_arrays(buffer)
        except ReplayBufferStateError as exc:
            raise CheckpointError(str(exc)) from None
        plaintexts[REPLAY_BUFFER_FILE] = st_numpy.save(arrays)
    if vec_normalize is not None:
        plaintexts[VECNORMALIZE_FILE] = st_numpy.save(_vec_normalize_arrays(vec_normalize))
        state["vec_normalize"] = _vec_normalize_config(vec_normalize)
    state["files"] = {
        name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in plaintexts.items()
    }
    try:
        json.dumps(state)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"the spec, counters or optimizer settings are not plain JSON data: {exc}"
        ) from None

    def make_files(number: int) -> dict[str, bytes]:
        # Called again with the next number if another writer took this one: seals bind it.
        document = json.dumps({**state, "number": number}, sort_keys=True).encode("utf-8")
        files = {**plaintexts, STATE_FILE: document}
        return {
            name + SEALED_SUFFIX: seal_bytes(
                data, keyring, model=run_name, version=number, filename=name
            )
            for name, data in files.items()
        }

    checkpoints = run_dir / CHECKPOINTS_DIR
    try:
        checkpoints.mkdir(parents=True, exist_ok=True)
        number = publish_version(checkpoints, make_files)
    except SealError as exc:
        raise CheckpointError(
            f"cannot seal checkpoint files: {exc}; a replay buffer this large must be left out "
            "(include_replay_buffer=False)"
            if "too large" in exc.reason
            else f"cannot seal checkpoint files: {exc}"
        ) from None
    except (PublishError, OSError) as exc:
        raise CheckpointError(f"cannot write a checkpoint under {checkpoints}: {exc}") from None
    path = checkpoints / str(number)
    try:
        _prune(checkpoints, keep=keep, newest=number)
    except OSError as exc:
        # The new checkpoint is safely written; old ones linger until a later save prunes them.
        log.warning("cannot prune old checkpoints", extra={"dir": str(checkpoints), "error": exc})
    seconds = time.perf_counter() - started
    log.info(
        "checkpoint saved",
        extra={
            "run": run_name,
            "checkpoint": number,
            "num_timesteps": state["num_timesteps"],
            "bytes": sum(len(d) for d in plaintexts.values()),
            "seconds": round(seconds, 4),
        },
    )
    return CheckpointInfo(
        number=number,
        path=path,
        num_timesteps=state["num_timesteps"],
        counters=state["counters"],
        spec_hash=spec_hash,
        spec=spec,
        algorithm=state["algorithm"],
        created=state["created"],
    )


def _remove_folder(folder: Path) -> None:
    # Renamed out of sight first, so a kill mid-delete never leaves a half-deleted numbered
    # checkpoint for a reader to stumble on: the hidden leftover is removed by a later save.
    hidden = folder.parent / f"{DELETE_PREFIX}{folder.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(folder, hidden)
    except FileNotFoundError:
        return
    shutil.rmtree(hidden, ignore_errors=True)


def _prune(checkpoints: Path, *, keep: int, newest: int) -> None:
    """Remove all but the newest ``keep`` checkpoints (never ``newest``), and leftovers."""
    numbers = sorted(version_dirs(checkpoints))
    for number in numbers[:-keep]:
        if number != newest:
            _remove_folder(checkpoints / str(number))
            log.debug("checkpoint pruned", extra={"checkpoint": number})
    now = time.time()
    for entry in os.scandir(checkpoints):
        if not entry.is_dir(follow_symlinks=False):
            continue
        stale_temp = entry.name.startswith(TEMP_PREFIX) and (
            now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS
        )
        if entry.name.startswith(DELETE_PREFIX) or stale_temp:
            shutil.rmtree(entry.path, ignore_errors=True)


# --- opening ------------------------------------------------------------------------------------


def _open_file(path: Path, keyring: Keyring, run_name: str, number: int, name: str) -> bytes:
    sealed = path / (name + SEALED_SUFFIX)
    try:
        blob = sealed.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"missing file {sealed.name}", path) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {sealed.name}: {exc.strerror}", path) from None
    try:
        return open_sealed(blob, keyring, model=run_name, version=number, filename=name)
    except SealError as exc:
        raise CheckpointError(f"{sealed.name}: {exc}", path) from None


def load_checkpoint(
    path: Path, keyring: Keyring, *, run_name: str, spec_hash: str | None = None
) -> LoadedCheckpoint:
    """Open one checkpoint folder in memory: every seal authenticated, every digest checked,
    and (when given) the spec hash compared. Raises CheckpointError saying what was wrong."""
    path = Path(path)
    if not path.name.isdigit():
        raise CheckpointError("a checkpoint folder is named by its number", path)
    number = int(path.name)
    try:
        state = json.loads(_open_file(path, keyring, run_name, number, STATE_FILE))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{STATE_FILE} is not valid JSON: {exc.msg}", path) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise CheckpointError(f"unsupported checkpoint format {found!r}, expected {FORMAT}", path)
    if state.get("number") != number or state.get("run_name") != run_name:
        raise CheckpointError(
            f"{STATE_FILE} describes checkpoint {state.get('number')} of run "
            f"{state.get('run_name')!r}, not {number} of {run_name!r}",
            path,
        )
    if spec_hash is not None and state.get("spec_hash") != spec_hash:
        raise CheckpointError(
            f"spec hash mismatch: made with spec {state.get('spec_hash')}, this run's spec is "
            f"{spec_hash}; resume with the spec that made it, or start a new run directory",
            path,
        )

    def checked(name: str) -> bytes:
        # Seals bind the folder number, not one particular save: a file left from an earlier
        # checkpoint that had the same number would still open, so compare digests too.
        data = _open_file(path, keyring, run_name, number, name)
        expected = state["files"].get(name)
        if not isinstance(expected, dict):
            raise CheckpointError(f"{STATE_FILE} lists no digest for {name}", path)
        if len(data) != expected.get("bytes") or _sha256(data) != expected.get("sha256"):
            raise CheckpointError(f"{name} does not match its SHA-256 in {STATE_FILE}", path)
        return data

    try:
        files = state["files"]
        policy = st_torch.load(checked(POLICY_FILE))
        optimizer = st_torch.load(checked(OPTIMIZER_FILE))
        replay = st_numpy.load(checked(REPLAY_BUFFER_FILE)) if REPLAY_BUFFER_FILE in files else None
        vecnorm = st_numpy.load(checked(VECNORMALIZE_FILE)) if VECNORMALIZE_FILE in files else None
        info = CheckpointInfo(
            number=number,
            path=path,
            num_timesteps=int(state["num_timesteps"]),
            counters=dict(state["counters"]),
            spec_hash=str(state["spec_hash"]),
            spec=dict(state["spec"]),
            algorithm=str(state["algorithm"]),
            created=str(state.get("created", "")),
        )
    except SafetensorError as exc:
        raise CheckpointError(f"a tensor file does not parse as safetensors: {exc}", path) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{STATE_FILE} is malformed: {exc!r}", path) from None
    return LoadedCheckpoint(info, state, policy, optimizer, replay, vecnorm)


def latest_valid_checkpoint(
    run_dir: Path,
    keyring: Keyring,
    *,
    run_name: str,
    spec_hash: str | None = None,
    model: BaseAlgorithm | None = None,
    vec_normalize: VecNormalize | None = None,
) -> LoadedCheckpoint | None:
    """The newest checkpoint that opens and validates (and, given ``model``, fits it).

    Each checkpoint that fails is logged with a warning naming its folder and the reason, and
    the previous one is tried. Returns None when the run has no checkpoint at all; raises
    CheckpointError, listing every reason, when it has some but none is usable.
    """
    checkpoints = Path(run_dir) / CHECKPOINTS_DIR
    folders = version_dirs(checkpoints)
    if not folders:
        return None
    reasons: list[str] = []
    for number in sorted(folders, reverse=True):
        path = folders[number]
        try:
            loaded = load_checkpoint(path, keyring, run_name=run_name, spec_hash=spec_hash)
            if model is not None:
                check_compatible(model, loaded, vec_normalize)
        except CheckpointError as exc:
            log.warning("checkpoint skipped", extra={"checkpoint": str(path), "reason": exc.reason})
            reasons.append(f"{number}: {exc.reason}")
            continue
        if reasons:
            log.info("using an older checkpoint", extra={"checkpoint": str(path)})
        return loaded
    raise CheckpointError(
        f"no usable checkpoint in {checkpoints} ({'; '.join(reasons)}); fix the cause, or start "
        "a new run directory to train from scratch"
    )


# --- restoring ----------------------------------------------------------------------------------


def _tensor_mismatch(what: str, saved: torch.Tensor, expected: torch.Tensor) -> str | None:
    if saved.shape != expected.shape or saved.dtype != expected.dtype:
        return (
            f"{what} is {saved.dtype}{list(saved.shape)}, the model has "
            f"{expected.dtype}{list(expected.shape)}"
        )
    return None


def _check_torch(model: BaseAlgorithm, objects: _TorchObjects, loaded: LoadedCheckpoint) -> None:
    path = loaded.info.path
    saved = loaded.state["torch"]
    current = {
        "modules": sorted(objects.modules),
        "variables": sorted(objects.variables),
        "optimizers": sorted(objects.optimizers),
    }
    if saved != current:
        raise CheckpointError(
            f"saved torch objects {saved} differ from the model's {current} (another algorithm "
            "configuration?)",
            path,
        )
    problems: list[str] = []
    for name, module in objects.modules.items():
        expected = module.state_dict()
        stored = loaded.module_state_dict(name)
        if set(expected) != set(stored):
            missing, extra = (
                sorted(set(expected) - set(stored)),
                sorted(set(stored) - set(expected)),
            )
            problems.append(f"{name}: missing {missing[:5]}, unexpected {extra[:5]}")
            continue
        for key, tensor in stored.items():
            problem = _tensor_mismatch(f"{name}.{key}", tensor, expected[key])
            if problem:
                problems.append(problem)
    for name, variable in objects.variables.items():
        problem = _tensor_mismatch(name, loaded.policy[name], variable)
        if problem:
            problems.append(problem)
    for name, optimizer in objects.optimizers.items():
        problems.extend(_optimizer_problems(name, optimizer, loaded))
    if problems:
        raise CheckpointError(
            f"does not fit {type(model).__name__}: {'; '.join(problems[:5])}"
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""),
            path,
        )


def _optimizer_problems(
    name: str, optimizer: torch.optim.Optimizer, loaded: LoadedCheckpoint
) -> list[str]:
    groups = loaded.state["optimizers"][name]["param_groups"]
    current_groups = optimizer.state_dict()["param_groups"]
    if [g["params"] for g in groups] != [g["params"] for g in current_groups]:
        return [f"{name}: parameter groups differ from the model's"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    problems = []
    state = _optimizer_state_dict(name, optimizer, loaded)["state"]
    for index, entries in state.items():
        if not 0 <= index < len(params):
            problems.append(f"{name}: state for parameter {index}, the model has {len(params)}")
            continue
        for key, value in entries.items():
            # Per-parameter buffers (moments) have the parameter's shape; counters are scalars.
            shape = params[index].shape
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != shape:
                problems.append(
                    f"{name} state {index}.{key} is {list(value.shape)}, the parameter is "
                    f"{list(shape)}"
                )
    return problems


def _check_vec_normalize(loaded: LoadedCheckpoint, vec_normalize: VecNormalize | None) -> None:
    path = loaded.info.path
    if loaded.vec_normalize is None and vec_normalize is None:
        return
    if loaded.vec_normalize is None:
        raise CheckpointError("has no VecNormalize statistics but a VecNormalize was given", path)
    if vec_normalize is None:
        raise CheckpointError(
            "has VecNormalize statistics; pass the run's VecNormalize to restore them", path
        )
    expected = _vec_normalize_arrays(vec_normalize)
    if set(expected) != set(loaded.vec_normalize):
        raise CheckpointError(
            f"VecNormalize statistics {sorted(loaded.vec_normalize)} differ from the given "
            f"VecNormalize's {sorted(expected)}",
            path,
        )
    for key, array in expected.items():
        if loaded.vec_normalize[key].shape != array.shape:
            raise CheckpointError(
                f"VecNormalize {key} has shape {loaded.vec_normalize[key].shape}, the given "
                f"VecNormalize has {array.shape}",
                path,
            )


def check_compatible(
    model: BaseAlgorithm, loaded: LoadedCheckpoint, vec_normalize: VecNormalize | None = None
) -> None:
    """Raise CheckpointError unless ``loaded`` can be restored into ``model`` as is."""
    path = loaded.info.path
    if loaded.info.algorithm != type(model).__name__:
        raise CheckpointError(
            f"made by {loaded.info.algorithm}, the model is a {type(model).__name__}", path
        )
    _check_torch(model, _torch_objects(model), loaded)
    missing = [a for a in loaded.state["progress"] if not hasattr(model, a)]
    if missing:
        raise CheckpointError(f"the model lacks progress attributes {missing}", path)
    if loaded.replay_buffer is not None:
        buffer = getattr(model, "replay_buffer", None)
        if buffer is None:
            raise CheckpointError("has a replay buffer, the model has none", path)
        try:
            check_buffer_fits(buffer, loaded.replay_buffer, loaded.state["replay_buffer"])
        except ReplayBufferStateError as exc:
            raise CheckpointError(str(exc), path) from None
    _check_vec_normalize(loaded, vec_normalize)


def restore_checkpoint(
    model: BaseAlgorithm, loaded: LoadedCheckpoint, vec_normalize: VecNormalize | None = None
) -> None:
    """Bring ``model`` (built fresh from the same spec) back to the checkpoint's state.

    Parameters, optimizer state, progress counters (so learning-rate and exploration
    schedules carry on), the replay buffer and VecNormalize statistics. Everything is checked
    before anything changes, so a CheckpointError leaves the model as it was. Continue with
    ``model.learn(total - model.num_timesteps, reset_num_timesteps=False)``.
    """
    check_compatible(model, loaded, vec_normalize)
    objects = _torch_objects(model)
    for name, module in objects.modules.items():
        module.load_state_dict(loaded.module_state_dict(name), strict=True)
    with torch.no_grad():
        for name, variable in objects.variables.items():
            # In place: the optimizer holding this tensor (SAC's ent_coef_optimizer) keeps it.
            variable.copy_(loaded.policy[name])
    for name, optimizer in objects.optimizers.items():
        optimizer.load_state_dict(_optimizer_state_dict(name, optimizer, loaded))
    for attribute, value in loaded.state["progress"].items():
        setattr(model, attribute, value)
    if loaded.replay_buffer is not None:
        arrays_to_buffer(model.replay_buffer, loaded.replay_buffer, loaded.state["replay_buffer"])
    elif getattr(model, "replay_buffer", None) is not None:
        log.info(
            "checkpoint has no replay buffer; it refills as training continues",
            extra={"checkpoint": str(loaded.info.path)},
        )
    if vec_normalize is not None and loaded.vec_normalize is not None:
        for name, rms in _running_stats(vec_normalize).items():
            rms.mean = loaded.vec_normalize[f"{name}/mean"].copy()
            rms.var = loaded.vec_normalize[f"{name}/var"].copy()
            rms.count = float(loaded.vec_normalize[f"{name}/count"])
    log.info(
        "checkpoint restored",
        extra={"checkpoint": str(loaded.info.path), "num_timesteps": loaded.info.num_timesteps},
    )


def resume_latest(
    model: BaseAlgorithm,
    run_dir: Path,
    keyring: Keyring,
    *,
    run_name: str,
    spec_hash: str,
    vec_normalize: VecNormalize | None = None,
) -> CheckpointInfo | None:
    """Restore the newest usable checkpoint into ``model``; None if the run has none yet."""
    loaded = latest_valid_checkpoint(
        run_dir,
        keyring,
        run_name=run_name,
        spec_hash=spec_hash,
        model=model,
        vec_normalize=vec_normalize,
    )
    if loaded is None:
        return None
    restore_checkpoint(model, loaded, vec_normalize)
    return loaded.info
