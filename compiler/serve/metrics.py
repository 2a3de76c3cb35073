"""Prometheus metrics of the server: requests by endpoint and status, requests cancelled because
the client went away, generated tokens, request latency and time to first token (histograms),
queue depth; the engine core's running and waiting sequences, KV rows in use and free, KV blocks
reserved and free under the budget and the KV memory resident, prefix cache hit rate and blocks,
and the tokens each step feeds (histogram)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


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
        self.step_tokens = Histogram("kiln_step_batched_tokens", "tokens fed to the engine in one step",
                                     buckets=_TOKEN_BUCKETS, registry=self.registry)
        gauge = {name: Gauge(f"kiln_{name}", text, registry=self.registry) for name, text in (
            ("running_sequences", "sequences holding a KV row"), ("waiting_sequences", "requests waiting for a KV row"),
            ("kv_rows_used", "KV cache rows in use"), ("kv_rows_free", "KV cache rows free"),
            ("kv_blocks_used", "KV blocks reserved by running sequences (CPU rows)"),
            ("kv_blocks_free", "KV blocks left in the budget (CPU rows)"),
            ("kv_resident_bytes", "KV cache memory in use (CPU rows, from the OS)"),
            ("prefix_cache_hit_rate", "share of prompt tokens loaded from the prefix cache"),
            ("prefix_cache_blocks_used", "prefix cache blocks holding a prefix"))}
        self.gauges = gauge

    def engine_state(self, core) -> None:
        """Set the engine core's gauges (at scrape time)."""
        g, kv = self.gauges, core.kv.usage()
        g["running_sequences"].set(len(core.scheduler.running))
        g["waiting_sequences"].set(len(core.scheduler.waiting))
        g["kv_rows_used"].set(kv.rows - kv.free_rows)
        g["kv_rows_free"].set(kv.free_rows)
        if kv.block_tokens is not None:
            g["kv_blocks_used"].set(kv.blocks_used)
            g["kv_blocks_free"].set(kv.blocks_free)
            g["kv_resident_bytes"].set(core.kv.resident_bytes())
        g["prefix_cache_hit_rate"].set(kv.prefix_hit_rate)
        g["prefix_cache_blocks_used"].set(kv.prefix_blocks_used)

    def render(self) -> bytes:
        return generate_latest(self.registry)
