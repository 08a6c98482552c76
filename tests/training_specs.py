"""Small training specs for tests: real SB3 runs of a few thousand steps."""

from __future__ import annotations

from pathlib import Path

PPO_CARTPOLE = """
[model]
name = "{model}"
repository = "{repository}"
max_batch_size = 64

[env]
id = "CartPole-v1"
n_envs = 4

[algorithm]
name = "PPO"
seed = {seed}
total_timesteps = {total}

[algorithm.hyperparameters]
n_steps = 64
batch_size = 128
n_epochs = 10
learning_rate = 0.001
gae_lambda = 0.8
gamma = 0.98

[checkpoint]
directory = "{run_dir}"
interval_timesteps = {interval}

[evaluation]
episodes = {episodes}
seed = 10000
margin = {margin}

[server]
url = "{url}"
keyring = "{keyring}"
"""

SAC_PENDULUM = """
[model]
name = "{model}"
repository = "{repository}"

[env]
id = "Pendulum-v1"
n_envs = 1

[algorithm]
name = "SAC"
seed = {seed}
total_timesteps = {total}
net_arch = [64, 64]

[algorithm.hyperparameters]
learning_starts = 200
buffer_size = 5000
batch_size = 64

[checkpoint]
directory = "{run_dir}"
interval_timesteps = {interval}

[evaluation]
episodes = {episodes}
seed = 10000
margin = {margin}

[server]
url = "{url}"
keyring = "{keyring}"
"""


def write_spec(
    path: Path,
    template: str,
    *,
    repository: Path,
    run_dir: Path,
    url: str,
    keyring: Path,
    model: str = "cartpole",
    total: int = 4096,
    interval: int = 2048,
    episodes: int = 5,
    margin: float = 0.0,
    seed: int = 0,
    extra: str = "",
) -> Path:
    """Write a spec file from ``template`` and return its path."""
    path.write_text(
        template.format(
            model=model,
            repository=repository,
            run_dir=run_dir,
            url=url,
            keyring=keyring,
            total=total,
            interval=interval,
            episodes=episodes,
            margin=margin,
            seed=seed,
        )
        + extra
    )
    return path
