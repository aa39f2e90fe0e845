"""The score-threshold policy and what its outcomes cost: :class:`Thresholds`, :class:`CostModel`, :func:`apply_policy`.

The policy on scores alone: **decline** when ``score >= thresholds.decline``, else **review** when
``score >= thresholds.review``, else **approve**. Its expected cost per transaction under a :class:`CostModel`::

    (missed_fraud * approved fraud + review * reviewed + false_decline * declined legit) / n

(a reviewed transaction costs the review whatever its label; the review is assumed to catch the fraud).

These lived in ``decisionflow.models.metrics`` / ``models.config`` and are re-exported there under the same
names. They are here so that serving and the decision runs import the policy with numpy only, without the
pandas / scikit-learn training code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from decisionflow.exceptions import NonRetryableError

__all__ = [
    "DECISIONS",
    "NEVER",
    "ConfigError",
    "CostModel",
    "PolicyOutcome",
    "Thresholds",
    "apply_policy",
    "decisions_by_thresholds",
    "outcome_of_decisions",
]

#: A threshold no score reaches: a policy with ``decline=NEVER`` never declines.
NEVER: float = math.inf

#: The outcomes of a decision, mildest first (a rule may only move a decision to the right unless it says so).
DECISIONS: tuple[str, ...] = ("approve", "review", "decline")


class ConfigError(NonRetryableError, ValueError):
    """A configuration value or key is invalid; the message names the field."""


def _number(owner: str, name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
            min_inclusive: bool = True, max_inclusive: bool = True, integer: bool = False) -> None:
    """Raise :class:`ConfigError` naming ``owner.name`` unless ``value`` is a finite number in range."""
    kind = "an integer" if integer else "a finite number"
    # bool is an int subclass: a JSON ``true`` for a cost is a mistake, not the number 1.
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
        raise ConfigError(f"{owner}.{name} must be {kind}, got {value!r}")
    bounds = []
    if minimum is not None:
        bounds.append(f"{'>=' if min_inclusive else '>'} {minimum}")
    if maximum is not None:
        bounds.append(f"{'<=' if max_inclusive else '<'} {maximum}")
    too_low = minimum is not None and (value < minimum or (not min_inclusive and value == minimum))
    too_high = maximum is not None and (value > maximum or (not max_inclusive and value == maximum))
    if too_low or too_high:
        raise ConfigError(f"{owner}.{name} must be {' and '.join(bounds)}, got {value!r}")


def _check_keys(cls: type, data: Mapping[str, Any]) -> None:
    """Reject keys that are not fields of the dataclass ``cls``, naming them and the accepted ones."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{cls.__name__} must be built from a mapping, got {type(data).__name__}")
    known = [f.name for f in fields(cls)]
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}; known keys: {', '.join(known)}")


@dataclass(frozen=True)
class CostModel:
    """What each outcome of the approve / review / decline policy costs, per transaction, in currency units.

    * ``missed_fraud`` - a fraudulent transaction that was approved (chargeback, lost goods).
    * ``review`` - a transaction sent to manual review, whatever its label (analyst time).
    * ``false_decline`` - a legitimate transaction that was declined (lost sale, annoyed customer).

    A declined fraud and an approved legitimate transaction cost nothing.
    """

    missed_fraud: float = 500.0
    review: float = 5.0
    false_decline: float = 50.0

    def __post_init__(self) -> None:
        for f in fields(self):
            _number("CostModel", f.name, getattr(self, f.name), minimum=0)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CostModel:
        """Build from a JSON-like mapping; unknown keys raise :class:`ConfigError` naming them."""
        _check_keys(cls, data)
        return cls(**data)

    def as_dict(self) -> dict[str, float]:
        """The costs as a flat dict (e.g. for MLflow params)."""
        return {k: float(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Thresholds:
    """Score thresholds of the policy: review from ``review`` on, decline from ``decline`` on (``review <= decline``).

    ``review == decline`` means no review band; :data:`NEVER` (infinity) means that action never happens.
    """

    review: float
    decline: float

    def __post_init__(self) -> None:
        for name in ("review", "decline"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"Thresholds.{name} must be a number, got {value!r}")
        if self.review > self.decline:
            raise ValueError(f"Thresholds.review ({self.review}) must be <= Thresholds.decline ({self.decline})")


@dataclass(frozen=True)
class PolicyOutcome:
    """Counts of what the policy did to a labelled set and what it cost."""

    n: int
    approved_fraud: int
    reviewed: int
    declined_fraud: int
    declined_legit: int
    total_cost: float

    @property
    def expected_cost(self) -> float:
        """Cost per transaction."""
        return self.total_cost / self.n if self.n else float("nan")

    @property
    def review_share(self) -> float:
        """Share of transactions sent to review."""
        return self.reviewed / self.n if self.n else float("nan")

    @property
    def decline_share(self) -> float:
        """Share of transactions declined."""
        return (self.declined_fraud + self.declined_legit) / self.n if self.n else float("nan")


def _as_arrays(scores: Sequence[float] | np.ndarray,
               labels: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores as float64 and labels as 0/1 int arrays of one length; ``ValueError`` otherwise."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y_raw = np.asarray(labels).ravel()
    if s.shape != y_raw.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y_raw.size}")
    if s.size == 0:
        raise ValueError("no scores to evaluate (0 rows)")
    y = y_raw.astype(np.float64)
    if np.isnan(y).any() or not np.isin(y, (0.0, 1.0)).all():
        bad = sorted({str(v) for v in np.unique(y_raw[~np.isin(y, (0.0, 1.0))])})
        raise ValueError(f"labels must be 0/1 or booleans, found {', '.join(bad[:10])}")
    return s, y.astype(np.int64)


def outcome_of_decisions(decisions: Sequence[str] | np.ndarray, labels: Sequence[int] | np.ndarray,
                         costs: CostModel) -> PolicyOutcome:
    """Count what ``decisions`` (``approve`` / ``review`` / ``decline`` per row) did to 0/1 ``labels``, and the cost.

    The same accounting as :func:`apply_policy`, for decisions made by anything (a full
    :class:`~decisionflow.decisions.policy.Policy`, a baseline); ``ValueError`` for another outcome or length.
    """
    d = np.asarray(decisions, dtype=object).ravel()
    y_raw = np.asarray(labels).ravel()
    if d.shape != y_raw.shape:
        raise ValueError(f"decisions and labels differ in length: {d.size} vs {y_raw.size}")
    _, y = _as_arrays(np.zeros(d.size), y_raw) if d.size else (None, np.zeros(0, dtype=np.int64))
    unknown = sorted({str(v) for v in d} - set(DECISIONS))
    if unknown:
        raise ValueError(f"decisions must be one of {', '.join(DECISIONS)}, found {', '.join(unknown[:10])}")
    approve, review, decline = (d == "approve"), (d == "review"), (d == "decline")
    approved_fraud = int((approve & (y == 1)).sum())
    reviewed = int(review.sum())
    declined_fraud = int((decline & (y == 1)).sum())
    declined_legit = int((decline & (y == 0)).sum())
    total = costs.missed_fraud * approved_fraud + costs.review * reviewed + costs.false_decline * declined_legit
    return PolicyOutcome(n=int(d.size), approved_fraud=approved_fraud, reviewed=reviewed,
                         declined_fraud=declined_fraud, declined_legit=declined_legit, total_cost=float(total))


def decisions_by_thresholds(scores: Sequence[float] | np.ndarray, review: float | np.ndarray,
                            decline: float | np.ndarray) -> np.ndarray:
    """What the thresholds alone decide per score: ``decline`` from ``decline`` on, else ``review`` from ``review``
    on, else ``approve`` (object array). Thresholds may be arrays (one per row, e.g. several model versions)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    return np.where(s >= decline, "decline", np.where(s >= review, "review", "approve")).astype(object)


def apply_policy(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, thresholds: Thresholds,
                 costs: CostModel) -> PolicyOutcome:
    """Apply the approve / review / decline policy to labelled scores and count outcomes and cost."""
    s, y = _as_arrays(scores, labels)
    return outcome_of_decisions(decisions_by_thresholds(s, thresholds.review, thresholds.decline), y, costs)