"""The `forseti` command: help, keys, seal, and start-up errors."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from forseti.core.sealing.keyring import Keyring
from testkit.model_builders import POLICY_CONFIG, policy_onnx, write_config
from testkit.server_process import run_forseti


def test_help_lists_every_command() -> None:
    result = run_forseti("--help")
    assert result.returncode == 0
    for command in ("serve", "keys", "seal"):
        assert f"  {command} " in result.stdout


def test_serve_help_names_the_triton_options() -> None:
    result = run_forseti("serve", "--help")
    assert result.returncode == 0
    for option in (
        "--model-repository",
        "--keyring",
        "--grpc-port",
        "--metrics-port",
        "--model-control-mode",
        "--repository-poll-secs",
        "--load-model",
        "--allow-plaintext",
    ):
        assert option in result.stdout


def test_unknown_command_exits_2_with_usage() -> None:
    result = run_forseti("frobnicate")
    assert result.returncode == 2
    assert "unknown command 'frobnicate'" in result.stderr


def test_keys_new_writes_owner_only_keyring(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    result = run_forseti("keys", "new", str(path))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(Keyring.load(path).key_ids) == 1
    assert "secret" not in result.stdout


def test_keys_new_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    assert run_forseti("keys", "new", str(path)).returncode == 0
    before = path.read_bytes()
    result = run_forseti("keys", "new", str(path))
    assert result.returncode == 1
    assert "--force" in result.stderr
    assert path.read_bytes() == before


def test_seal_turns_a_plaintext_triton_repository_into_a_served_sealed_one(
    tmp_path: Path, start_server
) -> None:
    repo = tmp_path / "repo"
    model_dir = write_config(repo, "policy", POLICY_CONFIG)
    (model_dir / "1").mkdir()
    (model_dir / "1" / "model.onnx").write_bytes(policy_onnx(3))
    keyring = tmp_path / "keyring.json"
    assert run_forseti("keys", "new", str(keyring)).returncode == 0

    result = run_forseti("seal", "--keyring", str(keyring), str(repo))
    assert result.returncode == 0, result.stderr
    assert not (model_dir / "1" / "model.onnx").exists()
    assert (model_dir / "1" / "model.onnx.sealed").is_file()

    server = start_server(repo, keyring=keyring)
    client = grpcclient.InferenceServerClient(server.url)
    obs = grpcclient.InferInput("obs", [1, 8], "FP32")
    obs.set_data_from_numpy(np.zeros((1, 8), np.float32))
    assert client.infer("policy", [obs]).as_numpy("action")[0, 0] == 3


def test_seal_with_missing_keyring_says_how_to_make_one(tmp_path: Path) -> None:
    result = run_forseti("seal", "--keyring", str(tmp_path / "nope.json"), str(tmp_path))
    assert result.returncode == 2
    assert "forseti keys new" in result.stderr


def test_serve_with_missing_repository_exits_2(tmp_path: Path) -> None:
    result = run_forseti("serve", "--model-repository", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert "is not a folder" in result.stderr


def test_serve_with_corrupt_keyring_exits_2_without_echoing_it(tmp_path: Path) -> None:
    keyring = tmp_path / "keyring.json"
    keyring.write_text(json.dumps({"format": "forseti-keyring/1", "keys": "SECRETSTUFF"}))
    keyring.chmod(0o600)
    result = run_forseti("serve", "--model-repository", str(tmp_path), "--keyring", str(keyring))
    assert result.returncode == 2
    assert "SECRETSTUFF" not in result.stderr + result.stdout


def test_server_modules_do_not_import_torch() -> None:
    code = (
        "import sys, forseti.cli, forseti.server.app, forseti.server.cli;"
        "bad = [m for m in ('torch', 'stable_baselines3', 'gymnasium') if m in sys.modules];"
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
