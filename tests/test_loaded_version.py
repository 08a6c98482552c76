"""A retired version drains: it is released only after its running requests finish."""

from __future__ import annotations

from forseti.core.repository.config import model_spec, parse_config_text
from forseti.server.backends.onnxruntime_backend import OnnxRuntimeBackend
from forseti.server.registry.loaded_version import LoadedVersion
from forseti.server.scheduler.inline import InlineScheduler
from forseti.server.stats import VersionStats
from testkit.model_builders import POLICY_CONFIG, policy_onnx


def make_version() -> LoadedVersion:
    spec = model_spec(parse_config_text(POLICY_CONFIG, "policy"), "policy")
    backend = OnnxRuntimeBackend(spec, policy_onnx(1))
    return LoadedVersion(
        model="policy",
        version=1,
        spec=spec,
        backend=backend,
        scheduler=InlineScheduler(backend),
        stats=VersionStats(),
        digest="0" * 64,
        fingerprint=(),
    )


def test_idle_version_is_released_when_retired() -> None:
    lv = make_version()
    lv.retire()
    assert lv.released
    assert lv.backend._sessions == []


def test_retired_version_with_running_requests_waits_for_the_last_one() -> None:
    lv = make_version()
    lv.acquire()
    lv.acquire()
    lv.retire()
    assert not lv.released
    lv.release()
    assert not lv.released
    assert len(lv.backend._sessions) == 1
    lv.release()
    assert lv.released
    assert lv.backend._sessions == []


def test_live_version_is_not_released_when_requests_finish() -> None:
    lv = make_version()
    lv.acquire()
    lv.release()
    assert not lv.released
