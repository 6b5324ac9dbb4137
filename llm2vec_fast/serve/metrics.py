"""Prometheus metrics of the embedding server, in a registry of their own (one per app, so two
servers in one process, e.g. in tests, never share counters)."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TEXT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
THROUGHPUT_WINDOW_S = 10.0


class ServerMetrics:
    """Counters, gauges and histograms named ``llm2vec_*``; :meth:`render` gives the exposition text."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llm2vec_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r)
        self.errors = Counter(
            "llm2vec_errors", "Failed requests by endpoint, status code and error type", ["endpoint", "status", "type"], registry=r
        )
        self.latency = Histogram(
            "llm2vec_request_duration_seconds",
            "Request latency, from receipt to response",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_requests = Gauge(
            "llm2vec_queue_requests", "Requests waiting for the model (some of their texts not yet in a batch)", registry=r
        )
        self.queue_tokens = Gauge("llm2vec_queue_tokens", "Tokens waiting for the model", registry=r)
        self.in_flight = Gauge("llm2vec_requests_in_flight", "Requests being handled (tokenising, queued or embedding)", registry=r)
        self.batch_texts = Histogram("llm2vec_batch_texts", "Texts per model batch", buckets=TEXT_BUCKETS, registry=r)
        self.batch_tokens = Histogram(
            "llm2vec_batch_tokens", "Real (non-padding) tokens per model batch", buckets=TOKEN_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "llm2vec_batch_requests", "Client requests contributing to one model batch", buckets=TEXT_BUCKETS, registry=r
        )
        self.batch_duration = Histogram("llm2vec_batch_duration_seconds", "Model time per batch", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_failures = Counter("llm2vec_batch_failures", "Model batches that raised an error", registry=r)
        self.tokens = Counter("llm2vec_embedded_tokens", "Tokens embedded", registry=r)
        self.texts = Counter("llm2vec_embedded_texts", "Texts embedded", registry=r)
        self.tokens_per_second = Gauge(
            "llm2vec_tokens_per_second", f"Tokens embedded per second over the last {THROUGHPUT_WINDOW_S:.0f} s", registry=r
        )
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self.tokens_per_second.set_function(self.throughput)

    def observe_batch(self, texts: int, tokens: int, requests: int, seconds: float) -> None:
        self.batch_texts.observe(texts)
        self.batch_tokens.observe(tokens)
        self.batch_requests.observe(requests)
        self.batch_duration.observe(seconds)
        self.tokens.inc(tokens)
        self.texts.inc(texts)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, tokens))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
            self._recent.popleft()

    def throughput(self) -> float:
        """Tokens per second over the last window (0 when idle)."""
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / THROUGHPUT_WINDOW_S

    def observe_request(self, endpoint: str, status: int, seconds: float, error_type: str | None = None) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if status >= 400:
            self.errors.labels(endpoint, str(status), error_type or "error").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
