"""`forseti train` as a process: bad specs, kill -9 then --resume, SIGTERM in sidecar mode."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from forseti.core.repository.layout import version_dirs
from testkit.server_process import ServerProcess, run_forseti

from .training_specs import PPO_CARTPOLE, write_spec


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, keyring_path: Path) -> Iterator[ServerProcess]:
    repository = tmp_path_factory.mktemp("train-cli") / "repo"
    repository.mkdir()
    process = ServerProcess(repository, keyring_path, ["--model-control-mode", "explicit"])
    process.start()
    try:
        yield process
    finally:
        process.stop()


def spec_file(tmp_path: Path, server: ServerProcess, keyring_path: Path, **kwargs: object) -> Path:
    return write_spec(
        tmp_path / "spec.toml",
        PPO_CARTPOLE,
        repository=server.repository,
        run_dir=tmp_path / "run",
        url=server.url,
        keyring=keyring_path,
        **kwargs,  # type: ignore[arg-type]
    )


def train(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_forseti("train", "--no-progress", *args, timeout=timeout)


def start_training(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "forseti", "train", "--no-progress", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def wait_for_checkpoints(run_dir: Path, count: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while len(version_dirs(run_dir / "checkpoints")) < count:
        assert proc.poll() is None, "training ended before it was interrupted"
        assert time.monotonic() < deadline, "no checkpoints appeared"
        time.sleep(0.05)


def test_bad_spec_exits_1_naming_the_field(tmp_path: Path, keyring_path: Path) -> None:
    path = tmp_path / "spec.toml"
    path.write_text('[model]\nname = "m"\nrepository = "r"\n[env]\nid = "CartPole-v1"\n')
    done = train(str(path))
    assert done.returncode == 1
    assert "algorithm: table is required" in done.stderr


def test_missing_keyring_exits_1(tmp_path: Path, server: ServerProcess) -> None:
    path = spec_file(tmp_path, server, tmp_path / "no-such-keyring.json", model="nokeys")
    done = train(str(path))
    assert done.returncode == 1
    assert "server.keyring" in done.stderr


def test_kill_9_then_resume_ends_at_the_exact_total(
    tmp_path: Path, server: ServerProcess, keyring_path: Path
) -> None:
    path = spec_file(tmp_path, server, keyring_path, model="resumed", total=8192, interval=1024)
    proc = start_training(str(path), log=tmp_path / "first.log")
    try:
        wait_for_checkpoints(tmp_path / "run", 2, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    done = train(str(path), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed" in done.stderr
    assert "run resumed-ppo: 8192 timesteps" in done.stdout
    manifest = json.loads((server.repository / "resumed" / "1" / "manifest.json").read_text())
    assert manifest["timesteps"] == 8192


def test_second_run_without_resume_is_refused(
    tmp_path: Path, server: ServerProcess, keyring_path: Path
) -> None:
    path = spec_file(tmp_path, server, keyring_path, model="twice", total=512, interval=512)
    assert train(str(path)).returncode == 0
    again = train(str(path))
    assert again.returncode == 1
    assert "--resume" in again.stderr


def test_sigterm_in_sidecar_mode_checkpoints_and_exits_cleanly(
    tmp_path: Path, server: ServerProcess, keyring_path: Path
) -> None:
    path = spec_file(
        tmp_path,
        server,
        keyring_path,
        model="sidecar",
        total=1_024_000,
        interval=1024,
        extra="\n[sidecar]\npromote_every_timesteps = 1024\n",
    )
    log = tmp_path / "sidecar.log"
    proc = start_training(str(path), "--continuous", log=log)
    try:
        deadline = time.monotonic() + 120
        while not version_dirs(server.repository / "sidecar"):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "nothing was promoted"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    stopped_at = re.search(r"run sidecar-ppo: (\d+) timesteps.*\(stopped\)", output)
    assert stopped_at, output[-3000:]
    # The state the run stopped in is checkpointed (once: a stop at a boundary adds none).
    checkpointed = re.findall(r"checkpoint written number=\d+ timesteps=(\d+)", output)
    assert checkpointed[-1] == stopped_at.group(1)
    assert len(checkpointed) == len(set(checkpointed))
