"""`forseti loadtest`: locust users making real decision calls against the real server.

Every run is the command itself in a subprocess (locust monkey-patches the process it runs in
with gevent, which must not happen to pytest), a few users for a few seconds.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from testkit.server_process import free_port, run_forseti

GENEROUS = ["--p99-ms", "5000"]  # a target any loaded CI box meets


def loadtest(server, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    url = ["--url", server.url] if server is not None else []
    return run_forseti("loadtest", *url, *args, timeout=timeout)


def aggregated(output: str) -> tuple[int, int]:
    """(requests, failures) from the printed table's Aggregated row."""
    match = re.search(r"^Aggregated\s+(\d+)\s+(\d+)\s", output, re.MULTILINE)
    assert match, output
    return int(match.group(1)), int(match.group(2))


def peak_in_flight(output: str) -> int:
    match = re.search(r"peak (\d+) calls in flight", output)
    assert match, output
    return int(match.group(1))


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_unary_meets_a_generous_target_and_writes_csv(shared_server, tmp_path: Path) -> None:
    prefix = tmp_path / "out" / "run"
    result = loadtest(
        shared_server,
        *("--model", "policy", "--users", "4", "--duration", "3", *GENEROUS),
        *("--csv", str(prefix)),
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "ModelInfer (unary)" in out and "PASS" in out
    requests, failures = aggregated(result.stdout)
    assert requests > 50 and failures == 0
    # gevent + grpc really overlap the users' calls (without grpc's gevent support they would
    # run one at a time)
    assert peak_in_flight(out) >= 2

    stats = rows(Path(f"{prefix}_stats.csv"))
    by_name = {(r["Type"], r["Name"]): r for r in stats}
    assert int(by_name[("ModelInfer", "policy b1")]["Request Count"]) == requests
    assert int(by_name[("", "Aggregated")]["Failure Count"]) == 0
    assert len(rows(Path(f"{prefix}_stats_history.csv"))) >= 2
    assert rows(Path(f"{prefix}_failures.csv")) == []
    summary = {r["type"]: r for r in rows(Path(f"{prefix}_summary.csv"))}
    assert int(summary["Aggregated"]["requests"]) == requests
    assert 0 < float(summary["ModelInfer"]["p50_ms"]) <= float(summary["ModelInfer"]["p99_ms"])


def test_stream_with_npy_input_meets_a_generous_target(shared_server, tmp_path: Path) -> None:
    obs = tmp_path / "obs.npy"
    np.save(obs, np.random.default_rng(0).uniform(-1, 1, (10, 8)).astype(np.float64))
    result = loadtest(
        shared_server,
        *("--model", "policy", "--stream", "--batch-size", "4", "--input-npy", str(obs)),
        *("--users", "4", "--duration", "3", *GENEROUS),
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "ModelStreamInfer" in out and "policy b4" in out
    requests, failures = aggregated(result.stdout)
    assert requests > 50 and failures == 0
    assert peak_in_flight(out) >= 2


def test_an_impossible_target_exits_1(shared_server) -> None:
    result = loadtest(
        shared_server, "--model", "policy", "--users", "2", "--duration", "2", "--p99-ms", "0.001"
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert re.search(r"MISSED\s+p99", out) and "FAIL" in out
    assert aggregated(result.stdout)[1] == 0  # missed on latency alone


@pytest.mark.parametrize("mode", [[], ["--stream"]], ids=["unary", "stream"])
def test_a_missing_model_counts_failures_and_exits_1(shared_server, mode) -> None:
    result = loadtest(
        shared_server,
        *("--model", "no_such_model", *mode, "--users", "2", "--duration", "2", *GENEROUS),
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    requests, failures = aggregated(result.stdout)
    assert failures == requests > 0
    assert "NOT_FOUND" in out or "unknown model" in out
    assert re.search(r"MISSED\s+failure rate 100", out)


@pytest.mark.parametrize("mode", [[], ["--stream"]], ids=["unary", "stream"])
def test_failed_decision_calls_are_counted(start_server, repository: Path, mode) -> None:
    """A server that refuses requests over 512 bytes: set-up calls pass, every decision call
    (64 x 8 FP32 = 2 KiB) fails -- as a unary status, or, on a stream, by ending the stream
    (which the user then starts again)."""
    server = start_server(
        repository, "--model-control-mode", "explicit", "--load-model", "*",
        "--max-request-bytes", "512",
    )  # fmt: skip
    result = loadtest(
        server,
        *("--model", "policy", *mode, "--batch-size", "64", "--users", "2", "--duration", "2"),
        *(*GENEROUS, "--max-failure-rate", "0.5"),
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    requests, failures = aggregated(result.stdout)
    assert failures == requests > 0
    assert "RESOURCE_EXHAUSTED" in out
    assert ("ModelStreamInfer" if mode else "ModelInfer") + " policy b64" in out


def test_worker_processes_report_every_call(shared_server) -> None:
    result = loadtest(
        shared_server,
        *("--model", "policy", "--users", "4", "--workers", "2", "--duration", "3", *GENEROUS),
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "2 locust worker processes + master" in out
    requests, failures = aggregated(result.stdout)
    assert requests > 50 and failures == 0
    assert peak_in_flight(out) >= 2  # 2 users per worker process


def test_bad_options_exit_2_before_any_load(shared_server, tmp_path: Path) -> None:
    too_big = loadtest(shared_server, "--model", "policy", "--batch-size", "65", "--duration", "1")
    assert too_big.returncode == 2, too_big.stdout + too_big.stderr
    assert "max_batch_size 64" in too_big.stderr

    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((4, 3), np.float32))
    bad_npy = loadtest(shared_server, "--model", "policy", "--input-npy", str(wrong))
    assert bad_npy.returncode == 2
    assert "does not fit input 'obs'" in bad_npy.stderr

    several = loadtest(shared_server, "--duration", "1")  # no --model, three ready models
    assert several.returncode == 2
    assert "choose one with --model" in several.stderr

    nobody = loadtest(None, "--url", f"127.0.0.1:{free_port()}", "--model", "policy")
    assert nobody.returncode == 2
    assert "cannot reach a server" in nobody.stderr


def test_the_command_works_without_locust_until_it_runs() -> None:
    """`forseti --help` and `forseti loadtest --help` need no locust; running says what to
    install; importing the runner imports no locust."""
    code = """
import importlib.abc, sys
class NoLocust(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "locust" or name.startswith("locust."):
            raise ImportError("No module named 'locust'")
sys.meta_path.insert(0, NoLocust())
from forseti.cli import main
assert main(["--help"]) == 0
try:
    main(["loadtest", "--help"])
except SystemExit as e:
    assert e.code == 0
import forseti.loadtests.runner
assert "locust" not in sys.modules
print("RC", main(["loadtest", "--model", "policy"]))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "loadtest" in result.stdout and "--p99-ms" in result.stdout
    assert "RC 2" in result.stdout
    assert "pip install 'forseti[load]'" in result.stderr


def test_auto_workers_and_durations() -> None:
    from forseti.loadtests.runner import auto_workers, parse_duration

    assert auto_workers(1, cpus=8) == 0
    assert auto_workers(16, cpus=8) == 0
    assert auto_workers(17, cpus=8) == 0  # 17 // 16 = 1: no point in a master
    assert auto_workers(64, cpus=8) == 4
    assert auto_workers(64, cpus=2) == 2
    assert auto_workers(1000, cpus=8) == 8
    assert parse_duration("20") == 20
    assert parse_duration("1.5m") == 90
    assert parse_duration("500ms") == 0.5
