"""`forseti export`: a trainer checkpoint as an ONNX, safetensors or GGUF policy artifact, or a
plain safetensors checkpoint (of any size) as GGUF through the streaming converter.

It lives with the trainer because exporting a checkpoint means rebuilding the policy from it
(the trainer's checkpoint loader and model builder), then handing it to the exporters; the
exporters themselves never import the trainer. torch and stable-baselines3 are imported
inside the functions that handle checkpoints only, so converting a safetensors file never
imports them.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from forseti.core.durable import atomic_output
from forseti.core.logs import configure_logging
from forseti.core.sealing.sealed import SEALED_SUFFIX

# Both import no torch: telling a checkpoint from a safetensors file must not load it.
from .checkpoint_format import CHECKPOINT_MARKER, CHECKPOINTS_DIR
from .spec import GGUF_TYPES

if TYPE_CHECKING:
    from forseti.core.sealing.keyring import Keyring
    from forseti.exporters.policy_description import PolicyDescription

    from .checkpoint_format import LoadedCheckpoint
    from .spec import TrainingSpec

log = logging.getLogger(__name__)

FORMATS = ("onnx", "safetensors", "gguf")
# Plaintext artifacts hold the policy's weights in the clear: readable by their owner only.
PLAINTEXT_MODE = 0o600
SEALED_MODE = 0o644
SEAL_HINT = (
    "a seal that does not authenticate means a wrong --run-name (the training spec's run name, "
    "<model.name>-<algorithm>, e.g. cartpole-ppo), a keyring whose key of that id differs, or an "
    "altered file; the seal cannot tell which: check --run-name and --keyring"
)
KEY_HINT = "the keyring lacks the key that sealed the checkpoint: check --keyring"

DESCRIPTION = """\
Export a trained policy, or convert a safetensors checkpoint to GGUF.

From a trainer checkpoint (run_dir/checkpoints/N, or a run dir for its newest valid
checkpoint): the model is rebuilt from the training spec stored inside the checkpoint,
restored, and written as the deterministic policy with its observation normalisation and
action scaling inside, so a client sends raw observations and gets env-ready actions:
  onnx         the artifact the onnxruntime backend serves; ONNX Runtime's outputs are checked
               against the SB3 policy's predict(deterministic=True) first (parity check)
  safetensors  the policy's layers and contract as tensors and metadata
  gguf         the artifact the gguf backend serves (--gguf-type F32, F16 or Q8_0)
The parity check runs for every format (on the policy every format is written from), and each
artifact is read back before it is written; any failure writes nothing.

From a plain safetensors file (or a folder of shards), --format gguf streams it tensor by
tensor into GGUF (F32/F16/BF16 -> --gguf-type), never holding the model in memory; a progress
bar with MB/s shows on a terminal.

The output is written atomically (complete or not at all). It is plaintext unless --seal:
then OUTPUT.sealed is written, bound to --model and --version and the file name, ready to be
dropped into a model repository as <repo>/<model>/<version>/<file>.sealed."""

EPILOG = """\
examples:
  forseti export runs/cartpole --keyring keyring.json --run-name cartpole-ppo \\
      --format onnx -o policy.onnx
  forseti export runs/cartpole/checkpoints/4 --keyring keyring.json --run-name cartpole-ppo \\
      --format onnx --seal --model cartpole --version 3 -o stage/3/model.onnx \\
      --config-dir stage
  (then publish in one step: mv stage/3 repo/cartpole/3, with repo/cartpole/config.pbtxt
  from stage/ if the model is new, and commit it with the key: forseti seal --keyring
  keyring.json repo; or export without --seal and let forseti publish seal, publish and
  commit: forseti publish --keyring keyring.json --model-repository repo cartpole policy.onnx)
  forseti export llama.safetensors --format gguf --gguf-type Q8_0 -o llama.gguf

exit status: 0 written; 1 export failed (checkpoint does not open or validate, parity check
or read-back failed, conversion error); 2 usage (bad arguments, keyring file, paths)."""


class _UsageError(Exception):
    """The command line asks for something that cannot be done as written (exit 2)."""


class _ExportFailed(Exception):
    """The export itself failed (exit 1)."""


@dataclasses.dataclass(frozen=True)
class _Written:
    """What was written, for the summary line."""

    path: Path
    nbytes: int
    sealed: bool


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="forseti export",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "source",
        type=Path,
        metavar="CHECKPOINT",
        help="a checkpoint folder (run_dir/checkpoints/N), a run dir (its newest valid "
        "checkpoint), or a .safetensors file / folder of shards (with --format gguf)",
    )
    p.add_argument("--format", required=True, choices=FORMATS, help="artifact format")
    p.add_argument(
        "-o", "--output", required=True, type=Path, help="file to write (its folder must exist)"
    )
    p.add_argument(
        "--keyring",
        type=Path,
        help="keyring file that opens the checkpoint and seals the output (default: "
        "$FORSETI_KEYRING or $FORSETI_KEYRING_FD)",
    )
    p.add_argument(
        "--run-name",
        metavar="NAME",
        help="the run the checkpoint belongs to, bound into its seals: the training spec's "
        "<model.name>-<algorithm>, e.g. cartpole-ppo (required for checkpoints)",
    )
    p.add_argument(
        "--gguf-type",
        type=str.upper,
        choices=GGUF_TYPES,
        help="GGUF tensor type (default: the spec's model.gguf_type for a checkpoint, F16 for "
        "a safetensors file); Q8_0 rows that do not split into 32-blocks stay F16",
    )
    p.add_argument(
        "--arch",
        metavar="NAME",
        help="general.architecture of the GGUF converted from a safetensors file (default "
        "forseti); a policy GGUF from a checkpoint is always forseti-policy",
    )
    p.add_argument(
        "--seal",
        action="store_true",
        help="write OUTPUT.sealed (AES-256-GCM with the keyring's newest key) instead of "
        "plaintext, bound to --model, --version and OUTPUT's file name",
    )
    p.add_argument("--model", metavar="M", help="model name the seal binds (with --seal)")
    p.add_argument(
        "--version", type=int, metavar="V", help="model version the seal binds (with --seal)"
    )
    p.add_argument(
        "--config-dir",
        type=Path,
        metavar="DIR",
        help="also write DIR/config.pbtxt for the artifact (onnx or gguf from a checkpoint): "
        "dims, dtypes, max_batch_size, env id, algorithm, run; model name --model or the spec's",
    )
    p.add_argument(
        "--parity-observations",
        type=int,
        metavar="N",
        help="observations the parity check compares (default: the spec's "
        "evaluation.parity_observations)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar, even on a tty")
    p.add_argument("--log-level", default="WARNING", help="log level on stderr (default WARNING)")
    return p


def main_export(argv: list[str]) -> int:
    """Entry point of `forseti export`; returns the exit status."""
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        kind = _source_kind(args.source)
        _check_common(args)
        if kind == "safetensors":
            return _convert_safetensors(args)
        return _export_checkpoint(args, kind)
    except _UsageError as exc:
        print(f"forseti export: {exc}", file=sys.stderr)
        return 2
    except _ExportFailed as exc:
        print(f"forseti export: {exc}", file=sys.stderr)
        return 1


# --- arguments ------------------------------------------------------------------------------


def _source_kind(source: Path) -> str:
    """'checkpoint', 'run' or 'safetensors', from what is at ``source``."""
    if source.is_file():
        if source.suffix == ".safetensors":
            return "safetensors"
        raise _UsageError(
            f"{source} is a file but not .safetensors; give a checkpoint folder "
            f"(run_dir/{CHECKPOINTS_DIR}/N), a run dir, or a .safetensors file"
        )
    if source.is_dir():
        if (source / CHECKPOINT_MARKER).is_file():
            return "checkpoint"
        if (source / CHECKPOINTS_DIR).is_dir() or source.name == CHECKPOINTS_DIR:
            return "run"
        if any(source.glob("*.safetensors")):
            return "safetensors"
        raise _UsageError(
            f"{source} holds no checkpoint ({CHECKPOINT_MARKER}), no {CHECKPOINTS_DIR}/ folder "
            "and no .safetensors file; give a checkpoint folder, a run dir or a safetensors file"
        )
    raise _UsageError(f"{source} does not exist")


def _check_common(args: argparse.Namespace) -> None:
    if not args.output.parent.is_dir():
        raise _UsageError(f"output folder {args.output.parent} does not exist; create it first")
    if args.seal:
        if not args.model or args.version is None:
            raise _UsageError(
                "--seal needs --model and --version: the seal binds the model name and version "
                "the artifact will be served as"
            )
        if args.version < 1:
            raise _UsageError(f"--version must be >= 1 (a repository version), not {args.version}")
    elif args.version is not None:
        raise _UsageError("--version only matters with --seal")
    if args.parity_observations is not None and args.parity_observations < 1:
        raise _UsageError(f"--parity-observations must be >= 1, not {args.parity_observations}")


def _load_keyring(path: Path | None) -> Keyring:
    from forseti.core.sealing.keyring import KeyringError, load_keyring

    try:
        return load_keyring(path)
    except KeyringError as exc:
        raise _UsageError(f"keyring: {exc}") from None


def _plaintext_name(output: Path) -> str:
    """The file name a seal binds: OUTPUT's name without any .sealed suffix."""
    name = output.name
    return name[: -len(SEALED_SUFFIX)] if name.endswith(SEALED_SUFFIX) else name


def _write(args: argparse.Namespace, data: bytes, keyring: Keyring | None) -> _Written:
    """Write ``data`` (sealed with --seal) to OUTPUT atomically."""
    from forseti.core.sealing.sealed import SealError, seal_bytes

    if not args.seal:
        with atomic_output(args.output, mode=PLAINTEXT_MODE) as fh:
            fh.write(data)
        return _Written(args.output, len(data), sealed=False)
    assert keyring is not None
    name = _plaintext_name(args.output)
    try:
        sealed = seal_bytes(data, keyring, model=args.model, version=args.version, filename=name)
    except SealError as exc:
        raise _ExportFailed(f"cannot seal the artifact: {exc}") from None
    path = args.output.with_name(name + SEALED_SUFFIX)
    with atomic_output(path, mode=SEALED_MODE) as fh:
        fh.write(sealed)
    return _Written(path, len(sealed), sealed=True)


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1_000_000 else f"{nbytes / 1e3:.1f} kB"


# --- a plain safetensors checkpoint -> GGUF --------------------------------------------------


def _convert_safetensors(args: argparse.Namespace) -> int:
    if args.format != "gguf":
        raise _UsageError(
            f"a plain safetensors file converts only to gguf; --format {args.format} needs a "
            f"Forseti checkpoint (run_dir/{CHECKPOINTS_DIR}/N) to rebuild the policy from"
        )
    for option, value in (
        ("--run-name", args.run_name),
        ("--config-dir", args.config_dir),
        ("--parity-observations", args.parity_observations),
    ):
        if value is not None:
            raise _UsageError(f"{option} applies to trainer checkpoints, not safetensors files")
    from forseti.exporters.gguf_stream import DEFAULT_ARCH, ConvertError, convert_checkpoint

    keyring = _load_keyring(args.keyring) if args.seal else None
    try:
        result = convert_checkpoint(
            args.source,
            args.output,
            outtype=(args.gguf_type or "F16").lower(),
            arch=args.arch or DEFAULT_ARCH,
            keyring=keyring,
            model=args.model if args.seal else None,
            version=args.version if args.seal else None,
            progress=False if args.no_progress else None,
        )
    except ConvertError as exc:
        raise _ExportFailed(f"{args.source}: {exc}") from None
    types = ", ".join(f"{n} {t}" for t, n in sorted(result.types.items()))
    print(
        f"wrote {result.output}: gguf, {result.tensors} tensors ({types}), "
        f"{_size(result.bytes_read)} read, {_size(result.bytes_written)} written"
        + (f", sealed for {args.model} v{args.version}" if result.sealed else "")
        + f" in {result.seconds:.2f} s ({result.read_mb_per_s:.0f} MB/s)"
    )
    return 0


# --- a trainer checkpoint -> policy artifact --------------------------------------------------


def _open_checkpoint(args: argparse.Namespace, kind: str, keyring: Keyring) -> LoadedCheckpoint:
    from .checkpoint_format import CheckpointError, latest_valid_checkpoint, load_checkpoint

    try:
        if kind == "checkpoint":
            return load_checkpoint(args.source, keyring, run_name=args.run_name)
        run_dir = args.source.parent if args.source.name == CHECKPOINTS_DIR else args.source
        loaded = latest_valid_checkpoint(run_dir, keyring, run_name=args.run_name)
    except CheckpointError as exc:
        raise _ExportFailed(f"{exc}{_hint(str(exc))}") from None
    if loaded is None:
        raise _ExportFailed(f"{run_dir} has no checkpoint yet")
    return loaded


def _hint(message: str) -> str:
    """What to check when the checkpoint's seals do not open."""
    from forseti.core.sealing.sealed import AUTH_FAILED

    if f"{CHECKPOINT_MARKER}: {AUTH_FAILED}" in message:
        return f"; {SEAL_HINT}"
    if "unknown key id" in message:
        return f"; {KEY_HINT}"
    if AUTH_FAILED in message:
        # state.json opened, so run name and key are right: that other file is damaged.
        return (
            "; the checkpoint's state opened, so --run-name and --keyring are right: the "
            "file named was altered, truncated or replaced; export another checkpoint"
        )
    return ""


def _export_checkpoint(args: argparse.Namespace, kind: str) -> int:
    if not args.run_name:
        raise _UsageError(
            "--run-name is required for a checkpoint: its seals are bound to the run name, "
            "the training spec's <model.name>-<algorithm> (e.g. cartpole-ppo)"
        )
    if args.arch is not None:
        raise _UsageError(
            "--arch applies to safetensors files; a policy GGUF's architecture is forseti-policy"
        )
    if args.config_dir is not None and args.format == "safetensors":
        raise _UsageError("--config-dir: no backend serves safetensors; use onnx or gguf")
    from .spec import SpecError, spec_from_dict

    started = time.perf_counter()
    keyring = _load_keyring(args.keyring)
    loaded = _open_checkpoint(args, kind, keyring)
    info = loaded.info
    try:
        spec = spec_from_dict(info.spec)
    except SpecError as exc:
        raise _ExportFailed(
            f"checkpoint {info.path}: its training spec does not rebuild: {exc}"
        ) from None
    if spec.spec_hash != info.spec_hash:
        raise _ExportFailed(
            f"checkpoint {info.path}: the spec inside hashes to {spec.spec_hash}, the checkpoint "
            f"says {info.spec_hash}; it was written by another Forseti version"
        )
    result = _export_policy(args, spec, loaded)
    written = _write(args, result.artifact, keyring if args.seal else None)
    config_path = _write_config(args, spec, result.description, loaded) if args.config_dir else None
    seconds = time.perf_counter() - started
    print(
        f"wrote {written.path}: {args.format}, {_size(written.nbytes)}"
        + (f", sealed for {args.model} v{args.version}" if written.sealed else "")
        + f"; from checkpoint {info.number} of run {args.run_name} ({info.num_timesteps} "
        f"timesteps, {spec.algorithm.name} on {spec.env.id}); {result.check}; {seconds:.1f} s"
    )
    if config_path is not None:
        print(f"wrote {config_path}")
    return 0


@dataclasses.dataclass(frozen=True)
class _PolicyExport:
    artifact: bytes
    description: PolicyDescription
    check: str  # what was checked, for the summary line


def _export_policy(
    args: argparse.Namespace, spec: TrainingSpec, loaded: LoadedCheckpoint
) -> _PolicyExport:
    """Rebuild and restore the model, describe it, check parity, and make the artifact."""
    from forseti.exporters.checked_policy import export_checked_policy
    from forseti.exporters.errors import ExportError
    from forseti.exporters.gguf_check import checked_gguf

    from .algorithms import build_model, make_env, vec_normalize_of
    from .checkpoint_format import CheckpointError
    from .checkpoint_sb3 import restore_checkpoint

    # In-process envs: exporting steps no env, and worker processes would only cost start-up.
    export_spec = dataclasses.replace(
        spec, env=dataclasses.replace(spec.env, vectorization="dummy")
    )
    try:
        env = make_env(export_spec)
    except Exception as exc:  # gymnasium raises many kinds for an env it cannot make
        raise _ExportFailed(
            f"cannot make env {spec.env.id!r} of the checkpoint's spec: {exc}"
        ) from None
    try:
        model = build_model(export_spec, env)
        normalizer = vec_normalize_of(env)
        # The replay buffer matters only to train on; the policy is all an export needs.
        restore_checkpoint(model, dataclasses.replace(loaded, replay_buffer=None), normalizer)
        checked = export_checked_policy(
            model,
            normalizer,
            env_id=spec.env.id,
            env_kwargs=dict(spec.env.kwargs),
            n=args.parity_observations or spec.evaluation.parity_observations,
            seed=spec.algorithm.seed,
        )
        description, report, obs = checked.description, checked.parity, checked.samples
        check = f"parity: {report.n} observations, max abs error {report.max_abs_error:.3g}"
        if args.format == "onnx":
            return _PolicyExport(checked.onnx, description, check)
        if args.format == "safetensors":
            artifact = _safetensors_artifact(description, obs)
            return _PolicyExport(artifact, description, check + "; read back: identical")
        gguf_type = args.gguf_type or spec.model.gguf_type
        artifact, agreement = checked_gguf(description, obs, gguf_type)
        return _PolicyExport(artifact, description, f"{check}; gguf {gguf_type}: {agreement}")
    except (CheckpointError, ExportError) as exc:  # ParityError is an ExportError
        raise _ExportFailed(f"checkpoint {loaded.info.path}: {exc}") from None
    finally:
        env.close()


def _safetensors_artifact(description: PolicyDescription, obs: np.ndarray) -> bytes:
    """The safetensors bytes, read back and evaluated against the description."""
    from forseti.exporters.errors import ExportError
    from forseti.exporters.policy_description import evaluate
    from forseti.exporters.safetensors_export import (
        description_from_safetensors,
        export_safetensors,
    )

    artifact = export_safetensors(description)
    expected = evaluate(description, obs)
    got = evaluate(description_from_safetensors(artifact), obs)
    for name, value in expected.items():
        if not np.array_equal(got[name], value):
            raise ExportError(f"the safetensors file read back computes another '{name}'")
    return artifact


def _write_config(
    args: argparse.Namespace,
    spec: TrainingSpec,
    description: PolicyDescription,
    loaded: LoadedCheckpoint,
) -> Path:
    """DIR/config.pbtxt for the artifact, naming its file when it is not the backend's default."""
    from google.protobuf import text_format

    from forseti.core.repository.config import CONFIG_FILENAME, DEFAULT_FILENAMES
    from forseti.exporters.errors import ExportError
    from forseti.exporters.model_config import policy_config

    backend = "gguf" if args.format == "gguf" else "onnxruntime"
    try:
        config = policy_config(
            args.model or spec.model.name,
            description,
            max_batch_size=spec.model.max_batch_size,
            parameters={
                "env_id": spec.env.id,
                "algorithm": spec.algorithm.name,
                "training_run": spec.run_name,
                "spec_hash": spec.spec_hash,
                "checkpoint": str(loaded.info.number),
                "checkpoint_timesteps": str(loaded.info.num_timesteps),
            },
            backend=backend,  # type: ignore[arg-type]
        )
    except ExportError as exc:
        raise _ExportFailed(f"config: {exc}") from None
    filename = _plaintext_name(args.output)
    if filename != DEFAULT_FILENAMES[backend]:
        config.default_model_filename = filename
    args.config_dir.mkdir(parents=True, exist_ok=True)
    path = args.config_dir / CONFIG_FILENAME
    with atomic_output(path, mode=0o644) as fh:
        fh.write(text_format.MessageToString(config).encode("utf-8"))
    return path
