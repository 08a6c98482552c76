"""Promotions to a fleet under load: three `forseti serve` replicas on one repository, client
threads spread over them with gRPC round robin (one channel over the three addresses), and N
promotions through the trainer's promotion code, each confirmed on every replica. Per server
mode (explicit: RepositoryModelLoad on each replica; poll: each replica's poll), it prints
the calls made and failed, and publish -> every replica serving (p50, max) next to the
per-replica times.

    .venv/bin/python -m benchmarks.bench_fleet [--promotions 10] [--clients 6] [--poll-secs 0.5]
        [--store folder|s3]

The repository is a local folder, or (--store s3) a bucket on a local S3 server (moto, run in
this process: it shares the benchmark's interpreter with the client threads, so its figures
include that contention).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from forseti.core.repository.publish import publish_model_version
from forseti.core.sealing.keyring import Keyring
from forseti.core.storage import open_storage
from forseti.trainer_sidecar.promote import promote
from forseti.trainer_sidecar.replicas import open_replicas
from testkit.model_builders import OBS_DIM, POLICY_CONFIG, build_repository, policy_onnx
from testkit.object_store import S3Server, s3_server
from testkit.server_process import ServerProcess

PROBE = np.zeros((1, OBS_DIM), np.float32)


@dataclass
class Load:
    """Client threads calling `policy` through one round-robin channel each."""

    target: str
    clients: int
    stop: threading.Event = field(default_factory=threading.Event)
    calls: int = 0
    failures: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for _ in range(self.clients):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self.threads.append(thread)

    def _run(self) -> None:
        client = grpcclient.InferenceServerClient(
            self.target, channel_args=[("grpc.lb_policy_name", "round_robin")]
        )
        obs = grpcclient.InferInput("obs", [1, OBS_DIM], "FP32")
        obs.set_data_from_numpy(np.ones((1, OBS_DIM), np.float32))
        calls, failures = 0, []
        try:
            while not self.stop.is_set():
                try:
                    client.infer("policy", [obs], client_timeout=10)
                    calls += 1
                except Exception as exc:
                    failures.append(str(exc)[:200])
        finally:
            client.close()
            with self.lock:
                self.calls += calls
                self.failures += failures

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


@dataclass
class ModeResult:
    mode: str
    promotions: int
    calls: int
    failed: int
    every_s: list[float]  # publish -> the last replica serving, per promotion
    each_s: list[float]  # publish -> serving, per replica and promotion
    failure_samples: list[str]
    per_replica_calls: list[int]  # calls each replica answered on the last version


def answered_calls(server: ServerProcess) -> int:
    with server.client() as client:
        stats = client.get_inference_statistics("policy", as_json=True)
    return sum(int(s.get("inference_count", 0)) for s in stats.get("model_stats", []))


def repository_for(mode: str, root: Path, keyring: Keyring, store: S3Server | None) -> Path | str:
    """A repository holding policy v1: a folder, or a prefix in a fresh bucket."""
    if store is None:
        folder = root / f"{mode}-repo"
        folder.mkdir()
        build_repository(folder, keyring)
        return folder
    url = store.bucket(f"fleet-{mode}") + "/models"
    publish_model_version(
        open_storage(url),
        "policy",
        {"model.onnx": policy_onnx(1)},
        keyring=keyring,
        config_text=POLICY_CONFIG,
    )
    return url


def run_mode(
    mode: str,
    promotions: int,
    clients: int,
    poll_secs: float,
    root: Path,
    store: S3Server | None,
) -> ModeResult:
    keyring_path = root / f"{mode}-keyring.json"
    Keyring.generate().save(keyring_path)
    keyring = Keyring.load(keyring_path)
    repository = repository_for(mode, root, keyring, store)
    if mode == "explicit":
        args = ["--model-control-mode", "explicit", "--load-model", "policy"]
    else:
        args = ["--model-control-mode", "poll", "--repository-poll-secs", str(poll_secs)]
    servers = [
        ServerProcess(
            repository,  # type: ignore[arg-type]  # a folder, or a URL where one usually goes
            keyring_path,
            list(args),
            env=None if store is None else store.env,
            log_path=root / f"{mode}-server-{i}.log",
        )
        for i in range(3)
    ]
    load: Load | None = None
    try:
        for server in servers:
            server.start()
        # One channel over the three addresses, balanced call by call.
        load = Load("ipv4:" + ",".join(server.url for server in servers), clients)
        load.start()
        time.sleep(1.0)  # steady load before the first promotion
        every: list[float] = []
        each: list[float] = []
        with open_replicas([s.url for s in servers], {}) as replicas:
            for n in range(promotions):
                promotion = promote(
                    replicas,
                    repository=repository,
                    model="policy",
                    config_text=POLICY_CONFIG,
                    artifacts={"model.onnx": policy_onnx(100 + n)},
                    manifest={"bench": "fleet"},
                    keyring=keyring,
                    probe=PROBE,
                    timeout_s=60,
                )
                every.append(promotion.publish_to_serving_seconds)
                each += list(promotion.replica_seconds.values())
        time.sleep(0.5)
        load.finish()
        per_replica = [answered_calls(server) for server in servers]
    finally:
        if load is not None:
            load.finish()
        for server in servers:
            server.stop()
    return ModeResult(
        mode,
        promotions,
        load.calls,
        len(load.failures),
        every,
        each,
        load.failures[:3],
        per_replica,
    )


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values) * 1000:.0f} / {max(values) * 1000:.0f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--promotions", type=int, default=10, help="promotions per server mode")
    p.add_argument("--clients", type=int, default=6, help="client threads (round robin each)")
    p.add_argument("--poll-secs", type=float, default=0.5, help="poll-mode interval")
    p.add_argument("--modes", default="explicit,poll", help="comma-separated server modes")
    p.add_argument("--store", choices=("folder", "s3"), default="folder", help="repository")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp, ExitStack() as stack:
        store = stack.enter_context(s3_server()) if args.store == "s3" else None
        for mode in args.modes.split(","):
            print(
                f"{mode}: 3 replicas on a {args.store} repository, {args.clients} clients, "
                f"{args.promotions} promotions"
            )
            results.append(
                run_mode(mode, args.promotions, args.clients, args.poll_secs, Path(tmp), store)
            )
    print()
    print(
        "| store | mode | promotions | calls | failed calls "
        "| publish -> every replica serving, p50 / max (ms) | per replica, p50 / max (ms) "
        "| calls to the last version, per replica |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        spread = " / ".join(str(n) for n in r.per_replica_calls)
        print(
            f"| {args.store} | {r.mode} | {r.promotions} | {r.calls} | {r.failed} "
            f"| {_ms(r.every_s)} | {_ms(r.each_s)} | {spread} |"
        )
    for r in results:
        for sample in r.failure_samples:
            print(f"  {r.mode} failure: {sample}")
    return 0 if all(r.failed == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
