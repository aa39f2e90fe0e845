"""Canary analysis math on Prometheus text built by the gateway's own metric objects (fresh registries)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from decisionflow.rollout.analysis import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    AnalysisError,
    Limits,
    analyze,
    fail_fast,
    histogram_quantile,
    measure,
    parse_metrics,
)

BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Gateway:
    """The routing module's metrics on a private registry, so each test scrapes its own numbers."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("decisionflow_model_requests", "x", ("role", "model_version", "outcome"),
                                registry=self.registry)
        self.seconds = Histogram("decisionflow_model_request_seconds", "x", ("role", "model_version"),
                                 buckets=BUCKETS, registry=self.registry)
        self.diff = Histogram("decisionflow_shadow_score_diff", "x", ("stable_version", "canary_version"),
                              buckets=(0.001, 0.01, 0.1, 0.5, 1.0), registry=self.registry)

    def call(self, role, version, seconds, ok=True, n=1):
        for _ in range(n):
            self.requests.labels(role=role, model_version=version, outcome="ok" if ok else "error").inc()
            self.seconds.labels(role=role, model_version=version).observe(seconds)

    def shadow_diff(self, value, n=1):
        for _ in range(n):
            self.diff.labels(stable_version="1", canary_version="2").observe(value)

    def scrape(self):
        return parse_metrics(generate_latest(self.registry).decode())


LIMITS = Limits(max_error_rate=0.02, max_p99_seconds=0.25, max_p99_ratio=2.0, p99_ratio_floor_seconds=0.01,
                max_mean_score_shift=0.05, min_requests=50)


def verdict(before, after, limits=LIMITS):
    return analyze(before, after, canary_version="2", stable_version="1", limits=limits)


def test_a_healthy_canary_passes_and_only_the_window_counts():
    g = Gateway()
    g.call("canary", "2", 0.004, ok=False, n=40)  # before the window: must not count
    before = g.scrape()
    g.call("stable", "1", 0.004, n=400)
    g.call("canary", "2", 0.004, n=100)
    v = verdict(before, g.scrape())
    assert v.status == PASS, v.reasons
    assert v.measurements["canary_requests"] == 100 and v.measurements["canary_errors"] == 0
    assert v.measurements["stable_requests"] == 400
    assert v.measurements["canary_p99_seconds"] <= 0.005


def test_error_rate_over_the_limit_fails_naming_it():
    g = Gateway()
    before = g.scrape()
    g.call("canary", "2", 0.004, n=95)
    g.call("canary", "2", 0.004, ok=False, n=5)
    v = verdict(before, g.scrape())
    assert v.status == FAIL
    assert "error rate 5.00% (5/100 calls) > limit 2.00%" in v.reason()


def test_shadow_calls_count_as_canary_calls():
    g = Gateway()
    before = g.scrape()
    g.call("shadow", "2", 0.004, n=60)
    g.call("shadow", "2", 0.004, ok=False, n=10)
    m = measure(before, g.scrape(), canary_version="2", stable_version="1")
    assert m["canary_shadow_requests"] == 70 and m["canary_live_requests"] == 0 and m["canary_errors"] == 10


def test_absolute_p99_and_ratio_to_stable():
    g = Gateway()
    before = g.scrape()
    g.call("stable", "1", 0.02, n=100)
    g.call("canary", "2", 0.02, n=90)
    g.call("canary", "2", 0.09, n=10)  # canary p99 in the (0.05, 0.1] bucket: > 2 x stable's ~0.025
    v = verdict(before, g.scrape())
    assert v.status == FAIL and "x stable p99" in v.reason() and "limit 250.0 ms" not in v.reason()
    g.call("canary", "2", 0.9, n=100)
    v = verdict(before, g.scrape())
    assert "canary p99" in v.reason() and "> limit 250.0 ms" in v.reason()


def test_ratio_uses_the_floor_for_tiny_stable_latencies():
    g = Gateway()
    before = g.scrape()
    g.call("stable", "1", 0.001, n=100)  # stable p99 ~2.5 ms
    g.call("canary", "2", 0.008, n=100)  # 3x stable, but under 2 x the 10 ms floor
    assert verdict(before, g.scrape()).status == PASS


def test_score_shift_from_shadow_diffs():
    g = Gateway()
    before = g.scrape()
    g.call("shadow", "2", 0.004, n=60)
    g.shadow_diff(0.3, n=60)
    v = verdict(before, g.scrape())
    assert v.status == FAIL and "shadow score shift" in v.reason()
    assert v.measurements["mean_score_shift"] == pytest.approx(0.3)


def test_too_little_traffic_is_inconclusive():
    g = Gateway()
    before = g.scrape()
    g.call("canary", "2", 0.004, n=10)
    v = verdict(before, g.scrape())
    assert v.status == INCONCLUSIVE and "only 10 canary call(s)" in v.reason()


def test_fail_fast_only_when_surely_failed():
    g = Gateway()
    before = g.scrape()
    g.call("canary", "2", 0.004, n=10)
    g.call("canary", "2", 0.004, ok=False, n=1)
    kwargs = {"canary_version": "2", "stable_version": "1", "limits": LIMITS}
    assert fail_fast(before, g.scrape(), **kwargs) is None  # 1 error <= 2% of 50: could still pass
    g.call("canary", "2", 0.004, ok=False, n=1)
    early = fail_fast(before, g.scrape(), **kwargs)
    assert early is not None and early.status == FAIL and "already exceed" in early.reason()


def test_a_counter_reset_voids_the_window():
    first, second = Gateway(), Gateway()
    first.call("canary", "2", 0.004, n=100)
    second.call("canary", "2", 0.004, n=60)
    v = verdict(first.scrape(), second.scrape())
    assert v.status == INCONCLUSIVE and "restarted" in v.reason()


def test_other_versions_do_not_count():
    g = Gateway()
    before = g.scrape()
    g.call("canary", "9", 0.004, ok=False, n=100)
    g.call("canary", "2", 0.004, n=100)
    assert verdict(before, g.scrape()).status == PASS


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = {0.1: 50.0, 0.2: 100.0, float("inf"): 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.99, {0.1: 0.0, float("inf"): 5.0}) == pytest.approx(0.1)
    assert histogram_quantile(0.99, {}) is None


def test_limits_validation_names_the_field():
    with pytest.raises(AnalysisError, match="limits.max_error_rate"):
        Limits(max_error_rate=2)
    with pytest.raises(AnalysisError, match="unknown field"):
        Limits.from_mapping({"max_errors": 1})
    assert Limits.from_mapping({"min_requests": "30"}).min_requests == 30


def test_garbage_metrics_text_is_named():
    with pytest.raises(AnalysisError, match="not Prometheus text"):
        parse_metrics("decisionflow_model_requests_total{role=\"x\" 1\n")


def test_routing_applied_reads_the_gateway_gauges():
    from decisionflow.rollout.analysis import routing_applied

    text = ('decisionflow_routing_weight{role="stable",model_version="1"} 90.0\n'
            'decisionflow_routing_weight{role="canary",model_version="2"} 10.0\n'
            'decisionflow_routing_weight{role="shadow",model_version="2"} 100.0\n')
    snap = parse_metrics(text)
    assert routing_applied(snap, canary_version="2", weight=10, shadow=True)
    assert not routing_applied(snap, canary_version="2", weight=10, shadow=False)
    assert not routing_applied(snap, canary_version="2", weight=50, shadow=True)
    assert not routing_applied(snap, canary_version="3", weight=10, shadow=True)
