"""Prometheus metrics with Triton's names, read from the per-version statistics at scrape time.

Reading at scrape time keeps the request path free of metrics-library calls.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from forseti.server.registry.loaded_version import LoadedVersion
from forseti.server.registry.model_registry import ModelRegistry
from forseti.server.security.tls import is_loopback
from forseti.server.stats import LATENCY_BUCKETS_S

log = logging.getLogger(__name__)

_LABELS = ["model", "version"]


def pending_requests(lv: LoadedVersion) -> int:
    """Requests routed to a version that have not started executing (Triton's pending request
    count): a queueing scheduler counts its queues; for the others (inline, threaded), the
    requests in flight beyond one per model instance."""
    counter = getattr(lv.scheduler, "pending_requests", None)
    if counter is not None:
        return int(counter())
    return max(0, lv.inflight - lv.backend.instance_count)


class TritonMetricsCollector(Collector):
    """Triton's nv_inference_* counters and pending request count, a request latency
    histogram, and the version each model serves on this replica."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        families = {
            "success": CounterMetricFamily(
                "nv_inference_request_success",
                "Number of successful inference requests",
                labels=_LABELS,
            ),
            "failure": CounterMetricFamily(
                "nv_inference_request_failure",
                "Number of failed inference requests",
                labels=_LABELS,
            ),
            "count": CounterMetricFamily(
                "nv_inference_count", "Number of inferences performed (batch items)", labels=_LABELS
            ),
            "exec": CounterMetricFamily(
                "nv_inference_exec_count", "Number of model executions performed", labels=_LABELS
            ),
            "request": CounterMetricFamily(
                "nv_inference_request_duration_us",
                "Cumulative inference request duration in microseconds",
                labels=_LABELS,
            ),
            "queue": CounterMetricFamily(
                "nv_inference_queue_duration_us",
                "Cumulative inference queuing duration in microseconds",
                labels=_LABELS,
            ),
            "input": CounterMetricFamily(
                "nv_inference_compute_input_duration_us",
                "Cumulative compute input duration in microseconds",
                labels=_LABELS,
            ),
            "infer": CounterMetricFamily(
                "nv_inference_compute_infer_duration_us",
                "Cumulative compute inference duration in microseconds",
                labels=_LABELS,
            ),
            "output": CounterMetricFamily(
                "nv_inference_compute_output_duration_us",
                "Cumulative inference compute output duration in microseconds",
                labels=_LABELS,
            ),
        }
        pending = GaugeMetricFamily(
            "nv_inference_pending_request_count",
            "Instantaneous number of pending requests awaiting execution per-model.",
            labels=_LABELS,
        )
        serving = GaugeMetricFamily(
            "forseti_model_serving_version",
            "The version a request naming no version gets on this replica (the newest ready one)",
            labels=["model"],
        )
        newest: dict[str, int] = {}
        histogram = HistogramMetricFamily(
            "forseti_inference_request_duration_seconds",
            "Latency of successful inference requests inside the server",
            labels=_LABELS,
        )
        # Snapshot the versions first: a swap on the loop thread must not change the dict
        # while this scrape thread walks it.
        for lv in list(self.registry.loaded_versions()):
            s = lv.stats
            labels = [lv.model, lv.version_str]
            families["success"].add_metric(labels, s.success.count)
            families["failure"].add_metric(labels, s.fail.count)
            families["count"].add_metric(labels, s.inference_count)
            families["exec"].add_metric(labels, s.execution_count)
            families["request"].add_metric(labels, (s.success.ns + s.fail.ns) // 1000)
            families["queue"].add_metric(labels, s.queue.ns // 1000)
            families["input"].add_metric(labels, s.compute_input.ns // 1000)
            families["infer"].add_metric(labels, s.compute_infer.ns // 1000)
            families["output"].add_metric(labels, s.compute_output.ns // 1000)
            pending.add_metric(labels, pending_requests(lv))
            newest[lv.model] = max(lv.version, newest.get(lv.model, lv.version))
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            counts = list(s.latency_buckets)
            for bound, n in zip(LATENCY_BUCKETS_S, counts, strict=False):
                cumulative += n
                buckets.append((repr(bound), cumulative))
            cumulative += counts[-1]
            buckets.append(("+Inf", cumulative))
            histogram.add_metric(labels, buckets, s.latency_sum_ns / 1e9)
        for model, version in sorted(newest.items()):
            serving.add_metric([model], version)
        yield from families.values()
        yield pending
        yield serving
        yield histogram
        yield CounterMetricFamily(
            "forseti_repository_poll_errors",
            "Repository polls that could not read the repository (the store errored or timed "
            "out); every model kept serving what it had",
            value=self.registry.poll_errors,
        )


class _Families(Collector):
    """Already collected families, for prometheus_client's text writer."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def exposition(collector: Collector) -> bytes:
    """The Prometheus text format, with counters named as Triton names them.

    prometheus_client writes every counter as `<name>_total`; Triton writes
    `nv_inference_request_success{model="m",version="1"}`, and dashboards and alerts built for
    Triton query those bare names, so the counters are written here and the rest by the library.
    """
    out: list[str] = []
    others: list[Metric] = []
    for family in collector.collect():
        if family.type != "counter":
            others.append(family)
            continue
        doc = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {family.name} {doc}\n# TYPE {family.name} counter\n")
        for sample in family.samples:
            if sample.name != family.name + "_total":
                continue
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sample.labels.items())
            out.append(f"{family.name}{{{labels}}} {floatToGoString(sample.value)}\n")
    return "".join(out).encode() + generate_latest(_Families(others))


class _MetricsHandler(BaseHTTPRequestHandler):
    collector: Collector

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404, "metrics are served on /metrics")
            return
        try:
            body = exposition(self.collector)
        except Exception:
            log.exception("metrics scrape failed")
            self.send_error(500)
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_PLAIN_0_0_4)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        pass


_HANDSHAKE_TIMEOUT_S = 10.0


class _TlsMetricsServer(ThreadingHTTPServer):
    """Serves HTTPS: the handshake runs in the connection's own thread, with a timeout, so a
    slow or plaintext client cannot hold up accepting the next connection."""

    ssl_context: ssl.SSLContext

    # socketserver types a request as a socket or a (bytes, socket) pair; a stream server
    # only ever gets sockets.
    def finish_request(self, request: socket.socket, client_address: Any) -> None:  # type: ignore[override]
        request.settimeout(_HANDSHAKE_TIMEOUT_S)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # not TLS, or a certificate the client refused: nothing to answer
        with tls:
            # typeshed wants the handler's own server type (Self); this server is one.
            self.RequestHandlerClass(tls, client_address, self)  # type: ignore[arg-type]


# A scrape is one short request: a client silent for this long is dropped, so slow or idle
# connections cannot hold the endpoint's threads (one per connection) indefinitely.
CLIENT_TIMEOUT_S = 10.0


def start_metrics_server(
    registry: ModelRegistry,
    address: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    client_timeout_s: float = CLIENT_TIMEOUT_S,
) -> ThreadingHTTPServer:
    """Serve /metrics on address:port from a background thread, over HTTPS when `ssl_context`
    is given; a connection silent for `client_timeout_s` is closed."""
    family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
    handler = type(
        "Handler",
        (_MetricsHandler,),
        # BaseHTTPRequestHandler applies `timeout` to each connection's socket.
        {"collector": TritonMetricsCollector(registry), "timeout": client_timeout_s},
    )
    base = ThreadingHTTPServer if ssl_context is None else _TlsMetricsServer
    server_class = type(
        "MetricsServer",
        (base,),
        {"address_family": family, "daemon_threads": True, "ssl_context": ssl_context},
    )
    httpd = server_class((address, port), handler)
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
    scheme = "http" if ssl_context is None else "https"
    log.info("metrics listening", extra={"address": address, "port": port, "scheme": scheme})
    if ssl_context is None and not is_loopback(address):
        log.warning(
            "metrics served without TLS on a non-loopback address; they show model names and "
            "traffic: bind --metrics-address 127.0.0.1 or add --metrics-ssl-cert/--metrics-ssl-key",
            extra={"address": address},
        )
    return httpd
