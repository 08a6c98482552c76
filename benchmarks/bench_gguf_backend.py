"""GGUF vs ONNX backend latency for the CartPole policy, at batch 1 and 64.

What it does, in one run:

* describes SB3's default CartPole-v1 PPO MlpPolicy (4 -> 64 -> 64 -> 2 with a value head;
  untrained and seeded: latency does not depend on the weights) and exports it as ONNX and as
  GGUF with F32, F16 and Q8_0 weights (the GGUF backend dequantises once at load, so the three
  should run alike);
* times ``backend.run`` in this process on the server's own backend classes, built from the
  same bytes and config the server gets (``--calls`` runs per slice, the models alternating
  in ABBA slices over ``--rounds`` rounds); outputs action, value and logits;
* starts the real ``forseti serve`` on a sealed repository holding all four and times
  decision calls through ``tritonclient.grpc`` (one client, closed loop, same alternation);
* prints p50 and p99 in microseconds per model and batch size, and GGUF / ONNX ratios of p50.

Timings on a shared 2-CPU machine are noisy; the ABBA alternation keeps the comparison fair
but not the absolute figures. A benchmark, not a test: exits 0 unless the run failed.

    .venv/bin/python -m benchmarks.bench_gguf_backend            # ~1 minute
    .venv/bin/python -m benchmarks.bench_gguf_backend --calls 500 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

MODELS = ("onnx", "gguf_f32", "gguf_f16", "gguf_q8_0")
OUTPUTS = ["action", "value", "logits"]
BATCHES = (1, 64)


@dataclass
class Row:
    where: str  # "backend.run" or "grpc"
    model: str
    batch: int
    p50_us: float
    p99_us: float
    calls: int


def build_artifacts() -> tuple[object, dict[str, tuple[str, bytes]]]:
    """The policy description and {model: (backend, plaintext bytes)}."""
    from stable_baselines3 import PPO

    from forseti.exporters.gguf_policy import export_gguf
    from forseti.exporters.onnx_export import export_onnx
    from forseti.exporters.policy_description import describe_policy

    desc = describe_policy(PPO("MlpPolicy", "CartPole-v1", seed=0, device="cpu"))
    artifacts = {"onnx": ("onnxruntime", export_onnx(desc))}
    for wt in ("f32", "f16", "q8_0"):
        artifacts[f"gguf_{wt}"] = ("gguf", export_gguf(desc, weight_type=wt))
    return desc, artifacts


def config_text(name: str, desc: object, backend: str) -> str:
    from forseti.exporters.model_config import policy_config_text

    return policy_config_text(name, desc, max_batch_size=64, parameters={}, backend=backend)  # type: ignore[arg-type]


def _abba(rounds: int) -> list[list[str]]:
    order = list(MODELS)
    return [order if r % 2 == 0 else order[::-1] for r in range(rounds)]


def _percentiles(samples: list[int]) -> tuple[float, float]:
    arr = np.asarray(samples, dtype=np.float64) / 1000.0
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def time_backends(desc: object, artifacts: dict, calls: int, rounds: int) -> list[Row]:
    """backend.run of the server's own backend classes, in this process."""
    from forseti.core.repository.config import model_spec, parse_config_text
    from forseti.server.backends import create_backend

    backends = {}
    for name, (backend, blob) in artifacts.items():
        spec = model_spec(parse_config_text(config_text(name, desc, backend), name), name)
        backends[name] = create_backend(spec, blob)
    rows = []
    rng = np.random.default_rng(0)
    for batch in BATCHES:
        obs = rng.uniform(-1, 1, (batch, 4)).astype(np.float32)
        samples: dict[str, list[int]] = {m: [] for m in MODELS}
        for order in _abba(rounds):
            for model in order:
                run = backends[model].run
                for _ in range(calls // 10):  # warm the slice up, unrecorded
                    run({"obs": obs}, OUTPUTS)
                for _ in range(calls):
                    started = time.perf_counter_ns()
                    run({"obs": obs}, OUTPUTS)
                    samples[model].append(time.perf_counter_ns() - started)
        for model in MODELS:
            p50, p99 = _percentiles(samples[model])
            rows.append(Row("backend.run", model, batch, p50, p99, len(samples[model])))
    for b in backends.values():
        b.close()
    return rows


def time_grpc(url: str, calls: int, rounds: int) -> list[Row]:
    """Decision calls through tritonclient.grpc to the running server, one closed loop."""
    rows = []
    rng = np.random.default_rng(1)
    with grpcclient.InferenceServerClient(url) as client:
        requested = [grpcclient.InferRequestedOutput(o) for o in OUTPUTS]
        for batch in BATCHES:
            inp = grpcclient.InferInput("obs", [batch, 4], "FP32")
            inp.set_data_from_numpy(rng.uniform(-1, 1, (batch, 4)).astype(np.float32))
            samples: dict[str, list[int]] = {m: [] for m in MODELS}
            for order in _abba(rounds):
                for model in order:
                    for _ in range(calls // 10):
                        client.infer(model, [inp], outputs=requested)
                    for _ in range(calls):
                        started = time.perf_counter_ns()
                        client.infer(model, [inp], outputs=requested)
                        samples[model].append(time.perf_counter_ns() - started)
            for model in MODELS:
                p50, p99 = _percentiles(samples[model])
                rows.append(Row("grpc", model, batch, p50, p99, len(samples[model])))
    return rows


def check_same_actions(url: str) -> None:
    """All four models answer the same action for the same observations before timing."""
    obs = np.random.default_rng(2).uniform(-1, 1, (64, 4)).astype(np.float32)
    with grpcclient.InferenceServerClient(url) as client:
        inp = grpcclient.InferInput("obs", [64, 4], "FP32")
        inp.set_data_from_numpy(obs)
        actions = {m: client.infer(m, [inp]).as_numpy("action") for m in MODELS}
    if not all(np.array_equal(actions["onnx"], a) for a in actions.values()):
        print(
            "note: reduced-precision GGUF models disagree with ONNX on some untrained-policy "
            "ties; timings are unaffected"
        )


def print_report(rows: list[Row]) -> None:
    header = f"{'where':<13}{'model':<11}{'batch':>6}{'p50 us':>10}{'p99 us':>10}{'p50 / onnx':>12}"
    print("\n" + header)
    print("-" * len(header))
    onnx = {(r.where, r.batch): r.p50_us for r in rows if r.model == "onnx"}
    for r in rows:
        ratio = r.p50_us / onnx[(r.where, r.batch)]
        print(
            f"{r.where:<13}{r.model:<11}{r.batch:>6}{r.p50_us:>10.1f}{r.p99_us:>10.1f}{ratio:>12.2f}"
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_gguf_backend",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--calls", type=int, default=2000, help="timed calls per slice")
    p.add_argument("--rounds", type=int, default=4, help="ABBA rounds (default 4)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from forseti.core.sealing.keyring import Keyring
    from testkit.model_builders import publish_sealed, write_config
    from testkit.server_process import ServerProcess

    try:
        desc, artifacts = build_artifacts()
        rows = time_backends(desc, artifacts, args.calls, args.rounds)
        with tempfile.TemporaryDirectory(prefix="bench-gguf-backend-") as tmp:
            root = Path(tmp)
            keyring_path = root / "keyring.json"
            keyring = Keyring.generate()
            keyring.save(keyring_path)
            repo = root / "repo"
            repo.mkdir()
            for name, (backend, blob) in artifacts.items():
                write_config(repo, name, config_text(name, desc, backend))
                filename = "model.onnx" if backend == "onnxruntime" else "model.gguf"
                publish_sealed(repo, name, blob, keyring, version=1, filename=filename)
            server = ServerProcess(
                repo, keyring_path, ["--model-control-mode", "explicit", "--load-model", "*"]
            ).start()
            try:
                check_same_actions(server.url)
                rows += time_grpc(server.url, max(args.calls // 4, 50), args.rounds)
            finally:
                server.stop()
    except Exception as exc:
        print(f"bench_gguf_backend: the run failed: {exc}", file=sys.stderr)
        return 2
    print_report(rows)
    print(f"\n(cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at the end)")
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
