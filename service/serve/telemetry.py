"""Prometheus metrics of the serving API, in a registry of their own (one per app, so several
apps in one process, as in tests, never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.serve.snapshot import Snapshot

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SWAP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "ctp_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "ctp_request_seconds", "HTTP request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "ctp_batch_size", "jobs per forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.forward_seconds = Histogram(
            "ctp_forward_seconds", "seconds per batched forward pass", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("ctp_queue_depth", "jobs waiting for a forward pass", registry=r)
        self.overloaded = Counter(
            "ctp_overloaded", "requests refused with 503 because the queue was full", registry=r
        )
        self.model_version = Gauge(
            "ctp_model_version", "version served (numeric versions; -1 otherwise)", registry=r
        )
        self.swaps = Counter("ctp_swaps", "model versions swapped in", registry=r)
        self.swap_failures = Counter(
            "ctp_swap_failures", "model versions refused (failed to load)", registry=r
        )
        self.swap_seconds = Histogram(
            "ctp_swap_seconds",
            "load + warm-up + gallery re-embedding per swap",
            buckets=SWAP_BUCKETS,
            registry=r,
        )
        self.gallery_items = Gauge("ctp_gallery_items", "retrieval gallery size", registry=r)
        self.model_version.set(-1)

    # SwapListener
    def swapped(self, snapshot: Snapshot, seconds: float) -> None:
        self.swaps.inc()
        self.swap_seconds.observe(seconds)
        self.model_version.set(int(snapshot.version) if snapshot.version.isdigit() else -1)

    def swap_failed(self, version: str, reason: str) -> None:
        self.swap_failures.inc()

    def gallery_changed(self, size: int) -> None:
        self.gallery_items.set(size)

    def batch(self, jobs: int, seconds: float) -> None:
        self.batch_size.observe(jobs)
        self.forward_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
