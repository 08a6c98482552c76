"""Checking `dynamic_batching` settings at load (server/scheduler/dynamic_batcher.py)."""

from __future__ import annotations

import pytest

from forseti.core.errors import ModelLoadError
from forseti.core.repository.config import model_spec, parse_config_text
from forseti.server.scheduler.dynamic_batcher import BatchingSpec
from testkit.model_builders import POLICY_CONFIG


def settings(extra: str, config: str = POLICY_CONFIG) -> BatchingSpec:
    return BatchingSpec.from_config(
        model_spec(parse_config_text(config + extra, "policy"), "policy")
    )


def test_defaults_mean_no_delay_one_level_unbounded_queue() -> None:
    s = settings("dynamic_batching { }")
    assert s.max_delay_ns == 0
    assert s.levels == 1
    assert s.policies[0].max_queue_size == 0
    assert s.preferred == ()


def test_queue_policy_and_delay_are_read_in_nanoseconds() -> None:
    s = settings(
        "dynamic_batching { max_queue_delay_microseconds: 250 preferred_batch_size: [ 8, 4 ] "
        "default_queue_policy { max_queue_size: 7 default_timeout_microseconds: 30 "
        "timeout_action: DELAY } }"
    )
    assert s.max_delay_ns == 250_000
    assert s.preferred == (4, 8)
    assert s.policies[0].max_queue_size == 7
    assert s.policies[0].default_timeout_ns == 30_000
    assert not s.policies[0].reject_on_timeout


def test_priority_levels_get_their_own_policies() -> None:
    s = settings(
        "dynamic_batching { priority_levels: 3 default_priority_level: 2 "
        "priority_queue_policy { key: 1 value: { max_queue_size: 5 } } }"
    )
    assert s.levels == 3
    assert s.default_level == 2
    assert [p.max_queue_size for p in s.policies] == [5, 0, 0]


def test_preferred_size_above_max_batch_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match="preferred_batch_size"):
        settings("dynamic_batching { preferred_batch_size: [ 128 ] }")


def test_batching_without_a_batch_dimension_is_a_load_error() -> None:
    config = POLICY_CONFIG.replace("max_batch_size: 64", "max_batch_size: 0")
    with pytest.raises(ModelLoadError, match="max_batch_size > 0"):
        settings("dynamic_batching { }", config)


def test_default_priority_outside_the_levels_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match="default_priority_level"):
        settings("dynamic_batching { priority_levels: 2 default_priority_level: 3 }")
