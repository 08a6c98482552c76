"""Type-check Forseti with mypy under the names it is installed with: `make typecheck`.

pyproject.toml maps top-level folders onto one import name (setuptools package-dir: server/ is
forseti.server, exporters/ is forseti.exporters, ...). mypy names a module after its path, so on
the checkout it would call server/app.py `server.app` and find no `forseti.server` to import;
mypy_path and explicit_package_bases cannot rename a folder. So this first lays out
build/typecheck/, a tree of symbolic links shaped like the installed package: forseti/ holds a
link to each entry of the forseti/ folder and one link per mapped folder (forseti/server ->
server/, ...). The tree is rebuilt from package-dir on every run (links only, so it is never
stale, and a new mapping needs no edit here). mypy then checks what [tool.mypy] `files` names
(the tree's forseti/ first), and its report is printed with the checkout's paths (server/app.py)
in place of the tree's.

Arguments are passed on to mypy, e.g. `tools/typecheck.py --no-incremental`.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tomllib
from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"  # also named in [tool.mypy] files
# A path into the tree as mypy prints it: relative to the checkout, where this runs mypy.
_TREE_PATH = re.compile(re.escape(TREE.relative_to(ROOT).as_posix()) + r"/[^\s:]+")


def build_tree(package_dir: dict[str, str]) -> None:
    """Lay out TREE for a package-dir mapping of packages and their direct subpackages."""
    shutil.rmtree(TREE, ignore_errors=True)
    TREE.mkdir(parents=True)
    tops = {name for name in package_dir if "." not in name}
    for name in package_dir:
        top, _, sub = name.partition(".")
        if top not in tops or "." in sub:
            raise SystemExit(f"typecheck: no layout for package-dir entry {name!r}")
    for top in sorted(tops):
        subpackages = {
            name.partition(".")[2]: ROOT / folder
            for name, folder in package_dir.items()
            if name.startswith(top + ".")
        }
        (TREE / top).mkdir()
        for entry in (ROOT / package_dir[top]).iterdir():
            if entry.name not in subpackages and entry.name != "__pycache__":
                (TREE / top / entry.name).symlink_to(entry)
        for sub, folder in subpackages.items():
            (TREE / top / sub).symlink_to(folder, target_is_directory=True)


def _checkout_path(match: re.Match[str]) -> str:
    return os.path.relpath(os.path.realpath(ROOT / match.group(0)), ROOT)


def main(argv: list[str]) -> int:
    os.chdir(ROOT)
    with open("pyproject.toml", "rb") as f:
        build_tree(tomllib.load(f)["tool"]["setuptools"]["package-dir"])
    stdout, stderr, status = api.run(argv)
    sys.stdout.write(_TREE_PATH.sub(_checkout_path, stdout))
    sys.stderr.write(_TREE_PATH.sub(_checkout_path, stderr))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
