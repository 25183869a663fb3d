"""The router's own Prometheus metrics: requests, retries, escalations and cost by backend and tier,
and each backend's health and load as the router sees them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily

from thrifty.router.pool import BackendPool

NO_TIER = ""  # the tier label of requests that were not for the tiered model


class _PoolCollector:
    def __init__(self, pool: BackendPool):
        self.pool = pool

    def collect(self):
        healthy = GaugeMetricFamily("thrifty:router_backend_healthy", "1 while the backend is in the pool.",
                                    labels=["backend"])
        in_flight = GaugeMetricFamily("thrifty:router_backend_in_flight",
                                      "Requests the router has in flight at the backend.", labels=["backend"])
        load = GaugeMetricFamily("thrifty:router_backend_load",
                                 "Running + waiting requests at the backend (last scrape + sent since).",
                                 labels=["backend"])
        for b in list(self.pool.backends.values()):
            healthy.add_metric([b.url], 1.0 if b.healthy else 0.0)
            in_flight.add_metric([b.url], b.in_flight)
            load.add_metric([b.url], b.load)
        yield from (healthy, in_flight, load)


class RouterMetrics:
    def __init__(self, pool: BackendPool):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_PoolCollector(pool))
        self.requests = Counter("thrifty:router_requests", "Requests answered, by backend, tier and HTTP status.",
                                ["backend", "tier", "code"], registry=self.registry)
        self.retries = Counter("thrifty:router_retries", "Requests retried on another backend after this one "
                               "failed before answering.", ["backend"], registry=self.registry)
        self.escalations = Counter("thrifty:router_escalations", "Answers judged poor and asked of the next tier.",
                                   ["from_tier", "to_tier", "reason"], registry=self.registry)
        self.cost = Counter("thrifty:router_cost_usd", "usage.cost_usd the backends reported, by backend and tier.",
                            ["backend", "tier"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
