"""decisionflow.models.promotion: the champion / challenger rule (pure: evaluations and scores in, verdict out)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from decisionflow.models import Evaluation, PromotionDecision, decide_promotion

SANE_SCORES = np.random.default_rng(11).beta(1, 20, 1000)


def evaluation(**overrides: float) -> Evaluation:
    """A plausible holdout evaluation; ``overrides`` set the metrics a test is about."""
    base = Evaluation(pr_auc=0.45, roc_auc=0.9, recall_at_review_budget=0.3, brier=0.03, ece=0.01,
                      expected_cost=2.5, review_share=0.02, decline_share=0.03, threshold_review=0.1,
                      threshold_decline=0.3, review_budget=0.02, n=1000, positives=40)
    return replace(base, **overrides)


def test_first_model_is_promoted_when_its_scores_are_sane():
    decision = decide_promotion(evaluation(pr_auc=0.412), None, SANE_SCORES)
    assert decision.promote
    assert decision.reason == "promoted: first model (no champion), pr_auc 0.412"
    assert decision.champion_value is None and decision.problems == ()


def test_challenger_better_by_the_margin_is_promoted():
    decision = decide_promotion(evaluation(pr_auc=0.47), evaluation(pr_auc=0.455), SANE_SCORES, margin=0.01)
    assert decision.promote
    assert decision.reason.startswith("promoted: pr_auc 0.47 is better than champion 0.455")


def test_exactly_the_margin_counts_despite_float_rounding():
    # 0.465 - 0.455 is 0.010000000000000009 or 0.00999... depending on rounding: either way "by the margin".
    assert decide_promotion(evaluation(pr_auc=0.465), evaluation(pr_auc=0.455), SANE_SCORES, margin=0.01).promote


@pytest.mark.parametrize("challenger_value", [0.412, 0.46])  # worse; better but within the margin
def test_worse_or_within_margin_is_not_promoted_and_says_why(challenger_value):
    decision = decide_promotion(evaluation(pr_auc=challenger_value), evaluation(pr_auc=0.455), SANE_SCORES,
                                margin=0.01)
    assert not decision.promote
    assert decision.reason == (f"not promoted: pr_auc {challenger_value:g} is not better than champion 0.455 "
                               "by margin 0.01")
    assert (decision.challenger_value, decision.champion_value) == (challenger_value, 0.455)


@pytest.mark.parametrize("champion", [None, evaluation(pr_auc=0.1)], ids=["no-champion", "weak-champion"])
@pytest.mark.parametrize("scores, named", [
    (np.append(SANE_SCORES, np.nan), "NaN"),
    (np.full(1000, 0.04), "scores collapsed"),
    (np.append(np.full(995, 0.04), [0.1, 0.2, 0.3, 0.4, 0.5]), "scores collapsed"),
    (np.append(SANE_SCORES, 1.7), "outside [0, 1]"),
    (np.array([]), "no scores"),
], ids=["nan", "constant", "99.5%-identical", "out-of-range", "empty"])
def test_broken_scores_are_never_promoted(champion, scores, named):
    decision = decide_promotion(evaluation(pr_auc=0.9), champion, scores)
    assert not decision.promote
    assert decision.reason.startswith("not promoted: ") and named in decision.reason
    assert any(named in p for p in decision.problems)


def test_expected_cost_lower_is_better():
    cheaper = decide_promotion(evaluation(expected_cost=2.0), evaluation(expected_cost=2.5), SANE_SCORES,
                               metric="expected_cost", margin=0.1)
    assert cheaper.promote and not cheaper.higher_is_better
    assert cheaper.reason.startswith("promoted: expected_cost 2 is lower than champion 2.5")
    dearer = decide_promotion(evaluation(expected_cost=3.0), evaluation(expected_cost=2.5), SANE_SCORES,
                              metric="expected_cost", margin=0.1)
    assert not dearer.promote
    assert dearer.reason == "not promoted: expected_cost 3 is not lower than champion 2.5 by margin 0.1"
    within = decide_promotion(evaluation(expected_cost=2.45), evaluation(expected_cost=2.5), SANE_SCORES,
                              metric="expected_cost", margin=0.1)
    assert not within.promote


def test_direction_contradicting_a_known_metric_is_refused():
    with pytest.raises(ValueError, match="expected_cost is lower-is-better"):
        decide_promotion(evaluation(), evaluation(), SANE_SCORES, metric="expected_cost", higher_is_better=True)


def test_unknown_metric_and_bad_margin_are_refused():
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        decide_promotion(evaluation(), None, SANE_SCORES, metric="f1")
    with pytest.raises(ValueError, match="margin must be"):
        decide_promotion(evaluation(), None, SANE_SCORES, margin=-0.1)


def test_nan_metrics():
    nan_challenger = decide_promotion(evaluation(pr_auc=float("nan")), None, SANE_SCORES)
    assert not nan_challenger.promote and "pr_auc is NaN" in nan_challenger.reason
    nan_champion = decide_promotion(evaluation(pr_auc=0.3), evaluation(pr_auc=float("nan")), SANE_SCORES)
    assert nan_champion.promote and "champion has no valid pr_auc" in nan_champion.reason


def test_decision_serialises():
    decision = decide_promotion(evaluation(), None, np.full(10, 0.5))
    record = decision.as_dict()
    assert isinstance(decision, PromotionDecision)
    assert record["promote"] is False and record["metric"] == "pr_auc" and isinstance(record["problems"], list)


@pytest.mark.parametrize("champion", [None, evaluation(roc_auc=0.5, pr_auc=0.04)], ids=["no-champion", "weaker-champion"])
def test_a_model_no_better_than_chance_is_never_promoted(champion):
    # 40 fraud / 960 legit: random rankings give ROC-AUC 0.5 +- 0.047; 0.55 is well within chance.
    decision = decide_promotion(evaluation(roc_auc=0.55, pr_auc=0.2), champion, SANE_SCORES, margin=0.01)
    assert not decision.promote
    assert decision.reason.startswith("not promoted: no better than chance, roc_auc 0.55 on 40 fraud / 960 legit "
                                      "(p=0.14"), decision.reason
    assert decide_promotion(evaluation(roc_auc=0.55, pr_auc=0.2), champion, SANE_SCORES, max_chance_p_value=1).promote


def test_chance_p_value_matches_a_permutation_test():
    from sklearn.metrics import roc_auc_score

    from decisionflow.models.promotion import chance_p_value

    rng = np.random.default_rng(5)
    labels = np.r_[np.ones(30), np.zeros(570)]
    null = np.array([roc_auc_score(labels, rng.random(600)) for _ in range(2000)])
    for auc in (0.55, 0.6, 0.65):
        assert chance_p_value(auc, 30, 600) == pytest.approx((null >= auc).mean(), abs=0.015)
    assert chance_p_value(0.9, 30, 600) < 1e-9
    assert chance_p_value(float("nan"), 30, 600) == 1.0 and chance_p_value(0.9, 0, 600) == 1.0
