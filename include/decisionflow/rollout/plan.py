"""A rollout as a sequence of serving states: shadow, weighted steps, then promotion - or rollback at any point.

For stable version ``s`` and new version ``c`` with steps ``(10, 50, 100)`` and shadow on::

    canary deployed, weight 0, shadow   (s, c, 0, shadow)   -- analysis window (score shift, errors, latency)
    weight 10                           (s, c, 10, shadow)  -- analysis window
    weight 50                           (s, c, 50, shadow)  -- analysis window
    weight 100                          (s, c, 100)         -- analysis window
    promote: stable loads c             (c, c, 100)         -- canary serves everything while stable reloads
    promoted                            (c, -, 0)           -- canary emptied; alias ``live`` = c

    rollback (from any step)            (s, -, 0)           -- weight 0 and canary emptied in one config

Stable keeps serving until the canary is RUNNING (the canary is a separate deployment: Ray Serve's
single-replica update gap never hits stable), and stable only reloads while the canary answers 100 %.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from decisionflow.exceptions import NonRetryableError
from decisionflow.rollout.analysis import FAIL, INCONCLUSIVE, PASS, Limits
from decisionflow.rollout.serve_config import ServingState

__all__ = ["RolloutPlan", "Step"]

ON_INCONCLUSIVE = ("fail", "pass")


class RolloutPlanError(NonRetryableError, ValueError):
    """The rollout parameters are invalid; the message names the field."""


@dataclass(frozen=True)
class Step:
    """One analysis step: the canary's weight and whether shadow mirroring is on."""

    index: int
    weight: float
    shadow: bool

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "weight": self.weight, "shadow": self.shadow}


@dataclass(frozen=True)
class RolloutPlan:
    """How to roll a version out.

    :param weights: canary weights of the weighted steps, increasing, each 1..100; the last should be 100.
    :param shadow: start with a shadow step (weight 0, mirrored traffic) and keep mirroring during the steps.
    :param window_seconds: length of each analysis window.
    :param limits: the analysis limits.
    :param on_inconclusive: ``fail`` (roll back) or ``pass`` when a window has too little traffic to judge.
    :param canary_timeout_s: a canary call slower than this is answered by stable (and counted as an error).
    """

    weights: tuple[float, ...] = (10.0, 50.0, 100.0)
    shadow: bool = True
    window_seconds: float = 60.0
    limits: Limits = field(default_factory=Limits)
    on_inconclusive: str = "fail"
    canary_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        weights = tuple(float(w) for w in self.weights)
        object.__setattr__(self, "weights", weights)
        if not weights and not self.shadow:
            raise RolloutPlanError("weights: at least one step (or shadow) is needed")
        if any(not 0 < w <= 100 for w in weights):
            raise RolloutPlanError(f"weights must each be within (0, 100], got {list(weights)}")
        if list(weights) != sorted(set(weights)):
            raise RolloutPlanError(f"weights must be strictly increasing, got {list(weights)}")
        if self.window_seconds <= 0:
            raise RolloutPlanError(f"window_seconds must be > 0, got {self.window_seconds}")
        if self.on_inconclusive not in ON_INCONCLUSIVE:
            raise RolloutPlanError(f"on_inconclusive must be one of {ON_INCONCLUSIVE}, got {self.on_inconclusive!r}")

    @classmethod
    def from_params(cls, *, weights: Iterable[float], shadow: bool, window_seconds: float,
                    limits: Mapping[str, Any] | None, on_inconclusive: str = "fail",
                    canary_timeout_s: float = 2.0) -> RolloutPlan:
        return cls(weights=tuple(weights), shadow=bool(shadow), window_seconds=float(window_seconds),
                   limits=Limits.from_mapping(limits), on_inconclusive=on_inconclusive,
                   canary_timeout_s=float(canary_timeout_s))

    def steps(self) -> list[Step]:
        out = [Step(0, 0.0, True)] if self.shadow else []
        out += [Step(len(out) + i, w, self.shadow and w < 100) for i, w in enumerate(self.weights)]
        return out

    def step_state(self, step: Step, stable: str, canary: str) -> ServingState:
        return ServingState(stable, canary, step.weight, shadow=step.shadow, canary_timeout_s=self.canary_timeout_s)

    def promote_states(self, stable: str, canary: str) -> list[ServingState]:
        del stable
        return [ServingState(canary, canary, 100.0, canary_timeout_s=self.canary_timeout_s),
                ServingState(canary, None, 0.0, canary_timeout_s=self.canary_timeout_s)]

    def rollback_state(self, stable: str) -> ServingState:
        return ServingState(stable, None, 0.0, canary_timeout_s=self.canary_timeout_s)

    def passed(self, status: str) -> bool:
        """Does a window with this verdict status let the rollout go on?"""
        if status == PASS:
            return True
        if status == INCONCLUSIVE:
            return self.on_inconclusive == "pass"
        if status == FAIL:
            return False
        return False  # "error": the metrics could not be read - no evidence is not a pass
