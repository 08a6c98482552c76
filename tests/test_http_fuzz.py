"""Garbage at the HTTP front door: hypothesis draws inference requests from
testkit/fuzz_http.py (valid ones, the gRPC fuzzer's malformed ones written as JSON and binary
tensors, and JSON- or byte-level damage on top) with a fixed seed. Every answer must be a
status below 500 with a JSON body, valid requests must succeed, and the server must stay up.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest
import tritonclient.http as httpclient
from hypothesis import HealthCheck, given, settings

from forseti.core.sealing.keyring import Keyring
from testkit.fuzz_http import HttpCase, http_cases, send
from testkit.model_builders import build_repository
from testkit.server_process import ServerProcess

EXAMPLES = 600


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, keyring: Keyring, keyring_path: Path):
    repo = tmp_path_factory.mktemp("http-fuzz") / "repo"
    repo.mkdir()
    build_repository(repo, keyring)
    srv = ServerProcess(
        repo, keyring_path, ["--model-control-mode", "explicit", "--load-model", "*"]
    ).start()
    yield srv
    srv.stop()


def test_the_server_never_answers_5xx_or_dies_on_garbage(server: ServerProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=20)
    seen: dict[str, int] = {}

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=http_cases())
    def one(case: HttpCase) -> None:
        nonlocal conn
        try:
            status, body = send(conn, case)
        except (http.client.HTTPException, OSError):
            # the server may close a connection after an answer it cannot carry on from
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=20)
            status, body = send(conn, case)
        assert status < 500, f"{status} {body[:300]!r} for {case.describe()}"
        if status != 200:
            assert "error" in json.loads(body), case.describe()
        elif case.label == "valid":
            seen["valid"] = seen.get("valid", 0) + 1
        seen[str(status)] = seen.get(str(status), 0) + 1

    one()
    conn.close()
    assert server.proc is not None and server.proc.poll() is None
    assert seen.get("200", 0) > 0 and seen.get("400", 0) > 0, seen
    with httpclient.InferenceServerClient(server.http_url) as client:
        assert client.is_server_live() and client.is_model_ready("policy")
