"""Repositories on an object store (issue 14, items 1-3), against a real S3 protocol: moto in
server mode on loopback, started once for the module. Servers reach the store through a
second door (another moto server on the same buckets) that a test can close for an outage
while publishers keep using the first."""

from __future__ import annotations

import itertools
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from forseti.core.repository.listing import COMMIT_NAME, list_model
from forseti.core.repository.manifest import read_manifest
from forseti.core.repository.publish import publish_model_version
from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.sealed import seal_bytes
from forseti.core.storage import open_storage
from testkit.model_builders import POLICY_CONFIG, policy_onnx
from testkit.object_store import S3Server, s3_server
from testkit.server_process import ServerProcess, run_forseti

OBS = np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(1, 8)
POLL = ["--model-control-mode", "poll", "--repository-poll-secs", "0.2"]


@pytest.fixture(scope="module")
def store() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def door(store: S3Server) -> Iterator[S3Server]:
    """The servers' way to the store."""
    second = S3Server()
    second.start()
    yield second
    second.stop()


@pytest.fixture
def repo_url(store: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh bucket per test, the repository under a prefix in it."""
    bucket = request.node.name.lower().replace("_", "-")[:40].strip("-")
    return store.bucket(bucket) + "/models"


@pytest.fixture
def servers(
    tmp_path: Path, keyring_path: Path, door: S3Server
) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []
    numbers = itertools.count()  # next() is atomic: replicas may start side by side

    def start(
        url: str, *args: str, wait_model: str = "policy", env: dict[str, str] | None = None
    ) -> ServerProcess:
        proc = ServerProcess(
            url,  # type: ignore[arg-type]  # a URL where a folder usually goes
            keyring_path,
            [*POLL, *args],
            log_path=tmp_path / f"server-{next(numbers)}.log",
            env={**door.env, **(env or {})},
        )
        started.append(proc)
        proc.start(wait_ready=False)
        proc.wait(lambda c: c.is_model_ready(wait_model), 60)
        return proc

    yield start
    for proc in started:
        proc.stop()


def publish(url: str, keyring: Keyring, tag: int) -> int:
    return publish_model_version(
        open_storage(url),
        "policy",
        {"model.onnx": policy_onnx(tag)},
        keyring=keyring,
        config_text=POLICY_CONFIG,
    ).version


def served(client: grpcclient.InferenceServerClient) -> int:
    tensor = grpcclient.InferInput("obs", list(OBS.shape), "FP32")
    tensor.set_data_from_numpy(OBS)
    return int(client.infer("policy", [tensor]).get_response().model_version)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_a_repository_published_with_forseti_publish_is_served_from_s3(
    repo_url: str, keyring_path: Path, tmp_path: Path, servers
) -> None:
    (tmp_path / "model.onnx").write_bytes(policy_onnx(1))
    (tmp_path / "config.pbtxt").write_text(POLICY_CONFIG)
    result = run_forseti(
        "publish",
        "--keyring",
        str(keyring_path),
        "--model-repository",
        repo_url,
        "--config",
        str(tmp_path / "config.pbtxt"),
        "policy",
        str(tmp_path / "model.onnx"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"
    server = servers(repo_url)
    with server.client() as client:
        assert served(client) == 1
    keys = {i.key for i in open_storage(repo_url).list_all("policy")}
    assert "policy/1/model.onnx.sealed" in keys and "policy/1/model.onnx" not in keys


def test_a_version_whose_manifest_commit_never_came_is_never_loaded(
    repo_url: str, keyring: Keyring, servers
) -> None:
    publish(repo_url, keyring, 1)
    server = servers(repo_url)
    storage = open_storage(repo_url)
    # A publisher that died after writing v2's objects (and even its marker), before the
    # manifest update that commits it.
    blob = seal_bytes(policy_onnx(2), keyring, model="policy", version=2, filename="model.onnx")
    storage.write("policy/2/model.onnx.sealed", blob)
    storage.write(f"policy/2/{COMMIT_NAME}", b"{}")
    wait_for(lambda: "not in the model manifest" in server.log(), "the poll to see v2")
    with server.client() as client:
        for _ in range(10):
            assert served(client) == 1
        time.sleep(0.6)
        assert served(client) == 1


def test_a_plaintext_version_without_its_commit_marker_is_never_loaded(
    repo_url: str, door: S3Server, servers
) -> None:
    storage = open_storage(repo_url)
    storage.write("policy/config.pbtxt", POLICY_CONFIG.encode())
    storage.write("policy/1/model.onnx", policy_onnx(1))
    storage.write(f"policy/1/{COMMIT_NAME}", b"{}")
    # Triton's form with the store's address in the URL, which wins over the environment's.
    url = repo_url.replace("s3://", f"s3://127.0.0.1:{door.port}/")
    server = servers(url, "--allow-plaintext", env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    with server.client() as client:
        storage.write("policy/2/model.onnx", policy_onnx(2))  # objects, no marker yet
        time.sleep(1.0)  # five polls
        assert served(client) == 1
        storage.write(f"policy/2/{COMMIT_NAME}", b"{}")
        wait_for(lambda: served(client) == 2, "the committed v2")


def test_two_concurrent_publishers_get_distinct_versions(repo_url: str, keyring: Keyring) -> None:
    publish(repo_url, keyring, 0)
    got: list[list[int]] = [[], []]

    def publisher(i: int) -> None:
        for n in range(4):
            got[i].append(publish(repo_url, keyring, 10 * i + n))

    threads = [threading.Thread(target=publisher, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    numbers = got[0] + got[1]
    assert len(numbers) == 8 and len(set(numbers)) == 8
    found = read_manifest(open_storage(repo_url), "policy", keyring)
    assert found is not None
    assert set(found[0].versions) == {1, *numbers}
    committed = list_model(open_storage(repo_url), "policy").versions
    assert all(committed[v].committed for v in numbers)


def _poll_errors(server: ServerProcess) -> float:
    text = urllib.request.urlopen(
        f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10
    ).read()
    for line in text.decode().splitlines():
        # Counters are written with bare names, as Triton writes its own.
        if line.startswith("forseti_repository_poll_errors{"):
            return float(line.split()[-1])
    raise AssertionError("forseti_repository_poll_errors not exported")


def test_a_store_outage_under_load_fails_no_call_and_the_next_good_poll_catches_up(
    repo_url: str, keyring: Keyring, door: S3Server, servers
) -> None:
    publish(repo_url, keyring, 1)
    server = servers(repo_url)
    failures: list[str] = []
    answers: list[int] = []
    stop = threading.Event()

    def caller() -> None:
        with server.client() as client:
            while not stop.is_set():
                try:
                    answers.append(served(client))
                except Exception as exc:
                    failures.append(str(exc))

    threads = [threading.Thread(target=caller) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        with server.client() as client:
            door.stop()
            wait_for(lambda: _poll_errors(server) >= 3, "three failed polls")
            assert client.is_server_ready() and client.is_model_ready("policy")
            assert publish(repo_url, keyring, 2) == 2  # through the other door
            time.sleep(0.5)
            assert served(client) == 1
            door.start()
            wait_for(lambda: served(client) == 2, "the catch-up to v2")
            assert client.is_server_ready()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        if not door.running:
            door.start()
    assert failures == []
    assert len(answers) > 20 and set(answers) == {1, 2}
    assert server.log_path is not None
    assert server.log_path.read_text().count("model repository unreadable") == 1


def test_three_replicas_on_one_store_converge_on_a_new_version(
    repo_url: str, keyring: Keyring, servers
) -> None:
    publish(repo_url, keyring, 1)
    with ThreadPoolExecutor(3) as pool:  # started side by side
        replicas = list(pool.map(lambda _: servers(repo_url), range(3)))
    clients = [r.client() for r in replicas]
    try:
        assert [served(c) for c in clients] == [1, 1, 1]
        assert publish(repo_url, keyring, 2) == 2
        wait_for(lambda: [served(c) for c in clients] == [2, 2, 2], "every replica on v2")
    finally:
        for c in clients:
            c.close()


def test_explicit_mode_loads_a_new_version_from_s3_on_request(
    repo_url: str, keyring: Keyring, servers
) -> None:
    publish(repo_url, keyring, 1)
    server = servers(repo_url, "--model-control-mode", "explicit", "--load-model", "policy")
    with server.client() as client:
        assert served(client) == 1
        assert publish(repo_url, keyring, 2) == 2
        time.sleep(0.5)
        assert served(client) == 1  # nothing polls in explicit mode
        client.load_model("policy")
        assert served(client) == 2
        index = client.get_model_repository_index(as_json=True)["models"]
        assert [(m["name"], m["version"], m["state"]) for m in index] == [("policy", "2", "READY")]


def test_an_explicit_load_during_a_store_outage_is_unavailable_and_the_live_version_serves(
    repo_url: str, keyring: Keyring, door: S3Server, servers
) -> None:
    publish(repo_url, keyring, 1)
    server = servers(repo_url, "--model-control-mode", "explicit", "--load-model", "policy")
    with server.client() as client:
        door.stop()
        try:
            with pytest.raises(InferenceServerException) as refused:
                client.load_model("policy")
            assert served(client) == 1
        finally:
            door.start()
    # Retryable, not the load failure (INVALID_ARGUMENT) a bad model gets.
    assert refused.value.status() == "StatusCode.UNAVAILABLE"
    assert "the model repository could not be read" in refused.value.message()
    assert "keep serving" in refused.value.message()
