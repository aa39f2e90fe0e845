"""decisionflow.models.pipeline: one training run in memory (validate, split, fit both models, evaluate).

The synthetic generator is a copy of the one in ``test_models_training.py`` (fraud follows feature
*interactions*, so LightGBM must clearly beat the logistic baseline); it is copied, not imported, so that the
two test modules can evolve independently.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from decisionflow.models import DEFAULT_FEATURE_COLUMNS, Evaluation, Thresholds, TrainingConfig, TrainingDataError
from decisionflow.models.pipeline import BASELINE, MODEL, TrainingOutcome, train_and_evaluate
from decisionflow.models.synthetic import make_transactions


FEATURES = list(DEFAULT_FEATURE_COLUMNS)
# Fewer trees than the default: the unit suite must stay fast, and 100 trees separate this data clearly.
CONFIG = TrainingConfig.from_dict({"lightgbm": {"n_estimators": 100}})


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return make_transactions()


@pytest.fixture(scope="module")
def outcome(frame) -> TrainingOutcome:
    return train_and_evaluate(frame, FEATURES, CONFIG)


@pytest.fixture(scope="module")
def degraded(frame) -> TrainingOutcome:
    return train_and_evaluate(frame, FEATURES, CONFIG, shuffle_labels=True)


def test_model_beats_the_baseline_on_the_holdout(outcome):
    base_rate = outcome.holdout_frame["is_fraud"].mean()
    assert outcome.holdout.pr_auc > outcome.baseline_holdout.pr_auc + 0.1, (
        outcome.holdout.pr_auc, outcome.baseline_holdout.pr_auc)
    assert outcome.holdout.pr_auc > 5 * base_rate
    assert outcome.holdout.expected_cost < outcome.baseline_holdout.expected_cost


def test_both_models_use_thresholds_chosen_on_validation(outcome):
    assert set(outcome.thresholds) == {MODEL, BASELINE}
    for name in (MODEL, BASELINE):
        chosen = outcome.thresholds[name]
        assert isinstance(chosen, Thresholds)
        for split_name in ("validation", "holdout"):
            evaluation = outcome.evaluations[name][split_name]
            assert isinstance(evaluation, Evaluation)
            assert (evaluation.threshold_review, evaluation.threshold_decline) == (chosen.review, chosen.decline)
        # Thresholds were picked within the budget on validation (the holdout share may drift a little).
        assert outcome.evaluations[name]["validation"].review_share <= CONFIG.review_budget + 1e-9
    assert outcome.holdout.n == len(outcome.holdout_frame)
    np.testing.assert_array_equal(outcome.holdout_scores[MODEL].shape, (len(outcome.holdout_frame),))


def test_flat_metrics_prefix_model_and_baseline(outcome):
    flat = outcome.flat_metrics()
    assert flat["holdout_pr_auc"] == outcome.holdout.pr_auc
    assert flat["baseline_holdout_pr_auc"] == outcome.baseline_holdout.pr_auc
    assert flat["validation_pr_auc"] == outcome.evaluations[MODEL]["validation"].pr_auc
    assert "baseline_validation_expected_cost" in flat
    assert all(isinstance(v, float) for v in flat.values())


def test_holdout_frame_has_ids_time_features_and_true_labels(outcome):
    expected = ["event_id", "event_timestamp", *FEATURES, "is_fraud"]
    assert list(outcome.holdout_frame.columns) == expected
    assert len(outcome.holdout_frame) == len(outcome.split.holdout)
    assert (outcome.holdout_frame["event_timestamp"] >= outcome.split.holdout_start).all()
    assert outcome.holdout_frame["event_timestamp"].is_monotonic_increasing
    assert set(outcome.holdout_frame["is_fraud"].unique()) == {0, 1}
    assert outcome.feature_columns == tuple(FEATURES) and outcome.config == CONFIG
    assert not outcome.shuffle_labels
    assert set(outcome.importance.index) == set(FEATURES)


def test_shuffled_labels_give_a_near_base_rate_model(outcome, degraded):
    base_rate = degraded.holdout_frame["is_fraud"].mean()
    assert degraded.shuffle_labels
    # 27 holdout positives: a noise model's PR-AUC wanders several points around the fraud rate by chance
    # (0.05-0.12 over permutation seeds here); the real model sits near 0.6.
    assert degraded.holdout.pr_auc < base_rate + 0.1, (degraded.holdout.pr_auc, base_rate)
    assert degraded.holdout.pr_auc < outcome.holdout.pr_auc - 0.3
    # Only train labels are permuted: same positives there, validation and holdout untouched.
    assert degraded.split.train["is_fraud"].sum() == outcome.split.train["is_fraud"].sum()
    assert not np.array_equal(degraded.split.labels("train"), outcome.split.labels("train"))
    np.testing.assert_array_equal(degraded.split.labels("validation"), outcome.split.labels("validation"))
    pd.testing.assert_frame_equal(degraded.holdout_frame, outcome.holdout_frame)


def test_bad_input_fails_before_training(frame):
    with pytest.raises(TrainingDataError, match="missing feature column"):
        train_and_evaluate(frame.drop(columns=["amount"]), FEATURES, CONFIG)
    with pytest.raises(TrainingDataError, match="is_fraud"):
        train_and_evaluate(frame, [*FEATURES, "is_fraud"], CONFIG)
    with pytest.raises(TypeError, match="shuffle_labels"):
        train_and_evaluate(frame, FEATURES, CONFIG, shuffle_labels="yes")


def test_run_record_is_infinity_safe(outcome):
    """Thresholds may be inf (NEVER): params and JSON carry them as "inf", metrics leave them out."""
    import json
    from dataclasses import replace

    from decisionflow.models import NEVER
    from decisionflow.models.tracking import _metrics, _params, json_safe

    never = replace(outcome, thresholds={**outcome.thresholds, MODEL: Thresholds(review=0.2, decline=NEVER)},
                    evaluations={**outcome.evaluations, MODEL: {
                        k: replace(e, threshold_decline=NEVER, roc_auc=float("nan"))
                        for k, e in outcome.evaluations[MODEL].items()}})
    params = _params(never)
    assert params["threshold_decline"] == "inf" and float(params["threshold_decline"]) == NEVER
    assert params["threshold_review"] == "0.2" and json.loads(params["feature_columns"]) == FEATURES
    assert params["holdout_rows"] == str(len(outcome.holdout_frame)) and "validation_start" in params
    metrics = _metrics(never)
    assert "holdout_pr_auc" in metrics and "baseline_holdout_pr_auc" in metrics
    assert "holdout_roc_auc" not in metrics  # NaN is left out
    assert not [k for k in metrics if "threshold" in k or (k.endswith("_review_budget") and "recall" not in k)]
    assert "holdout_recall_at_review_budget" in metrics
    assert json.dumps(json_safe({"a": [NEVER, -NEVER, float("nan"), np.float64(0.5)]}), allow_nan=False) == (
        '{"a": ["inf", "-inf", "nan", 0.5]}')


def test_pipeline_imports_no_platform_libraries():
    code = ("import sys, decisionflow.models.pipeline, decisionflow.models.tracking, decisionflow.models.registry; "
            "print(sorted(m for m in ('airflow', 'mlflow', 'lightgbm', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
