"""Evaluation of risk scores and the approve / review / decline policy built on them.

The policy: **decline** when ``score >= thresholds.decline``, else **review** when
``score >= thresholds.review``, else **approve**. Its expected cost per transaction under a
:class:`~decisionflow.decisions.costs.CostModel` is::

    (missed_fraud * approved fraud + review * reviewed + false_decline * declined legit) / n

(a reviewed transaction costs the review whatever its label; the review is assumed to catch the fraud).
:func:`choose_thresholds` picks the thresholds on the validation split; the holdout is then evaluated with
those thresholds, so the holdout cost is an honest estimate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

# The policy on scores and its costs live in decisions.costs (serving imports them without this module);
# re-exported here under their old names.
from decisionflow.decisions.costs import (
    NEVER,
    CostModel,
    PolicyOutcome,
    Thresholds,
    _as_arrays,
    apply_policy,
)

__all__ = [
    "ECE_BINS",
    "NEVER",
    "Evaluation",
    "PolicyOutcome",
    "Thresholds",
    "apply_policy",
    "choose_thresholds",
    "evaluate",
    "expected_calibration_error",
    "recall_at_share",
    "score_problems",
]

#: Equal-width probability bins of the expected calibration error.
ECE_BINS = 10

_COLLAPSE_STD = 1e-6  # below this spread the scores carry no ranking
_COLLAPSE_SHARE = 0.99  # or when this share of scores is one single value


@dataclass(frozen=True)
class Evaluation:
    """Metrics of one model's scores on one labelled set (see :func:`evaluate`)."""

    pr_auc: float
    roc_auc: float
    recall_at_review_budget: float
    brier: float
    ece: float
    expected_cost: float
    review_share: float
    decline_share: float
    threshold_review: float
    threshold_decline: float
    review_budget: float
    n: int
    positives: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """All fields as a flat ``{prefix + name: float}`` dict, ready for ``mlflow.log_metrics``.

        Thresholds may be ``inf`` (:data:`NEVER`); drop or map them if the receiver cannot store infinity.
        """
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}


def recall_at_share(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, share: float) -> float:
    """Share of all positives among the top ``floor(share * n)`` scores.

    Ties at the cut are broken at random in expectation (the tied positives count pro rata), so the result
    does not depend on row order. ``nan`` when there are no positives.
    """
    s, y = _as_arrays(scores, labels)
    positives = int(y.sum())
    if positives == 0:
        return float("nan")
    k = int(math.floor(share * s.size + 1e-9))
    if k <= 0:
        return 0.0
    order = np.argsort(-s, kind="mergesort")
    cut = s[order[k - 1]]
    above = s > cut
    tied = s == cut
    caught = y[above].sum() + y[tied].sum() * (k - above.sum()) / tied.sum()
    return float(caught / positives)


def expected_calibration_error(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                               bins: int = ECE_BINS) -> float:
    """Expected calibration error: the row-weighted mean |mean score - fraud rate| over equal-width bins of [0, 1]."""
    s, y = _as_arrays(scores, labels)
    # Bin i holds [i/bins, (i+1)/bins); a score of exactly 1.0 belongs to the last bin.
    index = np.clip(np.floor(s * bins).astype(np.int64), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            error += members.sum() / s.size * abs(s[members].mean() - y[members].mean())
    return float(error)


def score_problems(scores: Sequence[float] | np.ndarray) -> list[str]:
    """What is wrong with a model's scores as probabilities; an empty list means they look sane.

    Flags: no scores; NaN or infinite scores; scores outside [0, 1]; a collapsed distribution (standard
    deviation below 1e-6, or more than 99% of the scores one single value), which ranks nothing and usually
    means a broken feature pipeline or a degenerate fit.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size == 0:
        return ["no scores (0 rows)"]
    problems = []
    nan = int(np.isnan(s).sum())
    inf = int(np.isinf(s).sum())
    if nan:
        problems.append(f"{nan} of {s.size} scores are NaN")
    if inf:
        problems.append(f"{inf} of {s.size} scores are infinite")
    finite = s[np.isfinite(s)]
    outside = int(((finite < 0) | (finite > 1)).sum())
    if outside:
        problems.append(f"{outside} of {s.size} scores are outside [0, 1] "
                        f"(min {finite.min():.4g}, max {finite.max():.4g})")
    if finite.size:
        std = float(finite.std())
        _, counts = np.unique(finite, return_counts=True)
        top_share = counts.max() / s.size
        if std < _COLLAPSE_STD or top_share > _COLLAPSE_SHARE:
            problems.append(f"scores collapsed (std {std:.3g}, {top_share:.1%} of scores share one value)")
    return problems


def _threshold_candidates(scores: np.ndarray, grid_size: int) -> np.ndarray:
    """Candidate thresholds: every distinct score, or ``grid_size`` score quantiles when there are more."""
    distinct = np.unique(scores)
    if distinct.size > grid_size:
        # inverted_cdf returns actual scores, so each candidate is a cut between two real score values.
        distinct = np.unique(np.quantile(scores, np.linspace(0.0, 1.0, grid_size + 1), method="inverted_cdf"))
    return np.append(distinct, NEVER)


def choose_thresholds(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, costs: CostModel,
                      review_budget: float, grid_size: int = 1000) -> Thresholds:
    """The policy thresholds with the lowest expected cost on these labelled scores, reviews within budget.

    Searches every pair ``review <= decline`` of candidate thresholds (the distinct scores, or ``grid_size``
    score quantiles when there are more, plus :data:`NEVER`) for the lowest total cost subject to
    ``reviewed <= review_budget * n``. Ties go to fewer reviews, then fewer declines. Meant for the
    validation split; the chosen thresholds are then evaluated on the holdout.
    """
    s, y = _as_arrays(scores, labels)
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values: " + "; ".join(score_problems(s)))
    if not 0 <= review_budget <= 1:
        raise ValueError(f"review_budget must be in [0, 1], got {review_budget}")
    candidates = _threshold_candidates(s, grid_size)
    # Counts at or above each candidate from sorted scores: one searchsorted instead of a pass per candidate.
    pos_sorted = np.sort(s[y == 1])
    neg_sorted = np.sort(s[y == 0])
    pos_ge = pos_sorted.size - np.searchsorted(pos_sorted, candidates, side="left")
    neg_ge = neg_sorted.size - np.searchsorted(neg_sorted, candidates, side="left")
    all_ge = pos_ge + neg_ge
    max_reviews = review_budget * s.size + 1e-9
    positives = pos_sorted.size

    best: tuple[float, int, int] | None = None
    best_pair = (NEVER, NEVER)
    for d in range(candidates.size):
        # Review thresholds r <= d: candidates are ascending, so indices 0..d.
        reviewed = all_ge[: d + 1] - all_ge[d]
        cost = (costs.missed_fraud * (positives - pos_ge[: d + 1]) + costs.review * reviewed
                + costs.false_decline * neg_ge[d])
        allowed = reviewed <= max_reviews
        if not allowed.any():
            continue
        cost = np.where(allowed, cost, np.inf)
        # lexsort's last key is primary: lowest cost, then fewest reviews.
        r = int(np.lexsort((reviewed, cost))[0])
        key = (float(cost[r]), int(reviewed[r]), int(all_ge[d]))
        if best is None or key < best:
            best, best_pair = key, (float(candidates[r]), float(candidates[d]))
    return Thresholds(review=best_pair[0], decline=best_pair[1])


def evaluate(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, costs: CostModel,
             review_budget: float, thresholds: Thresholds | None = None) -> Evaluation:
    """All metrics of ``scores`` against 0/1 ``labels``.

    * ``pr_auc`` - average precision; ``roc_auc``; both ``nan`` when only one class is present.
    * ``recall_at_review_budget`` - share of fraud among the top ``review_budget`` share of scores.
    * ``brier`` - mean squared error of the scores as probabilities; ``ece`` - expected calibration error
      over 10 equal-width bins.
    * ``expected_cost`` (per transaction), ``review_share`` and ``decline_share`` of the policy with
      ``thresholds``; when ``None`` they are chosen on these same scores with :func:`choose_thresholds`
      (optimistic: pass the validation-chosen thresholds when evaluating the holdout).
    * ``n`` rows, ``positives`` fraud rows.

    Raises ``ValueError`` for NaN/infinite scores, mismatched lengths or labels other than 0/1.
    """
    from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

    s, y = _as_arrays(scores, labels)
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values: " + "; ".join(score_problems(s)))
    if thresholds is None:
        thresholds = choose_thresholds(s, y, costs, review_budget)
    outcome = apply_policy(s, y, thresholds, costs)
    both_classes = 0 < y.sum() < y.size
    return Evaluation(
        pr_auc=float(average_precision_score(y, s)) if both_classes else float("nan"),
        roc_auc=float(roc_auc_score(y, s)) if both_classes else float("nan"),
        recall_at_review_budget=recall_at_share(s, y, review_budget),
        brier=float(brier_score_loss(y, np.clip(s, 0.0, 1.0))),
        ece=expected_calibration_error(np.clip(s, 0.0, 1.0), y),
        expected_cost=outcome.expected_cost,
        review_share=outcome.review_share,
        decline_share=outcome.decline_share,
        threshold_review=float(thresholds.review),
        threshold_decline=float(thresholds.decline),
        review_budget=float(review_budget),
        n=int(s.size),
        positives=int(y.sum()),
    )
