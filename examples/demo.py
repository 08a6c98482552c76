"""Forseti end to end on one machine: keyring, sealed policy, serve, decide, hot-swap.

Until the trainer sidecar lands, the policy is a small fixed MLP for a CartPole-shaped
observation (4 floats -> 2 actions) built directly as ONNX; everything after that step
(sealing, atomic publishing, serving, decision calls, swapping) is the real path.
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper

from forseti.server.repository.publish import publish_version
from forseti.server.security.keyring import Keyring
from forseti.server.security.sealed import seal_bytes

ROOT = Path(__file__).resolve().parent.parent
REPO = ROOT / "model_repository"
KEYRING = ROOT / ".demo-keyring.json"
MODEL = "cartpole_policy"

CONFIG = f"""name: "{MODEL}"
backend: "onnxruntime"
max_batch_size: 32
input [ {{ name: "obs" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [
  {{ name: "action" data_type: TYPE_INT64 dims: [ 1 ] }},
  {{ name: "logits" data_type: TYPE_FP32 dims: [ 2 ] }}
]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
parameters {{ key: "env_id" value: {{ string_value: "CartPole-v1" }} }}
parameters {{ key: "action_space" value: {{ string_value: "Discrete(2)" }} }}
"""


def policy_onnx(sign: float) -> bytes:
    """Push the cart toward the pole's lean (sign=+1) or away from it (sign=-1)."""
    w = np.array([[0, 0], [0, 0], [-1, 1], [-0.5, 0.5]], np.float32) * sign
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["obs", "w"], ["logits"]),
            helper.make_node("ArgMax", ["logits"], ["action"], axis=1, keepdims=1),
        ],
        MODEL,
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("action", TensorProto.INT64, ["batch", 1]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2]),
        ],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def publish(keyring: Keyring, model: bytes) -> int:
    def files(version: int) -> dict[str, bytes]:
        sealed = seal_bytes(model, keyring, model=MODEL, version=version, filename="model.onnx")
        return {"model.onnx.sealed": sealed}

    return publish_version(REPO / MODEL, files)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decide(client: grpcclient.InferenceServerClient, obs: np.ndarray) -> tuple[int, str, float]:
    inp = grpcclient.InferInput("obs", [1, 4], "FP32")
    inp.set_data_from_numpy(obs.reshape(1, 4).astype(np.float32))
    started = time.perf_counter()
    result = client.infer(MODEL, [inp])
    elapsed_ms = (time.perf_counter() - started) * 1e3
    return int(result.as_numpy("action")[0, 0]), result.get_response().model_version, elapsed_ms


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    sys.stdout.reconfigure(line_buffering=True)  # keep our lines in order with the server's
    print("1. keyring:", KEYRING)
    keyring = Keyring.generate()
    keyring.save(KEYRING)
    print("2. repository:", REPO / MODEL)
    shutil.rmtree(REPO / MODEL, ignore_errors=True)
    (REPO / MODEL).mkdir(parents=True)
    (REPO / MODEL / "config.pbtxt").write_text(CONFIG)
    v1 = publish(keyring, policy_onnx(+1.0))
    print(f"   published sealed version {v1}")

    port, metrics = free_port(), free_port()
    cmd = [sys.executable, "-m", "forseti", "serve", "--model-repository", str(REPO),
           "--keyring", str(KEYRING), "--grpc-address", "127.0.0.1", "--grpc-port", str(port),
           "--metrics-port", str(metrics), "--model-control-mode", "explicit",
           "--load-model", MODEL]  # fmt: skip
    print("3. serving:", " ".join(cmd[2:]))
    server = subprocess.Popen(cmd)
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if client.is_server_ready():
                    break
            except Exception:
                time.sleep(0.1)
        rng = np.random.default_rng(0)
        print("4. decisions:")
        latencies = []
        for i in range(200):
            obs = rng.uniform(-0.2, 0.2, 4)
            action, version, ms = decide(client, obs)
            latencies.append(ms)
            if i < 3:
                print(
                    f"   obs={np.round(obs, 3)} -> action {action} (version {version}, {ms:.2f} ms)"
                )
        print(f"   200 decisions: p50 {np.percentile(latencies, 50):.2f} ms, "
              f"p99 {np.percentile(latencies, 99):.2f} ms")  # fmt: skip
        obs = np.array([0, 0, 0.1, 0.1])
        before, version_before, _ = decide(client, obs)
        v2 = publish(keyring, policy_onnx(-1.0))
        client.load_model(MODEL)
        action, version, _ = decide(client, obs)
        print(
            f"5. hot-swapped to version {v2}: obs {obs} -> action {before} "
            f"(version {version_before}) before, action {action} (version {version}) after"
        )
        stats = client.get_inference_statistics(MODEL).model_stats
        for s in stats:
            print(f"   statistics: version {s.version}: {s.inference_count} inferences")
        print(f"6. metrics: http://127.0.0.1:{metrics}/metrics")
        client.close()
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(30)
    print(f"7. server stopped cleanly (exit {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
