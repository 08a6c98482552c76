"""Training throughput of the sidecar's CartPole-v1 PPO, beside the targets Forseti holds itself to.

What it does, for n_envs 1, 8 and 32, each with in-process (DummyVecEnv) and subprocess
(SubprocVecEnv, forkserver) vector envs, built exactly as ``forseti train`` builds them
(``examples/cartpole_ppo.toml``'s hyperparameters through ``trainer_sidecar.algorithms``, one
torch thread, SB3 logger output and ``TrainingMonitor`` attached):

* env only: the vector env stepped with random actions: env steps/s and episodes/s;
* training: ``model.learn`` in chunks of rollouts (the first chunk is a warm-up and not
  counted): env steps/s and episodes/s of training as a whole (rollouts and updates), and the
  mean episode length those episodes had (episodes/s depends on it: an untrained policy ends
  CartPole episodes after ~20 steps, a trained one after 500);
* one policy update: the wall time of each PPO ``train()`` call inside those chunks (median
  and max); the rollout it learns from is n_steps x n_envs samples, and ``grads`` is the
  number of minibatch gradient steps it takes (n_epochs x minibatches);
* checkpoint: ``save_checkpoint`` (sealed safetensors, atomic publish) into a temporary run
  folder, median of three after one warm-up call;
* export + parity: ``describe_policy`` + ``export_onnx`` + ``check_parity`` on 1,000
  observations (half sampled, half visited), median of two after one warm-up call.

Then a monitor-overhead check: PPO with 8 in-process envs trained with and without
``TrainingMonitor`` in alternating runs, plus the time spent inside the callback.

It prints a table and the targets (> 100 episodes/s with 32 envs; one policy update < 100 ms).
It is a benchmark, not a test: it exits 0 whatever the numbers are, unless the run itself
failed. Timings depend on what else runs on the machine: the load average before and after is
printed with them.

    .venv/bin/python -m benchmarks.bench_training            # ~4 minutes on 2 cores
    .venv/bin/python -m benchmarks.bench_training --quick    # ~2 minutes, shorter windows
    .venv/bin/python -m benchmarks.bench_training --n-envs 32 --vectorization dummy --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = REPO_ROOT / "examples" / "cartpole_ppo.toml"
TARGET_EPISODES_PER_S = 100.0  # with 32 envs
TARGET_UPDATE_MS = 100.0


@dataclass
class Row:
    vectorization: str
    n_envs: int
    rollout: int  # samples per policy update (n_steps x n_envs)
    grad_steps: int  # minibatch gradient steps per policy update (n_epochs x minibatches)
    env_steps_per_s: float
    env_episodes_per_s: float
    train_steps_per_s: float
    train_episodes_per_s: float
    train_mean_episode_length: float
    update_ms_median: float
    update_ms_max: float
    updates_timed: int
    checkpoint_ms: float
    export_parity_ms: float


@dataclass
class Overhead:
    n_envs: int
    steps_per_s_without: float
    steps_per_s_with: float
    callback_share: float  # of the monitored runs' wall time spent inside the callback
    runs_without: list[float]  # steps/s of each run, in the order they ran
    runs_with: list[float]


@dataclass(frozen=True)
class Settings:
    env_seconds: float
    train_seconds: float
    checkpoint_repeats: int
    export_repeats: int
    overhead_steps: int
    overhead_runs: int


FULL = Settings(3.0, 8.0, 3, 2, 16_384, 3)
QUICK = Settings(1.0, 3.0, 2, 1, 8_192, 2)


def _spec(n_envs: int, vectorization: str, run_dir: Path, spec_path: Path = SPEC_PATH) -> Any:
    from forseti.trainer_sidecar.spec import load_spec

    spec = load_spec(spec_path)
    return dataclasses.replace(
        spec,
        env=dataclasses.replace(spec.env, n_envs=n_envs, vectorization=vectorization),
        checkpoint=dataclasses.replace(spec.checkpoint, directory=run_dir),
    )


def measure_env(env: Any, seconds: float) -> tuple[float, float]:
    """Step ``env`` with random actions for ``seconds``: (steps/s, episodes/s)."""
    import numpy as np

    env.reset()
    rng = np.random.default_rng(0)
    n_actions = int(env.action_space.n)
    steps = episodes = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        _, _, dones, _ = env.step(rng.integers(0, n_actions, env.num_envs))
        steps += env.num_envs
        episodes += int(dones.sum())
        now = time.perf_counter()
        if now >= deadline:
            break
    elapsed = now - start
    return steps / elapsed, episodes / elapsed


def measure_training(model: Any, metrics: Any, monitor: Any, seconds: float) -> dict[str, Any]:
    """Train in chunks until ``seconds`` have passed after a warm-up chunk; episodes and their
    lengths are read from the monitor's own metrics."""
    update_s: list[float] = []
    train = model.train

    def timed_train() -> None:
        started = time.perf_counter()
        train()
        update_s.append(time.perf_counter() - started)

    model.train = timed_train  # learn() calls self.train(): time each policy update
    chunk = model.n_steps * model.env.num_envs * 4
    model.learn(chunk, callback=[monitor])  # warm-up
    update_s.clear()

    def episodes_and_lengths() -> tuple[float, float]:
        value = metrics.registry.get_sample_value
        return value("forseti_train_episodes_total"), value("forseti_train_episode_length_sum")

    episodes_before, lengths_before = episodes_and_lengths()
    steps_before = model.num_timesteps
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.learn(chunk, callback=[monitor], reset_num_timesteps=False)
    elapsed = time.perf_counter() - start
    del model.train
    steps = model.num_timesteps - steps_before
    episodes_after, lengths_after = episodes_and_lengths()
    episodes = episodes_after - episodes_before
    return {
        "steps_per_s": steps / elapsed,
        "episodes_per_s": episodes / elapsed,
        "mean_episode_length": (lengths_after - lengths_before) / max(episodes, 1),
        "update_ms_median": 1000 * statistics.median(update_s),
        "update_ms_max": 1000 * max(update_s),
        "updates": len(update_s),
    }


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: the first call also pays for lazy imports and first-use set-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def measure_checkpoint(model: Any, spec: Any, repeats: int) -> float:
    from forseti.core.sealing.keyring import Keyring
    from forseti.trainer_sidecar.checkpoint_sb3 import save_checkpoint

    keyring = Keyring.generate()
    return _median_ms(
        lambda: save_checkpoint(
            model,
            spec.checkpoint.directory,
            keyring,
            run_name=spec.run_name,
            spec=spec.to_dict(),
            spec_hash=spec.spec_hash,
            counters={"episodes": 0},
            keep=spec.checkpoint.keep,
        ),
        repeats,
    )


def measure_export(model: Any, spec: Any, repeats: int) -> float:
    from forseti.exporters.onnx_export import export_onnx
    from forseti.exporters.parity import check_parity
    from forseti.exporters.policy_description import describe_policy

    def export_and_check() -> None:
        onnx_bytes = export_onnx(describe_policy(model))
        check_parity(onnx_bytes, model, env_id=spec.env.id, n=1000, seed=spec.algorithm.seed)

    return _median_ms(export_and_check, repeats)


def bench_config(
    n_envs: int, vectorization: str, settings: Settings, spec_path: Path = SPEC_PATH
) -> Row:
    from stable_baselines3 import PPO

    from forseti.trainer_sidecar.algorithms import build_model, make_env
    from forseti.trainer_sidecar.monitoring import TrainingMonitor, attach_logger
    from forseti.trainer_sidecar.training_metrics import SidecarMetrics

    with tempfile.TemporaryDirectory(prefix="forseti-bench-") as tmp:
        spec = _spec(n_envs, vectorization, Path(tmp) / "run", spec_path)
        env = make_env(spec)
        try:
            env_rates = measure_env(env, settings.env_seconds)
            model = build_model(spec, env)
            metrics = SidecarMetrics()
            attach_logger(model, metrics)
            monitor = TrainingMonitor(metrics, 10**9, progress=False)
            training = measure_training(model, metrics, monitor, settings.train_seconds)
            checkpoint_ms = measure_checkpoint(model, spec, settings.checkpoint_repeats)
            export_ms = measure_export(model, spec, settings.export_repeats)
        finally:
            env.close()
    # rollout and grad_steps are PPO's (the benchmark spec trains PPO)
    assert isinstance(model, PPO), f"the benchmark spec trains {type(model).__name__}, not PPO"
    return Row(
        vectorization=vectorization,
        n_envs=n_envs,
        rollout=model.n_steps * n_envs,
        grad_steps=model.n_epochs * -(-model.n_steps * n_envs // model.batch_size),
        env_steps_per_s=env_rates[0],
        env_episodes_per_s=env_rates[1],
        train_steps_per_s=training["steps_per_s"],
        train_episodes_per_s=training["episodes_per_s"],
        train_mean_episode_length=training["mean_episode_length"],
        update_ms_median=training["update_ms_median"],
        update_ms_max=training["update_ms_max"],
        updates_timed=training["updates"],
        checkpoint_ms=checkpoint_ms,
        export_parity_ms=export_ms,
    )


def bench_monitor_overhead(settings: Settings, n_envs: int = 8) -> Overhead:
    """PPO with and without TrainingMonitor, alternating (ABBA...) so both see the same load."""
    from forseti.trainer_sidecar.algorithms import build_model, make_env
    from forseti.trainer_sidecar.monitoring import TrainingMonitor, attach_logger
    from forseti.trainer_sidecar.training_metrics import SidecarMetrics

    class TimedMonitor(TrainingMonitor):
        inside = 0.0

        def on_step(self) -> bool:
            started = time.perf_counter()
            result = super().on_step()
            TimedMonitor.inside += time.perf_counter() - started
            return result

        def update_locals(self, locals_: dict[str, Any]) -> None:
            started = time.perf_counter()
            super().update_locals(locals_)
            TimedMonitor.inside += time.perf_counter() - started

        def on_rollout_end(self) -> None:
            started = time.perf_counter()
            super().on_rollout_end()
            TimedMonitor.inside += time.perf_counter() - started

    rates: dict[bool, list[float]] = {False: [], True: []}
    monitored_wall = 0.0
    with tempfile.TemporaryDirectory(prefix="forseti-bench-") as tmp:
        spec = _spec(n_envs, "dummy", Path(tmp) / "run")
        for i in range(settings.overhead_runs):
            for monitored in (False, True) if i % 2 == 0 else (True, False):
                env = make_env(spec)
                try:
                    model = build_model(spec, env)
                    callback = None
                    if monitored:
                        metrics = SidecarMetrics()
                        attach_logger(model, metrics)
                        callback = TimedMonitor(metrics, settings.overhead_steps, progress=False)
                    started = time.perf_counter()
                    model.learn(settings.overhead_steps, callback=callback)
                    elapsed = time.perf_counter() - started
                finally:
                    env.close()
                rates[monitored].append(settings.overhead_steps / elapsed)
                if monitored:
                    monitored_wall += elapsed
    return Overhead(
        n_envs=n_envs,
        steps_per_s_without=statistics.median(rates[False]),
        steps_per_s_with=statistics.median(rates[True]),
        callback_share=TimedMonitor.inside / monitored_wall,
        runs_without=rates[False],
        runs_with=rates[True],
    )


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_report(rows: list[Row], overhead: Overhead | None, load: tuple[Any, Any]) -> None:
    print()
    header = (
        f"{'vec env':<10} {'n_envs':>6} {'rollout':>7} {'grads':>5} | {'env steps/s':>11} "
        f"{'env ep/s':>9} | "
        f"{'train steps/s':>13} {'train ep/s':>10} {'ep len':>6} | {'update ms':>9} "
        f"{'max':>6} {'n':>4} | {'ckpt ms':>7} | {'export+parity ms':>16}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.vectorization:<10} {r.n_envs:>6} {r.rollout:>7} {r.grad_steps:>5} | "
            f"{r.env_steps_per_s:>11,.0f} "
            f"{r.env_episodes_per_s:>9,.0f} | {r.train_steps_per_s:>13,.0f} "
            f"{r.train_episodes_per_s:>10,.1f} {r.train_mean_episode_length:>6.0f} | "
            f"{r.update_ms_median:>9.1f} {r.update_ms_max:>6.1f} {r.updates_timed:>4} | "
            f"{r.checkpoint_ms:>7.1f} | {r.export_parity_ms:>16.0f}"
        )
    print()
    print("targets:")
    for r in rows:
        if r.n_envs == 32:
            print(
                f"  > {TARGET_EPISODES_PER_S:.0f} episodes/s with 32 envs ({r.vectorization}): "
                f"training {r.train_episodes_per_s:,.1f} (episodes of ~"
                f"{r.train_mean_episode_length:.0f} steps) "
                f"{_verdict(r.train_episodes_per_s > TARGET_EPISODES_PER_S)}; env alone "
                f"{r.env_episodes_per_s:,.0f} "
                f"{_verdict(r.env_episodes_per_s > TARGET_EPISODES_PER_S)}"
            )
    for r in rows:
        print(
            f"  policy update < {TARGET_UPDATE_MS:.0f} ms ({r.vectorization}, {r.n_envs} envs, "
            f"{r.rollout} samples, {r.grad_steps} gradient steps): median "
            f"{r.update_ms_median:.1f} ms "
            f"{_verdict(r.update_ms_median < TARGET_UPDATE_MS)}"
        )
    if overhead is not None:
        print()
        print(
            f"TrainingMonitor overhead (PPO, {overhead.n_envs} in-process envs, "
            f"{len(overhead.runs_with)} runs each, medians): {overhead.steps_per_s_without:,.0f} "
            f"steps/s without, {overhead.steps_per_s_with:,.0f} with; "
            f"{100 * overhead.callback_share:.2f}% of the monitored runs' time inside the callback"
        )
        runs = ", ".join(f"{r:,.0f}" for r in overhead.runs_without)
        print(f"  runs without: {runs}")
        print(f"  runs with:    {', '.join(f'{r:,.0f}' for r in overhead.runs_with)}")
    print()
    print(
        f"load average before {load[0]}, after {load[1]} on {os.cpu_count()} cores "
        f"({platform.processor() or platform.machine()}); other work on the machine moves these "
        "numbers"
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_training",
        description="Training throughput of CartPole-v1 PPO: env steps/s, episodes/s, policy "
        "update time, checkpoint time, export + parity time, beside Forseti's targets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="shorter measurement windows")
    p.add_argument("--n-envs", default="1,8,32", help="env counts, comma separated (1..32)")
    p.add_argument(
        "--vectorization",
        default="dummy,subprocess",
        help="vector env kinds, comma separated: dummy (in-process), subprocess",
    )
    p.add_argument(
        "--no-overhead", action="store_true", help="skip the TrainingMonitor overhead runs"
    )
    p.add_argument(
        "--spec",
        type=Path,
        default=SPEC_PATH,
        help="training spec whose PPO hyperparameters are measured (n_envs is overridden); "
        "examples/cartpole_ppo_32envs.toml keeps updates at 10 gradient steps for 32 envs",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        counts = [int(n) for n in args.n_envs.split(",")]
        kinds = [k.strip() for k in args.vectorization.split(",")]
    except ValueError:
        print(f"bench_training: --n-envs must be integers, got {args.n_envs!r}", file=sys.stderr)
        return 2
    bad = [k for k in kinds if k not in ("dummy", "subprocess")] + [
        str(n) for n in counts if not 1 <= n <= 32
    ]
    if bad:
        print(f"bench_training: not a vectorization or an env count 1..32: {bad}", file=sys.stderr)
        return 2
    settings = QUICK if args.quick else FULL
    # PPO warns when n_steps x n_envs is not a multiple of batch_size (n_envs 1): expected here.
    warnings.filterwarnings("ignore", message=".*mini-batch.*", category=UserWarning)
    load_before = os.getloadavg()
    rows: list[Row] = []
    try:
        for kind in kinds:
            for n in counts:
                print(f"measuring {kind} x {n} envs ...", flush=True)
                rows.append(bench_config(n, kind, settings, args.spec))
        overhead = None
        if not args.no_overhead:
            print("measuring TrainingMonitor overhead ...", flush=True)
            overhead = bench_monitor_overhead(settings)
    except Exception as exc:
        print(f"bench_training: the run failed: {exc!r}", file=sys.stderr)
        return 2
    load = (
        tuple(round(x, 2) for x in load_before),
        tuple(round(x, 2) for x in os.getloadavg()),
    )
    print_report(rows, overhead, load)
    if args.json:
        document = {
            "rows": [asdict(r) for r in rows],
            "monitor_overhead": asdict(overhead) if overhead is not None else None,
            "load_average": {"before": load[0], "after": load[1]},
            "cpus": os.cpu_count(),
            "quick": args.quick,
        }
        args.json.write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
