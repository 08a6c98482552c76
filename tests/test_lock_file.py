"""requirements.lock: every install comes from it, so it must cover pyproject.toml, hashed."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
LOCKED_EXTRAS = ("dev", "train", "load")

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def _lock_entries() -> dict[str, tuple[Version, list[str]]]:
    """{canonical name: (pinned version, its hash lines)} from the lock file."""
    entries: dict[str, tuple[Version, list[str]]] = {}
    current: str | None = None
    for line in LOCK.read_text().splitlines():
        pin = _PIN.match(line)
        if pin:
            current = canonicalize_name(pin.group(1))
            entries[current] = (Version(pin.group(2)), [])
        elif current and line.strip().startswith("--hash=sha256:"):
            entries[current][1].append(line.strip())
        elif not line.startswith(" "):
            current = None
    return entries


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in LOCKED_EXTRAS:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def test_every_declared_dependency_is_pinned_in_the_lock_within_its_range() -> None:
    entries = _lock_entries()
    problems = []
    for req in _declared():
        name = canonicalize_name(req.name)
        if name not in entries:
            problems.append(f"{req} is not in requirements.lock")
        elif not req.specifier.contains(entries[name][0], prereleases=True):
            problems.append(f"{req} but the lock pins {entries[name][0]}")
    assert not problems, "run `make lock` to refresh the lock:\n" + "\n".join(problems)


def test_every_locked_package_carries_a_sha256_hash() -> None:
    entries = _lock_entries()
    assert len(entries) > 50, "the lock looks truncated"
    unhashed = sorted(name for name, (_, hashes) in entries.items() if not hashes)
    assert not unhashed


@pytest.mark.parametrize("name", ["torch"])
def test_the_lock_takes_the_cpu_build_of_torch(name: str) -> None:
    version, _ = _lock_entries()[name]
    assert version.local == "cpu", f"{name} {version}: a CUDA build would pull several GB"
