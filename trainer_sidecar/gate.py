"""The evaluation gate: candidate (its exported ONNX) and live version (through the server) play
the same fixed-seed episodes; the candidate is promoted only if it beats the live one by the margin.

Both sides act through what a client would use: the candidate through an onnxruntime session of
the very bytes that will be published, the live version through tritonclient, so the gate judges
the artifacts, not the torch objects they came from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium
import numpy as np
import onnxruntime
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from forseti.core.repository.layout import parse_version_name

log = logging.getLogger(__name__)

# A batch of observations [n, obs_dim] -> a batch of actions [n, ...].
Actor = Callable[[np.ndarray], np.ndarray]


class GateError(Exception):
    """The gate could not compare the candidate with the live version."""


@dataclass(frozen=True)
class GateDecision:
    candidate_return: float
    live_return: float | None
    live_version: int | None
    margin: float
    promoted: bool
    reason: str
    episodes: int
    seconds: float


def play_episodes(
    act: Actor,
    env_id: str,
    *,
    episodes: int,
    seed: int,
    env_kwargs: dict | None = None,
    batch: int = 64,
) -> list[float]:
    """Undiscounted return of each episode; episode i starts from ``reset(seed=seed + i)``.

    Up to ``batch`` episodes run in lockstep and each step asks for all their actions in one
    batched call: the returns are those of playing the episodes one by one (each env is its own
    seeded instance), at a fraction of the calls, which matters when ``act`` is the server.
    """
    returns: list[float] = []
    for first in range(0, episodes, batch):
        count = min(batch, episodes - first)
        returns += _play_lockstep(act, env_id, seed + first, count, env_kwargs or {})
    return returns


def _play_lockstep(act: Actor, env_id: str, seed: int, count: int, env_kwargs: dict) -> list[float]:
    envs = [gymnasium.make(env_id, **env_kwargs) for _ in range(count)]
    try:
        obs = [
            np.asarray(env.reset(seed=seed + i)[0], dtype=np.float32) for i, env in enumerate(envs)
        ]
        totals = [0.0] * count
        running = list(range(count))
        while running:
            actions = act(np.stack([obs[i].reshape(-1) for i in running]))
            still = []
            for row, i in enumerate(running):
                step = envs[i].step(_env_action(envs[i], actions[row]))
                obs[i] = np.asarray(step[0], dtype=np.float32)
                totals[i] += float(step[1])
                if not (step[2] or step[3]):
                    still.append(i)
            running = still
        return totals
    finally:
        for env in envs:
            env.close()


def _env_action(env: gymnasium.Env, action: np.ndarray) -> int | np.ndarray:
    if isinstance(env.action_space, gymnasium.spaces.Discrete):
        return int(np.asarray(action).reshape(-1)[0])
    return np.asarray(action, dtype=np.float32).reshape(env.action_space.shape)


def onnx_actor(onnx_bytes: bytes) -> Actor:
    """Act with an onnxruntime CPU session of the exported policy."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])

    def act(obs: np.ndarray) -> np.ndarray:
        return session.run(["action"], {"obs": obs})[0]

    return act


def gguf_actor(gguf_bytes: bytes) -> Actor:
    """Act with the server's own numpy GGUF policy runner (the gguf backend's reader)."""
    from forseti.core.gguf.reader import load_policy

    network = load_policy(gguf_bytes)

    def act(obs: np.ndarray) -> np.ndarray:
        return network.forward(obs, ["action"])[0]

    return act


def server_actor(
    client: grpcclient.InferenceServerClient,
    model: str,
    *,
    version: str = "",
    headers: dict[str, str] | None = None,
) -> Actor:
    """Act by asking the server, the way the client service does."""
    output = grpcclient.InferRequestedOutput("action")

    def act(obs: np.ndarray) -> np.ndarray:
        tensor = grpcclient.InferInput("obs", list(obs.shape), "FP32")
        tensor.set_data_from_numpy(obs)
        result = client.infer(
            model, [tensor], model_version=version, outputs=[output], headers=headers
        )
        return result.as_numpy("action")

    return act


def live_version(
    client: grpcclient.InferenceServerClient, model: str, headers: dict[str, str] | None = None
) -> int | None:
    """The newest ready version the server answers with, or None when nothing is live.

    An unreachable server is an error, not "nothing live": promoting blind would skip the gate.
    """
    try:
        client.is_server_live(headers=headers)
    except InferenceServerException as exc:
        raise GateError(f"cannot reach the server: {exc.message()}") from None
    try:
        if not client.is_model_ready(model, headers=headers):
            return None
        metadata = client.get_model_metadata(model, headers=headers)
    except InferenceServerException as exc:
        log.info("no live version", extra={"model": model, "reason": exc.message()})
        return None
    versions = [n for n in map(parse_version_name, metadata.versions) if n is not None]
    return max(versions) if versions else None


def evaluate_gate(
    candidate: Actor,
    client: grpcclient.InferenceServerClient,
    *,
    model: str,
    env_id: str,
    episodes: int,
    seed: int,
    margin: float,
    env_kwargs: dict | None = None,
    headers: dict[str, str] | None = None,
    batch: int = 64,
) -> GateDecision:
    """Play the candidate and the live version on the same episodes and decide."""
    start = time.perf_counter()
    # First: an unreachable server stops the gate before the candidate's episodes are played.
    live = live_version(client, model, headers)
    candidate_returns = play_episodes(
        candidate, env_id, episodes=episodes, seed=seed, env_kwargs=env_kwargs, batch=batch
    )
    candidate_mean = float(np.mean(candidate_returns))
    if live is None:
        live_mean = None
        promoted, reason = True, "no live version"
    else:
        live_returns = play_episodes(
            server_actor(client, model, version=str(live), headers=headers),
            env_id,
            episodes=episodes,
            seed=seed,
            env_kwargs=env_kwargs,
            batch=batch,
        )
        live_mean = float(np.mean(live_returns))
        promoted = candidate_mean > live_mean + margin
        relation = "beats" if promoted else "does not beat"
        reason = f"candidate {relation} live version {live} by the margin {margin:g}"
    decision = GateDecision(
        candidate_return=candidate_mean,
        live_return=live_mean,
        live_version=live,
        margin=margin,
        promoted=promoted,
        reason=reason,
        episodes=episodes,
        seconds=time.perf_counter() - start,
    )
    log.info(
        "gate decision",
        extra={
            "model": model,
            "candidate_return": round(candidate_mean, 3),
            "live_return": None if live_mean is None else round(live_mean, 3),
            "live_version": live,
            "margin": margin,
            "promoted": promoted,
        },
    )
    return decision
