"""Hot swaps under 16 concurrent clients lose no call, in explicit and in poll mode.

The harness of `testkit/swap_harness.py` (the 50-swap benchmark's) with fewer swaps: 16
closed-loop tritonclient.grpc clients over 4 spawned processes call `policy` with no version
named while 8 new versions are published and swapped in one after the other.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.swap_harness import ClientPool, Tolerances, run_mode

SWAPS = 8
CLIENTS = 16


@pytest.fixture(scope="module")
def pool() -> Iterator[ClientPool]:
    with ClientPool(clients=CLIENTS, procs=4) as p:
        yield p


@pytest.mark.parametrize("mode", ["explicit", "poll"])
def test_swaps_under_16_clients_lose_no_call_and_release_every_old_version(
    mode: str, pool: ClientPool, tmp_path: Path, keyring_path: Path
) -> None:
    result = run_mode(
        pool,
        tmp_path,
        mode,
        SWAPS,
        steady_s=1.0,
        warmup_s=0.5,
        poll_secs=0.2,
        swap_timeout_s=15.0,
        keyring_path=keyring_path,
        tolerances=Tolerances(rss_mib=24.0, fds=2),
    )
    assert result.error == ""
    assert len(result.swaps) == SWAPS
    assert result.failed_calls == 0, result.failure_samples
    assert result.wrong_answers == 0
    assert result.went_back == 0
    # Every client was answered by every version, v1 and the 8 swapped in.
    assert result.missed == []
    assert result.steady.calls > 0 and result.during.calls > 0
    assert all(s.first_answer_s is not None for s in result.swaps)
    # latest 1: each swap released the version it replaced; no fd kept by released versions.
    assert result.released == SWAPS
    assert result.fd_growth <= 2, (result.fds_before, result.fds_after)
    assert result.rss_growth_mib <= 24.0
    assert result.ok, result.problems()
