"""The model manifest (issue 13, finding 5): what decides what is served (config.pbtxt, the
version set) is authenticated with the keyring. A disk change made without the key never
changes what a server serves nor rolls it back; `forseti rollback` does, and is audited.

One poll-mode server over one repository; each test works on its own model."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from forseti.core.repository.manifest import MANIFEST_NAME
from forseti.core.sealing.keyring import Keyring
from testkit.model_builders import POLICY_CONFIG, policy_onnx, publish_sealed, write_config
from testkit.server_process import ServerProcess, run_forseti

MODELS = ("tampered_config", "deleted_newest", "rolled_back", "replayed", "late_version")
OBS = np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(1, 8)


def _config(name: str) -> str:
    return POLICY_CONFIG.replace('name: "policy"', f'name: "{name}"')


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, keyring: Keyring) -> Path:
    root = tmp_path_factory.mktemp("manifest") / "repo"
    root.mkdir()
    for name in MODELS:
        write_config(root, name, _config(name))
        publish_sealed(root, name, policy_onnx(1), keyring, version=1)
        publish_sealed(root, name, policy_onnx(2), keyring, version=2)
    # A sealed model whose manifest was never written (sealed by hand, say).
    write_config(root, "unmanifested", _config("unmanifested"))
    publish_sealed(root, "unmanifested", policy_onnx(1), keyring, version=1)
    (root / "unmanifested" / MANIFEST_NAME).unlink()
    return root


@pytest.fixture(scope="module")
def server(repo: Path, keyring_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        repo,
        keyring_path,
        ["--model-control-mode", "poll", "--repository-poll-secs", "0.2"],
    ).start(wait_ready=False)
    proc.wait(lambda c: all(c.is_model_ready(m) for m in MODELS), 60)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.url)
    yield c
    c.close()


def served(client: grpcclient.InferenceServerClient, model: str) -> int:
    """The version a call naming no version is answered by."""
    tensor = grpcclient.InferInput("obs", list(OBS.shape), "FP32")
    tensor.set_data_from_numpy(OBS)
    return int(client.infer(model, [tensor]).get_response().model_version)


def reasons(client: grpcclient.InferenceServerClient, model: str) -> dict[str, str]:
    index = client.get_model_repository_index(as_json=True).get("models", [])
    return {m.get("version", ""): m.get("reason", "") for m in index if m["name"] == model}


def wait_for(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def polls_pass(server: ServerProcess, n: int = 3) -> None:
    """Let a few polls go by (0.2 s each) so that a change they would act on is seen."""
    time.sleep(0.2 * n + 0.3)


def test_a_version_policy_appended_without_the_key_changes_nothing(
    repo: Path, server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    name = "tampered_config"
    assert served(client, name) == 2
    with open(repo / name / "config.pbtxt", "a") as fh:
        fh.write("version_policy { specific { versions: [1] } }\n")
    wait_for(lambda: "model manifest" in reasons(client, name).get("2", ""), "the refusal")
    assert "not the one the model manifest authenticates" in reasons(client, name)["2"]
    assert served(client, name) == 2
    assert client.is_model_ready(name)


def test_deleting_the_newest_version_folder_does_not_roll_back(
    repo: Path, server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    name = "deleted_newest"
    shutil.rmtree(repo / name / "2")
    wait_for(lambda: "missing" in reasons(client, name).get("2", ""), "the missing folder noted")
    polls_pass(server)
    assert served(client, name) == 2
    reason = reasons(client, name)["2"]
    assert reason.startswith("reload failed, previous load serving: missing artifact")


def test_rollback_command_serves_the_pinned_version_and_is_audited(
    repo: Path,
    keyring_path: Path,
    tmp_path: Path,
    server: ServerProcess,
    client: grpcclient.InferenceServerClient,
) -> None:
    name = "rolled_back"
    audit = tmp_path / "audit.log"
    result = run_forseti(
        "rollback",
        "--keyring",
        str(keyring_path),
        "--model-repository",
        str(repo),
        "--audit-log",
        str(audit),
        name,
        "1",
    )
    assert result.returncode == 0, result.stderr
    wait_for(lambda: served(client, name) == 1, "the rollback to be served")
    record = json.loads(audit.read_text().splitlines()[-1])
    assert record["event"] == "model.rollback"
    assert record["fields"]["model"] == name and record["fields"]["pin"] == [1]
    assert run_forseti("audit", "verify", str(audit)).returncode == 0

    refused = run_forseti(
        "rollback", "--keyring", str(keyring_path), "--model-repository", str(repo), name, "7"
    )
    assert refused.returncode == 1 and "not committed" in refused.stderr

    unpinned = run_forseti(
        "rollback", "--keyring", str(keyring_path), "--model-repository", str(repo), "--unpin", name
    )
    assert unpinned.returncode == 0, unpinned.stderr
    wait_for(lambda: served(client, name) == 2, "the version policy's choice again")


def test_an_older_manifest_put_back_is_refused(
    repo: Path, keyring: Keyring, server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    name = "replayed"
    old = (repo / name / MANIFEST_NAME).read_bytes()  # serial 2: versions 1 and 2
    publish_sealed(repo, name, policy_onnx(3), keyring)
    wait_for(lambda: served(client, name) == 3, "v3")
    (repo / name / MANIFEST_NAME).write_bytes(old)
    wait_for(lambda: "older than serial" in reasons(client, name).get("3", ""), "the refusal")
    assert served(client, name) == 3


def test_a_version_folder_outside_the_manifest_is_never_served(
    repo: Path, keyring: Keyring, server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    name = "late_version"
    shutil.copytree(repo / name / "2", repo / name / "3")  # not committed (and bound to v2)
    wait_for(lambda: "late_version" in server.log() and "not in the model manifest" in server.log(),
             "the warning")  # fmt: skip
    polls_pass(server)
    assert served(client, name) == 2
    assert "3" not in reasons(client, name)


def test_a_sealed_model_without_a_manifest_is_refused_naming_the_command(
    server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    reason = reasons(client, "unmanifested")[""]
    assert "no model manifest" in reason and "forseti seal" in reason
    assert not client.is_model_ready("unmanifested")


def test_forseti_publish_prints_the_version_the_server_then_serves(
    repo: Path, keyring_path: Path, tmp_path: Path, client: grpcclient.InferenceServerClient
) -> None:
    model_file = tmp_path / "model.onnx"
    model_file.write_bytes(policy_onnx(7))
    config = tmp_path / "config.pbtxt"
    config.write_text(_config("published"))
    result = run_forseti(
        "publish",
        "--keyring",
        str(keyring_path),
        "--model-repository",
        str(repo),
        "--config",
        str(config),
        "published",
        str(model_file),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"
    wait_for(lambda: client.is_model_ready("published"), "the published model")
    assert served(client, "published") == 1
    assert not (repo / "published" / "1" / "model.onnx").exists()  # sealed, not plaintext


def test_allow_plaintext_serves_a_plain_triton_model_and_warns_at_start(
    tmp_path: Path, start_server
) -> None:
    repo = tmp_path / "plain"
    write_config(repo, "plain", _config("plain"))
    (repo / "plain" / "1").mkdir()
    (repo / "plain" / "1" / "model.onnx").write_bytes(policy_onnx(1))
    server = start_server(repo, "--allow-plaintext", keyring=None)
    assert "--allow-plaintext: models without a sealed manifest" in server.log()
    client = grpcclient.InferenceServerClient(server.url)
    try:
        assert served(client, "plain") == 1
    finally:
        client.close()


def test_two_publishers_on_a_folder_commit_distinct_versions_in_one_manifest(
    tmp_path: Path, keyring: Keyring
) -> None:
    import threading

    from forseti.core.repository.manifest import read_manifest
    from forseti.core.storage import open_storage

    repo = tmp_path / "repo"
    write_config(repo, "policy", POLICY_CONFIG)
    got: list[int] = []

    def publisher(tag: int) -> None:
        for n in range(3):
            got.append(publish_sealed(repo, "policy", policy_onnx(tag + n), keyring))

    threads = [threading.Thread(target=publisher, args=(10 * i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    found = read_manifest(open_storage(repo), "policy", keyring)
    assert found is not None and sorted(found[0].versions) == [1, 2, 3, 4, 5, 6]
    assert found[0].serial == 6


def test_explicit_mode_serves_a_rollback_at_the_next_load(tmp_path: Path, keyring: Keyring) -> None:
    import asyncio

    from forseti.core.repository.manifest import ModelManifest, commit_manifest, pinned
    from forseti.core.storage import open_storage
    from forseti.server.registry.model_registry import ModelRegistry

    repo = tmp_path / "repo"
    write_config(repo, "policy", POLICY_CONFIG)
    for tag in (1, 2):
        publish_sealed(repo, "policy", policy_onnx(tag), keyring)
    registry = ModelRegistry(repo, keyring, allow_plaintext=False)

    def pin_v1(current: ModelManifest | None) -> ModelManifest:
        assert current is not None
        return pinned(current, [1], "rollback")

    async def scenario() -> list[list[int]]:
        seen = []
        await registry.load_model("policy")
        seen.append([lv.version for lv in registry.versions_of("policy")])
        commit_manifest(open_storage(repo), "policy", keyring, pin_v1)
        seen.append([lv.version for lv in registry.versions_of("policy")])  # no load yet
        await registry.load_model("policy")
        seen.append([lv.version for lv in registry.versions_of("policy")])
        registry.release_all()
        return seen

    assert asyncio.run(scenario()) == [[2], [2], [1]]
