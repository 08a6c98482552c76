"""The trainer's path into the server, timed: training time to a mean return of 475 on CartPole,
export + parity time, gate time (lockstep batches vs one episode at a time), and
publish-to-serving time (rename of the new version folder -> first version-less answer from it),
with the server in explicit mode (RepositoryModelLoad) and in poll mode, in the same run.

    .venv/bin/python -m benchmarks.bench_promotion [--promotions 10] [--poll-secs 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
SPEC = REPO_ROOT / "examples" / "cartpole_ppo.toml"
TARGET = 475.0
EVAL_EPISODES = 20
EVAL_EVERY = 12_800  # timesteps between evaluations (50 rollouts of the example spec)


def train_to_target(spec: Any, seconds_limit: float) -> tuple[Any, Any, float, int, float]:
    """Train the example spec EVAL_EVERY steps at a time until 20 deterministic episodes
    average >= TARGET; returns model, env, training seconds, timesteps, mean return."""
    from forseti.trainer_sidecar.algorithms import build_model, make_env, pin_schedule
    from forseti.trainer_sidecar.gate import play_episodes

    env = make_env(spec)
    model = build_model(spec, env)
    pin_schedule(model, spec.algorithm.total_timesteps)  # as forseti train does
    trained = 0.0
    mean = float("-inf")
    while trained < seconds_limit and model.num_timesteps < spec.algorithm.total_timesteps:
        started = time.perf_counter()
        model.learn(EVAL_EVERY, reset_num_timesteps=False)
        trained += time.perf_counter() - started
        returns = play_episodes(
            lambda obs: model.predict(obs, deterministic=True)[0],
            spec.env.id,
            episodes=EVAL_EPISODES,
            seed=spec.evaluation.seed,
        )
        mean = float(np.mean(returns))
        print(
            f"  {model.num_timesteps:>7} steps, {trained:6.1f} s training: mean return {mean:.1f}"
        )
        if mean >= TARGET:
            break
    return model, env, trained, model.num_timesteps, mean


def publish_times(
    server: Any, repo: Path, keyring: Any, onnx_bytes: bytes, config: str, n: int
) -> list[float]:
    from forseti.trainer_sidecar.promote import promote

    client = server.client()
    try:
        return [
            promote(
                client,
                repository=repo,
                model="cartpole",
                config_text=config,
                artifacts={"model.onnx": onnx_bytes},
                manifest={"bench": True},
                keyring=keyring,
                probe=np.zeros((1, 4), np.float32),
            ).publish_to_serving_seconds
            * 1000
            for _ in range(n)
        ]
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_promotion", description=__doc__.split("\n\n")[0])
    p.add_argument("--promotions", type=int, default=10, help="promotions per server mode")
    p.add_argument("--poll-secs", type=float, default=1.0, help="poll-mode server interval")
    p.add_argument("--train-limit-s", type=float, default=600.0, help="give up training after")
    args = p.parse_args(argv)

    from forseti.core.sealing.keyring import Keyring
    from forseti.exporters.checked_policy import export_checked_policy
    from forseti.exporters.model_config import policy_config_text
    from forseti.trainer_sidecar.algorithms import vec_normalize_of
    from forseti.trainer_sidecar.gate import onnx_actor, play_episodes, server_actor
    from forseti.trainer_sidecar.spec import load_spec
    from testkit.server_process import ServerProcess

    with tempfile.TemporaryDirectory(prefix="forseti-bench-promotion-") as tmp:
        root = Path(tmp)
        spec = load_spec(SPEC)
        spec = dataclasses.replace(
            spec, checkpoint=dataclasses.replace(spec.checkpoint, directory=root / "run")
        )
        print(f"training {SPEC.name} until {EVAL_EPISODES} episodes average >= {TARGET:g}:")
        model, env, train_s, steps, mean = train_to_target(spec, args.train_limit_s)

        started = time.perf_counter()
        checked = export_checked_policy(
            model, vec_normalize_of(env), env_id=spec.env.id, env_kwargs={}, n=1000, seed=0
        )
        export_ms = (time.perf_counter() - started) * 1000
        config = policy_config_text(
            "cartpole", checked.description, max_batch_size=64, parameters={}
        )
        keyring_path = root / "keyring.json"
        Keyring.generate().save(keyring_path)
        keyring = Keyring.load(keyring_path)

        publish: dict[str, list[float]] = {}
        gate_s: dict[str, float] = {}
        for mode, extra in (
            ("explicit", ["--model-control-mode", "explicit"]),
            (
                "poll",
                ["--model-control-mode", "poll", "--repository-poll-secs", f"{args.poll_secs:g}"],
            ),
        ):
            repo = root / f"repo-{mode}"
            repo.mkdir()
            server = ServerProcess(repo, keyring_path, extra, log_path=root / f"{mode}.log").start()
            try:
                publish[mode] = publish_times(
                    server, repo, keyring, checked.onnx, config, args.promotions
                )
                if mode == "explicit":
                    client = server.client()
                    try:
                        for label, batch in (("one by one", 1), ("lockstep", 64)):
                            started = time.perf_counter()
                            play_episodes(
                                server_actor(client, "cartpole"),
                                spec.env.id,
                                episodes=EVAL_EPISODES,
                                seed=spec.evaluation.seed,
                                batch=batch,
                            )
                            gate_s[label] = time.perf_counter() - started
                    finally:
                        client.close()
            finally:
                server.stop()
        started = time.perf_counter()
        play_episodes(
            onnx_actor(checked.onnx), spec.env.id, episodes=EVAL_EPISODES, seed=spec.evaluation.seed
        )
        candidate_s = time.perf_counter() - started
        env.close()

    print()
    print(f"training to >= {TARGET:g}: {steps} steps, {train_s:.1f} s (mean return {mean:.1f})")
    print(f"export + parity (1,000 observations): {export_ms:.0f} ms")
    print(
        f"gate, {EVAL_EPISODES} episodes of the live version through the server: one by one "
        f"{gate_s['one by one']:.2f} s, lockstep {gate_s['lockstep']:.2f} s; "
        f"the candidate in process: {candidate_s:.2f} s"
    )
    print(f"publish-to-serving ms over {args.promotions} promotions (rename -> first answer):")
    print("  mode        median     min     max")
    for mode, times in publish.items():
        print(f"  {mode:<9} {statistics.median(times):8.1f} {min(times):7.1f} {max(times):7.1f}")
    return 0 if mean >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
