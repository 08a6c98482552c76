"""Imports run one way: trainer_sidecar -> exporters -> core <- server (DESIGN.md).

Every import of the installed packages counts, read from the source: at module level and
inside functions (the lazy ones), under `if TYPE_CHECKING:`, relative ones resolved (see
testkit/import_graph.py). Each contract is one case; a failure lists `file:line -> module` for
every import that runs against it. The dispatcher (forseti/cli.py) names every part: it is
its own part, which no part contract restricts.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from testkit.import_graph import ROOT, Import, imports_of, part_of, scan, under

SB3_STACK = ("torch", "stable_baselines3", "sb3_contrib", "gymnasium")
NOT_INSTALLED = ("tests", "testkit", "benchmarks")
# The folders' own names: importable only with the checkout root on sys.path, so an installed
# module that uses them breaks once installed.
FOLDER_NAMES = ("server", "exporters", "trainer_sidecar", "loadtests")


@dataclass(frozen=True)
class Contract:
    name: str
    parts: tuple[str, ...]  # the parts whose imports it restricts
    forbidden: tuple[str, ...]  # module names (and everything under them) they must not import
    allowed: tuple[str, ...] = ()  # exceptions inside `forbidden`

    def breaches(self, imports: list[Import]) -> list[Import]:
        return [
            i
            for i in imports
            if part_of(i.source) in self.parts
            and any(under(i.target, f) for f in self.forbidden)
            and not any(under(i.target, a) for a in self.allowed)
            and (i.path, self.name) not in KNOWN_BREACHES
        ]


CONTRACTS = [
    Contract(
        "core_imports_no_server_exporters_trainer_sidecar_or_loadtests",
        ("core",),
        (
            "forseti.server",
            "forseti.exporters",
            "forseti.trainer_sidecar",
            "forseti.loadtests",
            "forseti.client",
            "forseti.cli",
        ),
    ),
    Contract(
        "server_imports_no_exporters_trainer_sidecar_loadtests_torch_or_sb3",
        ("server",),
        (
            "forseti.exporters",
            "forseti.trainer_sidecar",
            "forseti.loadtests",
            "forseti.client",
            *SB3_STACK,
        ),
    ),
    # The calling service's client: the core's contract only, and for local mode the server's
    # backends (the same external-data refusal and signature check as a replica; they import
    # only the core, onnxruntime and onnx), never the rest of the server, the trainer or torch.
    Contract(
        "client_imports_core_and_only_the_servers_backends",
        ("client",),
        (
            "forseti.server",
            "forseti.exporters",
            "forseti.trainer_sidecar",
            "forseti.loadtests",
            *SB3_STACK,
        ),
        allowed=("forseti.server.backends",),
    ),
    Contract(
        "exporters_import_no_server_trainer_sidecar_or_loadtests",
        ("exporters",),
        ("forseti.server", "forseti.trainer_sidecar", "forseti.loadtests"),
    ),
    Contract(
        "trainer_sidecar_imports_no_server_or_loadtests",
        ("trainer_sidecar",),
        ("forseti.server", "forseti.loadtests"),
    ),
    Contract(
        "installed_packages_import_nothing_from_tests_testkit_or_benchmarks",
        ("cli", "core", "server", "exporters", "trainer_sidecar", "loadtests", "client"),
        NOT_INSTALLED,
    ),
    Contract(
        "installed_packages_import_each_other_by_installed_name_not_folder",
        ("cli", "core", "server", "exporters", "trainer_sidecar", "loadtests", "client"),
        FOLDER_NAMES,
    ),
]

# (file, contract) pairs that are known and being fixed; each needs a reason.
KNOWN_BREACHES: set[tuple[str, str]] = set()


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return scan(ROOT)


def test_tests_and_testkit_import_nothing_from_benchmarks() -> None:
    """benchmarks/ uses testkit/, never the other way round, and tests leave it alone."""
    found = scan(ROOT, ("tests", "testkit"))
    breaches = [i for i in found if under(i.target, "benchmarks")]
    assert not breaches, "imports of benchmarks/:\n" + "\n".join(f"  {b}" for b in breaches)


@pytest.mark.parametrize("contract", [pytest.param(c, id=c.name) for c in CONTRACTS])
def test_imports_follow_the_arrows(contract: Contract, imports: list[Import]) -> None:
    breaches = contract.breaches(imports)
    assert not breaches, f"{contract.name}: {len(breaches)} imports against it:\n" + "\n".join(
        f"  {b}" for b in breaches
    )


def test_every_part_is_scanned(imports: list[Import]) -> None:
    sources = {part_of(i.source) for i in imports}
    assert sources >= {
        "cli",
        "core",
        "server",
        "exporters",
        "trainer_sidecar",
        "loadtests",
        "client",
    }


def test_the_scanner_sees_lazy_relative_and_string_imports() -> None:
    source = """
import os
from . import sibling
from ..core import errors

def lazy():
    from .sub.leaf import thing
    import torch
    importlib.import_module("forseti.loadtests.runner")
"""
    found = {(line, target) for line, target, _ in imports_of(source, "forseti.server.a", False)}
    assert found == {
        (2, "os"),
        (3, "forseti.server"),
        (4, "forseti.core"),
        (7, "forseti.server.sub.leaf"),
        (8, "torch"),
        (9, "forseti.loadtests.runner"),
    }
    # in a package's __init__, `.` is the package itself
    init = list(imports_of("from .x import y", "forseti.server.registry", True))
    assert init == [(1, "forseti.server.registry.x", ["y"])]


def test_a_breach_names_its_file_line_and_module() -> None:
    contract = CONTRACTS[1]
    bad = Import("server/x.py", 3, "forseti.server.x", "torch.nn")
    ok = Import("server/x.py", 4, "forseti.server.x", "torchvision")
    assert contract.breaches([bad, ok]) == [bad]
    assert str(bad) == "server/x.py:3 -> torch.nn"


def test_the_client_may_import_the_servers_backends_and_nothing_else_of_the_server() -> None:
    contract = next(c for c in CONTRACTS if c.name.startswith("client_"))
    backends = Import("forseti/client/x.py", 1, "forseti.client.x", "forseti.server.backends")
    registry = Import("forseti/client/x.py", 2, "forseti.client.x", "forseti.server.registry")
    assert contract.breaches([backends, registry]) == [registry]
