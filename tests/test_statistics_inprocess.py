"""ModelStatistics and /metrics after known traffic, against the in-process server.

Each test starts its own server (tests/inprocess_server.py), so its counters start at zero,
makes a known number of successful and failed calls with tritonclient, then reads the
statistics over gRPC and the metrics text the /metrics endpoint would serve.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import InferRequestedOutput
from tritonclient.utils import InferenceServerException

from forseti.core.sealing.keyring import Keyring
from testkit.model_builders import OBS_DIM
from tests.inprocess_server import run_inprocess
from tests.test_request_path import assert_refused, build_request_path_repo, obs, obs_input

SUCCESS_BATCHES = [1, 1, 1, 4, 4]  # N = 5 requests, 11 inferences, 5 executions
FAILURES = 3  # M


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, keyring: Keyring) -> Path:
    return build_request_path_repo(tmp_path_factory.mktemp("statistics") / "repo", keyring)


async def known_traffic(client, model: str) -> None:
    """N successful calls of SUCCESS_BATCHES sizes, then M refused ones that reach the version
    (two wrong shapes, one unexpected requested output)."""
    for i, batch in enumerate(SUCCESS_BATCHES):
        await client.infer(model, [obs_input(obs(batch, seed=i))])
    bad_calls = [
        {"inputs": [obs_input(np.zeros((1, OBS_DIM + 1), np.float32))]},
        {"inputs": [obs_input(np.zeros((2, OBS_DIM - 1), np.float32))]},
        {"inputs": [obs_input(obs(1))], "outputs": [InferRequestedOutput("value")]},
    ]
    assert len(bad_calls) == FAILURES
    for kwargs in bad_calls:
        with pytest.raises(InferenceServerException):
            await client.infer(model, **kwargs)


def metric(text: str, name: str, model: str, version: str = "1") -> float:
    pattern = rf'^{name}\{{model="{model}",version="{version}"\}} (\S+)$'
    found = re.findall(pattern, text, re.MULTILINE)
    assert len(found) == 1, f"{name} for {model} v{version} not once in:\n{text}"
    return float(found[0])


# ---- ModelStatistics --------------------------------------------------------------------


@pytest.mark.parametrize("model", ["policy", "policy_threaded"], ids=["inline", "threaded"])
def test_statistics_count_successes_failures_inferences_and_executions(
    repo, keyring, model: str
) -> None:
    async def body(client, srv):
        await known_traffic(client, model)
        return await client.get_inference_statistics(model)

    stats = run_inprocess(repo, keyring, body, load=[model])
    assert len(stats.model_stats) == 1
    s = stats.model_stats[0]
    assert (s.name, s.version) == (model, "1")
    assert s.inference_stats.success.count == len(SUCCESS_BATCHES)
    assert s.inference_stats.fail.count == FAILURES
    assert s.inference_count == sum(SUCCESS_BATCHES)
    assert s.execution_count == len(SUCCESS_BATCHES)
    assert s.last_inference > 0


@pytest.mark.parametrize("model", ["policy", "policy_threaded"], ids=["inline", "threaded"])
def test_statistics_count_executions_per_batch_size(repo, keyring, model: str) -> None:
    async def body(client, srv):
        await known_traffic(client, model)
        return await client.get_inference_statistics(model, "1")

    s = run_inprocess(repo, keyring, body, load=[model]).model_stats[0]
    counts = {b.batch_size: b.compute_infer.count for b in s.batch_stats}
    assert counts == {1: 3, 4: 2}
    for b in s.batch_stats:
        assert b.compute_input.count == b.compute_output.count == b.compute_infer.count
        assert b.compute_infer.ns > 0


@pytest.mark.parametrize("model", ["policy", "policy_threaded"], ids=["inline", "threaded"])
def test_statistics_durations_are_positive_and_counted_per_success(
    repo, keyring, model: str
) -> None:
    async def body(client, srv):
        await known_traffic(client, model)
        return await client.get_inference_statistics(model)

    i = run_inprocess(repo, keyring, body, load=[model]).model_stats[0].inference_stats
    n = len(SUCCESS_BATCHES)
    for name in ("success", "compute_input", "compute_infer", "compute_output"):
        d = getattr(i, name)
        assert d.count == n, (name, d)
        assert d.ns > 0, (name, d)
    assert i.fail.ns > 0
    assert i.queue.count == n


def test_dynamic_batching_statistics_count_one_execution_for_four_requests(repo, keyring) -> None:
    """Four simultaneous batch-1 requests fill the preferred batch size of 4: four requests
    and four inferences, but one execution, of batch size 4."""

    async def body(client, srv):
        await asyncio.gather(
            *(client.infer("policy_batched", [obs_input(obs(1, seed=s))]) for s in range(4))
        )
        return await client.get_inference_statistics("policy_batched")

    s = run_inprocess(repo, keyring, body, load=["policy_batched"]).model_stats[0]
    assert s.inference_stats.success.count == 4
    assert s.inference_stats.fail.count == 0
    assert s.inference_count == 4
    assert s.execution_count == 1
    assert [(b.batch_size, b.compute_infer.count) for b in s.batch_stats] == [(4, 1)]
    assert s.inference_stats.queue.ns > 0  # they waited for each other


def test_dynamic_batching_batch_statistics_have_input_and_output_durations(repo, keyring) -> None:
    async def body(client, srv):
        await asyncio.gather(
            *(client.infer("policy_batched", [obs_input(obs(1, seed=s))]) for s in range(4))
        )
        return await client.get_inference_statistics("policy_batched")

    s = run_inprocess(repo, keyring, body, load=["policy_batched"]).model_stats[0]
    (b,) = s.batch_stats
    assert b.compute_infer.ns > 0
    assert b.compute_input.ns > 0
    assert b.compute_output.ns > 0


def test_statistics_of_every_model_list_each_loaded_version(repo, keyring) -> None:
    async def body(client, srv):
        await client.infer("policy", [obs_input(obs(1))])
        return await client.get_inference_statistics()

    stats = run_inprocess(repo, keyring, body, load=["policy", "policy_threaded"])
    by_name = {(s.name, s.version): s for s in stats.model_stats}
    assert set(by_name) == {("policy", "1"), ("policy_threaded", "1")}
    assert by_name[("policy", "1")].inference_stats.success.count == 1
    assert by_name[("policy_threaded", "1")].inference_stats.success.count == 0


def test_statistics_of_an_unknown_model_is_not_found(repo, keyring) -> None:
    async def body(client, srv):
        with pytest.raises(InferenceServerException) as caught:
            await client.get_inference_statistics("no_such_model")
        return caught.value

    exc = run_inprocess(repo, keyring, body, load=["policy"])
    assert_refused(exc, "NOT_FOUND", "Request for unknown model: 'no_such_model' is not found")


# ---- /metrics ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["policy", "policy_threaded"], ids=["inline", "threaded"])
def test_metrics_count_request_successes_and_failures_per_version(
    repo, keyring, model: str
) -> None:
    async def body(client, srv):
        await known_traffic(client, model)
        return srv.metrics()

    text = run_inprocess(repo, keyring, body, load=[model])
    assert metric(text, "nv_inference_request_success", model) == len(SUCCESS_BATCHES)
    assert metric(text, "nv_inference_request_failure", model) == FAILURES
    assert metric(text, "nv_inference_count", model) == sum(SUCCESS_BATCHES)
    assert metric(text, "nv_inference_exec_count", model) == len(SUCCESS_BATCHES)
    assert metric(text, "nv_inference_request_duration_us", model) > 0
    assert metric(text, "forseti_inference_request_duration_seconds_count", model) == len(
        SUCCESS_BATCHES
    )


def test_metrics_match_model_statistics(repo, keyring) -> None:
    async def body(client, srv):
        await known_traffic(client, "policy")
        stats = await client.get_inference_statistics("policy")
        return stats.model_stats[0], srv.metrics()

    s, text = run_inprocess(repo, keyring, body, load=["policy"])
    assert metric(text, "nv_inference_request_success", "policy") == s.inference_stats.success.count
    assert metric(text, "nv_inference_request_failure", "policy") == s.inference_stats.fail.count
    assert metric(text, "nv_inference_count", "policy") == s.inference_count
    assert metric(text, "nv_inference_exec_count", "policy") == s.execution_count
    assert metric(text, "nv_inference_compute_infer_duration_us", "policy") == (
        s.inference_stats.compute_infer.ns // 1000
    )


def test_metrics_of_dynamic_batching_count_executions_apart_from_requests(repo, keyring) -> None:
    async def body(client, srv):
        await asyncio.gather(
            *(client.infer("policy_batched", [obs_input(obs(1, seed=s))]) for s in range(4))
        )
        return srv.metrics()

    text = run_inprocess(repo, keyring, body, load=["policy_batched"])
    assert metric(text, "nv_inference_request_success", "policy_batched") == 4
    assert metric(text, "nv_inference_count", "policy_batched") == 4
    assert metric(text, "nv_inference_exec_count", "policy_batched") == 1
    assert metric(text, "nv_inference_request_failure", "policy_batched") == 0


def test_metrics_list_a_loaded_model_without_requests_at_zero(repo, keyring) -> None:
    async def body(client, srv):
        return srv.metrics()

    text = run_inprocess(repo, keyring, body, load=["policy"])
    assert metric(text, "nv_inference_request_success", "policy") == 0
    assert metric(text, "nv_inference_request_failure", "policy") == 0
