"""The server's Prometheus metrics: requests, tokens, queue depth, batch size, adapters, latencies.

One registry per server (not prometheus_client's global one), so that several servers or tests in
one process do not share counters. The engine reports through the Observer hooks; the adapter
cache's counters are read when scraped.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .cache import AdapterCache
from .engine import Observer, Request

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LOAD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)  # around 10 ms
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics(Observer):
    """Counters and histograms of one server, exposed as Prometheus text by `render()`."""

    def __init__(self, cache: AdapterCache | None) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("lorakit_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens of finished requests", registry=registry)
        self.generation_tokens = Counter("lorakit_generation_tokens", "Tokens generated", registry=registry)
        self.queue_depth = Gauge("lorakit_queue_depth", "Requests waiting to join the batch", registry=registry)
        self.batch_size = Gauge("lorakit_running_batch_size", "Requests in the running batch", registry=registry)
        self.ttft = Histogram("lorakit_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.itl = Histogram("lorakit_inter_token_latency_seconds", "Time between two tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=registry)
        self.latency = Histogram("lorakit_request_latency_seconds", "Arrival to last token",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.adapter_load = Histogram("lorakit_adapter_load_seconds", "Adapter loads on first use (cache misses)",
                                      buckets=LOAD_BUCKETS, registry=registry)
        if cache is not None:
            registry.register(_CacheCollector(cache))

    # --- engine hooks (engine thread) ------------------------------------------------------------------
    def first_token(self, request: Request, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.generation_tokens.inc()

    def next_token(self, request: Request, seconds: float) -> None:
        self.itl.observe(seconds)
        self.generation_tokens.inc()

    def finished(self, request: Request, seconds: float) -> None:
        self.latency.observe(seconds)
        self.prompt_tokens.inc(len(request.prompt_ids))

    def batch(self, waiting: int, running: int) -> None:
        self.queue_depth.set(waiting)
        self.batch_size.set(running)

    def adapter_loaded(self, seconds: float) -> None:
        self.adapter_load.observe(seconds)

    # --- the server ----------------------------------------------------------------------------------------
    def answered(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CacheCollector:
    """The adapter cache's own counters, read at scrape time."""

    def __init__(self, cache: AdapterCache) -> None:
        self.cache = cache

    def collect(self):
        stats = self.cache.stats()
        yield GaugeMetricFamily("lorakit_adapters_loaded", "Adapters resident on the model", len(stats["resident"]))
        yield GaugeMetricFamily("lorakit_adapters_registered", "Adapters the server can load", stats["registered"])
        for name in ("hits", "misses", "evictions"):
            yield CounterMetricFamily(f"lorakit_adapter_cache_{name}", f"Adapter cache {name}", stats[name])
