"""Faults with real processes and real signals: the server, a publisher or a client is killed
with SIGKILL, an artifact is damaged under a loaded version, clients walk away mid-call.

Load comes from the hot-swap harness of `testkit/swap_harness.py`: closed-loop tritonclient.grpc
clients in spawned processes calling `policy` with no version named, every answer recorded
with its time and `model_version` (policy_onnx(N) answers action N % 4, and versions N here
are built with tag N).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from forseti.core.repository.publish import TEMP_PREFIX
from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.sealed import seal_bytes
from testkit.model_builders import POLICY_CONFIG, policy_onnx, publish_sealed, write_config
from testkit.server_process import ServerProcess
from testkit.swap_harness import Calls, ClientPool
from tests.test_shutdown import SLOW_CONFIG, WIDTH, slow_onnx
from tests.test_swap import index_entries, infer_policy, wait_for

REPO_ROOT = Path(__file__).resolve().parent.parent
SEALED = "model.onnx.sealed"
CLIENTS = 8


@pytest.fixture(scope="module")
def pool() -> Iterator[ClientPool]:
    with ClientPool(clients=CLIENTS, procs=2) as p:
        yield p


def states(client: grpcclient.InferenceServerClient, name: str = "policy") -> dict[str, str]:
    return {v: e["state"] for v, e in index_entries(client, name).items()}


def assert_answers_match_versions(calls: Calls) -> None:
    assert np.all(calls.action == calls.version % 4), "an answer's action is not its version's"
    for slot in range(CLIENTS):
        seq = calls.version[calls.slot == slot]
        assert np.all(np.diff(seq) >= 0), f"client {slot} went back to an older version"


def log_text(server: ServerProcess) -> str:
    assert server.log_path is not None
    return server.log_path.read_text(errors="replace")


def usage(pid: int) -> tuple[int, int]:
    """(RSS bytes, open fds) of a process."""
    proc = psutil.Process(pid)
    return proc.memory_info().rss, proc.num_fds()


# ---- kill -9 of the server under load --------------------------------------------------------


def test_server_killed_under_load_restarts_on_the_newest_complete_version_and_clients_reconnect(
    repository: Path, keyring: Keyring, start_server, pool: ClientPool
) -> None:
    server = start_server(repository, "--model-control-mode", "explicit", "--load-model", "policy")
    control = grpcclient.InferenceServerClient(server.url)
    now = time.monotonic_ns
    pool.start(server.url)
    try:
        wait_for(lambda: pool.all_seen(1), what="every client answered by v1")
        assert publish_sealed(repository, "policy", policy_onnx(2), keyring) == 2
        control.load_model("policy")
        wait_for(lambda: pool.all_seen(2), what="every client answered by v2")
        # v3 is published but not loaded: only the restart can bring it in. A publisher that
        # died mid-write left a hidden folder holding a would-be v4, cut short.
        assert publish_sealed(repository, "policy", policy_onnx(3), keyring) == 3
        blob = seal_bytes(policy_onnx(4), keyring, model="policy", version=4, filename="model.onnx")
        leftover = repository / "policy" / f"{TEMP_PREFIX}killed"
        leftover.mkdir()
        (leftover / SEALED).write_bytes(blob[: len(blob) // 3])
        time.sleep(0.2)
        assert max(pool.versions()) == 2

        killed_at = now()
        assert server.kill() == -signal.SIGKILL
        time.sleep(0.3)  # the clients keep calling a dead address meanwhile
        server.restart()
        restarted_at = now()
        took = wait_for(lambda: pool.all_seen(3), timeout=30, what="every client on v3")
        reconnected_at = now()
        time.sleep(0.3)
        assert states(control) == {"3": "READY"}
        assert infer_policy(control) == (3, 3)
    finally:
        calls = pool.stop()
        control.close()

    assert_answers_match_versions(calls)
    # Before the kill: v1 then v2. After the restart: only v3, on every client.
    before = calls.version[calls.end < killed_at]
    after = calls.version[calls.start > restarted_at]
    assert set(before.tolist()) == {1, 2}
    assert set(after.tolist()) == {3}
    for slot in range(CLIENTS):
        mine = calls.start[(calls.slot == slot) & (calls.version == 3)]
        assert mine.size > 0, f"client {slot} never reconnected"
    # The clients were running at the kill; every failure falls between the kill and the
    # moment every client was answered again, and says the server was unavailable.
    assert calls.failures, "no call was in flight or attempted while the server was down"
    # (a call in flight at the kill started before it).
    late = [f for f in calls.failures if not killed_at <= f[2] <= reconnected_at]
    assert late == [], late[:3]
    statuses = {why.split(":")[0] for *_, why in calls.failures}
    assert statuses <= {"StatusCode.UNAVAILABLE"}, statuses
    assert took < 20
    assert "publish-killed" not in log_text(server)


# ---- kill -9 of a publisher mid-publish ------------------------------------------------------

# A publisher on a slow disk: the real publish_version, with every os.write cut to `chunk`
# bytes and followed by a pause, so it spends seconds inside its hidden temporary folder.
SLOW_PUBLISHER = """
import os, sys, time
from pathlib import Path
from forseti.core.sealing.keyring import Keyring
from testkit.model_builders import policy_onnx, publish_sealed

repo, keyring_path = Path(sys.argv[1]), Path(sys.argv[2])
chunk, pause = int(sys.argv[3]), float(sys.argv[4])
model = policy_onnx(2, hidden=4096)
real_write = os.write

def slow_write(fd, data):
    n = real_write(fd, bytes(data[:chunk]))
    print("wrote", n, flush=True)
    time.sleep(pause)
    return n

os.write = slow_write
number = publish_sealed(repo, "policy", model, Keyring.load(keyring_path))
print("published", number, flush=True)
"""


def test_publisher_killed_mid_publish_leaves_no_half_version_and_the_next_publish_loads(
    repository: Path, keyring: Keyring, keyring_path: Path, start_server, pool: ClientPool
) -> None:
    server = start_server(
        repository, "--model-control-mode", "poll", "--repository-poll-secs", "0.2"
    )
    control = grpcclient.InferenceServerClient(server.url)
    model_dir = repository / "policy"
    seen_states: list[dict[str, str]] = []
    sampling = threading.Event()

    def sample_index() -> None:
        client = grpcclient.InferenceServerClient(server.url)
        try:
            while not sampling.is_set():
                seen_states.append(states(client))
                time.sleep(0.05)
        finally:
            client.close()

    sampler = threading.Thread(target=sample_index, daemon=True)
    pool.start(server.url)
    publisher = None
    try:
        wait_for(lambda: pool.all_seen(1), what="every client answered by v1")
        sampler.start()
        publisher_args = [str(repository), str(keyring_path), "16384", "0.2"]
        publisher = subprocess.Popen(
            [sys.executable, "-c", SLOW_PUBLISHER, *publisher_args],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert publisher.stdout is not None
        for _ in range(2):  # two chunks are down: it is inside its hidden folder, half way
            line = publisher.stdout.readline()
            assert line.startswith("wrote"), line + publisher.stdout.read()
        time.sleep(0.5)  # a few poll intervals while the publisher is alive mid-write
        hidden = [p for p in model_dir.iterdir() if p.name.startswith(TEMP_PREFIX)]
        assert len(hidden) == 1, hidden
        partial = hidden[0] / SEALED
        written = partial.stat().st_size
        publisher.send_signal(signal.SIGKILL)
        assert publisher.wait(10) == -signal.SIGKILL
        full = len(
            seal_bytes(
                policy_onnx(2, hidden=4096), keyring, model="policy", version=2, filename="x"
            )
        )
        assert 0 < partial.stat().st_size < full, (written, full)
        time.sleep(1.0)  # five more poll intervals with the leftover on disk
        sampling.set()
        sampler.join(10)

        # No half version was ever listed, let alone loaded; every answer came from v1.
        assert seen_states and all(s == {"1": "READY"} for s in seen_states), seen_states[-3:]
        assert set(pool.versions()) == {1}
        assert infer_policy(control) == (1, 1)
        assert hidden[0].exists(), "the leftover is ignored, not half-served"

        # The next normal publish takes number 2 (the leftover claimed none) and goes live.
        assert publish_sealed(repository, "policy", policy_onnx(2), keyring) == 2
        wait_for(lambda: pool.all_seen(2), what="every client answered by the new v2")
        assert states(control) == {"2": "READY"}
    finally:
        sampling.set()
        if publisher is not None and publisher.poll() is None:
            publisher.kill()
            publisher.wait()
        calls = pool.stop()
        control.close()
    assert calls.failures == []
    assert_answers_match_versions(calls)
    assert set(calls.version.tolist()) == {1, 2}
    log = log_text(server)
    assert TEMP_PREFIX not in log
    assert "load failed" not in log


# ---- an artifact damaged under a loaded version ----------------------------------------------


def _truncate(path: Path, original: bytes) -> None:
    os.truncate(path, len(original) // 2)


def _garbage(path: Path, original: bytes) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(len(original)))


def _delete(path: Path, original: bytes) -> None:
    path.unlink()


DAMAGE = {"truncated": _truncate, "garbage": _garbage, "deleted": _delete}
LOAD_FAILED = re.compile(r"version load failed .*model=policy version=1\b")


@pytest.mark.parametrize("mode", ["explicit", "poll"])
def test_damaged_artifact_of_the_live_version_leaves_it_serving(
    mode: str, repository: Path, start_server, pool: ClientPool
) -> None:
    args = ["--load-model", "policy"] if mode == "explicit" else ["--repository-poll-secs", "0.2"]
    server = start_server(repository, "--model-control-mode", mode, *args)
    control = grpcclient.InferenceServerClient(server.url)
    path = repository / "policy" / "1" / SEALED
    original = path.read_bytes()
    pool.start(server.url)
    try:
        wait_for(lambda: pool.all_seen(1), what="every client answered by v1")
        for what, damage in DAMAGE.items():
            failed_before = len(LOAD_FAILED.findall(log_text(server)))
            damage(path, original)
            if mode == "explicit":
                # The loaded copy is in memory: damage on disk changes nothing until a load.
                time.sleep(0.2)
                assert infer_policy(control) == (1, 1)
                with pytest.raises(InferenceServerException) as excinfo:
                    control.load_model("policy")
                assert excinfo.value.status() == "StatusCode.INVALID_ARGUMENT", what
            # Poll mode notices the change by itself and tries to reload.
            wait_for(
                lambda n=failed_before: len(LOAD_FAILED.findall(log_text(server))) > n,
                what=f"the reload of the {what} artifact to fail",
            )
            entry = index_entries(control, "policy")
            assert entry["1"]["state"] == "READY", (what, entry)
            assert entry["1"]["reason"].startswith("reload failed, previous load serving"), (
                what,
                entry,
            )
            assert infer_policy(control) == (1, 1)
            assert control.is_model_ready("policy")
        # A good file again: the reload succeeds and the report clears.
        path.write_bytes(original)
        if mode == "explicit":
            control.load_model("policy")
        wait_for(
            lambda: index_entries(control, "policy")["1"].get("reason", "") == "",
            what="the repaired artifact to reload",
        )
        assert infer_policy(control) == (1, 1)
    finally:
        calls = pool.stop()
        control.close()
    assert calls.failures == [], calls.failures[:3]
    assert set(calls.version.tolist()) == {1}
    assert_answers_match_versions(calls)


# ---- clients walking away mid-stream and mid-call ---------------------------------------------

# Slow-model batches: on a 2-CPU box about 10 ms (8 rows), 50 ms (64) and 200 ms (256).
STREAM_BATCH = 64  # what an abandoned stream leaves pending
CANCEL_BATCH = 256  # a unary call cancelled 60 ms in is still running on the server
CANCEL_AFTER_S = 0.06

# The slow model behind Triton's dynamic batcher, with a short queue.
SLOW_BATCHED_CONFIG = SLOW_CONFIG.replace('name: "slow"', 'name: "slow_batched"') + (
    "dynamic_batching { max_queue_delay_microseconds: 2000 "
    "default_queue_policy { max_queue_size: 8 } }\n"
)

# A client process with open streams, each with a slow request and policy requests pending.
STREAMING_CLIENT = """
import sys, time
import numpy as np
import tritonclient.grpc as g

url, streams, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
x = g.InferInput("x", [8, width], "FP32")
x.set_data_from_numpy(np.ones((8, width), np.float32))
obs = g.InferInput("obs", [1, 8], "FP32")
obs.set_data_from_numpy(np.zeros((1, 8), np.float32))
clients = []
for _ in range(streams):
    c = g.InferenceServerClient(url)
    c.start_stream(lambda result, error: None)
    c.async_stream_infer("slow", [x])
    for _ in range(3):
        c.async_stream_infer("policy", [obs])
    clients.append(c)
print("streaming", flush=True)
time.sleep(60)
"""


@dataclass
class Tally:
    """What the walked-away clients did, and anything that went wrong on their side."""

    streams: int = 0
    sent: int = 0
    answered: int = 0
    calls: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    killed_processes: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _slow_input(rows: int) -> grpcclient.InferInput:
    x = grpcclient.InferInput("x", [rows, WIDTH], "FP32")
    x.set_data_from_numpy(np.ones((rows, WIDTH), np.float32))
    return x


def _obs_input() -> grpcclient.InferInput:
    obs = grpcclient.InferInput("obs", [1, 8], "FP32")
    obs.set_data_from_numpy(np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8))
    return obs


def _abandon_streams(url: str, count: int, tally: Tally) -> None:
    """`count` streams, each cancelled with requests still pending: tritonclient's
    stop_stream(cancel_requests=True), half right after sending, half once one answer came."""
    for i in range(count):
        client = grpcclient.InferenceServerClient(url)
        answers: list = []
        first = threading.Event()

        def callback(result, error, answers=answers, first=first) -> None:
            if result is not None:
                answers.append(result)
            first.set()

        sent = 0
        try:
            client.start_stream(callback)
            if i % 4 == 0:
                client.async_stream_infer("slow", [_slow_input(STREAM_BATCH)])
                sent += 1
            for _ in range(4):
                client.async_stream_infer("policy", [_obs_input()])
                sent += 1
            if i % 2:
                first.wait(5)
            client.stop_stream(cancel_requests=True)
        except Exception as exc:
            with tally.lock:
                tally.errors.append(repr(exc))
        finally:
            client.close()
        with tally.lock:
            tally.streams += 1
            tally.sent += sent
            tally.answered += len(answers)


def _cancel_unary_calls(url: str, model: str, rounds: int, at_once: int, tally: Tally) -> None:
    """`rounds` times, `at_once` slow calls cancelled while the server runs or queues them."""
    client = grpcclient.InferenceServerClient(url)
    try:
        for _ in range(rounds):
            outcomes: list = []
            all_done = threading.Semaphore(0)

            def callback(result, error, outcomes=outcomes, all_done=all_done) -> None:
                outcomes.append(error)
                all_done.release()

            calls = [
                client.async_infer(model, [_slow_input(CANCEL_BATCH)], callback)
                for _ in range(at_once)
            ]
            time.sleep(CANCEL_AFTER_S)
            for call in calls:
                call.cancel()
            for _ in calls:
                assert all_done.acquire(timeout=10), "a cancelled call never completed"
            with tally.lock:
                for error in outcomes:
                    status = "OK" if error is None else error.status().split(".")[-1]
                    tally.calls[model][status] += 1
    finally:
        client.close()


def _kill_streaming_clients(url: str, processes: int, streams: int, tally: Tally) -> None:
    """Client processes with open streams and pending requests, killed with SIGKILL."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", STREAMING_CLIENT, url, str(streams), str(WIDTH)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(processes)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line.strip() == "streaming", line + p.stdout.read()
        time.sleep(0.1)
        for p in procs:
            p.send_signal(signal.SIGKILL)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            if p.wait(10) == -signal.SIGKILL:
                tally.killed_processes += 1


def _infer_many(url: str, model: str, count: int) -> list[np.ndarray]:
    """`count` concurrent calls of 8 rows; their outputs."""
    client = grpcclient.InferenceServerClient(url)
    results: list = []
    done = threading.Semaphore(0)

    def callback(result, error) -> None:
        results.append(error if error is not None else result.as_numpy("y"))
        done.release()

    try:
        for _ in range(count):
            client.async_infer(model, [_slow_input(8)], callback)
        for _ in range(count):
            assert done.acquire(timeout=30)
    finally:
        client.close()
    errors = [r for r in results if not isinstance(r, np.ndarray)]
    assert errors == [], errors
    return results


def _walk_away(url: str, streams: int, cancels: int, killed: int) -> Tally:
    """All at once: 8 threads abandoning `streams` streams, one thread cancelling `cancels`
    slow calls one by one, one cancelling as many on the dynamic batcher four at a time,
    `killed` client processes with 10 open streams each SIGKILLed."""
    tally = Tally()
    threads = [
        threading.Thread(target=_abandon_streams, args=(url, streams // 8, tally)) for _ in range(8)
    ]
    threads.append(
        threading.Thread(target=_cancel_unary_calls, args=(url, "slow", cancels, 1, tally))
    )
    threads.append(
        threading.Thread(
            target=_cancel_unary_calls, args=(url, "slow_batched", cancels // 4, 4, tally)
        )
    )
    for t in threads:
        t.start()
    _kill_streaming_clients(url, killed, 10, tally)
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert tally.errors == [], tally.errors[:5]
    assert tally.streams == streams and tally.killed_processes == killed
    # Really mid-call: the streams left requests unanswered, the calls were cut off running.
    assert tally.answered < tally.sent, (tally.answered, tally.sent)
    assert tally.calls["slow"]["CANCELLED"] >= cancels * 0.8, tally.calls
    # Behind the batcher a call is cancelled, or refused at once when the queue is full.
    assert set(tally.calls["slow_batched"]) <= {"CANCELLED", "RESOURCE_EXHAUSTED", "OK"}
    assert tally.calls["slow_batched"]["CANCELLED"] > 0, tally.calls
    return tally


def test_clients_cancelling_or_dying_mid_stream_and_mid_call_leak_nothing(
    tmp_path: Path, keyring: Keyring, start_server
) -> None:
    repo = tmp_path / "repo"
    write_config(repo, "policy", POLICY_CONFIG)
    publish_sealed(repo, "policy", policy_onnx(1), keyring, version=1)
    write_config(repo, "slow", SLOW_CONFIG)
    publish_sealed(repo, "slow", slow_onnx(), keyring, version=1)
    write_config(repo, "slow_batched", SLOW_BATCHED_CONFIG)
    publish_sealed(repo, "slow_batched", slow_onnx(), keyring, version=1)
    server = start_server(repo, "--model-control-mode", "explicit", "--load-model", "*")
    control = grpcclient.InferenceServerClient(server.url)
    try:
        # A first round takes the allocator to its high-water marks; then the baseline.
        _walk_away(server.url, streams=200, cancels=30, killed=3)
        time.sleep(1.0)
        rss0, fds0 = usage(server.pid)

        # Two more rounds: were the walked-away requests kept (their tensors, tasks, calls),
        # each round would add ~40 MiB (30 slow batches of 1 MiB, 50 of 256 KiB, 30 of
        # 32 KiB).
        for _ in range(2):
            _walk_away(server.url, streams=200, cancels=30, killed=3)

        # Every connection the walked-away clients had is closed; memory is back.
        wait_for(
            lambda: usage(server.pid)[1] <= fds0,
            timeout=15,
            what=f"the server's open fds back to {fds0} (now {usage(server.pid)[1]})",
        )
        time.sleep(1.0)
        rss1, fds1 = usage(server.pid)
        assert fds1 <= fds0
        growth = (rss1 - rss0) / 2**20
        print(f"server RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB, fds {fds0} -> {fds1}")
        # (allocator retention moves RSS by up to ~20 MiB either way between rounds here)
        assert growth < 32, f"RSS grew {growth:.1f} MiB over 400 walked-away streams"

        # The server still answers, and the batcher's queue kept no cancelled leftovers: it
        # takes a full queue's worth (8) of new calls at once.
        assert infer_policy(control) == (1, 1)
        for name in ("slow", "slow_batched"):
            outs = _infer_many(server.url, name, 8)
            assert [o.shape for o in outs] == [(8, WIDTH)] * 8, name

        # No cancelled request is still counted as running on a version: every old version
        # drains and is released once swapped out.
        swaps = [("policy", policy_onnx(2)), ("slow", slow_onnx()), ("slow_batched", slow_onnx())]
        for name, model in swaps:
            assert publish_sealed(repo, name, model, keyring) == 2
            control.load_model(name)
            released = re.compile(rf"version released .*model={name} version=1\b")
            wait_for(
                lambda r=released: bool(r.search(log_text(server))),
                what=f"{name} v1 to drain and be released",
            )
        assert infer_policy(control) == (2, 2)
        assert _infer_many(server.url, "slow_batched", 1)[0].shape == (8, WIDTH)
        assert "Traceback" not in log_text(server)
    finally:
        control.close()
