"""Client-side Prometheus metrics (optional), named in the server's style (`forseti_*`).

    forseti_client_decision_duration_seconds{model,source}   histogram; source: replica,
                                                             local or fallback
    forseti_client_fallbacks_total{model,reason}             decisions that used the fallback
    forseti_client_retries_total{model,code}                 calls sent again to another replica
    forseti_client_hedges_total{model,result}                hedges sent, and those that won
    forseti_client_replica_errors_total{model,endpoint,code} failed calls per replica
    forseti_client_replica_ejections_total{model,endpoint}   replicas taken out of rotation
    forseti_client_healthy_replicas{model}                   replicas in rotation now

Pass `ClientMetrics(registry)` to a client (one ClientMetrics may serve several clients);
without it the client counts nothing and pays nothing.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

# Decisions are milliseconds; the buckets resolve 0.25 ms to 1 s.
LATENCY_BUCKETS_S = (
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)


class ClientMetrics:
    """The client's metric families, registered in `registry` (the default one if None)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = REGISTRY if registry is None else registry
        self.duration = Histogram(
            "forseti_client_decision_duration_seconds",
            "Time from a decide call to its decision, as the caller saw it",
            ["model", "source"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.fallbacks = Counter(
            "forseti_client_fallbacks",
            "Decisions that used the fallback action, by reason",
            ["model", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "forseti_client_retries",
            "Calls sent again to another replica after a retryable status",
            ["model", "code"],
            registry=r,
        )
        self.hedges = Counter(
            "forseti_client_hedges",
            "Hedged calls: sent, and won (the hedge answered first)",
            ["model", "result"],
            registry=r,
        )
        self.replica_errors = Counter(
            "forseti_client_replica_errors",
            "Failed calls per replica, by gRPC status",
            ["model", "endpoint", "code"],
            registry=r,
        )
        self.ejections = Counter(
            "forseti_client_replica_ejections",
            "Times a replica was taken out of rotation",
            ["model", "endpoint"],
            registry=r,
        )
        self.healthy = Gauge(
            "forseti_client_healthy_replicas",
            "Replicas in rotation now",
            ["model"],
            registry=r,
        )

    def for_model(self, model: str) -> ModelMetrics:
        return ModelMetrics(self, model)


class NoMetrics:
    """What a client without metrics records: nothing."""

    def decided(self, latency_s: float, source: str) -> None:
        pass

    def fallback(self, reason: str) -> None:
        pass

    def retry(self, code: str) -> None:
        pass

    def hedge(self, result: str) -> None:
        pass

    def replica_error(self, endpoint: str, code: str) -> None:
        pass

    def ejected(self, endpoint: str) -> None:
        pass

    def healthy_replicas(self, count: int) -> None:
        pass


class ModelMetrics(NoMetrics):
    """The families bound to one model; the hot children are looked up once."""

    def __init__(self, families: ClientMetrics, model: str) -> None:
        self.families = families
        self.model = model
        self._by_source = {
            s: families.duration.labels(model, s) for s in ("replica", "local", "fallback")
        }

    def decided(self, latency_s: float, source: str) -> None:
        self._by_source[source].observe(latency_s)

    def fallback(self, reason: str) -> None:
        self.families.fallbacks.labels(self.model, reason).inc()

    def retry(self, code: str) -> None:
        self.families.retries.labels(self.model, code).inc()

    def hedge(self, result: str) -> None:
        self.families.hedges.labels(self.model, result).inc()

    def replica_error(self, endpoint: str, code: str) -> None:
        self.families.replica_errors.labels(self.model, endpoint, code).inc()

    def ejected(self, endpoint: str) -> None:
        self.families.ejections.labels(self.model, endpoint).inc()

    def healthy_replicas(self, count: int) -> None:
        self.families.healthy.labels(self.model).set(count)
