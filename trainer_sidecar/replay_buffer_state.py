"""Replay-buffer contents as plain numpy arrays, for sealed safetensors checkpoints.

Only the filled part of the buffer is saved (everything up to ``pos`` until the buffer has
wrapped, then all of it), together with ``pos`` and ``full``, so a resumed off-policy run
samples from exactly the transitions it had collected.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from stable_baselines3.common.buffers import DictReplayBuffer, NStepReplayBuffer, ReplayBuffer

# Buffer classes whose whole state is the arrays below plus pos/full. HerReplayBuffer (a
# DictReplayBuffer subclass) keeps episode bookkeeping besides, so it is not among them.
SUPPORTED_BUFFERS: tuple[type[ReplayBuffer], ...] = (
    ReplayBuffer,
    DictReplayBuffer,
    NStepReplayBuffer,
)
_FIELDS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")


class ReplayBufferStateError(ValueError):
    """A buffer cannot be saved, or saved contents do not fit the buffer they go into."""


def _check_supported(buffer: Any) -> None:
    if type(buffer) not in SUPPORTED_BUFFERS:
        names = ", ".join(cls.__name__ for cls in SUPPORTED_BUFFERS)
        raise ReplayBufferStateError(
            f"replay buffer type {type(buffer).__name__} cannot be checkpointed (supported: "
            f"{names}); checkpoint without it (include_replay_buffer=False) to refill it on resume"
        )


def _stored(buffer: ReplayBuffer) -> int:
    return buffer.buffer_size if buffer.full else buffer.pos


def _named_arrays(buffer: ReplayBuffer) -> dict[str, np.ndarray]:
    """Every storage array of the buffer, dict observations flattened as ``field/key``."""
    arrays: dict[str, np.ndarray] = {}
    for name in _FIELDS:
        value = getattr(buffer, name, None)
        if value is None:  # next_observations with optimize_memory_usage
            continue
        if isinstance(value, dict):
            for key, array in value.items():
                arrays[f"{name}/{key}"] = array
        else:
            arrays[name] = value
    return arrays


def buffer_to_arrays(buffer: ReplayBuffer) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The filled part of ``buffer`` as arrays, and the metadata needed to put it back."""
    _check_supported(buffer)
    stored = _stored(buffer)
    arrays = {
        name: np.ascontiguousarray(array[:stored]) for name, array in _named_arrays(buffer).items()
    }
    meta = {
        "type": type(buffer).__name__,
        "pos": int(buffer.pos),
        "full": bool(buffer.full),
        "buffer_size": int(buffer.buffer_size),
        "n_envs": int(buffer.n_envs),
        "stored": int(stored),
    }
    return arrays, meta


def check_buffer_fits(
    buffer: ReplayBuffer, arrays: dict[str, np.ndarray], meta: dict[str, Any]
) -> None:
    """Raise ReplayBufferStateError unless ``arrays`` can be restored into ``buffer`` as is."""
    _check_supported(buffer)
    if meta.get("type") != type(buffer).__name__:
        raise ReplayBufferStateError(
            f"saved replay buffer is a {meta.get('type')}, the model's is a {type(buffer).__name__}"
        )
    stored, pos, full = int(meta["stored"]), int(meta["pos"]), bool(meta["full"])
    if full and stored != buffer.buffer_size:
        raise ReplayBufferStateError(
            f"saved replay buffer is full with {stored} slots, the model's holds "
            f"{buffer.buffer_size}; resume with the same buffer_size and n_envs"
        )
    if full and not 0 <= pos < buffer.buffer_size:
        # SB3 writes the next transition at pos: out of range, it would fail (or write
        # elsewhere) only once training has resumed.
        raise ReplayBufferStateError(
            f"saved replay buffer is full with its position at {pos}, outside the "
            f"0..{buffer.buffer_size - 1} slots of the model's buffer"
        )
    if not full and not (0 <= stored == pos <= buffer.buffer_size):
        raise ReplayBufferStateError(
            f"saved replay buffer holds {stored} slots (pos {pos}), the model's holds "
            f"{buffer.buffer_size}; resume with the same buffer_size and n_envs"
        )
    targets = _named_arrays(buffer)
    if set(targets) != set(arrays):
        raise ReplayBufferStateError(
            f"saved replay buffer has arrays {sorted(arrays)}, the model's has {sorted(targets)}"
        )
    for name, target in targets.items():
        saved = arrays[name]
        if saved.shape != (stored, *target.shape[1:]) or saved.dtype != target.dtype:
            raise ReplayBufferStateError(
                f"replay buffer array {name!r} is {saved.dtype}{list(saved.shape)}, the model "
                f"expects {target.dtype}{[stored, *target.shape[1:]]}"
            )


def arrays_to_buffer(
    buffer: ReplayBuffer, arrays: dict[str, np.ndarray], meta: dict[str, Any]
) -> None:
    """Put saved contents back into ``buffer`` (checks first; the buffer is unchanged on error)."""
    check_buffer_fits(buffer, arrays, meta)
    stored = int(meta["stored"])
    for name, target in _named_arrays(buffer).items():
        target[:stored] = arrays[name]
        # Slots past pos are never sampled before being overwritten, but clearing them makes a
        # restored buffer identical to the saved one whatever the target held before.
        target[stored:] = 0
    buffer.pos = int(meta["pos"])
    buffer.full = bool(meta["full"])
