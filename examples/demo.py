"""Forseti end to end on one machine, the way it runs in production:

1. a fresh keyring; 2. the server, on an empty repository; 3. the trainer sidecar
(`forseti train examples/cartpole_ppo.toml`): PPO on CartPole-v1, sealed checkpoints, ONNX export
with a parity check, the evaluation gate, a sealed atomic publish and RepositoryModelLoad;
4. a client plays CartPole asking the server for every action, and reports the episode returns
and the decision latency it saw; 5. a clean stop.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import gymnasium
import numpy as np
import tritonclient.grpc as grpcclient

from forseti.core.sealing.keyring import Keyring

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "examples" / "cartpole_ppo.toml"
REPO = ROOT / "model_repository"
RUNS = ROOT / "runs"
KEYRING = ROOT / ".demo-keyring.json"
MODEL = "cartpole"
EPISODES = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_spec(url: str) -> Path:
    """The example spec, pointed at this demo's server, keyring and folders."""
    text = SPEC.read_text()
    for key, value in {
        "url": url,
        "keyring": str(KEYRING),
        "repository": str(REPO),
        "directory": str(RUNS / MODEL),
    }.items():
        text = re.sub(rf'^{key} = ".*"$', f'{key} = "{value}"', text, flags=re.MULTILINE)
    path = RUNS / "demo-spec.toml"
    path.write_text(text)
    return path


def wait_ready(client: grpcclient.InferenceServerClient, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            if client.is_server_ready():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise SystemExit("the server did not become ready in 60 s")


def play(client: grpcclient.InferenceServerClient) -> tuple[list[float], list[float], set[str]]:
    """Play CartPole with every action decided by the server; returns, latencies (ms), versions."""
    env = gymnasium.make("CartPole-v1")
    returns, latencies, versions = [], [], set()
    obs_input = grpcclient.InferInput("obs", [1, 4], "FP32")
    for episode in range(EPISODES):
        obs, _ = env.reset(seed=1_000 + episode)
        total, done = 0.0, False
        while not done:
            obs_input.set_data_from_numpy(np.asarray(obs, np.float32).reshape(1, 4))
            started = time.perf_counter()
            result = client.infer(MODEL, [obs_input])
            latencies.append((time.perf_counter() - started) * 1e3)
            versions.add(result.get_response().model_version)
            obs, reward, terminated, truncated, _ = env.step(int(result.as_numpy("action")[0, 0]))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns, latencies, versions


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # keep our lines in order with the children's
    started = time.monotonic()
    Keyring.generate().save(KEYRING)
    print(f"1. keyring {KEYRING} (mode 0600, never committed)")
    shutil.rmtree(REPO / MODEL, ignore_errors=True)
    shutil.rmtree(RUNS / MODEL, ignore_errors=True)
    REPO.mkdir(exist_ok=True)
    RUNS.mkdir(exist_ok=True)

    port, metrics = free_port(), free_port()
    serve = [sys.executable, "-m", "forseti", "serve", "--model-repository", str(REPO),
             "--keyring", str(KEYRING), "--grpc-address", "127.0.0.1", "--grpc-port", str(port),
             "--metrics-port", str(metrics), "--http-port", str(free_port()),
             "--model-control-mode", "explicit", "--drain-seconds", "0",
             "--log-level", "WARNING"]  # fmt: skip
    print(f"2. server: forseti serve --model-repository {REPO} ... (127.0.0.1:{port})")
    server = subprocess.Popen(serve, stderr=subprocess.DEVNULL)
    code = 1
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        wait_ready(client, server)
        spec = demo_spec(f"127.0.0.1:{port}")
        print(f"3. trainer sidecar: forseti train {spec} (a minute or two on 2 cores)")
        trained = subprocess.run(
            [sys.executable, "-m", "forseti", "train", str(spec), "--log-level", "WARNING"],
            stdin=subprocess.DEVNULL,
        )
        if trained.returncode != 0:
            print(f"   training failed (exit {trained.returncode})")
            return trained.returncode
        print(f"4. playing {EPISODES} CartPole episodes, every action asked of the server:")
        returns, latencies, versions = play(client)
        print(f"   episode returns: {', '.join(f'{r:.0f}' for r in returns)}")
        print(f"   mean return {np.mean(returns):.1f} (CartPole-v1's maximum is 500)")
        print(
            f"   {len(latencies)} decisions from version {', '.join(sorted(versions))}: "
            f"p50 {np.percentile(latencies, 50):.2f} ms, p99 {np.percentile(latencies, 99):.2f} ms"
        )
        print(f"   server metrics: http://127.0.0.1:{metrics}/metrics")
        client.close()
        code = 0
    finally:
        server.send_signal(signal.SIGTERM)
        server_code = server.wait(30)
    print(f"5. server stopped (exit {server_code}); demo took {time.monotonic() - started:.0f} s")
    return code or server_code


if __name__ == "__main__":
    sys.exit(main())
