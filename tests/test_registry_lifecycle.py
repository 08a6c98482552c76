"""The registry's lifecycle hooks and the snapshot that other threads read, in process."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from forseti.core.sealing.keyring import Keyring
from forseti.server.app import assemble
from forseti.server.metrics import TritonMetricsCollector, exposition
from forseti.server.registry.lifecycle import (
    LifecycleEvent,
    Swapped,
    Unloaded,
    VersionLoaded,
    VersionLoadFailed,
    VersionReleased,
)
from testkit.model_builders import policy_onnx, publish_sealed
from tests.test_request_path import build_request_path_repo, obs


@pytest.fixture
def repo(tmp_path: Path, keyring: Keyring) -> Path:
    return build_request_path_repo(tmp_path / "repo", keyring)


class Recorder:
    def __init__(self) -> None:
        self.events: list[LifecycleEvent] = []

    async def on_event(self, event: LifecycleEvent) -> None:
        self.events.append(event)


def test_listeners_hear_load_swap_unload_and_release_in_order(repo, keyring) -> None:
    async def main() -> list[LifecycleEvent]:
        service = assemble(repo, keyring, control_mode="explicit")
        recorder = Recorder()
        service.registry.hooks.subscribe(recorder)
        await service.registry.load_model("policy")
        await service.registry.unload_model("policy")
        await asyncio.sleep(0)  # the release is delivered on the next loop turn
        return recorder.events

    events = asyncio.run(main())
    assert [type(e) for e in events] == [VersionLoaded, Swapped, Unloaded, VersionReleased]
    loaded, swapped = events[0], events[1]
    assert isinstance(loaded, VersionLoaded) and isinstance(swapped, Swapped)
    assert (loaded.model, loaded.version, loaded.key_id is not None) == ("policy", 1, True)
    assert swapped.serving == {"1": loaded.sha256} and swapped.previous == {}


def test_a_refused_version_is_heard_with_its_reason(repo, keyring) -> None:
    async def main() -> list[LifecycleEvent]:
        service = assemble(repo, keyring, control_mode="explicit")
        recorder = Recorder()
        service.registry.hooks.subscribe(recorder)
        with pytest.raises(Exception, match="onnxruntime could not load"):
            await service.registry.load_model("policy_broken")
        return recorder.events

    (event,) = asyncio.run(main())
    assert isinstance(event, VersionLoadFailed)
    assert "onnxruntime could not load" in event.reason and event.sha256


def test_a_failing_listener_does_not_fail_the_load(repo, keyring) -> None:
    class Broken:
        async def on_event(self, event: LifecycleEvent) -> None:
            raise RuntimeError("listener bug")

    async def main() -> int:
        service = assemble(repo, keyring, control_mode="explicit")
        service.registry.hooks.subscribe(Broken())
        await service.registry.load_model("policy")
        return service.registry.route("policy", "").version

    assert asyncio.run(main()) == 1


def test_the_handler_drops_a_released_versions_encoder(repo, keyring) -> None:
    """A swap releases the old version; its response encoder goes with it, so reloads do not
    accumulate per-version state in the request path."""
    from tritonclient.grpc import service_pb2 as pb

    async def main() -> tuple[int, int]:
        service = assemble(repo, keyring, control_mode="explicit")
        await service.registry.load_model("policy")
        request = pb.ModelInferRequest(model_name="policy", id="a")
        request.inputs.add(name="obs", datatype="FP32", shape=[1, 8])
        request.raw_input_contents.append(obs(1).tobytes())
        await service.handler.infer(request)
        before = len(service.handler._encoders)
        publish_sealed(repo, "policy", policy_onnx(2), keyring, version=2)
        await service.registry.load_model("policy")  # version_policy latest: v1 is released
        await asyncio.sleep(0)
        return before, len(service.handler._encoders)

    assert asyncio.run(main()) == (1, 0)


def test_metrics_scrapes_from_another_thread_while_models_load_and_unload(repo, keyring) -> None:
    """The /metrics thread walks the registry's snapshot, never the dict the loop mutates."""
    errors: list[BaseException] = []

    async def main() -> int:
        service = assemble(repo, keyring, control_mode="explicit")
        collector = TritonMetricsCollector(service.registry)
        stop = threading.Event()
        scrapes = 0

        def scrape() -> None:
            nonlocal scrapes
            while not stop.is_set():
                try:
                    exposition(collector)
                    scrapes += 1
                except BaseException as exc:
                    errors.append(exc)
                    return

        thread = threading.Thread(target=scrape)
        thread.start()
        try:
            for _ in range(15):
                for name in ("policy", "policy_threaded", "simple"):
                    await service.registry.load_model(name)
                for name in ("policy", "policy_threaded", "simple"):
                    await service.registry.unload_model(name)
        finally:
            stop.set()
            thread.join(10)
        return scrapes

    assert asyncio.run(main()) > 0
    assert errors == []


def test_a_swap_of_a_model_with_65_versions_is_audited_in_parts(tmp_path, keyring) -> None:
    """One audit field holds at most 64 entries; the swap record of a model serving 65
    versions is written in parts instead of being lost."""
    from forseti.core.audit import AuditLog, verify_file
    from testkit.model_builders import POLICY_CONFIG, write_config

    repo = tmp_path / "repo"
    write_config(repo, "policy", POLICY_CONFIG + "\nversion_policy { all { } }\n")
    for v in range(1, 66):
        publish_sealed(repo, "policy", policy_onnx(v), keyring, version=v)
    log_path = tmp_path / "audit.log"

    async def main() -> None:
        audit = AuditLog.open(log_path, component="server")
        service = assemble(repo, keyring, control_mode="explicit", audit=audit)
        await service.registry.load_model("policy")
        service.registry.release_all()
        audit.close()

    asyncio.run(main())
    assert verify_file(log_path).ok
    import json

    swaps = [
        json.loads(line)
        for line in log_path.read_text().splitlines()
        if '"event":"model.swap"' in line
    ]
    assert [(r["fields"]["part"], r["fields"]["parts"]) for r in swaps] == [(1, 2), (2, 2)]
    served = {**swaps[0]["fields"]["serving"], **swaps[1]["fields"]["serving"]}
    assert sorted(map(int, served)) == list(range(1, 66))
