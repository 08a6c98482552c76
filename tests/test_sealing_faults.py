"""Faulty artifacts and configs never replace a live version, and the reason is visible.

Real `forseti serve` subprocesses, real tritonclient.grpc, real files on disk. Every fault
is made the way it would happen in the field (a flipped bit, a cut-off copy, a file moved
between folders, the wrong key, an unsealed file, a missing file, a model that does not fit
its config), and each one must leave the previous version answering.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import numpy_helper
from tritonclient.utils import InferenceServerException

from forseti.core.repository.manifest import MANIFEST_NAME
from forseti.core.sealing.keyring import Keyring
from testkit.model_builders import (
    POLICY_CONFIG,
    all_types_onnx,
    commit_version,
    policy_onnx,
    publish_sealed,
    simple_onnx,
    write_config,
)

SEALED = "model.onnx.sealed"
OBS = np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(1, 8)


# ---- helpers --------------------------------------------------------------------------------


def infer_policy(client: grpcclient.InferenceServerClient, model: str = "policy"):
    """One decision call with no version named; returns (action, model_version)."""
    inp = grpcclient.InferInput("obs", [1, 8], "FP32")
    inp.set_data_from_numpy(OBS)
    result = client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("action")])
    return int(result.as_numpy("action")[0, 0]), result.get_response().model_version


def index_entries(client: grpcclient.InferenceServerClient, name: str) -> dict[str, dict]:
    """RepositoryIndex entries of one model, keyed by version ('' for a model-level entry)."""
    index = client.get_model_repository_index(as_json=True).get("models", [])
    return {m.get("version", ""): m for m in index if m["name"] == name}


def wait_for(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


# ---- a faulty v2 never replaces v1 ------------------------------------------------------------


def _flipped_byte(repo: Path, keyring: Keyring) -> None:
    publish_sealed(repo, "policy", policy_onnx(2), keyring, version=2)
    path = repo / "policy" / "2" / SEALED
    flip_byte(path, path.stat().st_size // 2)


def _truncated(repo: Path, keyring: Keyring) -> None:
    publish_sealed(repo, "policy", policy_onnx(2), keyring, version=2)
    path = repo / "policy" / "2" / SEALED
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _v1_copied_to_v2(repo: Path, keyring: Keyring) -> None:
    (repo / "policy" / "2").mkdir()
    shutil.copyfile(repo / "policy" / "1" / SEALED, repo / "policy" / "2" / SEALED)
    commit_version(repo, "policy", 2, keyring, {"model.onnx": policy_onnx(2)})


def _other_keyring(repo: Path, keyring: Keyring) -> None:
    publish_sealed(
        repo, "policy", policy_onnx(2), Keyring.generate(), version=2, manifest_keyring=keyring
    )


def _plaintext(repo: Path, keyring: Keyring) -> None:
    (repo / "policy" / "2").mkdir()
    (repo / "policy" / "2" / "model.onnx").write_bytes(policy_onnx(2))
    commit_version(repo, "policy", 2, keyring, {"model.onnx": policy_onnx(2)})


def _missing_artifact(repo: Path, keyring: Keyring) -> None:
    (repo / "policy" / "2").mkdir()
    commit_version(repo, "policy", 2, keyring, {"model.onnx": policy_onnx(2)})


def _onnx_disagrees_with_config(repo: Path, keyring: Keyring) -> None:
    publish_sealed(repo, "policy", policy_onnx(2, obs_dim=6), keyring, version=2)


FAULTS = {
    "flipped_byte": (_flipped_byte, "authentication failed"),
    "truncated": (_truncated, "authentication failed"),
    "v1_file_moved_to_v2": (_v1_copied_to_v2, "authentication failed"),
    "sealed_with_other_keyring": (_other_keyring, "unknown key id"),
    "plaintext_without_allow_plaintext": (_plaintext, "plaintext"),
    "missing_artifact": (_missing_artifact, "missing artifact"),
    "onnx_disagrees_with_config": (_onnx_disagrees_with_config, "obs"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_faulty_v2_is_refused_with_reason_and_v1_keeps_serving(
    fault: str, repository: Path, keyring: Keyring, start_server
) -> None:
    make_fault, reason_part = FAULTS[fault]
    server = start_server(repository, "--model-control-mode", "explicit", "--load-model", "policy")
    client = grpcclient.InferenceServerClient(server.url)
    try:
        assert infer_policy(client) == (1, "1")
        make_fault(repository, keyring)

        with pytest.raises(InferenceServerException) as excinfo:
            client.load_model("policy")
        assert excinfo.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert reason_part in excinfo.value.message()

        entries = index_entries(client, "policy")
        assert entries["2"]["state"] == "UNAVAILABLE"
        assert reason_part in entries["2"]["reason"]
        assert entries["1"]["state"] == "READY"
        assert client.is_model_ready("policy")
        assert not client.is_model_ready("policy", "2")
        for _ in range(5):
            assert infer_policy(client) == (1, "1")
    finally:
        client.close()


def test_sealed_file_copied_into_another_model_is_refused(
    repository: Path, keyring: Keyring, start_server
) -> None:
    """Same version number, same file name, same ONNX that fits: only the model name
    bound into the seal differs, and that alone must refuse it."""
    write_config(repository, "policy_b", POLICY_CONFIG.replace('"policy"', '"policy_b"'))
    (repository / "policy_b" / "1").mkdir()
    shutil.copyfile(repository / "policy" / "1" / SEALED, repository / "policy_b" / "1" / SEALED)
    commit_version(repository, "policy_b", 1, keyring, {"model.onnx": policy_onnx(1)})
    server = start_server(repository, "--model-control-mode", "explicit", "--load-model", "policy")
    client = grpcclient.InferenceServerClient(server.url)
    try:
        with pytest.raises(InferenceServerException) as excinfo:
            client.load_model("policy_b")
        assert excinfo.value.status() == "StatusCode.INVALID_ARGUMENT"

        entry = index_entries(client, "policy_b")["1"]
        assert entry["state"] == "UNAVAILABLE"
        assert "authentication failed" in entry["reason"]
        assert not client.is_model_ready("policy_b")
        assert infer_policy(client) == (1, "1")
    finally:
        client.close()


# ---- whole-server faults ----------------------------------------------------------------------


def test_wrong_keyring_leaves_every_model_unavailable_and_server_live_not_ready(
    repository: Path, tmp_path: Path, start_server
) -> None:
    wrong = tmp_path / "wrong-keyring.json"
    Keyring.generate().save(wrong)
    server = start_server(repository, wait_ready=False, keyring=wrong)
    client = grpcclient.InferenceServerClient(server.url)
    try:
        # Startup loading is over once the server logs that it is up.
        wait_for(lambda: "server ready" in server.log(), what="the startup load to finish")
        for name in ("policy", "simple", "all_types"):
            # The model manifest, sealed with the key the server lacks, is refused first: the
            # model as a whole (no version) is unavailable.
            entry = index_entries(client, name)[""]
            assert entry["state"] == "UNAVAILABLE", name
            assert "model manifest refused: unknown key id" in entry["reason"], entry
            assert not client.is_model_ready(name)
        assert client.is_server_live()
        assert not client.is_server_ready()
        with pytest.raises(InferenceServerException) as excinfo:
            infer_policy(client)
        assert excinfo.value.status() == "StatusCode.UNAVAILABLE"
    finally:
        client.close()


def test_invalid_and_missing_config_are_reported_while_policy_serves(
    repository: Path, keyring: Keyring, start_server
) -> None:
    write_config(repository, "bad_config", "name: 'bad_config'\nmax_batch_size: [ oops\n")
    publish_sealed(repository, "bad_config", policy_onnx(3), keyring, version=1)
    (repository / "no_config").mkdir()
    publish_sealed(repository, "no_config", policy_onnx(3), keyring, version=1)
    server = start_server(repository, "--model-control-mode", "none", "--strict-readiness", "false")
    client = grpcclient.InferenceServerClient(server.url)
    try:
        bad = index_entries(client, "bad_config")
        assert [e["state"] for e in bad.values()] == ["UNAVAILABLE"]
        assert "invalid config.pbtxt" in next(iter(bad.values()))["reason"]

        missing = index_entries(client, "no_config")
        assert [e["state"] for e in missing.values()] == ["UNAVAILABLE"]
        assert "missing config.pbtxt" in next(iter(missing.values()))["reason"]

        assert not client.is_model_ready("bad_config")
        assert not client.is_model_ready("no_config")
        assert client.is_server_ready()
        assert infer_policy(client) == (1, "1")
    finally:
        client.close()


# ---- plaintext --------------------------------------------------------------------------------


def test_allow_plaintext_serves_an_unsealed_model(repository: Path, start_server) -> None:
    # A plain Triton model: no manifest, so its config and version folders decide (as in
    # Triton), which --allow-plaintext accepts.
    (repository / "policy" / MANIFEST_NAME).unlink()
    (repository / "policy" / "2").mkdir()
    (repository / "policy" / "2" / "model.onnx").write_bytes(policy_onnx(2))
    server = start_server(
        repository,
        "--model-control-mode",
        "explicit",
        "--load-model",
        "policy",
        "--allow-plaintext",
    )
    client = grpcclient.InferenceServerClient(server.url)
    try:
        assert infer_policy(client) == (2, "2")
        assert index_entries(client, "policy")["2"]["state"] == "READY"
    finally:
        client.close()


def _files(*roots: Path):
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                yield Path(folder) / name


def test_server_never_writes_a_plaintext_model_file(
    repository: Path, keyring: Keyring, tmp_path: Path, start_server
) -> None:
    server_tmp = tmp_path / "server-tmp"
    server_tmp.mkdir()
    server = start_server(
        repository,
        "--model-control-mode",
        "explicit",
        "--load-model",
        "*",
        env={"TMPDIR": str(server_tmp), "TEMP": str(server_tmp), "TMP": str(server_tmp)},
    )
    client = grpcclient.InferenceServerClient(server.url)
    try:
        # Serve a while, then swap in a new sealed version as well.
        for _ in range(20):
            assert infer_policy(client) == (1, "1")
        publish_sealed(repository, "policy", policy_onnx(2), keyring)
        client.load_model("policy")
        assert infer_policy(client) == (2, "2")
    finally:
        client.close()

    plaintexts = {
        "policy v1": policy_onnx(1),
        "policy v2": policy_onnx(2),
        "simple": simple_onnx(),
        "all_types": all_types_onnx(),
    }
    # Signatures that survive a partial or re-serialised copy: each policy's first-layer
    # weights as stored in the ONNX initializer.
    signatures = {
        f"policy v{tag} weights": numpy_helper.to_array(
            onnx.load_from_string(policy_onnx(tag)).graph.initializer[0]
        ).tobytes()
        for tag in (1, 2)
    }
    checked = 0
    for path in _files(repository, server_tmp):
        assert not path.name.endswith(".onnx"), f"plaintext model file {path}"
        data = path.read_bytes()
        for what, needle in {**plaintexts, **signatures}.items():
            assert needle not in data, f"{path} holds the plaintext of {what}"
        checked += 1
    # Configs and sealed files were really looked at. (onnxruntime may leave a small
    # session-id file in TMPDIR; any file there is scanned like the rest.)
    assert checked >= 5
