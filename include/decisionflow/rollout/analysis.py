"""Canary analysis from two Prometheus scrapes of the gateway's ``GET /metrics``.

The gateway counts every model call (``decisionflow_serving.routing``): ``decisionflow_model_requests_total
{role,model_version,outcome}``, ``decisionflow_model_request_seconds{role,model_version}`` (histogram) and, for
shadow traffic, ``decisionflow_shadow_score_diff{stable_version,canary_version}`` (histogram of per-row
``|canary - stable|``). Counters only grow, so the difference of two scrapes is what happened in between: the
analysis window.

Judged on the canary's calls in the window (roles ``canary`` and ``shadow``: a mirrored call is a canary call):

* **error rate** = errors / calls <= ``max_error_rate``;
* **p99 latency** <= ``max_p99_seconds`` (absolute) and <= ``max_p99_ratio`` x stable's p99 in the same window
  (stable's p99 floored at ``p99_ratio_floor_seconds``: two tiny latencies are not a regression);
* **score shift** (shadow): mean ``|canary - stable|`` <= ``max_mean_score_shift``.

Fewer than ``min_requests`` canary calls: not enough evidence -- :data:`INCONCLUSIVE` (the operator treats it as a
failure unless told otherwise). :func:`fail_fast` judges a window in progress: it fails as soon as the error
budget is blown with at least ``min_requests`` calls (or as soon as the errors alone exceed what ``min_requests``
calls could absorb), without waiting for the window's end. A counter that went *down* means the gateway restarted
in between: the window is void (:data:`INCONCLUSIVE`, reason says so).

Pure Python (``prometheus_client``'s text parser only); the trigger does the HTTP.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from decisionflow.exceptions import NonRetryableError

__all__ = [
    "FAIL",
    "INCONCLUSIVE",
    "Limits",
    "MetricsSnapshot",
    "PASS",
    "Verdict",
    "analyze",
    "fail_fast",
    "histogram_quantile",
    "parse_metrics",
]

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
REQUESTS = "decisionflow_model_requests_total"
SECONDS = "decisionflow_model_request_seconds"
SHADOW_DIFF = "decisionflow_shadow_score_diff"
ROUTING_WEIGHT = "decisionflow_routing_weight"
CANARY_ROLES = ("canary", "shadow")

Labels = tuple[tuple[str, str], ...]


class AnalysisError(NonRetryableError, ValueError):
    """Metrics text or limits the analysis cannot use; the message names what."""


@dataclass(frozen=True)
class Limits:
    """What a canary must stay within during an analysis window.

    :param max_error_rate: errors / canary calls, e.g. 0.01.
    :param max_p99_seconds: absolute p99 latency of canary calls.
    :param max_p99_ratio: canary p99 / stable p99 (same window).
    :param p99_ratio_floor_seconds: stable's p99 is taken as at least this in the ratio.
    :param max_mean_score_shift: mean |canary - stable| per shadow-mirrored row.
    :param min_requests: canary calls needed for a verdict.
    """

    max_error_rate: float = 0.01
    max_p99_seconds: float = 0.5
    max_p99_ratio: float = 3.0
    p99_ratio_floor_seconds: float = 0.025
    max_mean_score_shift: float = 0.1
    min_requests: int = 50

    def __post_init__(self) -> None:
        for name in ("max_error_rate", "max_p99_seconds", "max_p99_ratio", "p99_ratio_floor_seconds",
                     "max_mean_score_shift"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise AnalysisError(f"limits.{name} must be a finite number >= 0, got {value!r}")
        if self.max_error_rate > 1:
            raise AnalysisError(f"limits.max_error_rate is a share (0..1), got {self.max_error_rate}")
        if int(self.min_requests) < 1:
            raise AnalysisError(f"limits.min_requests must be >= 1, got {self.min_requests}")

    @classmethod
    def from_mapping(cls, value: Mapping[str, Any] | None) -> Limits:
        value = dict(value or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise AnalysisError(f"limits: unknown field(s) {unknown}; known: {sorted(known)}")
        if "min_requests" in value:
            value["min_requests"] = int(value["min_requests"])
        return cls(**{k: (float(v) if k != "min_requests" else v) for k, v in value.items()})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MetricsSnapshot:
    """The samples the analysis reads, from one scrape: name -> labels -> value."""

    samples: dict[str, dict[Labels, float]] = field(default_factory=dict)

    def get(self, name: str) -> dict[Labels, float]:
        return self.samples.get(name, {})


def parse_metrics(text: str) -> MetricsSnapshot:
    """Parse Prometheus text exposition; keeps the ``decisionflow_model_*`` and shadow samples."""
    from prometheus_client.parser import text_string_to_metric_families

    snapshot = MetricsSnapshot()
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:  # noqa: BLE001 - the parser raises ValueError and friends
        raise AnalysisError(f"the /metrics body is not Prometheus text: {exc}") from exc
    for family in families:
        for sample in family.samples:
            if not sample.name.startswith((REQUESTS, SECONDS, SHADOW_DIFF, ROUTING_WEIGHT)):
                continue
            labels = tuple(sorted((k, str(v)) for k, v in sample.labels.items()))
            snapshot.samples.setdefault(sample.name, {})[labels] = float(sample.value)
    return snapshot


def routing_applied(snapshot: MetricsSnapshot, *, canary_version: str, weight: float, shadow: bool) -> bool:
    """Does the scraped gateway route as asked (``decisionflow_routing_weight`` of the canary, and of shadow)?

    Serve reports a deployment RUNNING with its new ``user_config`` a moment before a loaded replica has run
    ``reconfigure()``; a window must not start before the gateway routes the step's traffic.
    """
    weights = {dict(k).get("role"): v for k, v in snapshot.get(ROUTING_WEIGHT).items()
               if dict(k).get("model_version") == str(canary_version)}
    if abs(weights.get("canary", -1.0) - float(weight)) > 1e-6:
        return False
    return (weights.get("shadow", 0.0) > 0) == bool(shadow)


def _delta(before: MetricsSnapshot, after: MetricsSnapshot, name: str) -> tuple[dict[Labels, float], bool]:
    """``after - before`` per label set; the flag says a counter went down (the process restarted)."""
    old = before.get(name)
    out, reset = {}, False
    for labels, value in after.get(name).items():
        diff = value - old.get(labels, 0.0)
        if diff < -1e-9:
            reset = True
        out[labels] = max(diff, 0.0)
    return out, reset


def _match(labels: Labels, **wanted: Iterable[str] | str | None) -> bool:
    have = dict(labels)
    for key, value in wanted.items():
        if value is None:
            continue
        allowed = {value} if isinstance(value, str) else set(value)
        if have.get(key) not in allowed:
            return False
    return True


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile``: cumulative ``{le: count}`` -> the q-quantile (linear in its bucket).

    None without observations; the largest finite bound when the quantile falls in the ``+Inf`` bucket.
    """
    items = sorted(buckets.items())
    if not items or items[-1][1] <= 0:
        return None
    total = items[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in items:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = (bound if not math.isinf(bound) else lower_bound), count
    return lower_bound


def _buckets(deltas: dict[Labels, float], **wanted) -> dict[float, float]:
    out: dict[float, float] = {}
    for labels, value in deltas.items():
        if not _match(labels, **wanted):
            continue
        le = float(dict(labels)["le"])
        out[le] = out.get(le, 0.0) + value
    return out


@dataclass(frozen=True)
class Verdict:
    """The outcome of one analysis window: ``status`` pass | fail | inconclusive, why, and what was measured."""

    status: str
    reasons: tuple[str, ...]
    measurements: Mapping[str, Any]

    @property
    def passed(self) -> bool:
        return self.status == PASS

    def reason(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "all canary checks within limits"

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason(), "reasons": list(self.reasons),
                "measurements": dict(self.measurements)}


def measure(before: MetricsSnapshot, after: MetricsSnapshot, *, canary_version: str,
            stable_version: str | None = None) -> dict[str, Any]:
    """What happened between two scrapes, for the canary version (and stable, for the latency ratio)."""
    requests, reset_r = _delta(before, after, REQUESTS)
    seconds, reset_s = _delta(before, after, f"{SECONDS}_bucket")
    diffs_sum, reset_d = _delta(before, after, f"{SHADOW_DIFF}_sum")
    diffs_count, _ = _delta(before, after, f"{SHADOW_DIFF}_count")
    canary = {"role": CANARY_ROLES, "model_version": canary_version}
    calls = sum(v for k, v in requests.items() if _match(k, **canary))
    errors = sum(v for k, v in requests.items() if _match(k, outcome="error", **canary))
    by_role = {role: sum(v for k, v in requests.items() if _match(k, role=role, model_version=canary_version))
               for role in CANARY_ROLES}
    stable_calls = sum(v for k, v in requests.items() if _match(k, role="stable", model_version=stable_version))
    canary_p99 = histogram_quantile(0.99, _buckets(seconds, **canary))
    stable_p99 = histogram_quantile(0.99, _buckets(seconds, role="stable", model_version=stable_version))
    shadow = {"canary_version": canary_version, "stable_version": stable_version}
    shift_rows = sum(v for k, v in diffs_count.items() if _match(k, **shadow))
    shift_sum = sum(v for k, v in diffs_sum.items() if _match(k, **shadow))
    return {
        "canary_version": canary_version,
        "stable_version": stable_version,
        "canary_requests": int(calls),
        "canary_live_requests": int(by_role["canary"]),
        "canary_shadow_requests": int(by_role["shadow"]),
        "canary_errors": int(errors),
        "canary_error_rate": (errors / calls) if calls else None,
        "canary_p99_seconds": canary_p99,
        "stable_requests": int(stable_calls),
        "stable_p99_seconds": stable_p99,
        "shadow_rows": int(shift_rows),
        "mean_score_shift": (shift_sum / shift_rows) if shift_rows else None,
        "counter_reset": bool(reset_r or reset_s or reset_d),
    }


def judge(m: Mapping[str, Any], limits: Limits, *, final: bool = True) -> Verdict:
    """A verdict on :func:`measure`'s output. ``final=False``: a window in progress (only a sure failure counts)."""
    reasons: list[str] = []
    if m["counter_reset"]:
        return Verdict(INCONCLUSIVE, ("the gateway's counters went down during the window (a gateway replica "
                                      "restarted); the window is void",), dict(m))
    calls, errors = m["canary_requests"], m["canary_errors"]
    rate = m["canary_error_rate"]
    budget = limits.max_error_rate
    if calls >= limits.min_requests and rate is not None and rate > budget:
        reasons.append(f"canary error rate {rate:.2%} ({errors}/{calls} calls) > limit {budget:.2%}")
    elif errors > budget * limits.min_requests and errors >= 1 and (calls < limits.min_requests):
        # even if every further call to reach min_requests succeeds, the rate stays above the budget
        reasons.append(f"canary errors {errors} in {calls} calls already exceed the {budget:.2%} budget of "
                       f"{limits.min_requests} calls")
    if calls >= limits.min_requests:
        p99 = m["canary_p99_seconds"]
        if p99 is not None and p99 > limits.max_p99_seconds:
            reasons.append(f"canary p99 {p99 * 1000:.1f} ms > limit {limits.max_p99_seconds * 1000:.1f} ms")
        stable = m["stable_p99_seconds"]
        if p99 is not None and stable is not None:
            base = max(stable, limits.p99_ratio_floor_seconds)
            if p99 > limits.max_p99_ratio * base:
                reasons.append(f"canary p99 {p99 * 1000:.1f} ms > {limits.max_p99_ratio:g} x stable p99 "
                               f"{stable * 1000:.1f} ms (floored at {limits.p99_ratio_floor_seconds * 1000:.0f} ms)")
    shift = m["mean_score_shift"]
    if shift is not None and m["shadow_rows"] >= limits.min_requests and shift > limits.max_mean_score_shift:
        reasons.append(f"shadow score shift: mean |canary - stable| {shift:.4f} over {m['shadow_rows']} rows > "
                       f"limit {limits.max_mean_score_shift:.4f}")
    if reasons:
        return Verdict(FAIL, tuple(reasons), dict(m))
    if not final:
        return Verdict(INCONCLUSIVE, ("window in progress",), dict(m))
    if calls < limits.min_requests:
        return Verdict(INCONCLUSIVE, (f"only {calls} canary call(s) in the window, {limits.min_requests} needed for "
                                      "a verdict (too little traffic, or a window too short)",), dict(m))
    return Verdict(PASS, (), dict(m))


def analyze(before: MetricsSnapshot, after: MetricsSnapshot, *, canary_version: str, stable_version: str | None,
            limits: Limits) -> Verdict:
    """The verdict of a finished window between two scrapes."""
    return judge(measure(before, after, canary_version=canary_version, stable_version=stable_version), limits)


def fail_fast(before: MetricsSnapshot, now: MetricsSnapshot, *, canary_version: str, stable_version: str | None,
              limits: Limits) -> Verdict | None:
    """A :data:`FAIL` verdict as soon as the window in progress has surely failed, else None."""
    verdict = judge(measure(before, now, canary_version=canary_version, stable_version=stable_version), limits,
                    final=False)
    return verdict if verdict.status == FAIL else None
