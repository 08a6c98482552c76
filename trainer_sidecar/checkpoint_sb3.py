"""A stable-baselines3 model in and out of a checkpoint: what of an algorithm is saved (its
torch modules, variables and optimizers as SB3 itself names them, progress counters, replay
buffer, VecNormalize statistics), whether a checkpoint fits a model, and restoring one.

The sealed folder those go into, and opening it, is checkpoint_format.py's job.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy as st_numpy
import safetensors.torch as st_torch
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import VecNormalize

from forseti.core.sealing.keyring import Keyring
from forseti.trainer_sidecar.checkpoint_format import (
    OPTIMIZER_FILE,
    POLICY_FILE,
    REPLAY_BUFFER_FILE,
    VECNORMALIZE_FILE,
    CheckpointError,
    CheckpointInfo,
    LoadedCheckpoint,
    latest_valid_checkpoint,
    write_checkpoint,
)
from forseti.trainer_sidecar.replay_buffer_state import (
    ReplayBufferStateError,
    arrays_to_buffer,
    buffer_to_arrays,
    check_buffer_fits,
)

log = logging.getLogger(__name__)

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


def _plain(value: Any) -> Any:
    # numpy scalars (an exploration schedule may return one) are not JSON.
    return value.item() if isinstance(value, np.generic) else value


def save_checkpoint(
    model: BaseAlgorithm,
    run_dir: Path | str,
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
    started = time.perf_counter()
    objects = _torch_objects(model)
    optimizer_tensors, optimizer_meta = _optimizer_payload(objects)
    files: dict[str, bytes] = {
        POLICY_FILE: st_torch.save(_policy_tensors(objects)),
        OPTIMIZER_FILE: st_torch.save(optimizer_tensors),
    }
    state: dict[str, Any] = {
        "algorithm": type(model).__name__,
        "num_timesteps": int(model.num_timesteps),
        "progress": {
            a: _plain(getattr(model, a)) for a in PROGRESS_ATTRIBUTES if hasattr(model, a)
        },
        "counters": counters,
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
        files[REPLAY_BUFFER_FILE] = st_numpy.save(arrays)
    if vec_normalize is not None:
        files[VECNORMALIZE_FILE] = st_numpy.save(_vec_normalize_arrays(vec_normalize))
        state["vec_normalize"] = _vec_normalize_config(vec_normalize)
    info = write_checkpoint(
        run_dir, keyring, run_name=run_name, files=files, state=state, keep=keep
    )
    log.info(
        "checkpoint saved",
        extra={
            "run": run_name,
            "checkpoint": info.number,
            "num_timesteps": info.num_timesteps,
            "bytes": sum(len(d) for d in files.values()),
            "seconds": round(time.perf_counter() - started, 4),
        },
    )
    return info


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
    progress = loaded.state["progress"]
    # Restore sets these attributes on the model: only the counters a checkpoint saves, and
    # only as numbers, whatever else a (decrypted and authenticated) state file names.
    unknown = sorted(set(progress) - set(PROGRESS_ATTRIBUTES))
    if unknown:
        raise CheckpointError(f"names progress attributes it never saves: {unknown}", path)
    odd = sorted(
        a for a, v in progress.items() if isinstance(v, bool) or not isinstance(v, int | float)
    )
    if odd:
        raise CheckpointError(f"progress attributes {odd} are not numbers", path)
    missing = [a for a in progress if not hasattr(model, a)]
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
    buffer = getattr(model, "replay_buffer", None)
    if loaded.replay_buffer is not None:
        assert buffer is not None, "check_compatible found the model's replay buffer"
        arrays_to_buffer(buffer, loaded.replay_buffer, loaded.state["replay_buffer"])
    elif buffer is not None:
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
    run_dir: Path | str,
    keyring: Keyring,
    *,
    run_name: str,
    spec_hash: str,
    vec_normalize: VecNormalize | None = None,
) -> CheckpointInfo | None:
    """Restore the newest usable checkpoint into ``model``; None if the run has none yet.

    A checkpoint that does not fit ``model`` (see check_compatible) is skipped like one that
    does not open, and the previous one is tried."""
    loaded = latest_valid_checkpoint(
        run_dir,
        keyring,
        run_name=run_name,
        spec_hash=spec_hash,
        check=lambda loaded: check_compatible(model, loaded, vec_normalize),
    )
    if loaded is None:
        return None
    restore_checkpoint(model, loaded, vec_normalize)
    return loaded.info
