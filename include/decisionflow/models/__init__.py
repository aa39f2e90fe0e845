"""Training, evaluation and promotion of the transaction-risk model: plain Python, no Airflow/MLflow/Feast.

* :mod:`~decisionflow.models.config` - :class:`CostModel`, :class:`TrainingConfig` (validated, from JSON).
* :mod:`~decisionflow.models.dataset` - training-frame validation (:class:`TrainingDataError`) and the
  time-ordered train / validation / holdout :class:`Split`.
* :mod:`~decisionflow.models.training` - calibrated LightGBM risk model, logistic baseline, feature importance.
* :mod:`~decisionflow.models.metrics` - PR-AUC & co., the approve / review / decline policy, its expected cost
  and thresholds, score sanity checks.
* :mod:`~decisionflow.models.plots` - PR, calibration and importance plots as PNG.
* :mod:`~decisionflow.models.promotion` - champion / challenger decision.

The typical run::

    validate_training_frame(frame, features, config)
    split = time_split(frame, config)
    model = train_risk_model(split, features, config)
    val = predict_scores(model, split.validation, features)
    thresholds = choose_thresholds(val, split.labels("validation"), config.costs, config.review_budget)
    scores = predict_scores(model, split.holdout, features)
    result = evaluate(scores, split.labels("holdout"), config.costs, config.review_budget, thresholds)
    decision = decide_promotion(result, champion_result, scores)

LightGBM, scikit-learn's estimators and matplotlib are imported inside the functions that need them.
"""

from decisionflow.models.config import (
    CALIBRATION_METHODS,
    DEFAULT_FEATURE_COLUMNS,
    GOLD_FEATURE_COLUMNS,
    REQUEST_FEATURE_COLUMNS,
    ConfigError,
    CostModel,
    LightGBMParams,
    TrainingConfig,
)
from decisionflow.models.dataset import (
    SPLIT_NAMES,
    Split,
    TrainingDataError,
    feature_matrix,
    label_array,
    time_split,
    validate_training_frame,
)
from decisionflow.models.metrics import (
    NEVER,
    Evaluation,
    PolicyOutcome,
    Thresholds,
    apply_policy,
    choose_thresholds,
    evaluate,
    expected_calibration_error,
    recall_at_share,
    score_problems,
)
from decisionflow.models.plots import write_evaluation_plots
from decisionflow.models.promotion import HIGHER_IS_BETTER, PromotionDecision, decide_promotion
from decisionflow.models.training import (
    feature_importance,
    predict_scores,
    train_baseline,
    train_risk_model,
    unwrap_lightgbm,
)

__all__ = [
    "CALIBRATION_METHODS",
    "DEFAULT_FEATURE_COLUMNS",
    "GOLD_FEATURE_COLUMNS",
    "HIGHER_IS_BETTER",
    "NEVER",
    "REQUEST_FEATURE_COLUMNS",
    "SPLIT_NAMES",
    "ConfigError",
    "CostModel",
    "Evaluation",
    "LightGBMParams",
    "PolicyOutcome",
    "PromotionDecision",
    "Split",
    "Thresholds",
    "TrainingConfig",
    "TrainingDataError",
    "apply_policy",
    "choose_thresholds",
    "decide_promotion",
    "evaluate",
    "expected_calibration_error",
    "feature_importance",
    "feature_matrix",
    "label_array",
    "predict_scores",
    "recall_at_share",
    "score_problems",
    "time_split",
    "train_baseline",
    "train_risk_model",
    "unwrap_lightgbm",
    "validate_training_frame",
    "write_evaluation_plots",
]
