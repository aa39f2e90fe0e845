"""Whether a newly trained model (the challenger) should replace the serving one (the champion).

The decision is a pure function of two :class:`~decisionflow.models.metrics.Evaluation` objects and the
challenger's raw scores, so the Airflow task that acts on it (registry alias, serving rollout) stays thin and
the rule is testable. Both evaluations must come from the same labelled set (score the champion on the
challenger's holdout), or the comparison means nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from decisionflow.models.metrics import Evaluation, score_problems

__all__ = ["HIGHER_IS_BETTER", "PromotionDecision", "chance_p_value", "decide_promotion"]

#: Direction of the comparable metrics of :class:`Evaluation`; ``decide_promotion`` infers it from here.
HIGHER_IS_BETTER: dict[str, bool] = {
    "pr_auc": True,
    "roc_auc": True,
    "recall_at_review_budget": True,
    "brier": False,
    "ece": False,
    "expected_cost": False,
}

# Floating-point slack so that 0.465 vs 0.455 with margin 0.01 counts as "by the margin".
_EPS = 1e-12


@dataclass(frozen=True)
class PromotionDecision:
    """The verdict and why.

    ``reason`` is one human-readable line starting with ``promoted:`` or ``not promoted:``; ``problems`` the
    challenger's score problems (:func:`~decisionflow.models.metrics.score_problems`); ``champion_value`` is
    ``None`` when there was no champion.
    """

    promote: bool
    reason: str
    metric: str
    challenger_value: float
    champion_value: float | None
    margin: float
    higher_is_better: bool
    problems: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        """The decision as a JSON-serialisable dict (e.g. an XCom or MLflow tags)."""
        out = asdict(self)
        out["problems"] = list(self.problems)
        return out


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def chance_p_value(roc_auc: float, positives: int, n: int) -> float:
    """P(ROC-AUC >= ``roc_auc``) for scores that rank at random: the normal approximation of Mann-Whitney U.

    Under the null, AUC ~ N(0.5, (n + 1) / (12 * positives * negatives)). NaN inputs or a one-class set give 1.0.
    """
    negatives = n - positives
    if positives <= 0 or negatives <= 0 or not math.isfinite(roc_auc):
        return 1.0
    sd = math.sqrt((n + 1) / (12.0 * positives * negatives))
    return 0.5 * math.erfc((roc_auc - 0.5) / sd / math.sqrt(2.0))


def decide_promotion(challenger: Evaluation, champion: Evaluation | None,
                     challenger_scores: Sequence[float] | np.ndarray, metric: str = "pr_auc",
                     margin: float = 0.01, higher_is_better: bool | None = None,
                     max_chance_p_value: float = 0.001) -> PromotionDecision:
    """Promote the challenger only if its scores are sane and it beats the champion on ``metric`` by ``margin``.

    * Scores with problems (NaN/inf, outside [0, 1], collapsed) are never promoted, champion or not.
    * A challenger no better than chance is never promoted, champion or not: its ROC-AUC must be
      significantly above 0.5 (one-sided Mann-Whitney test, p <= ``max_chance_p_value``; see
      :func:`chance_p_value`). A model trained on shuffled labels ranks at random, so a broken first model
      never becomes champion. (PR-AUC alone is too noisy for this with a few dozen frauds in the holdout.)
    * A challenger whose ``metric`` is NaN is not promoted.
    * No champion (first model), or a champion without a valid value of ``metric``: promoted.
    * Otherwise promoted when ``challenger >= champion + margin`` (higher is better) or
      ``challenger <= champion - margin`` (lower is better); ``margin`` is absolute, in the metric's units.

    ``higher_is_better`` defaults to the metric's known direction (:data:`HIGHER_IS_BETTER`: ``pr_auc`` up,
    ``expected_cost`` down, ...); it must be given for other metrics and may not contradict a known one.
    """
    names = [f.name for f in fields(Evaluation)]
    if metric not in names:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(names)}")
    known = HIGHER_IS_BETTER.get(metric)
    if higher_is_better is None:
        if known is None:
            raise ValueError(f"say whether higher {metric} is better: pass higher_is_better")
        higher_is_better = known
    elif known is not None and higher_is_better != known:
        raise ValueError(f"{metric} is {'higher' if known else 'lower'}-is-better; "
                         f"higher_is_better={higher_is_better} contradicts it")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")

    value = float(getattr(challenger, metric))
    champion_value = None if champion is None else float(getattr(champion, metric))
    problems = tuple(score_problems(challenger_scores))

    def decision(promote: bool, reason: str) -> PromotionDecision:
        return PromotionDecision(promote=promote, reason=reason, metric=metric, challenger_value=value,
                                 champion_value=champion_value, margin=float(margin),
                                 higher_is_better=higher_is_better, problems=problems)

    if problems:
        return decision(False, "not promoted: " + "; ".join(problems))
    if math.isnan(value):
        return decision(False, f"not promoted: challenger {metric} is NaN (evaluation set lacks a class?)")
    p_value = chance_p_value(challenger.roc_auc, challenger.positives, challenger.n)
    if not p_value <= max_chance_p_value:
        return decision(False, f"not promoted: no better than chance, roc_auc {_fmt(challenger.roc_auc)} on "
                               f"{challenger.positives} fraud / {challenger.n - challenger.positives} legit "
                               f"(p={_fmt(p_value)} > {_fmt(max_chance_p_value)})")
    if champion_value is None:
        return decision(True, f"promoted: first model (no champion), {metric} {_fmt(value)}")
    if math.isnan(champion_value):
        return decision(True, f"promoted: champion has no valid {metric} (NaN), challenger {metric} {_fmt(value)}")

    if higher_is_better:
        better = value >= champion_value + margin - _EPS
        comparison = "better"
    else:
        better = value <= champion_value - margin + _EPS
        comparison = "lower"
    if better:
        return decision(True, f"promoted: {metric} {_fmt(value)} is {comparison} than champion "
                              f"{_fmt(champion_value)} by at least margin {_fmt(margin)}")
    return decision(False, f"not promoted: {metric} {_fmt(value)} is not {comparison} than champion "
                           f"{_fmt(champion_value)} by margin {_fmt(margin)}")
