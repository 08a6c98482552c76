"""How many imports cross between the installed parts (core, server, exporters,
trainer_sidecar, loadtests, cli), read from the source by testkit/import_graph.py: every import
statement counts, lazy ones inside functions included.

Prints two tables, rows importing columns: distinct (module -> module) edges, and import
statements (a `from m import a, b` of two modules counts twice).

    .venv/bin/python -m benchmarks.import_edges
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from testkit.import_graph import ROOT, part_of, scan

ORDER = ("cli", "core", "server", "exporters", "trainer_sidecar", "loadtests", "client")


def table(title: str, counts: Counter[tuple[str, str]]) -> str:
    width = max(len(p) for p in ORDER)
    head = f"{title:<{width}}" + "".join(f" {p:>{max(len(p), 5)}}" for p in ORDER)
    rows = [head, "-" * len(head)]
    for src in ORDER:
        cells = "".join(f" {counts[(src, dst)]:>{max(len(dst), 5)}}" for dst in ORDER)
        rows.append(f"{src:<{width}}" + cells)
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m benchmarks.import_edges",
        description="Count the import edges between Forseti's installed parts.",
    ).parse_args(argv)
    statements: Counter[tuple[str, str]] = Counter()
    edges: set[tuple[str, str]] = set()
    for imp in scan(ROOT):
        src, dst = part_of(imp.source), part_of(imp.target)
        if src is None or dst is None:
            continue
        statements[(src, dst)] += 1
        edges.add((imp.source, imp.target))
    distinct: Counter[tuple[str, str]] = Counter()
    for source, target in edges:
        distinct[(str(part_of(source)), str(part_of(target)))] += 1
    print(table("edges", distinct))
    print()
    print(table("imports", statements))
    crossing = sum(n for (s, d), n in distinct.items() if s != d)
    print(f"\n{crossing} distinct module edges cross between parts, {len(edges)} in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
