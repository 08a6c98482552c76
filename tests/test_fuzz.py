"""Bad input at volume: malformed ModelInfer and ModelStreamInfer requests against a real server.

Hypothesis draws the requests from `testkit/fuzz_requests.py` (the same strategies as the
10,000-request run of `benchmarks/fuzz_run.py`), with a fixed seed and a bounded count:
2,000 ModelInfer calls and 120 streams of a few malformed messages each (about 500), each
stream closed by a valid request it must still answer. Every call must get a proper status:
never UNKNOWN or INTERNAL, never a hang past the deadline, never a status the client cannot
read; OK only where the request is not malformed beyond doubt, and an error never for a valid
one. The server must not exit, its RSS must stay flat, and it must answer valid requests at
the end.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from tritonclient.grpc import service_pb2 as pb

from testkit.fuzz_requests import (
    MODEL_NAMES,
    MODELS,
    Case,
    Outcome,
    RssSamples,
    build_valid,
    expectation_of,
    malformed_cases,
    send_stream,
    send_unary,
    stream_batches,
    stream_stub,
    unary_stub,
    warmup_cases,
)

UNARY_EXAMPLES = 2_000
STREAM_EXAMPLES = 120  # 1 to 8 malformed messages each, and a valid one
MAX_RSS_GROWTH = 20 * 1024 * 1024
DEADLINE = 10.0

FUZZ = settings(
    derandomize=True,  # a fixed seed: the same requests on every run
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)


def _check(outcome: Outcome, where: str) -> None:
    if outcome.bad:
        pytest.fail(f"{where}: {outcome.describe()}", pytrace=False)


class Fuzzed:
    """The module's server, with a channel to it and its RSS samples."""

    def __init__(self, server) -> None:
        self.server = server
        self.channel = grpc.insecure_channel(server.url)
        self.unary = unary_stub(self.channel)
        self.stream = stream_stub(self.channel)
        self.rss = RssSamples(server.proc.pid)
        self.calls = 0

    def alive(self) -> None:
        if self.server.proc.poll() is not None:
            pytest.fail(
                f"the server exited with {self.server.proc.returncode}: {self.server.log()}"
            )

    def counted(self) -> None:
        self.calls += 1
        if self.calls % 100 == 0:
            self.rss.sample()
            self.alive()


@pytest.fixture(scope="module")
def fuzzed(shared_server):
    """The module's server after a warm-up with the biggest messages the fuzzer sends."""
    f = Fuzzed(shared_server)
    for case in warmup_cases():
        send_unary(f.unary, case, DEADLINE)
    f.alive()
    f.rss.sample()
    yield f
    f.channel.close()


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_the_fuzzers_valid_requests_are_answered(fuzzed, model: str, raw: bool) -> None:
    """The fuzzer's idea of the models matches the server's: its valid requests get OK."""
    request = build_valid(MODELS[model], batch=2, seed=1, raw=raw, request_id="v")
    assert expectation_of(request) == ("valid", "")
    case = Case.of("valid", request.SerializeToString(), request)
    assert send_unary(fuzzed.unary, case).verdict == "OK"
    [outcome] = send_stream(fuzzed.stream, [case])
    assert outcome.verdict == "OK", outcome.describe()


def test_malformed_model_infer_requests_get_proper_statuses(fuzzed) -> None:
    @settings(FUZZ, max_examples=UNARY_EXAMPLES)
    @given(case=malformed_cases())
    def one(case: Case) -> None:
        outcome = send_unary(fuzzed.unary, case, DEADLINE)
        _check(outcome, "ModelInfer")
        fuzzed.counted()

    one()
    fuzzed.alive()


def test_malformed_stream_messages_get_errors_and_the_stream_goes_on(fuzzed) -> None:
    @settings(FUZZ, max_examples=STREAM_EXAMPLES)
    @given(cases=stream_batches())
    def one(cases: list[Case]) -> None:
        outcomes = send_stream(fuzzed.stream, cases, DEADLINE * 3)
        assert len(outcomes) == len(cases), [o.describe() for o in outcomes]
        for i, outcome in enumerate(outcomes):
            _check(outcome, f"ModelStreamInfer message {i + 1} of {len(cases)}")
        assert outcomes[-1].verdict == "OK", outcomes[-1].describe()
        for _ in cases:
            fuzzed.counted()

    one()
    fuzzed.alive()


def test_the_server_survives_with_flat_memory(fuzzed) -> None:
    fuzzed.alive()
    fuzzed.rss.sample()
    client = grpcclient.InferenceServerClient(fuzzed.server.url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        obs = grpcclient.InferInput("obs", [1, 8], "FP32")
        obs.set_data_from_numpy(np.zeros((1, 8), np.float32))
        result = client.infer("policy", [obs])
        assert result.as_numpy("action").shape == (1, 1)
    finally:
        client.close()
    assert len(fuzzed.rss.samples) >= 2 * fuzzed.rss.window, "the fuzz tests did not run"
    growth = fuzzed.rss.growth
    mb = [round(s / 2**20) for s in fuzzed.rss.samples]
    assert growth < MAX_RSS_GROWTH, f"RSS grew by {growth / 2**20:.1f} MB: {mb}"


@pytest.mark.parametrize(
    "name",
    ["x" * 256, "/" + "x" * 20_000],
    ids=["longer-than-a-file-name", "longer-than-grpc-metadata"],
)
def test_overlong_model_name_is_not_found_on_unary_and_stream(fuzzed, name: str) -> None:
    """Found by this fuzzer: such names once gave INTERNAL, or lost their status in trailers
    too large for gRPC."""
    request = pb.ModelInferRequest(model_name=name)
    case = Case.of("overlong name", request.SerializeToString(), request)
    for outcome in (send_unary(fuzzed.unary, case), *send_stream(fuzzed.stream, [case])):
        _check(outcome, "overlong model name")
