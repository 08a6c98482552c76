"""Shared fixtures: a keyring, the standard sealed test repository, a running server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from forseti.core.sealing.keyring import Keyring
from testkit.model_builders import build_repository
from testkit.server_process import ServerProcess


@pytest.fixture(scope="session")
def keyring_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keyring.json"
    Keyring.generate().save(path)
    return path


@pytest.fixture(scope="session")
def keyring(keyring_path: Path) -> Keyring:
    return Keyring.load(keyring_path)


@pytest.fixture
def repository(tmp_path: Path, keyring: Keyring) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    build_repository(repo, keyring)
    return repo


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory, keyring: Keyring, keyring_path: Path):
    """One server per test module over the standard repository, in explicit mode with all
    models loaded; for tests that only read."""
    repo = tmp_path_factory.mktemp("shared") / "repo"
    repo.mkdir()
    build_repository(repo, keyring)
    server = ServerProcess(
        repo, keyring_path, ["--model-control-mode", "explicit", "--load-model", "*"]
    ).start()
    yield server
    server.stop()


@pytest.fixture
def start_server(keyring_path: Path) -> Iterator:
    """Factory: start a server over a given repository with extra args; stopped after."""
    started: list[ServerProcess] = []

    def start(
        repo: Path,
        *args: str,
        wait_ready: bool = True,
        keyring: Path | None = None,
        env: dict[str, str] | None = None,
    ):
        server = ServerProcess(repo, keyring or keyring_path, list(args), env=env)
        started.append(server)
        return server.start(wait_ready=wait_ready)

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def own_keyring(tmp_path: Path) -> Path:
    """A keyring file of this test's own, for tests that change it (rotation, retirement)."""
    path = tmp_path / "keys" / "keyring.json"
    path.parent.mkdir()
    Keyring.generate().save(path)
    return path


@pytest.fixture
def own_repo(tmp_path: Path, own_keyring: Path) -> Path:
    """The standard test repository, sealed with ``own_keyring``."""
    repo = tmp_path / "repo"
    repo.mkdir()
    build_repository(repo, Keyring.load(own_keyring))
    return repo
