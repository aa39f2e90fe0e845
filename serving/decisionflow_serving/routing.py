"""Weighted per-request routing between the ``stable`` and ``canary`` model deployments, with shadow traffic.

Ray Serve 2.x has no traffic splitting, so the gateway does it: :class:`RoutedBackend` is the gateway's
:class:`~decisionflow_serving.backends.ScoringBackend` over two handles (Ray Serve ``DeploymentHandle`` objects in
production, anything with ``.score.remote(rows)`` awaitable in tests).

* **Per request, one version.** ``canary_weight`` percent of the requests go to the canary, the rest to stable;
  all rows of a request are scored by that one version. The choice is a smooth weighted interleaving (a credit
  grows by the weight per request; at 100 the request goes to the canary and the credit drops by 100), so the
  canary's share equals its weight to within one request at any traffic volume - a random draw would wander by
  several points over a short analysis window. Shadow mirroring uses the same scheme for ``shadow_share``.
* **Canary faults never reach the client.** A canary call that raises or takes longer than
  ``canary_timeout_s`` is answered by stable; it is counted against the canary
  (``decisionflow_model_requests_total{role="canary",outcome="error"}`` and
  ``decisionflow_canary_fallbacks_total``).
* **Shadow.** With ``shadow`` on, a share (``shadow_share``) of the requests stable answered is mirrored to the
  canary in the background (the client does not wait); the canary's answer is dropped, its per-row
  ``|canary - stable|`` goes to ``decisionflow_shadow_score_diff``; its errors and latency are counted with
  ``role="shadow"``.

The routing config (:class:`RoutingConfig`) comes from the gateway deployment's ``user_config`` (see
``decisionflow_serving.deployments``): changing it calls :meth:`RoutedBackend.configure`, no replica restarts.
Metrics are registered on :data:`decisionflow_serving.metrics.REGISTRY`; their names are the contract the canary
analysis (``decisionflow.rollout.analysis``) reads.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from decisionflow_serving.backends import Scored
from decisionflow_serving.metrics import LATENCY_BUCKETS, REGISTRY

__all__ = [
    "CANARY",
    "FALLBACKS",
    "MODEL_REQUESTS",
    "MODEL_SECONDS",
    "RoutedBackend",
    "RoutingConfig",
    "ROUTING_WEIGHT",
    "SHADOW",
    "SHADOW_DIFF",
    "STABLE",
]

log = logging.getLogger(__name__)

STABLE, CANARY, SHADOW = "stable", "canary", "shadow"
#: Label value for a version the gateway does not know (a failed call to a canary without a configured version).
UNKNOWN_VERSION = "unknown"

MODEL_REQUESTS = Counter(
    "decisionflow_model_requests",
    "Model deployment calls made by the gateway, by role (stable | canary | shadow), model version and outcome "
    "(ok | error; a timeout is an error).",
    ("role", "model_version", "outcome"),
    registry=REGISTRY,
)
MODEL_SECONDS = Histogram(
    "decisionflow_model_request_seconds",
    "Latency of model deployment calls seen by the gateway, in seconds, by role and model version.",
    ("role", "model_version"),
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
SHADOW_DIFF = Histogram(
    "decisionflow_shadow_score_diff",
    "Per-row |canary score - stable score| of shadow-mirrored requests.",
    ("stable_version", "canary_version"),
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
    registry=REGISTRY,
)
FALLBACKS = Counter(
    "decisionflow_canary_fallbacks",
    "Requests routed to the canary that stable answered because the canary failed or timed out.",
    ("model_version",),
    registry=REGISTRY,
)
ROUTING_WEIGHT = Gauge(
    "decisionflow_routing_weight",
    "Share of requests (percent) routed to each role (stable, canary; shadow: the share of stable-served requests "
    "mirrored to the canary) as the gateway applies it.",
    ("role", "model_version"),
    registry=REGISTRY,
)


class RoutingConfigError(ValueError):
    """A routing config field is out of range or unknown; the message names it."""


@dataclass(frozen=True)
class RoutingConfig:
    """How the gateway splits traffic (the gateway deployment's ``user_config``).

    :param canary_weight: percent of requests (0-100) scored by the canary.
    :param shadow: mirror stable-served requests to the canary (scores compared, answers dropped).
    :param shadow_share: share (0-1) of stable-served requests mirrored when ``shadow`` is on.
    :param canary_timeout_s: a canary call slower than this is abandoned and answered by stable.
    :param stable_version: the version ``stable`` serves (metric labels only; the answer names the real one).
    :param canary_version: the version ``canary`` serves, ``None`` when it holds none.
    :param max_shadow_in_flight: mirrored calls in flight at most; more are skipped (never queued).
    """

    canary_weight: float = 0.0
    shadow: bool = False
    shadow_share: float = 1.0
    canary_timeout_s: float = 2.0
    stable_version: str | None = None
    canary_version: str | None = None
    max_shadow_in_flight: int = 32

    def __post_init__(self) -> None:
        if not 0 <= float(self.canary_weight) <= 100:
            raise RoutingConfigError(f"routing canary_weight must be within 0..100, got {self.canary_weight!r}")
        if not 0 <= float(self.shadow_share) <= 1:
            raise RoutingConfigError(f"routing shadow_share must be within 0..1, got {self.shadow_share!r}")
        if float(self.canary_timeout_s) <= 0:
            raise RoutingConfigError(f"routing canary_timeout_s must be > 0, got {self.canary_timeout_s!r}")
        if int(self.max_shadow_in_flight) < 0:
            raise RoutingConfigError(f"routing max_shadow_in_flight must be >= 0, got {self.max_shadow_in_flight!r}")
        if self.canary_version is None and (float(self.canary_weight) > 0 or self.shadow):
            raise RoutingConfigError("routing canary_weight > 0 or shadow needs canary_version (the canary holds "
                                     "no model version)")

    @classmethod
    def from_mapping(cls, value: Mapping[str, Any] | None) -> RoutingConfig:
        """From a ``user_config`` dict; unknown keys are refused (a typo must not silently route nothing)."""
        value = dict(value or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise RoutingConfigError(f"routing config has unknown field(s) {unknown}; known: {sorted(known)}")
        for key in ("stable_version", "canary_version"):
            if value.get(key) is not None:
                value[key] = str(value[key])
        return cls(**value)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RoutedBackend:
    """A :class:`~decisionflow_serving.backends.ScoringBackend` over a ``stable`` and a ``canary`` handle.

    :param stable: handle of the stable model deployment (``await stable.score.remote(rows)`` -> ``Scored``).
    :param canary: handle of the canary model deployment.
    :param routing: the initial :class:`RoutingConfig` (or its dict form).
    :param rng: random source of the initial credits (each gateway replica starts at a different phase).
    """

    def __init__(self, stable: Any, canary: Any, routing: RoutingConfig | Mapping[str, Any] | None = None,
                 *, rng: random.Random | None = None) -> None:
        self._stable = stable
        self._canary = canary
        rng = rng or random.Random()
        self._canary_credit = rng.random() * 100
        self._shadow_credit = rng.random()
        self._routing = RoutingConfig()
        self._stable_ready = False
        self._shadow_tasks: set[asyncio.Task] = set()
        self.configure(routing if routing is not None else RoutingConfig())

    # -- config -----------------------------------------------------------------------------------------------
    @property
    def routing(self) -> RoutingConfig:
        return self._routing

    def configure(self, routing: RoutingConfig | Mapping[str, Any]) -> RoutingConfig:
        """Swap the routing config (atomic: a request in flight keeps the config it started with)."""
        new = routing if isinstance(routing, RoutingConfig) else RoutingConfig.from_mapping(routing)
        old = self._routing
        for role, version in ((STABLE, old.stable_version), (CANARY, old.canary_version),
                              (SHADOW, old.canary_version)):
            if version is not None:
                try:
                    ROUTING_WEIGHT.remove(role, version)
                except KeyError:
                    pass
        if new.stable_version is not None:
            ROUTING_WEIGHT.labels(role=STABLE, model_version=new.stable_version).set(100 - float(new.canary_weight))
        if new.canary_version is not None:
            ROUTING_WEIGHT.labels(role=CANARY, model_version=new.canary_version).set(float(new.canary_weight))
            if new.shadow:
                ROUTING_WEIGHT.labels(role=SHADOW, model_version=new.canary_version).set(100 * float(new.shadow_share))
        self._routing = new
        log.info("routing: %s", new.as_dict())
        return new

    # -- ScoringBackend ---------------------------------------------------------------------------------------
    def ready(self) -> bool:
        """True once stable has answered (a score or :meth:`refresh_ready`)."""
        return self._stable_ready

    async def refresh_ready(self, timeout: float = 10.0) -> bool:
        """Ask stable whether it holds a model (its ``info`` method) and cache the answer for :meth:`ready`."""
        try:
            info = await asyncio.wait_for(_await(self._stable.info.remote()), timeout)
            self._stable_ready = bool(info and info.get("model_version"))
        except Exception as exc:  # noqa: BLE001 - not ready, whatever the reason
            log.debug("stable readiness probe failed: %s", exc)
            self._stable_ready = False
        return self._stable_ready

    async def score(self, rows: list[dict[str, Any]]) -> Scored:
        """Score ``rows`` with one version: the canary for ``canary_weight`` % of the requests, else stable."""
        routing = self._routing
        if self._pick_canary(routing):
            scored = await self._call_canary(rows, routing, CANARY)
            if scored is not None:
                return scored
            FALLBACKS.labels(model_version=routing.canary_version or UNKNOWN_VERSION).inc()
        scored = await self._call_stable(rows)
        if routing.shadow and routing.canary_version is not None and self._pick_shadow(routing):
            self._mirror(rows, scored, routing)
        return scored

    def _pick_canary(self, routing: RoutingConfig) -> bool:
        weight = float(routing.canary_weight)
        if weight <= 0:
            return False
        if weight >= 100:
            return True
        self._canary_credit += weight
        if self._canary_credit >= 100:
            self._canary_credit -= 100
            return True
        return False

    def _pick_shadow(self, routing: RoutingConfig) -> bool:
        share = float(routing.shadow_share)
        if share >= 1:
            return True
        self._shadow_credit += share
        if self._shadow_credit >= 1:
            self._shadow_credit -= 1
            return True
        return False

    # -- calls ------------------------------------------------------------------------------------------------
    async def _call_stable(self, rows: list[dict[str, Any]]) -> Scored:
        started = time.perf_counter()
        try:
            scored = await _await(self._stable.score.remote(rows))
        except Exception:
            version = self._routing.stable_version or UNKNOWN_VERSION
            MODEL_REQUESTS.labels(role=STABLE, model_version=version, outcome="error").inc()
            MODEL_SECONDS.labels(role=STABLE, model_version=version).observe(time.perf_counter() - started)
            raise
        self._stable_ready = True
        MODEL_REQUESTS.labels(role=STABLE, model_version=scored.model_version, outcome="ok").inc()
        MODEL_SECONDS.labels(role=STABLE, model_version=scored.model_version).observe(time.perf_counter() - started)
        return scored

    async def _call_canary(self, rows: list[dict[str, Any]], routing: RoutingConfig, role: str) -> Scored | None:
        """The canary's answer, or None (counted as an error) when it raised, timed out or named another version."""
        version = routing.canary_version or UNKNOWN_VERSION
        started = time.perf_counter()
        response = self._canary.score.remote(rows)
        outcome = "error"
        scored = None
        # asyncio.wait, not wait_for: a timed-out call is abandoned at once (wait_for would wait for the
        # cancellation to finish, and the client with it).
        call = asyncio.ensure_future(_await(response))
        done, _ = await asyncio.wait({call}, timeout=routing.canary_timeout_s)
        if not done:
            log.warning("canary %s timed out after %.2fs (%s)", version, routing.canary_timeout_s, role)
            call.cancel()
            call.add_done_callback(_consume)
            _cancel(response)
        elif call.exception() is not None:
            exc = call.exception()
            log.warning("canary %s failed (%s): %s: %s", version, role, type(exc).__name__, str(exc)[:300])
        else:
            scored = call.result()
            if routing.canary_version is not None and scored.model_version != routing.canary_version:
                log.warning("canary answered with version %s, routing expects %s: treated as a canary error",
                            scored.model_version, routing.canary_version)
                scored = None
            else:
                outcome = "ok"
        MODEL_REQUESTS.labels(role=role, model_version=version, outcome=outcome).inc()
        MODEL_SECONDS.labels(role=role, model_version=version).observe(time.perf_counter() - started)
        return scored

    def _mirror(self, rows: list[dict[str, Any]], stable: Scored, routing: RoutingConfig) -> None:
        if len(self._shadow_tasks) >= routing.max_shadow_in_flight:
            return  # the canary is behind: skip (a mirror never queues)
        task = asyncio.get_running_loop().create_task(self._shadow(rows, stable, routing))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, rows: list[dict[str, Any]], stable: Scored, routing: RoutingConfig) -> None:
        scored = await self._call_canary(rows, replace(routing), SHADOW)
        if scored is None or len(scored.scores) != len(stable.scores):
            return
        diff = SHADOW_DIFF.labels(stable_version=stable.model_version, canary_version=scored.model_version)
        for mine, theirs in zip(stable.scores, scored.scores, strict=True):
            diff.observe(abs(float(theirs) - float(mine)))

    async def drain_shadow(self, timeout: float = 10.0) -> None:
        """Wait for mirrored calls in flight (tests; a clean shutdown)."""
        if self._shadow_tasks:
            await asyncio.wait(list(self._shadow_tasks), timeout=timeout)


async def _await(response: Any) -> Any:
    """Await a ``DeploymentResponse`` (or any awaitable) inside a coroutine, so ``wait_for`` can time it."""
    return await response


def _consume(task: asyncio.Future) -> None:
    """Retrieve an abandoned call's outcome so asyncio does not log 'exception was never retrieved'."""
    if not task.cancelled():
        task.exception()


def _cancel(response: Any) -> None:
    cancel = getattr(response, "cancel", None)
    if callable(cancel):
        try:
            cancel()
        except Exception:  # noqa: BLE001 - best effort
            pass
