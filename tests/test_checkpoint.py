"""Sealed safetensors checkpoints and resume (trainer_sidecar/checkpoint_format.py and
checkpoint_sb3.py), on real SB3 runs."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from stable_baselines3 import A2C, DQN, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

from forseti.core.repository.layout import version_dirs
from forseti.core.sealing.keyring import Keyring
from forseti.trainer_sidecar.checkpoint_format import (
    CHECKPOINTS_DIR,
    STALE_TEMP_SECONDS,
    CheckpointError,
    CheckpointInfo,
    LoadedCheckpoint,
    latest_valid_checkpoint,
    load_checkpoint,
)
from forseti.trainer_sidecar.checkpoint_sb3 import (
    check_compatible,
    restore_checkpoint,
    resume_latest,
    save_checkpoint,
)

RUN = "cartpole-run"
SPEC = {"model": "cartpole_policy", "env": {"id": "CartPole-v1"}, "algorithm": {"name": "PPO"}}
SPEC_HASH = "0123456789abcdef"
# Skipped checkpoints are logged where they are opened.
LOGGER = "forseti.trainer_sidecar.checkpoint_format"


def make_ppo(seed: int = 0, net_arch: list[int] | None = None) -> PPO:
    return PPO(
        "MlpPolicy",
        "CartPole-v1",
        n_steps=64,
        batch_size=32,
        n_epochs=2,
        seed=seed,
        device="cpu",
        policy_kwargs={"net_arch": net_arch or [16]},
    )


def make_sac(seed: int = 0) -> SAC:
    return SAC(
        "MlpPolicy",
        "Pendulum-v1",
        buffer_size=1_000,
        learning_starts=48,
        batch_size=16,
        seed=seed,
        device="cpu",
        policy_kwargs={"net_arch": [16]},
    )


def make_dqn(seed: int = 0) -> DQN:
    return DQN(
        "MlpPolicy",
        "CartPole-v1",
        buffer_size=1_000,
        learning_starts=48,
        train_freq=4,
        target_update_interval=50,
        exploration_fraction=0.5,
        seed=seed,
        device="cpu",
        policy_kwargs={"net_arch": [16]},
    )


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """These networks are tiny: on a shared 2-core machine, intra-op threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_ppo() -> PPO:
    """Two PPO updates, so the Adam state has moments and step counters."""
    return make_ppo().learn(128)


def save(model: BaseAlgorithm, run_dir: Path, keyring: Keyring, **kwargs: Any) -> CheckpointInfo:
    kwargs.setdefault("spec_hash", SPEC_HASH)
    kwargs.setdefault("counters", {"episodes": 7, "wall_seconds": 1.5})
    return save_checkpoint(model, run_dir, keyring, run_name=RUN, spec=SPEC, **kwargs)


def latest(
    run_dir: Path,
    keyring: Keyring,
    model: BaseAlgorithm | None = None,
    vec_normalize: VecNormalize | None = None,
    **kwargs: Any,
) -> LoadedCheckpoint | None:
    """The newest usable checkpoint; given ``model``, the newest that also fits it."""
    kwargs.setdefault("spec_hash", SPEC_HASH)
    if model is not None:
        kwargs["check"] = lambda loaded: check_compatible(model, loaded, vec_normalize)
    return latest_valid_checkpoint(run_dir, keyring, run_name=RUN, **kwargs)


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Deep equality of state dicts: tensors bit for bit, containers by type and content."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_torch_state(a: BaseAlgorithm, b: BaseAlgorithm) -> None:
    """Module and optimizer state dicts (Adam moments and step counters included)."""
    assert_same(a.get_parameters(), b.get_parameters())


def params_equal(a: BaseAlgorithm, b: BaseAlgorithm) -> bool:
    pa, pb = a.policy.state_dict(), b.policy.state_dict()
    return all(torch.equal(pa[k], pb[k]) for k in pa)


def skipped_reasons(caplog: pytest.LogCaptureFixture) -> dict[str, str]:
    return {
        Path(r.checkpoint).name: r.reason
        for r in caplog.records
        if r.name == LOGGER and r.getMessage() == "checkpoint skipped"
    }


def checkpoint_dir(run_dir: Path, number: int) -> Path:
    return run_dir / CHECKPOINTS_DIR / str(number)


# --- round trips --------------------------------------------------------------------------------


def test_ppo_round_trip_restores_parameters_optimizer_and_counters(
    tmp_path: Path, keyring: Keyring, trained_ppo: PPO
) -> None:
    info = save(trained_ppo, tmp_path, keyring)
    fresh = make_ppo(seed=1)
    assert not params_equal(trained_ppo, fresh)

    loaded = latest(tmp_path, keyring, model=fresh)
    assert loaded is not None and loaded.info.number == info.number == 1
    restore_checkpoint(fresh, loaded)

    assert_same_torch_state(trained_ppo, fresh)
    assert fresh.num_timesteps == trained_ppo.num_timesteps == 128
    assert fresh._n_updates == trained_ppo._n_updates > 0
    assert fresh._total_timesteps == trained_ppo._total_timesteps
    assert fresh._current_progress_remaining == trained_ppo._current_progress_remaining
    assert loaded.info.counters == {"episodes": 7, "wall_seconds": 1.5}
    assert loaded.info.spec == SPEC and loaded.info.spec_hash == SPEC_HASH
    assert loaded.info.algorithm == "PPO"


def test_ppo_training_continues_after_restore(
    tmp_path: Path, keyring: Keyring, trained_ppo: PPO
) -> None:
    save(trained_ppo, tmp_path, keyring)
    resumed = make_ppo(seed=1)
    info = resume_latest(resumed, tmp_path, keyring, run_name=RUN, spec_hash=SPEC_HASH)
    assert info is not None
    updates = resumed._n_updates

    resumed.learn(192 - resumed.num_timesteps, reset_num_timesteps=False)

    assert resumed.num_timesteps == 192
    assert resumed._n_updates == updates + 2
    assert resumed._total_timesteps == 192


def test_sac_round_trip_restores_replay_buffer_and_entropy_coefficient(
    tmp_path: Path, keyring: Keyring
) -> None:
    model = make_sac().learn(96)
    save(model, tmp_path, keyring)
    fresh = make_sac(seed=1)
    loaded = latest(tmp_path, keyring, model=fresh)
    assert loaded is not None
    restore_checkpoint(fresh, loaded)

    assert_same_torch_state(model, fresh)
    assert torch.equal(fresh.log_ent_coef, model.log_ent_coef)
    # The optimizer still holds the restored tensor, not a copy of it.
    assert fresh.ent_coef_optimizer.param_groups[0]["params"][0] is fresh.log_ent_coef
    old, new = model.replay_buffer, fresh.replay_buffer
    assert (new.pos, new.full) == (old.pos, old.full) == (96, False)
    for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        assert np.array_equal(getattr(new, name), getattr(old, name)), name
    assert fresh.num_timesteps == 96 and fresh._n_updates == model._n_updates > 0

    fresh.learn(32, reset_num_timesteps=False)
    assert fresh.num_timesteps == 128 and fresh.replay_buffer.pos == 128


def test_dqn_round_trip_restores_exploration_and_target_update_counters(
    tmp_path: Path, keyring: Keyring
) -> None:
    model = make_dqn().learn(120)
    save(model, tmp_path, keyring)
    fresh = make_dqn(seed=1)
    loaded = latest(tmp_path, keyring, model=fresh)
    assert loaded is not None
    restore_checkpoint(fresh, loaded)

    assert_same_torch_state(model, fresh)
    assert fresh.exploration_rate == model.exploration_rate < 1.0
    assert fresh._n_calls == model._n_calls == 120
    assert fresh.replay_buffer.pos == model.replay_buffer.pos == 120
    fresh.learn(40, reset_num_timesteps=False)
    assert fresh.num_timesteps == 160


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: A2C(
            "MlpPolicy", "CartPole-v1", n_steps=16, seed=seed, policy_kwargs={"net_arch": [16]}
        ),
        lambda seed: TD3(
            "MlpPolicy",
            "Pendulum-v1",
            buffer_size=500,
            learning_starts=32,
            batch_size=16,
            seed=seed,
            policy_kwargs={"net_arch": [16]},
        ),
    ],
    ids=["A2C", "TD3"],
)
def test_other_algorithms_round_trip_and_continue(
    tmp_path: Path, keyring: Keyring, make: Callable[[int], BaseAlgorithm]
) -> None:
    model = make(0).learn(64)
    save(model, tmp_path, keyring)
    fresh = make(1)
    info = resume_latest(fresh, tmp_path, keyring, run_name=RUN, spec_hash=SPEC_HASH)

    assert info is not None and info.algorithm == type(model).__name__
    assert_same_torch_state(model, fresh)
    assert fresh._n_updates == model._n_updates > 0
    fresh.learn(32, reset_num_timesteps=False)
    assert fresh.num_timesteps == 96


def test_vecnormalize_statistics_round_trip(tmp_path: Path, keyring: Keyring) -> None:
    env = VecNormalize(make_vec_env("CartPole-v1", n_envs=2, seed=0))
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=32, n_epochs=1, device="cpu")
    model.learn(64)
    save(model, tmp_path, keyring, vec_normalize=env)

    fresh_env = VecNormalize(make_vec_env("CartPole-v1", n_envs=2, seed=1))
    fresh = PPO("MlpPolicy", fresh_env, n_steps=32, batch_size=32, n_epochs=1, device="cpu")
    loaded = latest(tmp_path, keyring, model=fresh, vec_normalize=fresh_env)
    assert loaded is not None
    restore_checkpoint(fresh, loaded, fresh_env)

    for rms, restored in ((env.obs_rms, fresh_env.obs_rms), (env.ret_rms, fresh_env.ret_rms)):
        assert np.array_equal(restored.mean, rms.mean) and np.array_equal(restored.var, rms.var)
        assert restored.count == rms.count > 1
    assert loaded.state["vec_normalize"]["clip_obs"] == env.clip_obs


def test_checkpoint_with_vecnormalize_refuses_a_model_without_one(
    tmp_path: Path, keyring: Keyring
) -> None:
    env = VecNormalize(make_vec_env("CartPole-v1", n_envs=1, seed=0))
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=32, device="cpu")
    save(model, tmp_path, keyring, vec_normalize=env)
    loaded = latest(tmp_path, keyring)
    assert loaded is not None
    with pytest.raises(CheckpointError, match="VecNormalize"):
        restore_checkpoint(PPO("MlpPolicy", "CartPole-v1", device="cpu"), loaded)


# --- never plaintext on disk -------------------------------------------------------------------


def test_no_plaintext_file_is_ever_written(
    tmp_path: Path, keyring: Keyring, trained_ppo: PPO
) -> None:
    env = VecNormalize(make_vec_env("Pendulum-v1", n_envs=1, seed=0))
    sac = SAC(
        "MlpPolicy",
        env,
        buffer_size=500,
        learning_starts=10,
        batch_size=16,
        device="cpu",
        policy_kwargs={"net_arch": [16]},
    ).learn(20)
    save(trained_ppo, tmp_path / "ppo", keyring)
    save(sac, tmp_path / "sac", keyring, vec_normalize=env)

    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert "replay_buffer.safetensors.sealed" in names
    assert "vecnormalize.safetensors.sealed" in names
    assert [p for p in files if not p.name.endswith(".sealed")] == []
    for path in files:
        data = path.read_bytes()
        # Tensor names and JSON keys would show if any plaintext leaked.
        for marker in (b"mlp_extractor", b"latent_pi", b"observations", b"spec_hash"):
            assert marker not in data, (path, marker)


# --- damaged checkpoints are reported and skipped ------------------------------------------------


def two_checkpoints(run_dir: Path, keyring: Keyring, model: PPO) -> None:
    save(model, run_dir, keyring, counters={"n": 1})
    save(model, run_dir, keyring, counters={"n": 2})


def test_tampered_newest_checkpoint_falls_back_to_the_previous(
    tmp_path: Path, keyring: Keyring, trained_ppo: PPO, caplog: pytest.LogCaptureFixture
) -> None:
    two_checkpoints(tmp_path, keyring, trained_ppo)
    target = checkpoint_dir(tmp_path, 2) / "policy.safetensors.sealed"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = latest(tmp_path, keyring)

    assert loaded is not None and loaded.info.number == 1 and loaded.info.counters == {"n": 1}
    reasons = skipped_reasons(caplog)
    assert set(reasons) == {"2"}
    assert "policy.safetensors.sealed" in reasons["2"] and "authentication failed" in reasons["2"]


def test_truncated_newest_checkpoint_falls_back_to_the_previous(
    tmp_path: Path, keyring: Keyring, trained_ppo: PPO, caplog: pytest.LogCaptureFixture
) -> None:
    two_checkpoints(tmp_path, keyring, trained_ppo)
    target = checkpoint_dir(tmp_path, 2) / "state.json.sealed"
    target.write_bytes(target.read_bytes()[:-40])

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = latest(tmp_path, keyring)

    assert loaded is not None and loaded.info.number == 1
    assert "state.json.sealed" in skipped_reasons(caplog)["2"]


def test_newest_checkpoint_sealed_with_another_key_falls_back_to_the_previous(
    tmp_path: Path, keyring: Keyring, trained_ppo: PPO, caplog: pytest.LogCaptureFixture
) -> None:
    save(trained_ppo, tmp_path, keyring)
    save(trained_ppo, tmp_path, Keyring.generate())

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = latest(tmp_path, keyring)

    assert loaded is not None and loaded.info.number == 1
    assert "unknown key id" in skipped_reasons(caplog)["2"]


def test_newest_checkpoint_missing_a_file_falls_back_to_the_previous(
    tmp_path: Path, keyring: Keyring, trained_ppo: PPO, caplog: pytest.LogCaptureFixture
) -> None:
    two_checkpoints(tmp_path, keyring, trained_ppo)
    (checkpoint_dir(tmp_path, 2) / "optimizer.safetensors.sealed").unlink()

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = latest(tmp_path, keyring)

    assert loaded is not None and loaded.info.number == 1
    assert "missing file optimizer.safetensors.sealed" in skipped_reasons(caplog)["2"]


def test_file_left_from_an_earlier_checkpoint_with_the_same_number_fails_its_digest(
    tmp_path: Path, keyring: Keyring, trained_ppo: PPO, caplog: pytest.LogCaptureFixture
) -> None:
    save(trained_ppo, tmp_path, keyring)
    stale = (checkpoint_dir(tmp_path, 1) / "policy.safetensors.sealed").read_bytes()
    shutil.rmtree(checkpoint_dir(tmp_path, 1))
    changed = make_ppo(seed=5)
    assert save(changed, tmp_path, keyring).number == 1  # the number is taken again
    # The old file opens under the same binding; only the digest in state.json tells.
    (checkpoint_dir(tmp_path, 1) / "policy.safetensors.sealed").write_bytes(stale)

    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(CheckpointError):
        latest(tmp_path, keyring)

    assert "does not match its SHA-256" in skipped_reasons(caplog)["1"]


def test_checkpoint_of_another_spec_is_refused(
    tmp_path: Path, keyring: Keyring, trained_ppo: PPO, caplog: pytest.LogCaptureFixture
) -> None:
    save(trained_ppo, tmp_path, keyring, spec_hash="aaaaaaaaaaaaaaaa")

    with (
        caplog.at_level(logging.WARNING, logger=LOGGER),
        pytest.raises(CheckpointError, match="no usable checkpoint") as raised,
    ):
        latest(tmp_path, keyring, spec_hash="bbbbbbbbbbbbbbbb")

    assert "spec hash mismatch" in str(raised.value)
    assert "spec hash mismatch" in skipped_reasons(caplog)["1"]


def test_checkpoint_whose_shapes_do_not_fit_the_model_falls_back_to_the_previous(
    tmp_path: Path, keyring: Keyring, caplog: pytest.LogCaptureFixture
) -> None:
    small, wide = make_ppo(net_arch=[8]), make_ppo(net_arch=[32])
    save(small, tmp_path, keyring)
    save(wide, tmp_path, keyring)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = latest(tmp_path, keyring, model=make_ppo(seed=3, net_arch=[8]))

    assert loaded is not None and loaded.info.number == 1
    assert "does not fit PPO" in skipped_reasons(caplog)["2"]


def test_restore_that_does_not_fit_leaves_the_model_unchanged(
    tmp_path: Path, keyring: Keyring
) -> None:
    save(make_ppo(net_arch=[32]), tmp_path, keyring)
    loaded = load_checkpoint(checkpoint_dir(tmp_path, 1), keyring, run_name=RUN)
    target = make_ppo(seed=3, net_arch=[8])
    before = {k: v.clone() for k, v in target.policy.state_dict().items()}

    with pytest.raises(CheckpointError, match=r"\[32, 4\]"):
        restore_checkpoint(target, loaded)

    assert_same(before, dict(target.policy.state_dict()))
    assert target.num_timesteps == 0


def test_checkpoint_of_another_algorithm_is_refused(tmp_path: Path, keyring: Keyring) -> None:
    save(make_dqn(), tmp_path, keyring)
    loaded = load_checkpoint(checkpoint_dir(tmp_path, 1), keyring, run_name=RUN)
    with pytest.raises(CheckpointError, match="made by DQN, the model is a PPO"):
        restore_checkpoint(make_ppo(), loaded)


def test_run_without_checkpoints_has_none(tmp_path: Path, keyring: Keyring) -> None:
    assert latest(tmp_path, keyring) is None


# --- layout: leftovers and pruning --------------------------------------------------------------


def test_hidden_leftover_temp_folder_is_ignored_and_later_removed(
    tmp_path: Path, keyring: Keyring, trained_ppo: PPO, caplog: pytest.LogCaptureFixture
) -> None:
    save(trained_ppo, tmp_path, keyring)
    checkpoints = tmp_path / CHECKPOINTS_DIR
    # What kill -9 mid-write leaves: a hidden folder with some of a newer checkpoint's files.
    leftover = checkpoints / ".publish-0123abcd"
    shutil.copytree(checkpoint_dir(tmp_path, 1), leftover)
    (leftover / "state.json.sealed").unlink()
    fresh_leftover = checkpoints / ".publish-4567ef01"
    fresh_leftover.mkdir()

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = latest(tmp_path, keyring)
    assert loaded is not None and loaded.info.number == 1
    assert skipped_reasons(caplog) == {}

    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(leftover, (old, old))
    assert save(trained_ppo, tmp_path, keyring).number == 2
    assert not leftover.exists()
    assert fresh_leftover.exists()  # might still be another writer's: left alone


def test_only_the_newest_checkpoints_are_kept(
    tmp_path: Path, keyring: Keyring, trained_ppo: PPO
) -> None:
    numbers = [save(trained_ppo, tmp_path, keyring, keep=2).number for _ in range(5)]

    assert numbers == [1, 2, 3, 4, 5]
    checkpoints = tmp_path / CHECKPOINTS_DIR
    assert sorted(version_dirs(checkpoints)) == [4, 5]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["4", "5"]
    loaded = latest(tmp_path, keyring)
    assert loaded is not None and loaded.info.number == 5


def test_keep_below_one_is_refused(tmp_path: Path, keyring: Keyring, trained_ppo: PPO) -> None:
    with pytest.raises(CheckpointError, match="keep=0"):
        save(trained_ppo, tmp_path, keyring, keep=0)
    assert not (tmp_path / CHECKPOINTS_DIR).exists()


# --- kill -9 mid-write --------------------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from stable_baselines3 import PPO
    from forseti.core.sealing.keyring import Keyring
    from forseti.trainer_sidecar.checkpoint_sb3 import save_checkpoint

    run_dir, keyring = Path(sys.argv[1]), Keyring.load(sys.argv[2])
    # Wide enough that a checkpoint takes a while to write, so the kill lands inside one.
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, n_epochs=1, seed=0,
                device="cpu", policy_kwargs={"net_arch": [256, 256]}).learn(64)
    step = 0
    while True:
        step += 1
        model.num_timesteps = step
        save_checkpoint(model, run_dir, keyring, run_name=sys.argv[3], spec={}, spec_hash="h",
                        counters={"step": step}, keep=2)
    """
)


@pytest.mark.slow
def test_checkpoint_writer_killed_mid_write_leaves_a_complete_checkpoint(
    tmp_path: Path, keyring: Keyring, keyring_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    run_dir = tmp_path / "run"
    checkpoints = run_dir / CHECKPOINTS_DIR
    writer = subprocess.Popen(
        [sys.executable, str(script), str(run_dir), str(keyring_path), RUN],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        while len(version_dirs(checkpoints)) < 2:
            assert writer.poll() is None, writer.stderr.read().decode() if writer.stderr else ""
            assert time.monotonic() < deadline, "writer made no checkpoints"
            time.sleep(0.02)
        # Kill while a hidden temp folder is being filled (or after 5 s, whatever it is doing).
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if any(e.name.startswith(".publish-") for e in os.scandir(checkpoints)):
                break
            time.sleep(0.002)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
    assert writer.returncode == -signal.SIGKILL

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = latest_valid_checkpoint(run_dir, keyring, run_name=RUN, spec_hash="h")

    assert skipped_reasons(caplog) == {}
    assert loaded is not None
    assert loaded.info.number == max(version_dirs(checkpoints))
    assert loaded.info.counters["step"] == loaded.info.num_timesteps >= 2
    fresh = PPO("MlpPolicy", "CartPole-v1", device="cpu", policy_kwargs={"net_arch": [256, 256]})
    restore_checkpoint(fresh, loaded)
    assert fresh.num_timesteps == loaded.info.num_timesteps


@pytest.mark.parametrize(
    "progress",
    [{"policy": 3}, {"num_timesteps": "96"}, {"num_timesteps": True}],
    ids=["unsaved-attribute", "string", "bool"],
)
def test_restore_refuses_progress_it_never_saves_and_changes_nothing(
    tmp_path: Path, keyring: Keyring, progress: dict[str, Any]
) -> None:
    model = make_ppo().learn(64)
    save(model, tmp_path, keyring)
    fresh = make_ppo(seed=1)
    loaded = latest(tmp_path, keyring, model=fresh)
    assert loaded is not None
    loaded.state["progress"].update(progress)
    policy = fresh.policy

    with pytest.raises(CheckpointError, match="progress attributes"):
        restore_checkpoint(fresh, loaded)
    assert fresh.policy is policy and fresh.num_timesteps == 0


def test_a_full_replay_buffer_position_out_of_range_is_refused(
    tmp_path: Path, keyring: Keyring
) -> None:
    from forseti.trainer_sidecar.replay_buffer_state import (
        ReplayBufferStateError,
        buffer_to_arrays,
        check_buffer_fits,
    )

    model = make_sac()
    buffer = model.replay_buffer
    buffer.full, buffer.pos = True, 3
    arrays, meta = buffer_to_arrays(buffer)
    check_buffer_fits(buffer, arrays, meta)  # in range: fits
    for pos in (buffer.buffer_size, -1, 10**9):
        with pytest.raises(ReplayBufferStateError, match="position"):
            check_buffer_fits(buffer, arrays, {**meta, "pos": pos})
