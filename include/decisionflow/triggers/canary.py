"""Deferrable canary analysis: watch the gateway's metrics for one analysis window and fire a verdict.

The trigger waits until the gateway routes the step's traffic (``decisionflow_routing_weight``), scrapes
``GET <metrics_url>`` (the gateway's Prometheus text) then, and every
``poll_interval`` seconds until ``window_seconds`` have passed; each scrape is compared with the first by
:mod:`decisionflow.rollout.analysis`. It fires once:

* ``{"status": "fail", ...}`` as soon as the canary has surely failed (fail fast), or at the window's end;
* ``{"status": "pass" | "inconclusive", ...}`` at the window's end;
* ``{"status": "error", ...}`` when the metrics could not be read for ``max_scrape_failures`` polls in a row
  (the operator rolls back: no evidence is not a pass).

The event carries ``reason``, ``reasons``, ``measurements`` (see :func:`decisionflow.rollout.analysis.measure`),
``window_seconds`` and ``step`` (passed through for the operator).

No event fires sooner than ``min_fire_seconds`` after the trigger started: a trigger that fires while the
scheduler has not yet processed the deferring worker's exit gets the resumed task killed as a "state mismatch"
(apache/airflow#72716, #71580, still open in Airflow 3.3), which a fail-fast verdict 2 s into a window hit here.
The verdict is taken when it is sure; only its delivery waits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


def scrape(url: str, timeout: float = 10.0) -> str:
    """The metrics text at ``url`` (blocking)."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - URL from the connection
        return response.read().decode()


class CanaryAnalysisTrigger(BaseTrigger):
    """Judge the canary over one analysis window from the gateway's ``/metrics``.

    :param metrics_url: the gateway's metrics endpoint, e.g. ``http://127.0.0.1:8000/metrics``.
    :param canary_version: the model version under analysis.
    :param stable_version: the stable version (for the latency ratio and the shadow comparison).
    :param window_seconds: how long the window lasts.
    :param limits: :class:`decisionflow.rollout.analysis.Limits` as a dict.
    :param poll_interval: seconds between scrapes (fail-fast granularity).
    :param step: opaque step description handed back in the event.
    :param max_scrape_failures: consecutive failed scrapes before the trigger gives up with ``error``.
    :param settle_timeout: seconds to wait for the gateway to route the step's traffic (its
        ``decisionflow_routing_weight`` gauges: ``step["weight"]`` and ``step["shadow"]``) before the window
        starts; ``error`` after that.
    :param min_fire_seconds: the earliest an event is delivered after the trigger started (default 10; see the
        module doc).
    """

    def __init__(self, *, metrics_url: str, canary_version: str, stable_version: str | None,
                 window_seconds: float, limits: dict[str, Any] | None = None, poll_interval: float = 2.0,
                 step: dict[str, Any] | None = None, max_scrape_failures: int = 5,
                 settle_timeout: float = 120.0, min_fire_seconds: float = 10.0) -> None:
        super().__init__()
        self.min_fire_seconds = float(min_fire_seconds)
        self.metrics_url = metrics_url
        self.canary_version = str(canary_version)
        self.stable_version = None if stable_version is None else str(stable_version)
        self.window_seconds = float(window_seconds)
        self.limits = dict(limits or {})
        self.poll_interval = float(poll_interval)
        self.step = dict(step or {})
        self.max_scrape_failures = int(max_scrape_failures)
        self.settle_timeout = float(settle_timeout)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "metrics_url": self.metrics_url,
                "canary_version": self.canary_version,
                "stable_version": self.stable_version,
                "window_seconds": self.window_seconds,
                "limits": self.limits,
                "poll_interval": self.poll_interval,
                "step": self.step,
                "max_scrape_failures": self.max_scrape_failures,
                "settle_timeout": self.settle_timeout,
                "min_fire_seconds": self.min_fire_seconds,
            },
        )

    async def _snapshot(self):
        from decisionflow.rollout.analysis import parse_metrics

        text = await asyncio.to_thread(scrape, self.metrics_url)
        return parse_metrics(text)

    def _event(self, verdict: dict[str, Any], started: float) -> TriggerEvent:
        return TriggerEvent({**verdict, "window_seconds": round(time.monotonic() - started, 2), "step": self.step,
                             "canary_version": self.canary_version, "stable_version": self.stable_version})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        created = time.monotonic()
        async for event in self._verdicts():
            await asyncio.sleep(max(0.0, created + self.min_fire_seconds - time.monotonic()))
            yield event
            return

    async def _verdicts(self) -> AsyncIterator[TriggerEvent]:
        from decisionflow.rollout.analysis import Limits, analyze, fail_fast, routing_applied

        limits = Limits.from_mapping(self.limits)
        started = time.monotonic()
        failures = 0
        baseline = None
        settle_until = time.monotonic() + self.settle_timeout
        while baseline is None:
            try:
                snapshot = await self._snapshot()
                if "weight" in self.step and not routing_applied(
                        snapshot, canary_version=self.canary_version, weight=float(self.step["weight"]),
                        shadow=bool(self.step.get("shadow"))):
                    if time.monotonic() > settle_until:
                        yield self._event({"status": "error", "reason": (
                            f"the gateway at {self.metrics_url} does not route the step's traffic after "
                            f"{self.settle_timeout:.0f}s (decisionflow_routing_weight of canary "
                            f"{self.canary_version} is not {self.step['weight']})"), "reasons": [],
                            "measurements": {}}, started)
                        return
                    await asyncio.sleep(0.5)
                    continue
                baseline = snapshot
            except Exception as exc:  # noqa: BLE001 - the gateway may be between replicas
                failures += 1
                self.log.warning("canary analysis: scrape of %s failed (%d/%d): %s", self.metrics_url, failures,
                                 self.max_scrape_failures, exc)
                if failures >= self.max_scrape_failures:
                    yield self._event({"status": "error", "reason": f"cannot read {self.metrics_url}: {exc}",
                                       "reasons": [str(exc)], "measurements": {}}, started)
                    return
                await asyncio.sleep(self.poll_interval)
        failures = 0
        started = time.monotonic()  # the window starts once the gateway routes as asked
        deadline = started + self.window_seconds
        kwargs = {"canary_version": self.canary_version, "stable_version": self.stable_version, "limits": limits}
        while True:
            await asyncio.sleep(max(0.0, min(self.poll_interval, deadline - time.monotonic())))
            try:
                now = await self._snapshot()
                failures = 0
            except Exception as exc:  # noqa: BLE001
                failures += 1
                self.log.warning("canary analysis: scrape failed (%d/%d): %s", failures, self.max_scrape_failures, exc)
                if failures >= self.max_scrape_failures:
                    yield self._event({"status": "error", "reason": f"cannot read {self.metrics_url}: {exc}",
                                       "reasons": [str(exc)], "measurements": {}}, started)
                    return
                continue
            early = fail_fast(baseline, now, **kwargs)
            if early is not None:
                self.log.warning("canary %s failed early: %s", self.canary_version, early.reason())
                yield self._event(early.as_dict(), started)
                return
            if time.monotonic() >= deadline:
                verdict = analyze(baseline, now, **kwargs)
                self.log.info("canary %s: %s (%s)", self.canary_version, verdict.status, verdict.reason())
                yield self._event(verdict.as_dict(), started)
                return
