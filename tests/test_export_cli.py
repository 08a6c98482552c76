"""`forseti export` (trainer_sidecar/export_cli.py) run as a real subprocess on real sealed
checkpoints of a real SB3 model, and on a small safetensors file through the streaming GGUF
converter."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import safetensors.numpy as st_numpy
from gguf import GGUFReader
from gguf.quants import dequantize
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import VecNormalize

from forseti.core.repository.config import model_spec, parse_config_text
from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.sealed import (
    SEALED_SUFFIX,
    SealError,
    open_sealed,
    open_sealed_stream,
)
from forseti.exporters.policy_description import evaluate
from forseti.exporters.safetensors_export import description_from_safetensors
from forseti.trainer_sidecar.algorithms import build_model, make_env, vec_normalize_of
from forseti.trainer_sidecar.checkpoint_sb3 import save_checkpoint
from forseti.trainer_sidecar.spec import load_spec
from testkit.server_process import run_forseti

RUN_NAME = "cartpole-ppo"
# A small PPO run with observation normalisation, so the statistics must travel into the export.
SPEC = """
[model]
name = "cartpole"
repository = "repo"
max_batch_size = 32

[env]
id = "CartPole-v1"
n_envs = 2
normalize_observations = true

[algorithm]
name = "PPO"
total_timesteps = 1024
net_arch = [32, 32]

[algorithm.hyperparameters]
n_steps = 128
batch_size = 128
n_epochs = 4
learning_rate = 0.003
"""
# CartPole's velocities are unbounded; these cover the states an episode visits and beyond.
OBS = np.random.default_rng(3).uniform(-2.5, 2.5, size=(500, 4)).astype(np.float32)


@dataclass(frozen=True)
class Run:
    run_dir: Path
    keyring_path: Path
    actions: dict[int, np.ndarray]  # checkpoint number -> SB3 predict on OBS at that point


def sb3_actions(model: BaseAlgorithm, normalizer: VecNormalize | None) -> np.ndarray:
    obs = OBS if normalizer is None else normalizer.normalize_obs(OBS)
    actions, _ = model.predict(obs, deterministic=True)
    return np.asarray(actions).reshape(-1)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, keyring: Keyring, keyring_path: Path) -> Run:
    """A run dir with two checkpoints (512 and 1024 timesteps) saved by the trainer's code."""
    base = tmp_path_factory.mktemp("export_run")
    spec_path = base / "spec.toml"
    spec_path.write_text(SPEC)
    spec = load_spec(spec_path)
    assert spec.run_name == RUN_NAME
    env = make_env(spec)
    model = build_model(spec, env)
    normalizer = vec_normalize_of(env)
    run_dir = base / "runs" / "cartpole"
    actions: dict[int, np.ndarray] = {}
    for _ in range(2):
        model.learn(512, reset_num_timesteps=False)
        info = save_checkpoint(
            model,
            run_dir,
            keyring,
            run_name=spec.run_name,
            spec=spec.to_dict(),
            spec_hash=spec.spec_hash,
            counters={},
            vec_normalize=normalizer,
        )
        actions[info.number] = sb3_actions(model, normalizer)
    env.close()
    return Run(run_dir, keyring_path, actions)


def command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "forseti", "export", "--no-progress", *map(str, args)]


def export(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_forseti("export", "--no-progress", *map(str, args), timeout=120)


@dataclass(frozen=True)
class Exported:
    result: subprocess.CompletedProcess[str]
    output: Path


@pytest.fixture(scope="module")
def exports(run: Run, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    """Every export that opens a checkpoint, run side by side: each subprocess spends most of
    its time importing torch, so running them at once keeps this file's time down."""
    out = tmp_path_factory.mktemp("exports")
    common = ("--keyring", run.keyring_path, "--run-name", RUN_NAME)
    checkpoints = run.run_dir / "checkpoints"
    tampered = out / "tampered_run" / "checkpoints" / "2"
    shutil.copytree(checkpoints / "2", tampered)
    sealed = tampered / ("policy.safetensors" + SEALED_SUFFIX)
    data = bytearray(sealed.read_bytes())
    data[len(data) // 2] ^= 0x01
    sealed.write_bytes(bytes(data))
    jobs: dict[str, tuple[Path, tuple[str | Path, ...]]] = {
        "folder_onnx": (out / "folder.onnx", (checkpoints / "1", "--format", "onnx")),
        "run_sealed_onnx": (
            out / "3" / "model.onnx",
            (
                run.run_dir,
                "--format",
                "onnx",
                "--seal",
                "--model",
                "pole",
                "--version",
                "3",
                "--config-dir",
                out,
            ),
        ),
        "safetensors": (out / "policy.safetensors", (checkpoints / "2", "--format", "safetensors")),
        "gguf": (out / "model.gguf", (run.run_dir, "--format", "gguf", "--gguf-type", "f32")),
        # Failures: a run name the seals were not bound to, and a checkpoint with a flipped bit.
        "wrong_run_name": (
            out / "wrong" / "policy.onnx",
            (run.run_dir, "--format", "onnx", "--run-name", "cartpole-dqn"),
        ),
        "tampered": (out / "tampered" / "policy.onnx", (tampered, "--format", "onnx")),
    }
    for output, _ in jobs.values():
        output.parent.mkdir(exist_ok=True)
    started = {
        name: subprocess.Popen(
            command(*common, *args, "-o", output),  # a job's own --run-name wins
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        for name, (output, args) in jobs.items()
    }
    done: dict[str, Exported] = {}
    try:
        for name, process in started.items():
            stdout, stderr = process.communicate(timeout=180)
            result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
            done[name] = Exported(result, jobs[name][0])
    finally:
        for process in started.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return done


def onnx_actions(path: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (action,) = session.run(["action"], {"obs": OBS})
    return np.asarray(action).reshape(-1)


def test_onnx_from_a_checkpoint_folder_acts_like_sb3_predict_at_that_checkpoint(
    run: Run, exports: dict[str, Exported]
) -> None:
    result, out = exports["folder_onnx"].result, exports["folder_onnx"].output
    assert result.returncode == 0, result.stderr
    assert "from checkpoint 1 of run cartpole-ppo (512 timesteps" in result.stdout
    assert "parity: 1000 observations" in result.stdout
    np.testing.assert_array_equal(onnx_actions(out), run.actions[1])


def test_onnx_from_a_run_dir_uses_its_newest_checkpoint(
    run: Run, exports: dict[str, Exported], keyring: Keyring, tmp_path: Path
) -> None:
    # The two checkpoints act differently, so equality below picks out checkpoint 2.
    assert (run.actions[1] != run.actions[2]).any()
    result, out = exports["run_sealed_onnx"].result, exports["run_sealed_onnx"].output
    assert result.returncode == 0, result.stderr
    assert "from checkpoint 2 of run cartpole-ppo (1024 timesteps" in result.stdout
    blob = out.with_name("model.onnx" + SEALED_SUFFIX).read_bytes()
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(open_sealed(blob, keyring, model="pole", version=3, filename="model.onnx"))
    np.testing.assert_array_equal(onnx_actions(plain), run.actions[2])


def test_sealed_export_is_bound_to_its_model_and_version_with_no_plaintext_beside_it(
    exports: dict[str, Exported], keyring: Keyring
) -> None:
    out = exports["run_sealed_onnx"].output
    assert exports["run_sealed_onnx"].result.returncode == 0
    assert not out.exists()
    blob = out.with_name("model.onnx" + SEALED_SUFFIX).read_bytes()
    with pytest.raises(SealError):
        open_sealed(blob, keyring, model="pole", version=4, filename="model.onnx")


def test_config_dir_gets_a_config_the_server_accepts_naming_the_run(
    exports: dict[str, Exported],
) -> None:
    assert exports["run_sealed_onnx"].result.returncode == 0
    config_dir = exports["run_sealed_onnx"].output.parent.parent
    config = parse_config_text((config_dir / "config.pbtxt").read_text(), "pole")
    model_spec(config, "pole")  # the server's own check of a config; raises if refused
    assert config.name == "pole"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 32
    assert config.parameters["training_run"].string_value == RUN_NAME
    assert config.parameters["env_id"].string_value == "CartPole-v1"
    assert config.parameters["checkpoint"].string_value == "2"


def test_safetensors_export_round_trips_through_description_from_safetensors(
    run: Run, exports: dict[str, Exported]
) -> None:
    result, out = exports["safetensors"].result, exports["safetensors"].output
    assert result.returncode == 0, result.stderr
    description = description_from_safetensors(out.read_bytes())
    assert description.algorithm == "PPO"
    assert description.obs_normalization is not None  # VecNormalize statistics travelled
    actions = evaluate(description, OBS)["action"].reshape(-1)
    np.testing.assert_array_equal(actions, run.actions[2])


def test_gguf_policy_from_a_checkpoint_acts_like_sb3_in_the_servers_gguf_reader(
    run: Run, exports: dict[str, Exported]
) -> None:
    from forseti.core.gguf.reader import load_policy

    result, out = exports["gguf"].result, exports["gguf"].output
    assert result.returncode == 0, result.stderr
    assert "gguf F32: 1000 of 1000 actions equal" in result.stdout
    (actions,) = load_policy(out.read_bytes()).forward(OBS, ["action"])
    np.testing.assert_array_equal(np.asarray(actions).reshape(-1), run.actions[2])


def test_wrong_run_name_fails_with_a_hint_to_check_run_name_and_keyring(
    exports: dict[str, Exported],
) -> None:
    result, out = exports["wrong_run_name"].result, exports["wrong_run_name"].output
    assert result.returncode == 1
    assert "check --run-name and --keyring" in result.stderr
    assert not out.exists()


def test_tampered_checkpoint_fails_and_writes_nothing(exports: dict[str, Exported]) -> None:
    result, out = exports["tampered"].result, exports["tampered"].output
    assert result.returncode == 1
    assert "policy.safetensors.sealed" in result.stderr
    assert "--run-name and --keyring are right" in result.stderr
    assert not out.exists()
    assert not any(p.name.endswith(".tmp") for p in out.parent.iterdir())


def test_safetensors_file_converts_to_gguf_with_every_tensor_read_back(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    tensors = {
        "blk.0.attn.weight": rng.standard_normal((64, 128)).astype(np.float32),
        "blk.0.ffn.weight": rng.standard_normal((96, 64)).astype(np.float16),
        "blk.0.norm": rng.standard_normal(128).astype(np.float32),
    }
    source = tmp_path / "weights.safetensors"
    st_numpy.save_file(tensors, str(source))
    out = tmp_path / "weights.gguf"
    result = export(source, "--format", "gguf", "--gguf-type", "F16", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "3 tensors" in result.stdout and "MB/s" in result.stdout
    read = {t.name: t for t in GGUFReader(out).tensors}
    assert set(read) == set(tensors)
    for name, expected in tensors.items():
        t = read[name]
        got = dequantize(np.asarray(t.data), t.tensor_type).reshape(expected.shape)
        # F16 output: exact for F16 sources and for 1-D tensors (kept F32), else F16 rounding.
        np.testing.assert_allclose(got, expected.astype(np.float32), rtol=1e-3, atol=1e-3)


def test_arch_names_the_converted_gguf_architecture(tmp_path: Path) -> None:
    source = tmp_path / "weights.safetensors"
    st_numpy.save_file({"w": np.ones((32, 32), np.float32)}, str(source))
    out = tmp_path / "weights.gguf"
    result = export(source, "--format", "gguf", "--arch", "llama", "-o", out)
    assert result.returncode == 0, result.stderr
    field = GGUFReader(out).fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode("utf-8") == "llama"


def test_sealed_gguf_conversion_opens_for_its_model_and_version(
    tmp_path: Path, keyring: Keyring, keyring_path: Path
) -> None:
    weights = np.random.default_rng(5).standard_normal((32, 64)).astype(np.float32)
    source = tmp_path / "weights.safetensors"
    st_numpy.save_file({"w": weights}, str(source))
    plain = tmp_path / "plain.gguf"
    assert export(source, "--format", "gguf", "-o", plain).returncode == 0
    result = export(source, "--format", "gguf", "--seal", "--keyring", keyring_path,
                    "--model", "llm", "--version", "2", "-o", tmp_path / "model.gguf")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "model.gguf").exists()
    with (tmp_path / ("model.gguf" + SEALED_SUFFIX)).open("rb") as fh:
        opened = b"".join(
            open_sealed_stream(fh, keyring, model="llm", version=2, filename="model.gguf")
        )
    assert opened == plain.read_bytes()


def test_converting_a_safetensors_file_never_imports_torch(tmp_path: Path) -> None:
    source = tmp_path / "weights.safetensors"
    st_numpy.save_file({"w": np.ones((32, 32), np.float32)}, str(source))
    code = (
        "import sys; from forseti.trainer_sidecar.export_cli import main_export;"
        f"rc = main_export([{str(source)!r}, '--format', 'gguf', '-o', "
        f"{str(tmp_path / 'w.gguf')!r}, '--no-progress']);"
        "bad = [m for m in ('torch', 'stable_baselines3', 'gymnasium') if m in sys.modules];"
        "print(bad); sys.exit(rc or (3 if bad else 0))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_safetensors_file_to_onnx_is_a_usage_error(tmp_path: Path) -> None:
    source = tmp_path / "weights.safetensors"
    st_numpy.save_file({"w": np.zeros((4, 4), np.float32)}, str(source))
    result = export(source, "--format", "onnx", "-o", tmp_path / "out.onnx")
    assert result.returncode == 2
    assert "converts only to gguf" in result.stderr


def test_arch_with_a_checkpoint_is_a_usage_error(run: Run, tmp_path: Path) -> None:
    result = export(run.run_dir, "--keyring", run.keyring_path, "--run-name", RUN_NAME,
                    "--format", "gguf", "--arch", "llama", "-o", tmp_path / "out.gguf")  # fmt: skip
    assert result.returncode == 2
    assert "--arch applies to safetensors files" in result.stderr


def test_checkpoint_without_run_name_is_a_usage_error(run: Run, tmp_path: Path) -> None:
    result = export(run.run_dir, "--keyring", run.keyring_path, "--format", "onnx",
                    "-o", tmp_path / "out.onnx")  # fmt: skip
    assert result.returncode == 2
    assert "--run-name is required" in result.stderr
