"""The native data plane (`forseti serve --data-plane native`, native/ and server/dataplane/).

The choice of data plane is tested always. The rest needs the extension `make native` builds
and is skipped, saying so, where it is not built: a native server over the standard repository
answers decisions itself, words every refusal as the Python data plane does (one server of
each, the same bad requests), counts its calls in the same statistics, keeps a stream's order
when it mixes native answers and Python ones, swaps a version under traffic without a failed
call, and survives the hypothesis fuzzer. The existing protocol, swap, fuzz, TLS and
restricted-protocol tests run against it as they are with FORSETI_DATA_PLANE=native.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg

from forseti.core.sealing.keyring import Keyring
from forseti.server.dataplane import DataPlaneError, native_extension, use_native
from testkit.fuzz_requests import (
    Case,
    malformed_cases,
    send_stream,
    send_unary,
    stream_batches,
    stream_stub,
    unary_stub,
)
from testkit.model_builders import OBS_DIM, build_repository, policy_onnx, publish_sealed
from testkit.server_process import ServerProcess, serve_args

_module, _why = native_extension()
needs_native = pytest.mark.skipif(
    _module is None, reason=f"the native extension is not built (`make native`): {_why}"
)
POLICY_ACTION = 1  # policy v1 of the standard repository answers action 1
RID = re.compile(r" \(request id [0-9a-f]+\)")


# ---- choosing the data plane (always) -------------------------------------------------------


def _without_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def refuse(name: str, *args: object) -> object:
        if name == "forseti_native":
            raise ImportError("No module named 'forseti_native'")
        return real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib, "import_module", refuse)


def test_python_data_plane_never_needs_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_extension(monkeypatch)
    assert use_native("python") is False


def test_native_without_the_extension_is_refused_naming_make_native(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _without_extension(monkeypatch)
    with pytest.raises(DataPlaneError, match="make native"):
        use_native("native")


def test_auto_without_the_extension_falls_back_to_python_with_a_log_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _without_extension(monkeypatch)
    with caplog.at_level(logging.INFO, logger="forseti.server.dataplane"):
        assert use_native("auto") is False
    assert "data plane: python" in caplog.text


def test_an_unknown_data_plane_is_refused() -> None:
    with pytest.raises(DataPlaneError, match="python, native, auto"):
        use_native("rust")


@pytest.fixture
def unbuilt(tmp_path: Path) -> dict[str, str]:
    """An environment in which `import forseti_native` fails, as where it was never built."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "forseti_native.py").write_text('raise ImportError("forseti_native is not built")\n')
    return {**os.environ, "PYTHONPATH": f"{shadow}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def test_forseti_serve_native_without_the_extension_exits_2_naming_make_native(
    repository: Path, keyring_path: Path, unbuilt: dict[str, str]
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "forseti",
            *serve_args(repository, keyring_path, "--data-plane", "native"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=unbuilt,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result.stderr
    assert "make native" in result.stderr and "--data-plane python" in result.stderr


def test_forseti_serve_auto_without_the_extension_serves_with_python(
    repository: Path, keyring_path: Path, unbuilt: dict[str, str]
) -> None:
    server = ServerProcess(repository, keyring_path, ["--data-plane", "auto"], env=unbuilt)
    server.start()
    try:
        assert unary(server, infer_request()) == ("OK", "")
    finally:
        server.stop()
    assert "data plane: python (the native extension is not built)" in server.log()


# ---- a native server and a Python one over the same repository -----------------------------


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory, keyring: Keyring, keyring_path: Path
) -> Iterator[dict[str, ServerProcess]]:
    if _module is None:
        pytest.skip(f"the native extension is not built (`make native`): {_why}")
    started: dict[str, ServerProcess] = {}
    try:
        for plane in ("native", "python"):
            repo = tmp_path_factory.mktemp(plane) / "repo"
            repo.mkdir()
            build_repository(repo, keyring)
            started[plane] = ServerProcess(
                repo,
                keyring_path,
                ["--model-control-mode", "explicit", "--load-model", "*", "--data-plane", plane],
            ).start()
        yield started
    finally:
        for server in started.values():
            server.stop()


def obs(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).uniform(-1, 1, (batch, OBS_DIM)).astype(np.float32)


def infer_request(batch: int = 1, request_id: str = "", **fields: object) -> pb.ModelInferRequest:
    x = obs(batch)
    request = pb.ModelInferRequest(model_name="policy", id=request_id)
    request.inputs.add(name="obs", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    for key, value in fields.items():
        setattr(request, key, value)
    return request


def unary(server: ServerProcess, request: pb.ModelInferRequest | bytes) -> tuple[str, str]:
    """(status name, message without its request id) of one ModelInfer call."""
    payload = request if isinstance(request, bytes) else request.SerializeToString()
    with grpc.insecure_channel(server.url) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda b: b,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        try:
            call(payload, timeout=30)
        except grpc.RpcError as exc:
            return exc.code().name, RID.sub("", exc.details() or "")
    return "OK", ""


def _bad_requests() -> dict[str, pb.ModelInferRequest | bytes]:
    wrong_name = infer_request()
    wrong_name.inputs[0].name = "observation"
    wrong_type = infer_request()
    wrong_type.inputs[0].datatype = "FP64"
    wrong_shape = infer_request()
    wrong_shape.inputs[0].shape[1] = OBS_DIM + 1
    short_bytes = infer_request()
    short_bytes.raw_input_contents[0] = short_bytes.raw_input_contents[0][:-4]
    unknown_output = infer_request()
    unknown_output.outputs.add(name="nope")
    return {
        "unknown model": infer_request(model_name="nobody"),
        "unknown version": infer_request(model_version="7"),
        "version not a number": infer_request(model_version="x1"),
        "wrong input name": wrong_name,
        "wrong datatype": wrong_type,
        "wrong shape": wrong_shape,
        "short raw bytes": short_bytes,
        "batch above max_batch_size": infer_request(batch=65),
        "unknown output": unknown_output,
        "no input": pb.ModelInferRequest(model_name="policy"),
        "bytes that do not parse": b"\xff\xff\xff",
    }


@needs_native
@pytest.mark.parametrize("case", list(_bad_requests()))
def test_native_refusals_are_worded_as_the_python_data_planes(
    servers: dict[str, ServerProcess], case: str
) -> None:
    request = _bad_requests()[case]
    native, python = unary(servers["native"], request), unary(servers["python"], request)
    assert native[0] != "OK"
    assert native == python


@needs_native
def test_native_answers_decisions_with_request_ids_and_every_output(
    servers: dict[str, ServerProcess],
) -> None:
    client = servers["native"].client()
    try:
        x = grpcclient.InferInput("obs", [3, OBS_DIM], "FP32")
        x.set_data_from_numpy(obs(3))
        result = client.infer("policy", [x], request_id="r-7")
        assert result.get_response().id == "r-7"
        assert result.get_response().model_version == "1"
        assert (result.as_numpy("action") == POLICY_ACTION).all()
        assert result.as_numpy("action").shape == (3, 1)
        assert {o.name for o in result.get_response().outputs} == {"action", "logits"}
        only = client.infer("policy", [x], outputs=[grpcclient.InferRequestedOutput("logits")])
        assert [o.name for o in only.get_response().outputs] == ["logits"]
    finally:
        client.close()


def _policy_stats(server: ServerProcess) -> pb.ModelStatistics:
    with grpc.insecure_channel(server.url) as channel:
        reply = pbg.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name="policy"), timeout=30
        )
    [stats] = reply.model_stats
    return stats


@needs_native
def test_native_calls_are_counted_in_model_statistics(servers: dict[str, ServerProcess]) -> None:
    server = servers["native"]
    before = _policy_stats(server)
    for _ in range(5):
        assert unary(server, infer_request(batch=2)) == ("OK", "")
    assert unary(server, infer_request(batch=65))[0] == "INVALID_ARGUMENT"
    after = _policy_stats(server)
    stats, old = after.inference_stats, before.inference_stats
    assert stats.success.count - old.success.count == 5
    assert stats.fail.count - old.fail.count == 1
    assert after.inference_count - before.inference_count == 10
    assert after.execution_count - before.execution_count == 5
    assert stats.compute_infer.ns > old.compute_infer.ns
    batches = {b.batch_size: b.compute_infer.count for b in after.batch_stats}
    old_batches = {b.batch_size: b.compute_infer.count for b in before.batch_stats}
    assert batches[2] - old_batches.get(2, 0) == 5
    assert after.last_inference >= before.last_inference > 0


@needs_native
def test_a_stream_mixing_native_and_python_answers_keeps_its_order(
    servers: dict[str, ServerProcess],
) -> None:
    bad = infer_request(batch=65, request_id="b1")
    requests = [
        infer_request(request_id="g1"),
        bad,
        infer_request(batch=2, request_id="g2"),
        infer_request(request_id="u1", model_name="nobody"),
        infer_request(request_id="g3"),
    ]
    with grpc.insecure_channel(servers["native"].url) as channel:
        replies = list(
            pbg.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests), timeout=30)
        )
    assert [r.infer_response.id for r in replies] == ["g1", "b1", "g2", "u1", "g3"]
    assert [bool(r.error_message) for r in replies] == [False, True, False, True, False]
    assert "max_batch_size" in replies[1].error_message or "64" in replies[1].error_message


@needs_native
def test_the_native_data_plane_answers_decisions_itself_and_hands_the_rest_over(
    keyring_path: Path, keyring: Keyring, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    build_repository(repo, keyring)
    server = ServerProcess(
        repo, keyring_path, ["--data-plane", "native", "--load-model", "*"]
    ).start()
    try:
        for _ in range(20):
            assert unary(server, infer_request()) == ("OK", "")
        assert unary(server, infer_request(model_name="nobody"))[0] == "NOT_FOUND"
    finally:
        server.stop()
    line = next(ln for ln in server.log().splitlines() if "native data plane stopped" in ln)
    native = int(re.search(r"native_calls=(\d+)", line).group(1))  # type: ignore[union-attr]
    fallback = int(re.search(r"fallback_calls=(\d+)", line).group(1))  # type: ignore[union-attr]
    assert native >= 20
    assert fallback >= 1  # the unknown model, and the health checks of the start-up wait


@needs_native
def test_a_swap_under_native_traffic_loses_no_call(
    keyring_path: Path, keyring: Keyring, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    build_repository(repo, keyring)
    server = ServerProcess(
        repo,
        keyring_path,
        ["--data-plane", "native", "--model-control-mode", "explicit", "--load-model", "policy"],
    ).start()
    stop = threading.Event()
    answers: list[tuple[str, str]] = []

    def traffic() -> None:
        with grpc.insecure_channel(server.url) as channel:
            stub = pbg.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                try:
                    reply = stub.ModelInfer(infer_request(), timeout=30)
                    answers.append(("OK", reply.model_version))
                except grpc.RpcError as exc:
                    answers.append((exc.code().name, exc.details() or ""))

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        publish_sealed(repo, "policy", policy_onnx(2), keyring)
        client = server.client()
        client.load_model("policy")
        client.close()
        seen = len(answers)
        deadline = 200
        while len(answers) < seen + 20 and deadline:
            stop.wait(0.05)
            deadline -= 1
    finally:
        stop.set()
        thread.join(timeout=30)
        server.stop()
    assert [a for a in answers if a[0] != "OK"] == []
    versions = [v for _, v in answers]
    assert versions[0] == "1" and versions[-1] == "2"
    assert versions == sorted(versions)  # never back to the old version
    assert "version released model=policy version=1" in server.log()


FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=list(HealthCheck),
)


@needs_native
def test_the_native_port_gives_malformed_requests_proper_statuses(
    servers: dict[str, ServerProcess],
) -> None:
    server = servers["native"]
    with grpc.insecure_channel(server.url) as channel:
        unary_call, stream_call = unary_stub(channel), stream_stub(channel)

        @settings(FUZZ, max_examples=400)
        @given(case=malformed_cases())
        def one(case: Case) -> None:
            outcome = send_unary(unary_call, case, 10.0)
            assert not outcome.bad, outcome.describe()

        @settings(FUZZ, max_examples=30)
        @given(cases=stream_batches())
        def stream(cases: list[Case]) -> None:
            outcomes = send_stream(stream_call, cases, 30.0)
            assert len(outcomes) == len(cases)
            assert not [o.describe() for o in outcomes if o.bad]

        one()
        stream()
    assert server.proc is not None and server.proc.poll() is None
    assert unary(server, infer_request()) == ("OK", "")


@needs_native
def test_a_second_native_server_on_a_taken_port_refuses_to_start(
    servers: dict[str, ServerProcess], repository: Path, keyring_path: Path
) -> None:
    taken = str(servers["native"].grpc_port)
    args = serve_args(repository, keyring_path, "--data-plane", "native", "--grpc-address")
    args += ["127.0.0.1"]
    args[args.index("--grpc-port") + 1] = taken
    result = subprocess.run(
        [sys.executable, "-m", "forseti", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"cannot listen on 127.0.0.1:{taken}" in result.stderr
