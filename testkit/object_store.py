"""A local S3 server for tests: moto in server mode on a free loopback port.

moto runs in the test process (its threaded server), so it can be stopped and started again
on the same port with its buckets intact: a store outage that the servers under test see as
refused connections, then a store that comes back with everything it held. Every S3Server of
one process serves the same buckets: a second one is a second door to the same store (stop
it, and the servers that use it see an outage while publishers at the first door go on).
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from testkit.server_process import free_port

ACCESS_KEY = "forseti-test"
SECRET_KEY = "forseti-test-secret"
REGION = "us-east-1"


class S3Server:
    """One moto server; `env` is what a client process needs to reach it."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.running = False

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def start(self) -> None:
        # werkzeug logs every request moto serves; the tests do not need them.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                self.running = True
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"moto did not start on port {self.port}")

    def stop(self) -> None:
        if self.running:
            self._server.stop()
            self.running = False

    def client(self) -> Any:
        """A boto3 client on this server (for setting up buckets and inspecting objects)."""
        boto3 = importlib.import_module("boto3")  # untyped; a test dependency (moto's)

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def bucket(self, name: str) -> str:
        """Create a bucket; returns its s3:// URL."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """A running moto server whose address is in this process's AWS environment, stopped
    and the environment restored afterwards."""
    server = S3Server()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
