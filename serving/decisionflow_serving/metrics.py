"""Prometheus metrics of the gateway, on one module-level registry every serving part registers on.

The metric names are a contract: the canary analysis trigger reads them from ``GET /metrics``.

- ``decisionflow_gateway_requests_total{route,status,model_version}`` (counter)
- ``decisionflow_gateway_request_seconds{route,model_version}`` (histogram)

Model-call metrics (``decisionflow_model_*``, shadow, fallbacks, routing weight) are registered on the same
:data:`REGISTRY` by ``decisionflow_serving.routing``.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

REGISTRY = CollectorRegistry()

# 2.5 ms .. 5 s: fine enough for a p99 around the 25 ms goal.
LATENCY_BUCKETS = (
    0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
)

REQUESTS = Counter(
    "decisionflow_gateway_requests",
    "HTTP requests answered by the gateway, by route template, status code and the model version that scored.",
    ("route", "status", "model_version"),
    registry=REGISTRY,
)

REQUEST_SECONDS = Histogram(
    "decisionflow_gateway_request_seconds",
    "Gateway request latency in seconds (receive to response), by route template and model version.",
    ("route", "model_version"),
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)

#: Label value when no model version was involved (auth failure, validation error, /health...).
NO_VERSION = "none"


def observe(route: str, status: int, model_version: str | None, seconds: float) -> None:
    """Count one answered request and its latency."""
    version = model_version or NO_VERSION
    REQUESTS.labels(route=route, status=str(status), model_version=version).inc()
    REQUEST_SECONDS.labels(route=route, model_version=version).observe(seconds)


def exposition() -> tuple[bytes, str]:
    """The registry in Prometheus text format and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
