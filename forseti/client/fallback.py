"""Fallback actions: what a decision is when no policy answered in time.

Three kinds: a fixed action, the last good action for the caller's key (with a default for a
key never answered), or a callable `fn(obs, reason) -> action`. `as_fallback` turns what the
caller gave (an action value, a callable or one of these) into a `Fallback`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol

import numpy as np


class Fallback(Protocol):
    """The action to use instead of a policy's answer."""

    def single(self, obs: np.ndarray, key: Hashable | None, reason: str) -> Any:
        """The action for one observation."""
        ...

    def batch(self, obs: np.ndarray, keys: Sequence[Hashable] | None, reason: str) -> Any:
        """The actions for a batch of observations (one row each)."""
        ...

    def remember(self, key: Hashable, action: Any) -> None:
        """Called with every answered action whose call named a key."""
        ...


class FixedAction:
    """Always the same action (for example "hold", or the safest arm)."""

    def __init__(self, action: Any) -> None:
        self.action = action

    def single(self, obs: np.ndarray, key: Hashable | None, reason: str) -> Any:
        return self.action

    def batch(self, obs: np.ndarray, keys: Sequence[Hashable] | None, reason: str) -> Any:
        return np.stack([np.asarray(self.action)] * len(obs))

    def remember(self, key: Hashable, action: Any) -> None:
        pass


class LastGoodAction:
    """The last action a policy gave for the caller's key (a user, a session, a device), or
    `default` for a key never answered. Keeps at most `max_keys` keys, dropping the least
    recently answered one first."""

    def __init__(self, default: Any, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.default = default
        self.max_keys = max_keys
        self._last: dict[Hashable, Any] = {}
        self._lock = threading.Lock()

    def remember(self, key: Hashable, action: Any) -> None:
        with self._lock:
            self._last.pop(key, None)  # re-inserted last: the dict's order is recency
            self._last[key] = action
            if len(self._last) > self.max_keys:
                del self._last[next(iter(self._last))]

    def get(self, key: Hashable | None) -> Any:
        if key is None:
            return self.default
        with self._lock:
            return self._last.get(key, self.default)

    def single(self, obs: np.ndarray, key: Hashable | None, reason: str) -> Any:
        return self.get(key)

    def batch(self, obs: np.ndarray, keys: Sequence[Hashable] | None, reason: str) -> Any:
        if keys is None:
            return np.stack([np.asarray(self.default)] * len(obs))
        return np.stack([np.asarray(self.get(k)) for k in keys])


class CallableFallback:
    """`fn(obs, reason)`: for example a rule-based policy; called with one observation from
    `decide` and with the whole batch from `decide_batch`. It runs on the caller's time, so it
    must be quick."""

    def __init__(self, fn: Callable[[np.ndarray, str], Any]) -> None:
        self.fn = fn

    def single(self, obs: np.ndarray, key: Hashable | None, reason: str) -> Any:
        return self.fn(obs, reason)

    def batch(self, obs: np.ndarray, keys: Sequence[Hashable] | None, reason: str) -> Any:
        return self.fn(obs, reason)

    def remember(self, key: Hashable, action: Any) -> None:
        pass


def as_fallback(spec: Any) -> Fallback | None:
    """A `Fallback` from what the caller gave: None (no fallback: a call that cannot be
    answered raises), a Fallback, a callable, or an action value (a fixed action)."""
    if spec is None:
        return None
    if all(hasattr(spec, m) for m in ("single", "batch", "remember")):
        return spec
    if callable(spec):
        return CallableFallback(spec)
    return FixedAction(spec)
