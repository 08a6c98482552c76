"""Convergence: PPO on CartPole-v1 from the example spec reaches a mean return of at least 475
over 20 evaluation episodes played through the server, within a CI-sized budget."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest

from forseti.core.sealing.keyring import Keyring
from forseti.trainer_sidecar.gate import play_episodes, server_actor
from forseti.trainer_sidecar.run import TrainingRun
from forseti.trainer_sidecar.spec import load_spec
from testkit.server_process import ServerProcess

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cartpole_ppo.toml"
TOTAL = 76_800  # 300 rollouts of 32 x 8; the example's full 102,400 is the demo's


@pytest.mark.slow
def test_ppo_cartpole_reaches_475_through_the_server(
    tmp_path: Path, keyring_path: Path, keyring: Keyring, start_server
) -> None:
    repository = tmp_path / "repo"
    repository.mkdir()
    server: ServerProcess = start_server(repository, "--model-control-mode", "explicit")
    text = EXAMPLE.read_text()
    for key, value in {
        "url": server.url,
        "keyring": str(keyring_path),
        "repository": str(repository),
        "directory": str(tmp_path / "run"),
        "total_timesteps": TOTAL,
    }.items():
        quoted = f'"{value}"' if isinstance(value, str) else str(value)
        text = re.sub(rf"^{key} = .*$", f"{key} = {quoted}", text, flags=re.MULTILINE)
    (tmp_path / "spec.toml").write_text(text)
    spec = load_spec(tmp_path / "spec.toml")

    started = time.perf_counter()
    result = TrainingRun(spec, keyring=keyring).run()
    seconds = time.perf_counter() - started
    assert [p.version for p in result.promotions] == [1]

    client = server.client()
    try:
        returns = play_episodes(
            server_actor(client, "cartpole"), "CartPole-v1", episodes=20, seed=123_456
        )
    finally:
        client.close()
    print(f"trained {TOTAL} steps in {seconds:.0f} s; mean return {np.mean(returns):.1f}")
    assert np.mean(returns) >= 475
