"""The decision client's parts without a Forseti server: fallbacks, the replica set, the
hedging delay, request encoding, tokens, health checks against a bare KServe servicer, and that
importing the client imports no torch."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent import futures

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from forseti.client import DecisionClient, FixedAction, Hedging, LastGoodAction
from forseti.client.credentials import TLSConfig, token_metadata
from forseti.client.endpoints import ReplicaSet
from forseti.client.errors import ClientConfigError
from forseti.client.fallback import CallableFallback, as_fallback
from forseti.client.wire import decode_outputs, infer_request

OBS = np.zeros(4, np.float32)


def test_fixed_action_is_the_same_for_every_call_and_row() -> None:
    fallback = FixedAction(2)
    assert fallback.single(OBS, "user-1", "deadline") == 2
    assert fallback.batch(np.zeros((3, 4)), None, "deadline").tolist() == [2, 2, 2]


def test_last_good_action_returns_the_keys_last_answer_or_the_default() -> None:
    fallback = LastGoodAction(default=0)
    fallback.remember("a", 3)
    fallback.remember("b", 1)
    fallback.remember("a", 2)
    assert fallback.single(OBS, "a", "deadline") == 2
    assert fallback.single(OBS, "never-seen", "deadline") == 0
    assert fallback.single(OBS, None, "deadline") == 0
    assert fallback.batch(np.zeros((3, 4)), ["b", "a", "c"], "deadline").tolist() == [1, 2, 0]


def test_last_good_action_drops_the_least_recently_answered_key_past_its_bound() -> None:
    fallback = LastGoodAction(default=-1, max_keys=2)
    fallback.remember("a", 1)
    fallback.remember("b", 2)
    fallback.remember("a", 3)  # "a" is now the most recent
    fallback.remember("c", 4)
    assert [fallback.get(k) for k in "abc"] == [3, -1, 4]


def test_a_callable_fallback_gets_the_observation_and_the_reason() -> None:
    seen = []
    fallback = as_fallback(lambda obs, reason: seen.append((obs.shape, reason)) or 7)
    assert isinstance(fallback, CallableFallback)
    assert fallback.single(OBS, None, "unavailable") == 7
    assert seen == [((4,), "unavailable")]
    assert isinstance(as_fallback(5), FixedAction)
    assert as_fallback(None) is None


def test_round_robin_goes_over_the_healthy_replicas_only() -> None:
    replicas = ReplicaSet(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"])
    replicas.refresh()
    picks = {str(replicas.pick()) for _ in range(6)}
    assert picks == {"127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"}
    second = replicas.endpoints[1]
    assert replicas.failed(second, grpc.StatusCode.UNAVAILABLE)  # ejected at the first
    assert {str(replicas.pick()) for _ in range(6)} == {"127.0.0.1:1", "127.0.0.1:3"}
    assert replicas.set_health(second, True)
    assert replicas.healthy_count() == 3


def test_a_replica_is_ejected_only_after_several_deadline_misses() -> None:
    replicas = ReplicaSet(["127.0.0.1:1"], eject_after_timeouts=3)
    replicas.refresh()
    ep = replicas.endpoints[0]
    assert not replicas.failed(ep, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert not replicas.failed(ep, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert replicas.failed(ep, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert replicas.pick() is None


def test_pick_skips_the_replicas_already_tried() -> None:
    replicas = ReplicaSet(["127.0.0.1:1", "127.0.0.1:2"])
    replicas.refresh()
    first = replicas.pick()
    assert first is not None
    second = replicas.pick([first])
    assert second is not None and second is not first
    assert replicas.pick([first, second]) is None


def test_a_dns_endpoint_stands_for_every_address_of_the_name() -> None:
    replicas = ReplicaSet("dns:///policy.internal:8001")
    replicas.resolver = lambda host, port: [f"10.0.0.{i}:{port}" for i in (1, 2, 3)]
    replicas.refresh()
    assert [e.address for e in replicas.endpoints] == [
        "10.0.0.1:8001",
        "10.0.0.2:8001",
        "10.0.0.3:8001",
    ]
    assert {e.authority for e in replicas.endpoints} == {"policy.internal"}
    replicas.resolver = lambda host, port: [f"10.0.0.{i}:{port}" for i in (2, 3, 4)]
    replicas.refresh()  # a replica went away behind the name, another came
    assert [e.address for e in replicas.endpoints] == [
        "10.0.0.2:8001",
        "10.0.0.3:8001",
        "10.0.0.4:8001",
    ]


def test_localhost_resolves_through_the_real_resolver() -> None:
    replicas = ReplicaSet("dns:///localhost:8001")
    replicas.refresh()
    assert "127.0.0.1:8001" in [e.address for e in replicas.endpoints]


def test_an_endpoint_without_a_port_is_refused() -> None:
    with pytest.raises(ClientConfigError, match="expected host:port"):
        ReplicaSet(["policy.internal"]).refresh()


def test_fixed_hedging_delay_and_the_adaptive_one_follows_recent_answers() -> None:
    assert Hedging(after_ms=5).delay_s() == 0.005
    adaptive = Hedging(min_samples=32, every=32)
    assert adaptive.delay_s() is None  # not enough answers yet: no hedging
    for latency in [0.001] * 95 + [0.050] * 5:
        adaptive.observe(latency, "a:1")
    delay = adaptive.delay_s()
    assert delay is not None and 0.001 <= delay < 0.050


def test_the_adaptive_hedging_delay_follows_the_fastest_replica() -> None:
    adaptive = Hedging(min_samples=32, every=32)
    for _ in range(64):  # one replica slow throughout: half the answers are slow
        adaptive.observe(0.001, "fast:1")
        adaptive.observe(0.020, "slow:1")
    delay = adaptive.delay_s()
    assert delay is not None and delay < 0.005  # the slow half would have made it 20 ms


def test_bad_hedging_settings_are_refused() -> None:
    with pytest.raises(ClientConfigError, match="percentile"):
        Hedging(percentile=100)


def test_request_encoding_round_trips_through_a_response() -> None:
    obs = np.arange(8, dtype=np.float32).reshape(1, 8)
    request = infer_request("policy", {"obs": obs}, "2", {"priority": 1, "mode": "greedy"})
    assert request.model_version == "2"
    assert request.parameters["priority"].int64_param == 1
    assert request.parameters["mode"].string_param == "greedy"
    response = pb.ModelInferResponse(model_name="policy", model_version="2")
    out = response.outputs.add()
    out.name, out.datatype = "obs", "FP32"
    out.shape.extend(request.inputs[0].shape)
    response.raw_output_contents.append(request.raw_input_contents[0])
    np.testing.assert_array_equal(decode_outputs(response)["obs"], obs)


def test_tokens_become_the_restricted_protocol_headers(tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("# the inference token\nfrom-a-file-0123456789\n")
    token_file.chmod(0o600)
    headers = token_metadata({"infer": "literal-0123456789", "Admin": f"@{token_file}"})
    assert headers == (
        ("triton-grpc-protocol-infer", "literal-0123456789"),
        ("triton-grpc-protocol-admin", "from-a-file-0123456789"),
    )
    token_file.chmod(0o644)
    with pytest.raises(ClientConfigError, match="chmod 600"):
        token_metadata({"infer": f"@{token_file}"})


def test_mutual_tls_needs_both_the_certificate_and_its_key() -> None:
    with pytest.raises(ClientConfigError, match="both certificate_chain and private_key"):
        TLSConfig(certificate_chain="client.pem")


def test_importing_the_client_imports_neither_torch_nor_the_server() -> None:
    code = (
        "import sys, forseti.client; "
        "bad = [m for m in sys.modules if m.split('.')[0] == 'torch' "
        "or m.startswith('forseti.server')]; print(bad)"
    )
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_closed_client_refuses_calls() -> None:
    client = DecisionClient(["127.0.0.1:1"], "policy", fallback=0)
    client.close()
    with pytest.raises(ClientConfigError, match="closed"):
        client.decide(OBS)


class _ReadyOnly(service_pb2_grpc.GRPCInferenceServiceServicer):
    """A KServe server with ModelReady only and no grpc.health.v1 service (an older server)."""

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name == "policy")


def test_health_falls_back_to_model_ready_where_there_is_no_health_service() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_ReadyOnly(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with (
            DecisionClient([f"127.0.0.1:{port}"], "policy", probe_every_s=60) as ready,
            DecisionClient([f"127.0.0.1:{port}"], "other", probe_every_s=60) as missing,
        ):
            assert ready.check(ready.replicas.endpoints[0])
            assert not missing.check(missing.replicas.endpoints[0])
    finally:
        server.stop(0)
