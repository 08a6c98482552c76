"""The HTTP/REST front door (KServe v2 REST with Triton's extensions) against a real server,
with the unmodified `tritonclient.http` (sync and aio) and raw HTTP requests.

One server serves the read-only tests; a second one, with restricted APIs and a short
request timeout, serves model control, restrictions, slow clients and the swap under load.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from tritonclient.utils import InferenceServerException

from forseti.core.sealing.keyring import Keyring
from testkit.certificates import make_certificates
from testkit.fuzz_requests import DATATYPES
from testkit.model_builders import build_repository, policy_onnx, publish_sealed
from testkit.server_process import ServerProcess, run_forseti, serve_args

TOKEN = "http-admin-token-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, keyring: Keyring, keyring_path: Path):
    repo = tmp_path_factory.mktemp("http") / "repo"
    repo.mkdir()
    build_repository(repo, keyring)
    srv = ServerProcess(
        repo, keyring_path, ["--model-control-mode", "explicit", "--load-model", "*"]
    ).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, keyring: Keyring, keyring_path: Path):
    """Explicit mode on 0.0.0.0 with the model-repository API behind a token (the HTTP guard
    the secure-by-default rule asks for), and a 1 s request timeout."""
    base = tmp_path_factory.mktemp("http-guarded")
    repo = base / "repo"
    repo.mkdir()
    build_repository(repo, keyring)
    tokens = base / "tokens"
    tokens.write_text(TOKEN + "\n")
    tokens.chmod(0o600)
    srv = ServerProcess(
        repo,
        keyring_path,
        [
            "--model-control-mode",
            "explicit",
            "--load-model",
            "*",
            "--http-address",
            "0.0.0.0",
            f"--http-restricted-api=model-repository:forseti-admin=@{tokens}",
            "--http-request-timeout-secs",
            "1",
        ],
    ).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(server.http_url)
    yield c
    c.close()


def raw(
    server: ServerProcess,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict]:
    """One request with http.client: (status, JSON body or {})."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    return response.status, (json.loads(data) if data else {})


def _until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _simple_inputs(binary: bool) -> list[httpclient.InferInput]:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    inputs = []
    for name, arr in (("INPUT0", a), ("INPUT1", b)):
        inp = httpclient.InferInput(name, [1, 16], "INT32")
        inp.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(inp)
    return inputs


# ---- health, metadata, config ---------------------------------------------------------------


def test_health_and_model_readiness(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("simple")
    assert client.is_model_ready("simple", "1")
    assert not client.is_model_ready("simple", "7")
    assert not client.is_model_ready("no_such_model")


def test_server_and_model_metadata(client: httpclient.InferenceServerClient) -> None:
    server = client.get_server_metadata()
    assert server["name"] == "forseti"
    assert "model_repository" in server["extensions"]
    meta = client.get_model_metadata("simple")
    assert meta["name"] == "simple"
    assert meta["versions"] == ["1"]
    assert meta["inputs"][0] == {"name": "INPUT0", "datatype": "INT32", "shape": [-1, 16]}
    assert [o["name"] for o in meta["outputs"]] == ["OUTPUT0", "OUTPUT1"]


def test_model_config_is_the_config_pbtxt(client: httpclient.InferenceServerClient) -> None:
    config = client.get_model_config("simple")
    assert config["name"] == "simple"
    assert config["max_batch_size"] == 8
    assert config["input"][0]["data_type"] == "TYPE_INT32"


def test_unknown_model_is_404_with_tritons_text(client: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("no_such_model")
    assert err.value.status() == "404"
    assert "Request for unknown model: 'no_such_model' is not found" in err.value.message()


# ---- inference --------------------------------------------------------------------------------


@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
def test_infer_simple(
    client: httpclient.InferenceServerClient, binary_in: bool, binary_out: bool
) -> None:
    outputs = [
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary_out),
        httpclient.InferRequestedOutput("OUTPUT1", binary_data=binary_out),
    ]
    result = client.infer("simple", _simple_inputs(binary_in), outputs=outputs, request_id="r-7")
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + 3)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - 3)
    response = result.get_response()
    assert response["id"] == "r-7"
    assert response["model_version"] == "1"
    assert ("data" in response["outputs"][0]) is not binary_out


def test_infer_every_numeric_datatype_json_and_binary(
    client: httpclient.InferenceServerClient,
) -> None:
    rng = np.random.default_rng(3)
    sent = {}
    inputs = []
    for i, (name, (dtype, _)) in enumerate(DATATYPES.items()):
        if dtype == np.bool_:
            arr = rng.integers(0, 2, (2, 3)).astype(np.bool_)
        elif dtype.kind == "f":
            arr = rng.uniform(-100, 100, (2, 3)).astype(dtype)
        else:
            info = np.iinfo(dtype)
            arr = np.array([[info.min, info.max, 0], [1, info.max - 1, info.min + 1]], dtype)
        sent[name] = arr
        inp = httpclient.InferInput(f"IN_{name}", [2, 3], name)
        # FP16 has no JSON form in tritonclient; every other type alternates JSON / binary
        inp.set_data_from_numpy(arr, binary_data=name == "FP16" or i % 2 == 1)
        inputs.append(inp)
    outputs = [
        httpclient.InferRequestedOutput(f"OUT_{name}", binary_data=i % 3 == 0 or name == "FP16")
        for i, name in enumerate(DATATYPES)
    ]
    result = client.infer("all_types", inputs, outputs=outputs)
    for name, arr in sent.items():
        got = result.as_numpy(f"OUT_{name}")
        assert got.dtype == arr.dtype, name
        np.testing.assert_array_equal(got, arr, err_msg=name)


def test_only_the_requested_outputs_come_back(client: httpclient.InferenceServerClient) -> None:
    result = client.infer(
        "simple", _simple_inputs(True), outputs=[httpclient.InferRequestedOutput("OUTPUT1")]
    )
    assert [o["name"] for o in result.get_response()["outputs"]] == ["OUTPUT1"]
    assert result.as_numpy("OUTPUT0") is None


def test_no_outputs_named_returns_every_output_in_binary(
    client: httpclient.InferenceServerClient,
) -> None:
    result = client.infer("simple", _simple_inputs(False))
    outputs = result.get_response()["outputs"]
    assert [o["name"] for o in outputs] == ["OUTPUT0", "OUTPUT1"]
    assert all(o["parameters"]["binary_data_size"] == 64 for o in outputs)


def test_the_plain_path_answers_as_the_protobuf_path(server: ServerProcess) -> None:
    # A request without parameters skips the protobuf form (InferenceHandler.infer_plain);
    # a request parameter sends it through the servicer. Both must answer the same body.
    doc = {
        "id": "same",
        "inputs": [{"name": "obs", "shape": [2, 8], "datatype": "FP32", "data": [0.5] * 16}],
        "outputs": [{"name": "logits"}, {"name": "action"}],
    }
    plain = raw(server, "POST", "/v2/models/policy/infer", json.dumps(doc).encode())
    doc["parameters"] = {"priority": 0}
    via_proto = raw(server, "POST", "/v2/models/policy/infer", json.dumps(doc).encode())
    assert plain[0] == via_proto[0] == 200
    assert plain[1] == via_proto[1]
    assert [o["shape"] for o in plain[1]["outputs"]] == [[2, 4], [2, 1]]


def test_a_bad_input_gets_the_same_text_as_over_grpc(
    server: ServerProcess, client: httpclient.InferenceServerClient
) -> None:
    inp = httpclient.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 16), np.float32))
    with pytest.raises(InferenceServerException) as over_http:
        client.infer("simple", [inp, _simple_inputs(True)[1]])
    ginp = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    ginp.set_data_from_numpy(np.zeros((1, 16), np.float32))
    gother = grpcclient.InferInput("INPUT1", [1, 16], "INT32")
    gother.set_data_from_numpy(np.zeros((1, 16), np.int32))
    with server.client() as gclient, pytest.raises(InferenceServerException) as over_grpc:
        gclient.infer("simple", [ginp, gother])
    assert over_http.value.status() == "400"

    def text(message: str) -> str:
        return message.split(" (request id")[0].split("] ", 1)[-1]

    assert text(over_http.value.message()) == text(over_grpc.value.message())


def test_statistics_count_http_inferences(client: httpclient.InferenceServerClient) -> None:
    before = client.get_inference_statistics("policy")["model_stats"][0]
    obs = httpclient.InferInput("obs", [1, 8], "FP32")
    obs.set_data_from_numpy(np.zeros((1, 8), np.float32))
    for _ in range(3):
        client.infer("policy", [obs])
    after = client.get_inference_statistics("policy", "1")["model_stats"][0]
    assert after["name"] == "policy" and after["version"] == "1"
    assert after["inference_count"] == before["inference_count"] + 3
    assert after["inference_stats"]["success"]["count"] == (
        before["inference_stats"]["success"]["count"] + 3
    )
    every = client.get_inference_statistics()["model_stats"]
    assert {s["name"] for s in every} == {"all_types", "policy", "simple"}


def test_repository_index_lists_every_model(client: httpclient.InferenceServerClient) -> None:
    index = client.get_model_repository_index()
    assert {(m["name"], m["version"], m["state"]) for m in index} == {
        ("all_types", "1", "READY"),
        ("policy", "1", "READY"),
        ("simple", "1", "READY"),
    }


def test_aio_client_health_metadata_and_infer(server: ServerProcess) -> None:
    async def body() -> None:
        async with aiohttpclient.InferenceServerClient(server.http_url) as c:
            assert await c.is_server_live()
            assert await c.is_model_ready("simple")
            assert (await c.get_model_metadata("simple"))["name"] == "simple"
            inputs = []
            for name, value in (("INPUT0", 5), ("INPUT1", 2)):
                inp = aiohttpclient.InferInput(name, [1, 16], "INT32")
                inp.set_data_from_numpy(np.full((1, 16), value, np.int32))
                inputs.append(inp)
            results = await asyncio.gather(*(c.infer("simple", inputs) for _ in range(4)))
            for result in results:
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 7))
            stats = await c.get_inference_statistics("simple")
            assert stats["model_stats"][0]["inference_count"] >= 4

    asyncio.run(body())


# ---- raw requests: status codes and bodies ----------------------------------------------------


def test_malformed_json_is_400_naming_the_problem(server: ServerProcess) -> None:
    status, body = raw(server, "POST", "/v2/models/simple/infer", b'{"inputs": [')
    assert status == 400
    assert "failed to parse the inference request header as JSON" in body["error"]
    assert "request id" in body["error"]


def test_binary_header_length_outside_the_body_is_400(server: ServerProcess) -> None:
    for value in ("500", "-1", "abc"):
        status, body = raw(
            server,
            "POST",
            "/v2/models/simple/infer",
            b"{}",
            {"Inference-Header-Content-Length": value},
        )
        assert status == 400, value
        assert "Inference-Header-Content-Length" in body["error"]


def test_binary_data_size_past_the_body_is_400(server: ServerProcess) -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "shape": [1, 16],
                    "datatype": "INT32",
                    "parameters": {"binary_data_size": 64},
                }
            ]
        }
    ).encode()
    status, body = raw(
        server,
        "POST",
        "/v2/models/simple/infer",
        header + b"\0" * 10,
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 400
    assert "needs 64 bytes of binary data, 10 are left" in body["error"]


def test_data_of_the_wrong_kind_is_400(server: ServerProcess) -> None:
    doc = {"inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": "INT32", "data": [1.5, 2]}]}
    status, body = raw(server, "POST", "/v2/models/simple/infer", json.dumps(doc).encode())
    assert status == 400
    assert "'data' holds values that are not INT32" in body["error"]


def test_a_body_over_the_request_limit_is_413_before_it_is_read(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        sock.sendall(
            b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 9000000\r\n\r\n"
        )
        answer = _until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"--max-request-bytes" in answer


def test_unknown_path_is_404_and_wrong_method_405(server: ServerProcess) -> None:
    assert raw(server, "GET", "/v2/nothing/here") == (404, {"error": "Not Found"})
    status, body = raw(server, "GET", "/v2/models/simple/infer")
    assert status == 405
    assert body == {"error": "Method Not Allowed"}


def test_shared_memory_is_501(server: ServerProcess) -> None:
    status, body = raw(server, "GET", "/v2/systemsharedmemory/status")
    assert status == 501
    assert "shared memory" in body["error"]


# ---- model control, restrictions, slow clients, swaps -----------------------------------------


def test_control_without_the_header_is_403_and_changes_nothing(guarded: ServerProcess) -> None:
    with httpclient.InferenceServerClient(guarded.http_url) as c:
        for headers in (None, {"forseti-admin": "wrong"}):
            with pytest.raises(InferenceServerException) as err:
                c.unload_model("simple", headers=headers)
            assert err.value.status() == "403"
            assert "This API is restricted, expecting header 'forseti-admin'" in (
                err.value.message()
            )
        assert c.is_model_ready("simple")
        # inference is not restricted
        assert c.infer("simple", _simple_inputs(True)).as_numpy("OUTPUT0") is not None


def test_load_and_unload_with_the_token(guarded: ServerProcess) -> None:
    admin = {"forseti-admin": TOKEN}
    with httpclient.InferenceServerClient(guarded.http_url) as c:
        c.unload_model("simple", headers=admin)
        assert not c.is_model_ready("simple")
        states = {m["name"]: m["state"] for m in c.get_model_repository_index(headers=admin)}
        assert states["simple"] == "UNAVAILABLE"
        c.load_model("simple", headers=admin)
        assert c.is_model_ready("simple")
        with pytest.raises(InferenceServerException) as err:
            c.load_model("no_such_model", headers=admin)
        assert err.value.status() in ("400", "404")  # the gRPC code's twin (status.py)
        assert "failed to load" in err.value.message()


def test_a_client_that_stalls_in_its_head_gets_408(guarded: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", guarded.http_port), timeout=30) as sock:
        sock.sendall(b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_a_body_shorter_than_its_content_length_gets_408(guarded: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", guarded.http_port), timeout=30) as sock:
        sock.sendall(
            b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}"
        )
        answer = _until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"did not arrive within 1 s" in answer


def test_swap_during_http_load_fails_no_call(guarded: ServerProcess, keyring: Keyring) -> None:
    stop = threading.Event()
    calls = [0, 0]
    failures: list[str] = []
    versions: set[str] = set()

    def loop(slot: int) -> None:
        with httpclient.InferenceServerClient(guarded.http_url) as c:
            obs = httpclient.InferInput("obs", [1, 8], "FP32")
            obs.set_data_from_numpy(np.full((1, 8), 0.25, np.float32))
            while not stop.is_set():
                try:
                    versions.add(c.infer("policy", [obs]).get_response()["model_version"])
                    calls[slot] += 1
                except Exception as exc:  # any failure is the finding
                    failures.append(repr(exc))

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while min(calls) < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        publish_sealed(guarded.repository, "policy", policy_onnx(2), keyring, version=2)
        with httpclient.InferenceServerClient(guarded.http_url) as c:
            c.load_model("policy", headers={"forseti-admin": TOKEN})
        seen = sum(calls)
        while sum(calls) < seen + 40 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == []
    assert "2" in versions


def test_explicit_mode_on_a_public_http_address_without_a_guard_is_refused(
    tmp_path: Path, keyring_path: Path
) -> None:
    done = run_forseti(
        *serve_args(
            tmp_path,
            keyring_path,
            "--grpc-address",
            "127.0.0.1",
            "--http-address",
            "0.0.0.0",
            "--model-control-mode",
            "explicit",
        ),
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert "--http-address 0.0.0.0" in done.stderr
    assert "--http-restricted-api=model-repository:" in done.stderr


def test_https_with_http_ssl_cert_and_key(
    tmp_path: Path, keyring: Keyring, keyring_path: Path
) -> None:
    certs = make_certificates(tmp_path / "certs")
    repo = tmp_path / "repo"
    repo.mkdir()
    build_repository(repo, keyring)
    srv = ServerProcess(
        repo,
        keyring_path,
        [
            "--http-ssl-cert",
            str(certs.server.cert),
            "--http-ssl-key",
            str(certs.server.key),
        ],
    ).start()
    try:
        context = ssl.create_default_context(cafile=str(certs.ca))
        conn = http.client.HTTPSConnection("127.0.0.1", srv.http_port, context=context, timeout=30)
        conn.request("GET", "/v2/models/simple/ready")
        assert conn.getresponse().status == 200
        conn.close()
        plain = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=30)
        with pytest.raises((http.client.HTTPException, OSError)):
            plain.request("GET", "/v2/health/live")
            plain.getresponse()
        plain.close()
    finally:
        srv.stop()


def test_allow_grpc_false_serves_http_alone(tmp_path: Path, keyring: Keyring) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    build_repository(repo, keyring)
    keyring_file = tmp_path / "keyring.json"
    keyring.save(keyring_file)
    args = serve_args(repo, keyring_file, "--allow-grpc", "false", "--drain-seconds", "0")
    port = int(args[args.index("--http-port") + 1])
    grpc_port = int(args[args.index("--grpc-port") + 1])
    proc = subprocess.Popen([sys.executable, "-m", "forseti", *args], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        status = 0
        while time.monotonic() < deadline and status != 200:
            assert proc.poll() is None
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/v2/health/ready")
                status = conn.getresponse().status
                conn.close()
            except OSError:
                time.sleep(0.05)
        assert status == 200
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", grpc_port), timeout=5).close()
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_load_with_a_config_override_over_http(guarded: ServerProcess) -> None:
    admin = {"forseti-admin": TOKEN}
    with httpclient.InferenceServerClient(guarded.http_url) as c:
        with pytest.raises(InferenceServerException) as err:
            c.load_model("simple", headers=admin, config='"max_batch_size": {{')
        assert err.value.status() == "400"
        assert "failed to load" in err.value.message()
        assert c.get_model_config("simple")["max_batch_size"] == 8
        c.load_model("simple", headers=admin, config='{"max_batch_size": 16}')
        assert c.get_model_config("simple")["max_batch_size"] == 16
        c.load_model("simple", headers=admin)  # back to its config.pbtxt
        assert c.get_model_config("simple")["max_batch_size"] == 8


def test_async_infer_of_the_sync_client(server: ServerProcess) -> None:
    with httpclient.InferenceServerClient(server.http_url, concurrency=4) as c:
        pending = [
            c.async_infer("simple", _simple_inputs(i % 2 == 0), request_id=str(i)) for i in range(8)
        ]
        results = [p.get_result(timeout=30) for p in pending]
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    for i, result in enumerate(results):
        assert result.get_response()["id"] == str(i)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + 3)


@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
def test_classification_comes_back_as_bytes(
    client: httpclient.InferenceServerClient, binary_out: bool
) -> None:
    wanted = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary_out, class_count=2)
    result = client.infer("simple", _simple_inputs(True), outputs=[wanted])
    output = result.get_response()["outputs"][0]
    assert output["datatype"] == "BYTES" and output["shape"] == [1, 2]
    got = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("OUTPUT0")[0]]
    assert got == ["18:15", "17:14"]  # value:index of the two largest of arange(16) + 3
