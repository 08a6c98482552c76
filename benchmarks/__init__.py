"""Scripts that measure Forseti and print tables. Not installed: run them from the checkout
root as modules, e.g. `.venv/bin/python -m benchmarks.bench_latency`, so that `testkit/` (the
helpers they share with the tests) is importable here and in their spawned worker processes."""
