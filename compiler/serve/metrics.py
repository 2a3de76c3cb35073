"""Prometheus metrics of the server: requests by endpoint and status, requests cancelled because
the client went away, generated tokens, request latency and time to first token (histograms),
queue depth."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("kiln_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.cancelled = Counter("kiln_requests_cancelled", "requests whose client went away before the end", ["endpoint"],
                                 registry=self.registry)
        self.tokens = Counter("kiln_generated_tokens", "tokens generated", registry=self.registry)
        self.latency = Histogram("kiln_request_latency_seconds", "request latency", ["endpoint"], buckets=_BUCKETS,
                                 registry=self.registry)
        self.ttft = Histogram("kiln_time_to_first_token_seconds", "time to first token", buckets=_BUCKETS, registry=self.registry)
        self.queue = Gauge("kiln_queue_depth", "requests waiting for the engine", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
