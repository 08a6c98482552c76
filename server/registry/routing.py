"""The routing table: which loaded version serves which model name and version.

Mutated only on the event-loop thread. `serving` is a tuple of every loaded version, replaced
in one assignment at each swap, so readers on other threads (the /metrics scrape) walk a
consistent snapshot while the loop adds and removes models.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from forseti.core.errors import InvalidArgument, NotFound, Unavailable, shown
from forseti.server.registry.loaded_version import LoadedVersion

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
LOADING = "LOADING"

# A version number longer than this cannot name a folder that was loaded (and int() of a
# few thousand digits is refused by Python itself).
_MAX_VERSION_DIGITS = 18


@dataclass
class VersionStatus:
    state: str
    reason: str = ""


@dataclass(eq=False)
class ModelEntry:
    """One model's serving state."""

    name: str
    versions: dict[int, LoadedVersion] = field(default_factory=dict)
    latest: LoadedVersion | None = None
    status: dict[int, VersionStatus] = field(default_factory=dict)
    reason: str = ""  # why the last load of the model as a whole failed
    wanted: bool = False  # the server is meant to serve it (strict readiness)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class RoutingTable:
    """Model entries by name, and the route from (name, version) to a loaded version."""

    def __init__(self, in_repository: Callable[[str], bool]) -> None:
        self._in_repository = in_repository
        self.models: dict[str, ModelEntry] = {}
        self.serving: tuple[LoadedVersion, ...] = ()

    def route(self, name: str, version: str) -> LoadedVersion:
        """The version a request goes to: the newest ready one when `version` is empty.

        Refusals use Triton's texts ("Request for unknown model: ..."), which clients match;
        Forseti's reason follows them where it knows more."""
        entry = self.models.get(name)
        if entry is None:
            if self._in_repository(name):
                raise Unavailable(
                    f"Request for unknown model: '{name}' is not found (it is in the model "
                    "repository but not loaded)"
                )
            raise NotFound(f"Request for unknown model: '{shown(name)}' is not found")
        if not version:
            lv = entry.latest
            if lv is None:
                why = f": {entry.reason}" if entry.reason else ""
                raise Unavailable(
                    f"Request for unknown model: '{name}' has no available versions{why}"
                )
            return lv
        if not (version.isascii() and version.isdigit()) or len(version) > _MAX_VERSION_DIGITS:
            raise NotFound(
                "failed to get model version from specified version string "
                f"'{shown(version)}' (model '{name}'; a version is a number)"
            )
        number = int(version)
        lv = entry.versions.get(number)
        if lv is None:
            status = entry.status.get(number)
            if status is not None:
                raise Unavailable(
                    f"Request for unknown model: '{name}' version {number} is not at ready "
                    f"state ({status.state})"
                )
            raise NotFound(f"Request for unknown model: '{name}' version {number} is not found")
        return lv

    def statistics_route(self, name: str, version: str) -> LoadedVersion:
        """The version whose statistics a request names; a known model's version that is not
        ready gets Triton's statistics text."""
        try:
            return self.route(name, version)
        except (NotFound, Unavailable):
            if name in self.models:
                raise InvalidArgument(
                    f"requested model version is not available for model '{name}'"
                ) from None
            raise

    def entry(self, name: str) -> ModelEntry:
        """The model's entry, created empty on first use."""
        entry = self.models.get(name)
        if entry is None:
            entry = self.models[name] = ModelEntry(name)
        return entry

    def swap(self, entry: ModelEntry, new_map: dict[int, LoadedVersion]) -> None:
        """Serve `new_map` from now on; versions no longer served drain and are released."""
        old = entry.versions
        entry.versions = new_map
        entry.latest = new_map[max(new_map)] if new_map else None
        self._snapshot()
        for v, lv in old.items():
            if new_map.get(v) is not lv:
                lv.retire()
                if v not in new_map:
                    entry.status.pop(v, None)

    def forget(self, name: str) -> None:
        """Drop a model's entry (it left the repository); it must serve nothing."""
        entry = self.models.pop(name, None)
        if entry is not None and entry.versions:
            self.swap(entry, {})

    def versions_of(self, name: str) -> list[LoadedVersion]:
        entry = self.models.get(name)
        return [] if entry is None else [entry.versions[v] for v in sorted(entry.versions)]

    def ready(self) -> bool:
        """Strict readiness: every model the server is meant to serve has a ready version."""
        return all(e.latest is not None for e in self.models.values() if e.wanted)

    def _snapshot(self) -> None:
        self.serving = tuple(lv for e in self.models.values() for lv in e.versions.values())
