"""Start the real `forseti serve` as a subprocess on free loopback ports, and stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tritonclient.grpc as grpcclient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A running server; `url` is what tritonclient connects to."""

    repository: Path
    keyring: Path | None
    extra_args: list[str] = field(default_factory=list)
    log_path: Path | None = None
    env: dict[str, str] | None = None  # extra environment variables for the server process
    # InferenceServerClient keyword arguments (ssl=True, root_certificates=...) and headers
    # the start-up checks need, for servers started with TLS or a restricted health protocol.
    client_options: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] | None = None
    grpc_port: int = 0
    metrics_port: int = 0
    http_port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """Where tritonclient.http connects (the HTTP/REST front door)."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        """The server's own process id (it is started directly, with no shell between)."""
        assert self.proc is not None, "the server was never started"
        return self.proc.pid

    def start(
        self, wait_ready: bool = True, timeout: float = 60.0, same_ports: bool = False
    ) -> ServerProcess:
        """Start the server; `same_ports` keeps the ports of an earlier start (a restart that
        clients already connected to that address reconnect to)."""
        if not (same_ports and self.grpc_port):
            self.grpc_port = free_port()
            self.metrics_port = free_port()
            self.http_port = free_port()
        args = [
            sys.executable,
            "-m",
            "forseti",
            "serve",
            "--model-repository",
            str(self.repository),
            "--grpc-address",
            "127.0.0.1",
            "--grpc-port",
            str(self.grpc_port),
            "--metrics-port",
            str(self.metrics_port),
            "--http-port",
            str(self.http_port),
            # No drain unless a test asks for one (extra_args come later and win): a stop
            # would otherwise wait the default drain in every test.
            "--drain-seconds",
            "0",
            *self.extra_args,
        ]
        if self.keyring is not None:
            args += ["--keyring", str(self.keyring)]
        self.log_path = self.log_path or self.repository.parent / f"server-{self.grpc_port}.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed when the process ends
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.wait(lambda c: c.is_server_live(headers=self.headers), timeout)
        if wait_ready:
            self.wait(lambda c: c.is_server_ready(headers=self.headers), timeout)
        return self

    def wait(self, check, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = self.client()
        try:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()}")
                try:
                    if check(client):
                        return
                except Exception:
                    pass
                time.sleep(0.05)
        finally:
            client.close()
        raise TimeoutError(f"server not ready after {timeout}s: {self.log()}")

    def client(self) -> grpcclient.InferenceServerClient:
        """A client with this server's `client_options`; the caller closes it."""
        return grpcclient.InferenceServerClient(self.url, **self.client_options)

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> int | None:
        """SIGKILL: no drain, no clean-up; returns the exit code (-9)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(30)

    def restart(self, wait_ready: bool = True, timeout: float = 60.0) -> ServerProcess:
        """Start again, on the same ports and repository, once the old process has gone."""
        assert self.proc is not None and self.proc.poll() is not None, "stop or kill it first"
        return self.start(wait_ready=wait_ready, timeout=timeout, same_ports=True)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def serve_args(repository: Path, keyring: Path, *extra: str) -> list[str]:
    """`forseti serve` arguments for `repository` and `keyring` on free ports (run_forseti's
    arguments for a server that is expected to refuse to start)."""
    return [
        "serve",
        "--model-repository",
        str(repository),
        "--keyring",
        str(keyring),
        "--grpc-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
        "--http-port",
        str(free_port()),
        *extra,
    ]


def run_forseti(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the `forseti` command in a subprocess and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "forseti", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,  # as in CI: a command that waits for input fails, not hangs
    )
