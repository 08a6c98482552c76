"""The sealed checkpoint folder: its files, writing one atomically, opening and validating one,
and finding the newest usable one of a run.

A checkpoint is a folder ``<run_dir>/checkpoints/<N>/`` published like a model version (a
hidden temporary folder renamed to its number in one step, so a reader never sees half of
one, even after kill -9). The run directory may be an object store (``s3://bucket/run``): then
the number is claimed, the objects written and a commit marker written last, and a checkpoint
without its marker does not exist for a reader (forseti.core.repository.publish).

Every file in it is sealed (AES-256-GCM bound to run name, N and file name); nothing is ever
written in plaintext, and nothing is pickled:

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

What goes into those files from a stable-baselines3 model, and back, is checkpoint_sb3.py's
job. This module imports torch only when a checkpoint is opened, so naming the layout (as
``forseti export`` does to tell a checkpoint from a safetensors file) imports none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.numpy as st_numpy
from safetensors import SafetensorError

from forseti.core.repository.layout import parse_version_name, version_dirs
from forseti.core.repository.listing import CLAIM_NAME, COMMIT_NAME, list_model
from forseti.core.repository.publish import (
    TEMP_PREFIX,
    PublishError,
    publish_objects,
    publish_version,
)
from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.sealed import SEALED_SUFFIX, SealError, open_sealed, seal_bytes
from forseti.core.storage import Storage, StorageError, StorageNotFound, is_remote, open_storage

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger(__name__)

FORMAT = "forseti-checkpoint/1"
CHECKPOINTS_DIR = "checkpoints"
POLICY_FILE = "policy.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
REPLAY_BUFFER_FILE = "replay_buffer.safetensors"
VECNORMALIZE_FILE = "vecnormalize.safetensors"
STATE_FILE = "state.json"
# Every checkpoint folder has it, so its presence tells a checkpoint folder from other folders.
CHECKPOINT_MARKER = STATE_FILE + SEALED_SUFFIX
DELETE_PREFIX = ".delete-"
# A publisher's temp folder this old was left by a killed process (one trainer owns a run dir,
# and a checkpoint takes seconds to write), so the next save may remove it.
STALE_TEMP_SECONDS = 600.0


class CheckpointError(Exception):
    """A checkpoint could not be written, opened, validated or restored.

    ``reason`` says what was wrong; ``path`` is the checkpoint folder when there is one.
    """

    def __init__(self, reason: str, path: Path | str | None = None) -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"checkpoint {path}: {reason}" if path is not None else reason)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint is: its number, folder, progress and the spec that made it."""

    number: int
    path: Path | str  # a folder, or the checkpoint's URL on an object store
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


def _info(number: int, path: Path | str, state: dict[str, Any]) -> CheckpointInfo:
    return CheckpointInfo(
        number=number,
        path=path,
        num_timesteps=int(state["num_timesteps"]),
        counters=dict(state["counters"]),
        spec_hash=str(state["spec_hash"]),
        spec=dict(state["spec"]),
        algorithm=str(state["algorithm"]),
        created=str(state.get("created", "")),
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- writing ------------------------------------------------------------------------------------


def _checked_counters(counters: dict[str, Any]) -> dict[str, int | float]:
    """``counters`` as state.json holds them (names to numbers); CheckpointError otherwise."""
    checked: dict[str, int | float] = {}
    for key, value in counters.items():
        if not isinstance(key, str) or isinstance(value, bool):
            raise CheckpointError(f"counter {key!r}={value!r}: counters map names to numbers")
        if not isinstance(value, int | float):
            raise CheckpointError(f"counter {key!r}={value!r}: counters map names to numbers")
        checked[key] = value
    return checked


def write_checkpoint(
    run_dir: Path | str,
    keyring: Keyring,
    *,
    run_name: str,
    files: dict[str, bytes],
    state: dict[str, Any],
    keep: int = 3,
) -> CheckpointInfo:
    """Seal ``files`` and state.json into the next checkpoint folder of ``run_dir`` atomically,
    then keep only the newest ``keep``.

    :param files: plaintext file name (``POLICY_FILE`` ...) -> contents
    :param state: state.json's contents: at least ``algorithm``, ``num_timesteps``,
        ``counters``, ``spec`` and ``spec_hash``; the format, run name, creation time,
        number and every file's SHA-256 are added here
    :raises CheckpointError: on error no new checkpoint becomes visible
    """
    if keep < 1:
        raise CheckpointError(f"keep={keep}: at least the newest checkpoint must be kept")
    state = {
        **state,
        "format": FORMAT,
        "run_name": run_name,
        "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "counters": _checked_counters(state["counters"]),
        "files": {
            name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in files.items()
        },
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
        return {
            name + SEALED_SUFFIX: seal_bytes(
                data, keyring, model=run_name, version=number, filename=name
            )
            for name, data in {**files, STATE_FILE: document}.items()
        }

    if is_remote(run_dir):
        return _write_remote(str(run_dir), make_files, keep, state)
    checkpoints = Path(run_dir) / CHECKPOINTS_DIR
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
    try:
        _prune(checkpoints, keep=keep, newest=number)
    except OSError as exc:
        # The new checkpoint is safely written; old ones linger until a later save prunes them.
        log.warning("cannot prune old checkpoints", extra={"dir": str(checkpoints), "error": exc})
    return _info(number, checkpoints / str(number), state)


def _write_remote(
    run_dir: str, make_files: Callable[[int], dict[str, bytes]], keep: int, state: dict[str, Any]
) -> CheckpointInfo:
    """The object-store twin of the folder path above: claim, objects, commit marker; prune."""
    storage = open_storage(run_dir)
    try:
        number = publish_objects(storage, CHECKPOINTS_DIR, make_files)
    except SealError as exc:
        raise CheckpointError(f"cannot seal checkpoint files: {exc}") from None
    except (PublishError, StorageError) as exc:
        raise CheckpointError(f"cannot write a checkpoint under {run_dir}: {exc}") from None
    try:
        _prune_remote(storage, keep=keep, newest=number)
    except StorageError as exc:
        log.warning("cannot prune old checkpoints", extra={"dir": run_dir, "error": str(exc)})
    return _info(number, f"{run_dir}/{CHECKPOINTS_DIR}/{number}", state)


def _prune_remote(storage: Storage, *, keep: int, newest: int) -> None:
    """Remove all but the newest ``keep`` committed checkpoints (never ``newest``): the commit
    marker first, so a reader stops counting one before any of its files goes. The claim
    stays, so the number is never taken again."""
    versions = list_model(storage, CHECKPOINTS_DIR).versions
    committed = sorted(v for v, vl in versions.items() if vl.committed)
    for number in committed[:-keep]:
        if number == newest:
            continue
        files = versions[number].files
        storage.delete(f"{CHECKPOINTS_DIR}/{number}/{COMMIT_NAME}")
        for name in files:
            if name not in (COMMIT_NAME, CLAIM_NAME):
                storage.delete(f"{CHECKPOINTS_DIR}/{number}/{name}")
        log.debug("checkpoint pruned", extra={"checkpoint": number})


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


def _read_sealed(path: Path | str, sealed_name: str) -> bytes:
    """A sealed file of a checkpoint, from a folder or an object store."""
    if isinstance(path, str) and is_remote(path):
        run_dir, number = path.rsplit("/", 2)[0], path.rsplit("/", 1)[1]
        try:
            return open_storage(run_dir).read(f"{CHECKPOINTS_DIR}/{number}/{sealed_name}")
        except StorageNotFound:
            raise FileNotFoundError(sealed_name) from None
        except StorageError as exc:
            raise OSError(0, f"{type(exc).__name__}: {exc}") from None
    return (Path(path) / sealed_name).read_bytes()


def _open_file(path: Path | str, keyring: Keyring, run_name: str, number: int, name: str) -> bytes:
    sealed_name = name + SEALED_SUFFIX
    try:
        blob = _read_sealed(path, sealed_name)
    except FileNotFoundError:
        raise CheckpointError(f"missing file {sealed_name}", path) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {sealed_name}: {exc.strerror}", path) from None
    try:
        return open_sealed(blob, keyring, model=run_name, version=number, filename=name)
    except SealError as exc:
        raise CheckpointError(f"{sealed_name}: {exc}", path) from None


def load_checkpoint(
    path: Path | str, keyring: Keyring, *, run_name: str, spec_hash: str | None = None
) -> LoadedCheckpoint:
    """Open one checkpoint folder in memory: every seal authenticated, every digest checked,
    and (when given) the spec hash compared. Raises CheckpointError saying what was wrong."""
    import safetensors.torch as st_torch  # torch only here (see the module docstring)

    if not (isinstance(path, str) and is_remote(path)):
        path = Path(path)
    number = parse_version_name(str(path).rstrip("/").rsplit("/", 1)[-1])
    if number is None:
        raise CheckpointError("a checkpoint folder is named by its number", path)
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
        info = _info(number, path, state)
    except SafetensorError as exc:
        raise CheckpointError(f"a tensor file does not parse as safetensors: {exc}", path) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{STATE_FILE} is malformed: {exc!r}", path) from None
    return LoadedCheckpoint(info, state, policy, optimizer, replay, vecnorm)


def checkpoint_folders(run_dir: Path | str) -> dict[int, Path | str]:
    """The run's checkpoints by number: folders, or (object store) committed ones' URLs."""
    if is_remote(run_dir):
        versions = list_model(open_storage(run_dir), CHECKPOINTS_DIR).versions
        base = f"{str(run_dir).rstrip('/')}/{CHECKPOINTS_DIR}"
        return {v: f"{base}/{v}" for v, vl in versions.items() if vl.committed}
    return dict(version_dirs(Path(run_dir) / CHECKPOINTS_DIR))


def latest_valid_checkpoint(
    run_dir: Path | str,
    keyring: Keyring,
    *,
    run_name: str,
    spec_hash: str | None = None,
    check: Callable[[LoadedCheckpoint], None] | None = None,
) -> LoadedCheckpoint | None:
    """The newest checkpoint that opens and validates (and passes ``check``, when given).

    Each checkpoint that fails is logged with a warning naming its folder and the reason, and
    the previous one is tried. Returns None when the run has no checkpoint at all; raises
    CheckpointError, listing every reason, when it has some but none is usable.

    :param check: raises CheckpointError for a checkpoint that opens but will not do (e.g.
        checkpoint_sb3.check_compatible: it does not fit the model it is meant for)
    """
    checkpoints = f"{run_dir}/{CHECKPOINTS_DIR}"
    try:
        folders = checkpoint_folders(run_dir)
    except StorageError as exc:
        raise CheckpointError(f"cannot list the checkpoints in {checkpoints}: {exc}") from None
    if not folders:
        return None
    reasons: list[str] = []
    for number in sorted(folders, reverse=True):
        path = folders[number]
        try:
            loaded = load_checkpoint(path, keyring, run_name=run_name, spec_hash=spec_hash)
            if check is not None:
                check(loaded)
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
