"""Prometheus metrics of one server (``GET /metrics``), in a registry of its own (no process-wide state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    """Requests, tokens, batch sizes, queue depth, sessions and latency histograms."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("vexport_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=registry)
        self.latency = Histogram("vexport_request_latency_seconds", "Time from request to response", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.tokens = Counter("vexport_tokens", "Tokens scored", registry=registry)
        self.batch_rows = Histogram("vexport_batch_rows", "Sequences per model batch", buckets=ROW_BUCKETS,
                                    registry=registry)
        self.batch_tokens = Histogram("vexport_batch_padded_tokens", "Padded tokens (rows x longest) per model batch",
                                      buckets=TOKEN_BUCKETS, registry=registry)
        self.queue_tokens = Gauge("vexport_queue_tokens", "Tokens of requests queued or running", registry=registry)
        self.queue_requests = Gauge("vexport_queue_requests", "Requests queued or running", registry=registry)
        self.rejected = Counter("vexport_rejected_overload", "Requests refused with 429 (queue full)",
                                registry=registry)
        self.dropped = Counter("vexport_dropped_disconnected", "Requests dropped because the client went away",
                               registry=registry)
        self.auth_refused = Counter("vexport_auth_refused", "Requests refused with 401 (no or a wrong API key)",
                                    ["reason"], registry=registry)
        self.reward_truncated = Counter("vexport_reward_truncated", "/get_reward queries cut to --reward-max-len",
                                        registry=registry)
        self.sessions = Gauge("vexport_sessions", "Live sessions", registry=registry)
        self.session_evictions = Gauge("vexport_session_evictions", "Sessions evicted so far (memory cap or idle)",
                                       registry=registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
