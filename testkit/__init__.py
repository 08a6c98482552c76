"""Helpers shared by tests/ and benchmarks/: real servers on loopback, model builders,
certificates, request strategies and load harnesses. Not installed: import it from the
checkout root (`from testkit.server_process import ServerProcess`)."""
