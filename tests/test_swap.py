"""Hot swaps under live traffic: no call fails, answers move forward, old versions are freed.

Real `forseti serve` subprocesses, four client threads each with its own tritonclient.grpc
client making policy decision calls (no version named) for the whole test. policy_onnx(tag)
answers action == tag % 4, and versions N here are built with tag N, so every answer names
the version that produced it twice: by its action and by the response's model_version.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.sealed import seal_bytes
from testkit.model_builders import (
    POLICY_CONFIG,
    authenticate_model,
    policy_onnx,
    publish_sealed,
    write_config,
)
from testkit.server_process import ServerProcess

THREADS = 4
SEALED = "model.onnx.sealed"
OBS = np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(1, 8)


def infer_policy(client: grpcclient.InferenceServerClient) -> tuple[int, int]:
    """One decision call with no version named; returns (action, model_version)."""
    inp = grpcclient.InferInput("obs", [1, 8], "FP32")
    inp.set_data_from_numpy(OBS)
    result = client.infer("policy", [inp], outputs=[grpcclient.InferRequestedOutput("action")])
    return int(result.as_numpy("action")[0, 0]), int(result.get_response().model_version)


def index_entries(client: grpcclient.InferenceServerClient, name: str) -> dict[str, dict]:
    index = client.get_model_repository_index(as_json=True).get("models", [])
    return {m.get("version", ""): m for m in index if m["name"] == name}


def wait_for(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> float:
    """Wait until `check()` holds; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Caller:
    """One client thread's record: every (action, version) answer and every failure."""

    answers: list[tuple[int, int]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def last_version(self) -> int:
        return self.answers[-1][1] if self.answers else 0


class Traffic:
    """THREADS threads, each with its own client, calling policy until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.callers = [Caller() for _ in range(THREADS)]
        self.threads = [
            threading.Thread(target=self._run, args=(c,), daemon=True) for c in self.callers
        ]

    def _run(self, caller: Caller) -> None:
        client = grpcclient.InferenceServerClient(self.url)
        try:
            while not self.stop.is_set():
                try:
                    caller.answers.append(infer_policy(client))
                except InferenceServerException as exc:
                    caller.failures.append(f"{exc.status()}: {exc.message()}")
                    time.sleep(0.01)
        finally:
            client.close()

    def all_saw(self, version: int) -> bool:
        return all(c.last_version >= version for c in self.callers)

    def calls(self) -> int:
        return sum(len(c.answers) for c in self.callers)

    def failures(self) -> list[str]:
        return [f for c in self.callers for f in c.failures]

    def wait_calls(self, more: int, timeout: float = 10.0) -> None:
        """Wait until every thread has made `more` further calls."""
        targets = [len(c.answers) + more for c in self.callers]
        wait_for(
            lambda: all(len(c.answers) >= t for c, t in zip(self.callers, targets, strict=True)),
            timeout,
            f"{more} more calls on every thread",
        )


@contextmanager
def traffic(server: ServerProcess) -> Iterator[Traffic]:
    t = Traffic(server.url)
    for thread in t.threads:
        thread.start()
    try:
        t.wait_calls(5)
        yield t
    finally:
        t.stop.set()
        for thread in t.threads:
            thread.join(10)
    assert not any(thread.is_alive() for thread in t.threads)


def assert_consistent_and_monotone(t: Traffic, versions: list[int]) -> None:
    """No failures; each answer's action matches its version; per thread the versions
    never go back; every thread ends on the last version."""
    assert t.failures() == [], t.failures()[:5]
    for i, caller in enumerate(t.callers):
        seen = [v for _, v in caller.answers]
        assert all(a == v % 4 for a, v in caller.answers), f"thread {i}: action/version mismatch"
        assert set(seen) <= set(versions), f"thread {i} saw {sorted(set(seen))}"
        assert seen == sorted(seen), f"thread {i} went back to an older version"
        assert seen[0] == versions[0] and seen[-1] == versions[-1], (i, seen[0], seen[-1])


def full_log(server: ServerProcess) -> str:
    assert server.log_path is not None
    return server.log_path.read_text(errors="replace")


# ---- explicit mode ----------------------------------------------------------------------------


@pytest.fixture(params=["inline", "threaded"])
def execution(request: pytest.FixtureRequest, repository: Path, keyring: Keyring) -> str:
    """Run policy on the event loop (inline) or on a worker thread (threaded), where
    requests are really in flight on the old version while it is swapped out."""
    choice = f'{{ key: "forseti.execution" value: {{ string_value: "{request.param}" }} }}'
    write_config(repository, "policy", POLICY_CONFIG + f"parameters {choice}\n")
    authenticate_model(repository, "policy", keyring)  # the operator's new config, with the key
    return request.param


def test_explicit_swaps_v1_v2_v3_under_traffic_without_a_failed_call(
    execution: str, repository: Path, keyring: Keyring, start_server
) -> None:
    server = start_server(repository, "--model-control-mode", "explicit", "--load-model", "policy")
    client = grpcclient.InferenceServerClient(server.url)
    try:
        with traffic(server) as t:
            for version in (2, 3):
                assert publish_sealed(repository, "policy", policy_onnx(version), keyring) == (
                    version
                )
                t.wait_calls(5)  # the new folder is on disk; the old version still answers
                assert t.all_saw(version - 1) and not any(
                    c.last_version >= version for c in t.callers
                )
                client.load_model("policy")
                # The load call returns only once the new version takes requests.
                assert infer_policy(client) == (version % 4, version)
                wait_for(lambda v=version: t.all_saw(v), what=f"every thread to see v{version}")
                t.wait_calls(5)
        assert_consistent_and_monotone(t, [1, 2, 3])
        for i, caller in enumerate(t.callers):
            assert {v for _, v in caller.answers} == {1, 2, 3}, f"thread {i} skipped a version"
    finally:
        client.close()


def test_failed_load_under_traffic_leaves_v1_serving_without_a_failed_call(
    repository: Path, keyring: Keyring, start_server
) -> None:
    server = start_server(repository, "--model-control-mode", "explicit", "--load-model", "policy")
    client = grpcclient.InferenceServerClient(server.url)
    try:
        with traffic(server) as t:
            publish_sealed(repository, "policy", policy_onnx(2), keyring, version=2)
            path = repository / "policy" / "2" / SEALED
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            path.write_bytes(bytes(data))
            with pytest.raises(InferenceServerException) as excinfo:
                client.load_model("policy")
            assert excinfo.value.status() == "StatusCode.INVALID_ARGUMENT"
            t.wait_calls(20)
        assert t.failures() == []
        assert {v for c in t.callers for _, v in c.answers} == {1}
        assert_consistent_and_monotone(t, [1])
        assert index_entries(client, "policy")["2"]["state"] == "UNAVAILABLE"
        assert infer_policy(client) == (1, 1)
    finally:
        client.close()


def test_swapped_out_version_is_released_after_draining(
    execution: str, repository: Path, keyring: Keyring, start_server
) -> None:
    server = start_server(repository, "--model-control-mode", "explicit", "--load-model", "policy")
    released = re.compile(r"version released .*model=policy version=(\d+)\b")
    client = grpcclient.InferenceServerClient(server.url)
    try:
        with traffic(server) as t:
            assert released.findall(full_log(server)) == []
            publish_sealed(repository, "policy", policy_onnx(2), keyring)
            client.load_model("policy")
            wait_for(
                lambda: released.findall(full_log(server)) == ["1"],
                what="v1 to be released",
            )
            t.wait_calls(5)
        assert t.failures() == []
        # v2 stays loaded: only the swapped-out version was released.
        assert released.findall(full_log(server)) == ["1"]
        states = {k: e["state"] for k, e in index_entries(client, "policy").items()}
        assert states == {"2": "READY"}
        assert infer_policy(client) == (2, 2)
    finally:
        client.close()


# ---- poll mode --------------------------------------------------------------------------------


@pytest.fixture
def poll_server(repository: Path, start_server) -> ServerProcess:
    return start_server(repository, "--model-control-mode", "poll", "--repository-poll-secs", "0.2")


def test_poll_picks_up_a_published_version_under_traffic_without_a_failed_call(
    repository: Path, keyring: Keyring, poll_server: ServerProcess
) -> None:
    client = grpcclient.InferenceServerClient(poll_server.url)
    try:
        with traffic(poll_server) as t:
            publish_sealed(repository, "policy", policy_onnx(2), keyring)
            took = wait_for(lambda: t.all_saw(2), timeout=10, what="every thread to see v2")
            assert took < 5, f"poll mode took {took:.1f}s to swap"
            t.wait_calls(5)
        assert_consistent_and_monotone(t, [1, 2])
        assert infer_policy(client) == (2, 2)
    finally:
        client.close()


def test_poll_ignores_a_hidden_publish_folder(repository: Path, poll_server: ServerProcess) -> None:
    hidden = repository / "policy" / ".publish-xyz"
    hidden.mkdir()
    (hidden / SEALED).write_bytes(b"FSEAL\x01 definitely not a sealed model")
    client = grpcclient.InferenceServerClient(poll_server.url)
    try:
        log_before = full_log(poll_server)
        time.sleep(1.0)  # five poll intervals
        assert {k: e["state"] for k, e in index_entries(client, "policy").items()} == {"1": "READY"}
        assert infer_policy(client) == (1, 1)
        new_lines = full_log(poll_server)[len(log_before) :]
        assert "load failed" not in new_lines
        assert "publish-xyz" not in new_lines
    finally:
        client.close()


def test_poll_never_loads_a_version_folder_the_manifest_does_not_commit(
    repository: Path, keyring: Keyring, poll_server: ServerProcess
) -> None:
    client = grpcclient.InferenceServerClient(poll_server.url)
    try:
        with traffic(poll_server) as t:
            publish_sealed(repository, "policy", policy_onnx(2), keyring)
            wait_for(lambda: t.all_saw(2), what="every thread to see v2")
            # A copy straight into a visible numeric folder (no hidden folder, no rename, no
            # manifest update) that stopped half way through the file.
            blob = seal_bytes(
                policy_onnx(3), keyring, model="policy", version=3, filename="model.onnx"
            )
            (repository / "policy" / "3").mkdir()
            (repository / "policy" / "3" / SEALED).write_bytes(blob[: len(blob) // 2])
            wait_for(
                lambda: "version folder not in the model manifest" in poll_server.log(),
                what="v3 to be ignored",
            )
            t.wait_calls(20)
        assert_consistent_and_monotone(t, [1, 2])
        entries = index_entries(client, "policy")
        assert "3" not in entries and entries["2"]["state"] == "READY"
        assert infer_policy(client) == (2, 2)
    finally:
        client.close()


def test_poll_loads_a_hand_copied_version_once_the_key_holder_commits_it(
    repository: Path, keyring: Keyring, poll_server: ServerProcess
) -> None:
    blob = seal_bytes(policy_onnx(2), keyring, model="policy", version=2, filename="model.onnx")
    (repository / "policy" / "2").mkdir()
    (repository / "policy" / "2" / SEALED).write_bytes(blob[:100])
    client = grpcclient.InferenceServerClient(poll_server.url)
    try:
        wait_for(
            lambda: "version folder not in the model manifest" in poll_server.log(),
            what="the half-written v2 to be ignored",
        )
        with traffic(poll_server) as t:
            (repository / "policy" / "2" / SEALED).write_bytes(blob)
            t.wait_calls(5)
            assert t.all_saw(1) and not any(c.last_version >= 2 for c in t.callers)
            authenticate_model(repository, "policy", keyring)  # what `forseti seal` does
            wait_for(lambda: t.all_saw(2), what="every thread to see the committed v2")
            t.wait_calls(5)
        assert_consistent_and_monotone(t, [1, 2])
        assert {k: e["state"] for k, e in index_entries(client, "policy").items()} == {"2": "READY"}
    finally:
        client.close()
