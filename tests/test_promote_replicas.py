"""A promotion reaches every replica: the sidecar's promotion code publishes once and confirms
on three real servers over one repository on a local S3 server (moto on loopback; two replicas
in explicit mode, one polling); with a replica killed it fails and names it, the others serve
the new version, and the audit log says which."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from forseti.core.audit import AuditLog
from forseti.core.repository.publish import publish_model_version
from forseti.core.sealing.keyring import Keyring
from forseti.core.storage import open_storage
from forseti.trainer_sidecar.promote import PromotionError, promote
from forseti.trainer_sidecar.replicas import (
    ReplicaError,
    join_address,
    open_replicas,
    replica_addresses,
    resolve_all,
)
from testkit.model_builders import OBS_DIM, POLICY_CONFIG, policy_onnx
from testkit.object_store import S3Server, s3_server
from testkit.server_process import ServerProcess

PROBE = np.zeros((1, OBS_DIM), np.float32)


@pytest.fixture(scope="module")
def store() -> Iterator[S3Server]:
    """A local S3 server, its address in this process's AWS environment (the publisher's)."""
    with s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory,
    keyring: Keyring,
    keyring_path: Path,
    store: S3Server,
) -> Iterator[list[ServerProcess]]:
    url = store.bucket("replicas") + "/models"
    publish_model_version(
        open_storage(url),
        "policy",
        {"model.onnx": policy_onnx(1)},
        keyring=keyring,
        config_text=POLICY_CONFIG,
    )
    logs = tmp_path_factory.mktemp("replica-logs")
    explicit = ["--model-control-mode", "explicit", "--load-model", "policy"]
    poll = ["--model-control-mode", "poll", "--repository-poll-secs", "0.2"]
    servers = [
        ServerProcess(
            url,  # type: ignore[arg-type]  # a URL where a folder usually goes
            keyring_path,
            args,
            env=store.env,
            log_path=logs / f"server-{i}.log",
        )
        for i, args in enumerate((explicit, explicit, poll))
    ]
    try:
        # Started side by side: each start is mostly the interpreter's imports.
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda server: server.start(), servers))
        yield servers
    finally:
        for server in servers:
            server.stop()


def promote_to(servers: list[ServerProcess], keyring: Keyring, tag: int, **kwargs):
    with open_replicas([s.url for s in servers], {}) as replicas:
        return promote(
            replicas,
            repository=servers[0].repository,
            model="policy",
            config_text=POLICY_CONFIG,
            artifacts={"model.onnx": policy_onnx(tag)},
            manifest={"test": True},
            keyring=keyring,
            probe=PROBE,
            **kwargs,
        )


def answered_version(server: ServerProcess) -> str:
    with server.client() as client:
        obs = grpcclient.InferInput("obs", list(PROBE.shape), "FP32")
        obs.set_data_from_numpy(PROBE)
        return str(client.infer("policy", [obs]).get_response().model_version)


def test_promotion_is_confirmed_on_every_replica_in_explicit_and_poll_mode(
    replicas: list[ServerProcess], keyring: Keyring
) -> None:
    promotion = promote_to(replicas, keyring, tag=2, timeout_s=60)
    assert sorted(promotion.replica_seconds) == sorted(s.url for s in replicas)
    assert promotion.publish_to_serving_seconds == max(promotion.replica_seconds.values())
    for server in replicas:
        with server.client() as client:
            assert client.is_model_ready("policy", str(promotion.version))
        assert answered_version(server) == str(promotion.version)


def test_promotion_with_a_replica_down_fails_and_names_it(
    replicas: list[ServerProcess], keyring: Keyring
) -> None:
    down = replicas[1]
    down.kill()
    try:
        with pytest.raises(PromotionError) as excinfo:
            promote_to(replicas, keyring, tag=3, timeout_s=20)
        error = excinfo.value
        assert list(error.failed) == [down.url]
        assert down.url in str(error)
        assert sorted(error.served) == sorted([replicas[0].url, replicas[2].url])
        # Report partial: the replicas that took the new version keep serving it.
        assert error.version is not None
        for server in (replicas[0], replicas[2]):
            assert answered_version(server) == str(error.version)
    finally:
        down.restart()


@pytest.mark.slow
def test_the_sidecar_fails_a_promotion_a_replica_misses_and_audits_which(
    replicas: list[ServerProcess], keyring: Keyring, keyring_path: Path, tmp_path: Path
) -> None:
    """forseti train's own promotion step, with [server] endpoints naming a live replica and
    a port nobody listens on (a replica that is down)."""
    from forseti.trainer_sidecar.run import TrainingRun
    from forseti.trainer_sidecar.spec import load_spec

    from .training_specs import PPO_CARTPOLE, write_spec

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{s.getsockname()[1]}"
    live = replicas[0].url
    audit_path = tmp_path / "audit.log"
    spec_path = write_spec(
        tmp_path / "spec.toml",
        PPO_CARTPOLE,
        repository=replicas[0].repository,
        run_dir=tmp_path / "run",
        url=live,
        keyring=keyring_path,
        model="fleet_cartpole",
        total=256,
        interval=256,
        episodes=2,
        extra=f'endpoints = ["{live}", "{nobody}"]\nready_timeout_s = 20\n'
        f'audit_log = "{audit_path}"\n',
    )
    audit = AuditLog.open(audit_path, component="trainer")
    try:
        with pytest.raises(PromotionError) as excinfo:
            TrainingRun(load_spec(spec_path), keyring=keyring, audit=audit).run()
    finally:
        audit.close()
    assert nobody in str(excinfo.value)
    records = [json.loads(line) for line in audit_path.read_text().splitlines()]
    incomplete = [r for r in records if r["event"] == "promotion.incomplete"]
    assert len(incomplete) == 1, records
    fields = json.dumps(incomplete[0])
    assert nobody in fields and live in fields


def test_replica_addresses_resolve_every_record_of_a_name() -> None:
    records = resolve_all("localhost:8001")
    assert "127.0.0.1:8001" in records or "[::1]:8001" in records
    assert len(records) == len(set(records))
    assert replica_addresses("a:1", ("b:2", "c:3", "b:2"), None) == ["b:2", "c:3"]
    assert replica_addresses("a:1", (), None) == ["a:1"]
    assert join_address("::1", 8001) == "[::1]:8001"
    with pytest.raises(ReplicaError, match="cannot resolve"):
        resolve_all("no-such-host.invalid:8001")
    with pytest.raises(ReplicaError, match="not host:port"):
        resolve_all("no-port")
    assert json.dumps(records)


SPEC = """
[model]
name = "cartpole"
repository = "repo"

[env]
id = "CartPole-v1"
n_envs = 2

[algorithm]
name = "PPO"
total_timesteps = 1024

[algorithm.hyperparameters]
n_steps = 64

[server]
"""


def server_spec(tmp_path: Path, lines: str):
    from forseti.trainer_sidecar.spec import load_spec

    path = tmp_path / "spec.toml"
    path.write_text(SPEC + lines)
    return load_spec(path).server


def test_spec_server_takes_every_replicas_endpoints_or_a_dns_name(tmp_path: Path) -> None:
    from forseti.trainer_sidecar.spec import SpecError

    spec = server_spec(tmp_path, 'endpoints = ["10.0.0.1:8001", "10.0.0.2:8001"]\n')
    assert spec.endpoints == ("10.0.0.1:8001", "10.0.0.2:8001")
    assert server_spec(tmp_path, 'replicas_dns = "forseti-headless:8001"\n').replicas_dns == (
        "forseti-headless:8001"
    )
    with pytest.raises(SpecError, match="not both"):
        server_spec(tmp_path, 'endpoints = ["a:1"]\nreplicas_dns = "b:2"\n')
    with pytest.raises(SpecError, match="not host:port"):
        server_spec(tmp_path, 'endpoints = ["no-port"]\n')
