"""Prometheus metrics with Triton's names, read from the per-version statistics at scrape time.

Reading at scrape time keeps the request path free of metrics-library calls.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from forseti.server.registry.model_registry import ModelRegistry
from forseti.server.stats import LATENCY_BUCKETS_S

log = logging.getLogger(__name__)

_LABELS = ["model", "version"]


class TritonMetricsCollector(Collector):
    """Triton's nv_inference_* counters plus a request latency histogram."""

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
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            counts = list(s.latency_buckets)
            for bound, n in zip(LATENCY_BUCKETS_S, counts, strict=False):
                cumulative += n
                buckets.append((repr(bound), cumulative))
            cumulative += counts[-1]
            buckets.append(("+Inf", cumulative))
            histogram.add_metric(labels, buckets, s.latency_sum_ns / 1e9)
        yield from families.values()
        yield histogram


def start_metrics_server(registry: ModelRegistry, address: str, port: int) -> CollectorRegistry:
    """Serve /metrics on address:port from a background thread."""
    prom = CollectorRegistry()
    prom.register(TritonMetricsCollector(registry))
    start_http_server(port, addr=address, registry=prom)
    log.info("metrics listening", extra={"address": address, "port": port})
    return prom
