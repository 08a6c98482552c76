"""Every import of the installed packages, read from the source (no module is imported).

The parts are top-level folders installed under one import name (pyproject.toml's
`package-dir`): `forseti/` is `forseti`, `server/` is `forseti.server`, and so on. `scan`
walks each file's whole syntax tree, so imports inside functions (the lazy ones) count as much
as those at the top, and so do `if TYPE_CHECKING:` imports; relative imports are resolved, and
`importlib.import_module("...")` with a literal name counts as an import of that name.

Used by tests/test_import_direction.py (the arrows between the parts) and
benchmarks/import_edges.py (how many imports cross each pair of parts).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# folder -> the package it installs as
INSTALLED = {
    "forseti": "forseti",
    "server": "forseti.server",
    "exporters": "forseti.exporters",
    "trainer_sidecar": "forseti.trainer_sidecar",
    "loadtests": "forseti.loadtests",
}
# folder -> its import name from the checkout root (not installed)
UNINSTALLED = {"tests": "tests", "testkit": "testkit", "benchmarks": "benchmarks"}
FOLDERS = INSTALLED | UNINSTALLED

# part -> the module names it owns; `cli` is the dispatcher (`forseti COMMAND`), which names
# every part by string and imports it only when its command runs.
PARTS = {
    "cli": ("forseti.cli", "forseti.__main__"),
    "server": ("forseti.server",),
    "exporters": ("forseti.exporters",),
    "trainer_sidecar": ("forseti.trainer_sidecar",),
    "loadtests": ("forseti.loadtests",),
    "client": ("forseti.client",),
    "core": ("forseti.core", "forseti"),  # after the others: `forseti` is the core's root
    "tests": ("tests",),
    "testkit": ("testkit",),
    "benchmarks": ("benchmarks",),
}


@dataclass(frozen=True)
class Import:
    """One imported module: `path:line` in `source` (a module name) imports `target`."""

    path: str  # relative to the checkout root
    line: int
    source: str
    target: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} -> {self.target}"


def under(module: str, prefix: str) -> bool:
    """True when `module` is `prefix` or inside it (`a.b` is under `a`, `ab` is not)."""
    return module == prefix or module.startswith(prefix + ".")


def part_of(module: str) -> str | None:
    """The part that owns an installed module, or None (third-party, standard library...)."""
    for part, prefixes in PARTS.items():
        if any(under(module, p) for p in prefixes):
            return part
    return None


def module_name(path: Path, root: Path = ROOT) -> str:
    """The installed module name of a source file, e.g. server/registry/routing.py ->
    forseti.server.registry.routing."""
    rel = path.relative_to(root).with_suffix("")
    folder, *rest = rel.parts
    if rest and rest[-1] == "__init__":
        rest = rest[:-1]
    return ".".join([FOLDERS[folder], *rest])


def source_files(root: Path = ROOT, folders: Iterable[str] = INSTALLED) -> Iterator[Path]:
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield path


def imports_of(source: str, module: str, is_package: bool) -> Iterator[tuple[int, str, list[str]]]:
    """(line, module, names) for every import in `source`, the module of `from m import a, b`
    resolved against `module` when relative; names is empty for `import m`."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{anchor}.{base}" if base else anchor
            yield node.lineno, base, [alias.name for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and _is_import_call(node.func)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            yield node.lineno, node.args[0].value, []


def _is_import_call(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in ("import_module", "__import__")
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "import_module"
        and isinstance(func.value, ast.Name)
        and func.value.id == "importlib"
    )


def scan(root: Path = ROOT, folders: Iterable[str] = INSTALLED) -> list[Import]:
    """Every import in the sources of `folders` (by default the installed packages) under
    `root`. `from m import a` counts as an import of `m.a` when that is one of the scanned
    modules, else of `m`."""
    files = {path: module_name(path, root) for path in source_files(root, folders)}
    known = set(files.values())
    found = []
    for path, module in files.items():
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(root).as_posix()
        for line, target, names in imports_of(text, module, path.name == "__init__.py"):
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            for t in submodules or [target]:
                found.append(Import(rel, line, module, t))
    return found
