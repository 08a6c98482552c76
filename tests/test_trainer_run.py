"""The training pipeline end to end: real SB3 training → sealed checkpoints → ONNX export with
parity → gate against the live server → sealed publish → the server answers from the new
version, over real gRPC with tritonclient."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import onnxruntime
import pytest
import torch
import tritonclient.grpc as grpcclient
from stable_baselines3 import PPO
from tritonclient.utils import InferenceServerException

from forseti.core.audit import AuditLog, verify_file
from forseti.core.repository.layout import version_dirs
from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.sealed import open_sealed_file
from forseti.exporters import checked_policy, onnx_export
from forseti.exporters.errors import ParityError
from forseti.exporters.model_config import policy_config_text
from forseti.exporters.policy_description import PolicyDescription, describe_policy
from forseti.trainer_sidecar.gate import evaluate_gate, onnx_actor
from forseti.trainer_sidecar.promote import PromotionError, promote
from forseti.trainer_sidecar.run import RunResult, TrainingRun
from forseti.trainer_sidecar.spec import TrainingSpec, load_spec
from testkit.certificates import make_certificates
from testkit.server_process import ServerProcess

from .training_specs import PPO_CARTPOLE, SAC_PENDULUM, write_spec

pytestmark = pytest.mark.slow

FirstRun = tuple[TrainingSpec, RunResult]


@dataclass
class Served:
    server: ServerProcess
    repository: Path
    root: Path
    keyring_path: Path
    keyring: Keyring
    runs: int = 0

    def spec(self, template: str = PPO_CARTPOLE, **kwargs: Any) -> TrainingSpec:
        self.runs += 1
        run_dir = self.root / f"run-{self.runs}"
        path = write_spec(
            self.root / f"spec-{self.runs}.toml",
            template,
            repository=self.repository,
            run_dir=run_dir,
            url=self.server.url,
            keyring=self.keyring_path,
            **kwargs,
        )
        return load_spec(path)


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, keyring_path: Path, keyring: Keyring
) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("training")
    repository = root / "repo"
    repository.mkdir()
    server = ServerProcess(repository, keyring_path, ["--model-control-mode", "explicit"])
    server.start()
    try:
        yield Served(server, repository, root, keyring_path, keyring)
    finally:
        server.stop()


def infer(
    client: grpcclient.InferenceServerClient, model: str, obs: np.ndarray
) -> grpcclient.InferResult:
    tensor = grpcclient.InferInput("obs", list(obs.shape), "FP32")
    tensor.set_data_from_numpy(obs.astype(np.float32))
    return client.infer(model, [tensor])


def always_left_policy() -> PPO:
    """A CartPole policy that always pushes left: the worst sensible live version."""
    model = PPO("MlpPolicy", "CartPole-v1", device="cpu", seed=0)
    with torch.no_grad():
        model.policy.action_net.weight.zero_()
        model.policy.action_net.bias.copy_(torch.tensor([1.0, 0.0]))
    return model


def publish_policy(served: Served, model_name: str, sb3_model: PPO) -> int:
    description = describe_policy(sb3_model)
    client = served.server.client()
    try:
        return promote(
            client,
            repository=served.repository,
            model=model_name,
            config_text=policy_config_text(
                model_name, description, max_batch_size=64, parameters={"env_id": "CartPole-v1"}
            ),
            artifacts={"model.onnx": onnx_export.export_onnx(description)},
            manifest={"training_run": "hand-made"},
            keyring=served.keyring,
            probe=np.zeros((1, 4), dtype=np.float32),
        ).version
    finally:
        client.close()


@dataclass
class Caller:
    """A client that keeps making decision calls in a thread, recording what answered."""

    server: ServerProcess
    model: str
    versions: set[str] = field(default_factory=set)
    calls: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Caller:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        client = self.server.client()
        obs = np.zeros((1, 4), dtype=np.float32)
        try:
            while not self._stop.is_set():
                try:
                    self.versions.add(infer(client, self.model, obs).get_response().model_version)
                    self.calls += 1
                except InferenceServerException as exc:
                    self.failures.append(str(exc))
        finally:
            client.close()

    def wait_for(self, version: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while version not in self.versions and time.monotonic() < deadline:
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture(scope="module")
def first_run(served: Served) -> FirstRun:
    """A short PPO CartPole run promoted into an empty repository."""
    spec = served.spec(model="cartpole")
    result = TrainingRun(spec, keyring=served.keyring).run()
    return spec, result


def test_first_run_is_promoted_because_nothing_is_live(first_run: FirstRun) -> None:
    _, result = first_run
    assert [p.version for p in result.promotions] == [1]
    assert result.decisions[0].live_return is None
    assert result.decisions[0].reason == "no live version"


def test_run_ends_at_exactly_the_total_timesteps(first_run: FirstRun) -> None:
    spec, result = first_run
    assert result.num_timesteps == spec.algorithm.total_timesteps == 4096
    assert result.checkpoints == 2


def test_server_decisions_equal_the_published_onnx(served: Served, first_run: FirstRun) -> None:
    sealed = served.repository / "cartpole" / "1" / "model.onnx.sealed"
    onnx_bytes = open_sealed_file(sealed, served.keyring, model="cartpole", version=1)
    session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    env = gymnasium.make("CartPole-v1")
    obs = np.stack([env.observation_space.sample() for _ in range(64)]).clip(-5, 5)
    client = served.server.client()
    try:
        answered = infer(client, "cartpole", obs).as_numpy("action")
    finally:
        client.close()
    expected = session.run(["action"], {"obs": obs.astype(np.float32)})[0]
    assert np.array_equal(answered, expected)


def test_published_config_and_manifest_record_the_run(served: Served, first_run: FirstRun) -> None:
    spec, _ = first_run
    config = (served.repository / "cartpole" / "config.pbtxt").read_text()
    for text in ('"CartPole-v1"', '"PPO"', f'"{spec.run_name}"', f'"{spec.spec_hash}"'):
        assert text in config
    manifest = json.loads((served.repository / "cartpole" / "1" / "manifest.json").read_text())
    assert manifest["gate"]["candidate_return"] > 0
    assert manifest["timesteps"] == 4096
    assert manifest["parity"]["n"] >= 1000


def test_nothing_plaintext_is_written_for_checkpoints_or_versions(
    served: Served, first_run
) -> None:
    spec, _ = first_run
    written = [p for p in spec.checkpoint.directory.rglob("*") if p.is_file()]
    written += [p for p in (served.repository / "cartpole").rglob("*") if p.is_file()]
    plain = [
        p
        for p in written
        if not p.name.endswith(".sealed") and p.name not in ("config.pbtxt", "manifest.json")
    ]
    assert written and plain == []


def test_better_candidate_replaces_a_worse_live_version_without_a_failed_call(
    served: Served,
) -> None:
    assert publish_policy(served, "swap", always_left_policy()) == 1
    spec = served.spec(model="swap")
    with Caller(served.server, "swap") as caller:
        result = TrainingRun(spec, keyring=served.keyring).run()
        caller.wait_for("2")
    decision = result.decisions[0]
    assert decision.live_version == 1
    assert decision.candidate_return > decision.live_return
    assert [p.version for p in result.promotions] == [2]
    assert caller.failures == []
    assert caller.calls > 0
    assert caller.versions == {"1", "2"}


def test_worse_candidate_is_not_promoted(served: Served, first_run: FirstRun) -> None:
    worse = onnx_export.export_onnx(describe_policy(always_left_policy()))
    client = served.server.client()
    try:
        decision = evaluate_gate(
            onnx_actor(worse),
            client,
            model="cartpole",
            env_id="CartPole-v1",
            episodes=5,
            seed=10_000,
            margin=0.0,
        )
    finally:
        client.close()
    assert decision.live_version == 1
    assert decision.live_return > decision.candidate_return
    assert not decision.promoted


def test_run_that_does_not_clear_the_margin_publishes_nothing(
    served: Served, first_run: FirstRun
) -> None:
    before = set(version_dirs(served.repository / "cartpole"))
    spec = served.spec(model="cartpole", total=1024, interval=1024, margin=10_000.0)
    result = TrainingRun(spec, keyring=served.keyring).run()
    assert result.promotions == []
    assert not result.decisions[0].promoted
    assert set(version_dirs(served.repository / "cartpole")) == before


def test_parity_failure_stops_the_promotion_and_keeps_the_live_version(
    served: Served,
    first_run,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_export = onnx_export.export_onnx

    def corrupted_export(desc: PolicyDescription) -> bytes:
        last = desc.actor[-1]
        last.weight[...] = -last.weight  # flip the policy's preferences: a wrong export
        return real_export(desc)

    monkeypatch.setattr(checked_policy, "export_onnx", corrupted_export)
    before = set(version_dirs(served.repository / "cartpole"))
    spec = served.spec(model="cartpole", total=1024, interval=1024)
    with pytest.raises(ParityError):
        TrainingRun(spec, keyring=served.keyring).run()
    assert set(version_dirs(served.repository / "cartpole")) == before
    client = served.server.client()
    try:
        answered = infer(client, "cartpole", np.zeros((1, 4), np.float32)).get_response()
    finally:
        client.close()
    assert answered.model_version == str(max(before))


def test_continuous_sac_pendulum_run_promotes_box_actions(served: Served) -> None:
    spec = served.spec(
        SAC_PENDULUM,
        model="pendulum",
        total=1200,
        interval=600,
        episodes=2,
        margin=-10_000.0,
    )
    result = TrainingRun(spec, keyring=served.keyring, continuous=True).run()
    assert result.num_timesteps == 1200
    assert [p.version for p in result.promotions] == [1, 2]
    sealed = served.repository / "pendulum" / "2" / "model.onnx.sealed"
    onnx_bytes = open_sealed_file(sealed, served.keyring, model="pendulum", version=2)
    session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    obs = np.random.default_rng(0).uniform(-1, 1, (32, 3)).astype(np.float32)
    client = served.server.client()
    try:
        answered = infer(client, "pendulum", obs).as_numpy("action")
    finally:
        client.close()
    expected = session.run(["action"], {"obs": obs})[0]
    assert answered.dtype == np.float32 and answered.shape == (32, 1)
    assert np.max(np.abs(answered - expected)) <= 1e-5
    assert np.all(np.abs(answered) <= 2.0)  # Pendulum's torque bounds, applied in the graph


def test_training_operations_leave_a_verifiable_audit_trail(served: Served, tmp_path: Path) -> None:
    path = tmp_path / "trainer-audit.jsonl"
    spec = served.spec(model="audited", total=1024, interval=512)
    with AuditLog.open(path, component="trainer") as audit:
        TrainingRun(spec, keyring=served.keyring, audit=audit).run()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    events = [r["event"] for r in records]
    for event in (
        "train.run_start",
        "train.checkpoint",
        "export.done",
        "gate.decision",
        "promotion.done",
        "train.run_stop",
    ):
        assert event in events
    assert events.count("train.checkpoint") == 2
    start = next(r for r in records if r["event"] == "train.run_start")
    gate = next(r for r in records if r["event"] == "gate.decision")
    assert json.dumps(start).count(spec.spec_hash) == 1
    assert "candidate_return" in json.dumps(gate) and "live_return" in json.dumps(gate)
    assert verify_file(path).ok


def test_sidecar_promotes_through_a_restricted_repository_protocol_with_its_token(
    tmp_path: Path, keyring_path: Path, keyring: Keyring, start_server
) -> None:
    repository = tmp_path / "repo"
    repository.mkdir()
    tokens = tmp_path / "control.tokens"
    tokens.write_text("sidecar-token\n")
    tokens.chmod(0o600)
    server = start_server(
        repository,
        "--model-control-mode",
        "explicit",
        f"--grpc-restricted-protocol=model-repository:admin=@{tokens}",
    )
    served = Served(server, repository, tmp_path, keyring_path, keyring)
    header = '\ntoken_header = "triton-grpc-protocol-admin"\n'
    wrong = tmp_path / "wrong.tokens"
    wrong.write_text("not-the-token\n")
    refused = served.spec(model="guarded", total=512, interval=512)
    source = Path(refused.source)
    base = source.read_text().replace("[server]\n", f'[server]{header}token_file = "{wrong}"\n')
    source.write_text(base)
    with pytest.raises(PromotionError, match="refused to load guarded"):
        TrainingRun(load_spec(source), keyring=keyring).run()

    spec = served.spec(model="guarded2", total=512, interval=512)
    Path(spec.source).write_text(
        Path(spec.source)
        .read_text()
        .replace("[server]\n", f'[server]{header}token_file = "{tokens}"\n')
    )
    result = TrainingRun(load_spec(spec.source), keyring=keyring).run()
    assert [p.version for p in result.promotions] == [1]


def test_sidecar_promotes_into_a_mutual_tls_server_with_its_client_certificate(
    tmp_path: Path, keyring_path: Path, keyring: Keyring
) -> None:
    certs = make_certificates(tmp_path / "certs")
    repository = tmp_path / "repo"
    repository.mkdir()
    server = ServerProcess(
        repository,
        keyring_path,
        [
            "--model-control-mode=explicit",
            "--grpc-use-ssl-mutual=true",
            "--grpc-server-cert",
            str(certs.server.cert),
            "--grpc-server-key",
            str(certs.server.key),
            "--grpc-root-cert",
            str(certs.ca),
        ],
        client_options={
            "ssl": True,
            "root_certificates": str(certs.ca),
            "private_key": str(certs.client.key),
            "certificate_chain": str(certs.client.cert),
        },
    ).start()
    try:
        served = Served(server, repository, tmp_path, keyring_path, keyring)
        spec = served.spec(model="tls", total=512, interval=512)
        tls = (
            f'[server]\nssl = true\nroot_certificates = "{certs.ca}"\n'
            f'private_key = "{certs.client.key}"\ncertificate_chain = "{certs.client.cert}"\n'
        )
        Path(spec.source).write_text(Path(spec.source).read_text().replace("[server]\n", tls))
        result = TrainingRun(load_spec(spec.source), keyring=keyring).run()
    finally:
        server.stop()
    assert [p.version for p in result.promotions] == [1]


def test_sidecar_keeps_training_after_a_failed_mid_run_promotion(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_export = onnx_export.export_onnx
    exports: list[int] = []

    def first_export_corrupted(desc: PolicyDescription) -> bytes:
        exports.append(1)
        if len(exports) == 1:
            desc.actor[-1].weight[...] = -desc.actor[-1].weight
        return real_export(desc)

    monkeypatch.setattr(checked_policy, "export_onnx", first_export_corrupted)
    spec = served.spec(model="carry-on", total=1024, interval=512)
    result = TrainingRun(spec, keyring=served.keyring, continuous=True).run()
    assert result.failed_promotions == 1
    assert result.num_timesteps == 1024
    assert [p.version for p in result.promotions] == [1]


def test_gguf_first_run_publishes_gguf_and_onnx_that_answer_alike(served: Served) -> None:
    spec = served.spec(model="both", total=512, interval=512)
    Path(spec.source).write_text(
        Path(spec.source)
        .read_text()
        .replace("max_batch_size = 64\n", 'max_batch_size = 64\nformats = ["gguf", "onnx"]\n')
    )
    result = TrainingRun(load_spec(spec.source), keyring=served.keyring).run()
    assert [(p.model, p.version) for p in result.promotions] == [("both", 1), ("both_onnx", 1)]
    assert 'backend: "gguf"' in (served.repository / "both" / "config.pbtxt").read_text()
    assert (served.repository / "both" / "1" / "model.gguf.sealed").is_file()
    obs = np.random.default_rng(1).uniform(-2, 2, (64, 4)).astype(np.float32)
    client = served.server.client()
    try:
        from_gguf = infer(client, "both", obs).as_numpy("action")
        from_onnx = infer(client, "both_onnx", obs).as_numpy("action")
    finally:
        client.close()
    assert np.array_equal(from_gguf, from_onnx)


def test_sidecar_promotes_into_a_polling_server_without_control_calls(
    tmp_path: Path, keyring_path: Path, keyring: Keyring, start_server
) -> None:
    repository = tmp_path / "repo"
    repository.mkdir()
    server = start_server(repository, "--model-control-mode", "poll", "--repository-poll-secs", "1")
    served = Served(server, repository, tmp_path, keyring_path, keyring)
    spec = served.spec(model="polled", total=512, interval=512)
    result = TrainingRun(spec, keyring=keyring).run()
    assert [p.version for p in result.promotions] == [1]
    assert result.promotions[0].publish_to_serving_seconds < 30


def test_normalised_policy_is_served_from_raw_observations(served: Served) -> None:
    spec = served.spec(model="normalised", total=1024, interval=1024)
    Path(spec.source).write_text(
        Path(spec.source)
        .read_text()
        .replace("n_envs = 4\n", "n_envs = 4\nnormalize_observations = true\n")
    )
    run = TrainingRun(load_spec(spec.source), keyring=served.keyring)
    result = run.run()
    assert [p.version for p in result.promotions] == [1]
    assert run.model is not None and run.env is not None
    normalizer = run.env  # VecNormalize: what the policy saw in training
    obs = np.random.default_rng(2).uniform(-2, 2, (64, 4)).astype(np.float32)
    expected, _ = run.model.predict(normalizer.normalize_obs(obs), deterministic=True)
    client = served.server.client()
    try:
        answered = infer(client, "normalised", obs).as_numpy("action").reshape(-1)
    finally:
        client.close()
    assert 'string_value: "true"' in (served.repository / "normalised" / "config.pbtxt").read_text()
    assert np.array_equal(answered, expected)


def test_dqn_run_publishes_actions_and_q_values(served: Served) -> None:
    spec = served.spec(SAC_PENDULUM, model="dqn", total=1024, interval=512, episodes=3)
    text = (
        Path(spec.source)
        .read_text()
        .replace('id = "Pendulum-v1"', 'id = "CartPole-v1"')
        .replace('name = "SAC"', 'name = "DQN"')
        .replace("buffer_size = 5000", "buffer_size = 5000\ntarget_update_interval = 100")
    )
    Path(spec.source).write_text(text)
    result = TrainingRun(load_spec(spec.source), keyring=served.keyring).run()
    assert result.num_timesteps == 1024
    assert [p.version for p in result.promotions] == [1]
    client = served.server.client()
    try:
        answer = infer(client, "dqn", np.zeros((3, 4), np.float32))
    finally:
        client.close()
    q_values = answer.as_numpy("q_values")
    assert q_values.shape == (3, 2)
    assert np.array_equal(answer.as_numpy("action").reshape(-1), q_values.argmax(axis=1))
