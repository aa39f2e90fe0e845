"""Fitting the transaction-risk model (calibrated LightGBM) and its logistic-regression baseline.

Both return plain scikit-learn estimators (no lambdas, no closures), so ``pickle`` and ``mlflow.sklearn``
can store them, and both take the float64 feature frame of :func:`~decisionflow.models.dataset.feature_matrix`
(use :func:`predict_scores` to score a raw frame). LightGBM is imported lazily: importing this package must
stay cheap for DAG parsing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from decisionflow.models.config import TrainingConfig
from decisionflow.models.dataset import Split, feature_matrix

__all__ = [
    "feature_importance",
    "predict_scores",
    "train_baseline",
    "train_risk_model",
    "unwrap_lightgbm",
]


def train_risk_model(split: Split, feature_columns: Sequence[str], config: TrainingConfig) -> Any:
    """Fit LightGBM on ``split.train`` and calibrate its probabilities on ``split.validation``.

    Returns a fitted ``sklearn.calibration.CalibratedClassifierCV`` wrapping a ``FrozenEstimator`` of the
    ``lightgbm.LGBMClassifier``: the booster is fitted once on train, only the calibration map (``sigmoid`` or
    ``isotonic``, ``config.calibration_method``) is fitted on validation. Calibrating on data the trees never
    saw matters: boosted trees are over-confident on their own training rows. NaN features go to LightGBM
    as missing values (learned default directions), no imputation. Deterministic for a given config: fixed
    seed, ``deterministic=True`` and row-wise histograms.
    """
    from lightgbm import LGBMClassifier
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.frozen import FrozenEstimator

    columns = list(feature_columns)
    params = config.lightgbm
    booster = LGBMClassifier(
        objective="binary",
        n_estimators=params.n_estimators,
        learning_rate=params.learning_rate,
        num_leaves=params.num_leaves,
        max_depth=params.max_depth,
        min_child_samples=params.min_child_samples,
        subsample=params.subsample,
        subsample_freq=params.subsample_freq,
        colsample_bytree=params.colsample_bytree,
        reg_lambda=params.reg_lambda,
        n_jobs=params.n_jobs,
        random_state=config.random_seed,
        # Same model for the same data and seed, whatever the machine's thread count or timing.
        deterministic=True,
        force_row_wise=True,
        verbose=-1,
    )
    booster.fit(feature_matrix(split.train, columns), split.labels("train"))
    calibrated = CalibratedClassifierCV(FrozenEstimator(booster), method=config.calibration_method)
    calibrated.fit(feature_matrix(split.validation, columns), split.labels("validation"))
    return calibrated


def train_baseline(split: Split, feature_columns: Sequence[str], config: TrainingConfig) -> Any:
    """Fit the baseline: median imputation, standard scaling and a class-balanced logistic regression.

    Fitted on ``split.train`` only, like the risk model's trees, so both are compared on equal terms. It is
    the yardstick a tree model must clearly beat; with ``class_weight="balanced"`` its scores rank well but
    are not calibrated probabilities (they over-state the fraud rate), so compare it on ranking metrics.
    """
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    columns = list(feature_columns)
    pipeline = Pipeline([
        # keep_empty_features: a feature NULL on every train row (e.g. no merchant label known yet) keeps its
        # slot, so the pipeline still takes the same columns at scoring time.
        ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
        ("scale", StandardScaler()),
        ("classify", LogisticRegression(C=config.baseline_c, class_weight="balanced",
                                        max_iter=config.baseline_max_iter, random_state=config.random_seed)),
    ])
    pipeline.fit(feature_matrix(split.train, columns), split.labels("train"))
    return pipeline


def predict_scores(model: Any, frame: pd.DataFrame, feature_columns: Sequence[str]) -> np.ndarray:
    """Fraud probability (``predict_proba[:, 1]``) of each row of ``frame``, as a float64 array."""
    return np.asarray(model.predict_proba(feature_matrix(frame, feature_columns))[:, 1], dtype=np.float64)


def unwrap_lightgbm(model: Any) -> Any:
    """The fitted ``LGBMClassifier`` inside ``model`` (itself, a ``FrozenEstimator`` or a calibrated wrapper).

    Raises ``TypeError`` when there is none (e.g. the logistic baseline).
    """
    seen = model
    # CalibratedClassifierCV -> FrozenEstimator -> LGBMClassifier; each wrapper keeps it as ``.estimator``.
    for _ in range(5):
        if hasattr(seen, "booster_"):
            return seen
        if not hasattr(seen, "estimator") or seen.estimator is None:
            break
        seen = seen.estimator
    raise TypeError(f"no fitted LightGBM model inside {type(model).__name__}")


def feature_importance(model: Any, feature_columns: Sequence[str]) -> pd.Series:
    """Total gain of each feature's splits in the underlying LightGBM, largest first.

    ``feature_columns`` must be the columns the model was trained on, in order (checked against the
    booster's own feature names); features never used in a split have importance 0.
    """
    booster = unwrap_lightgbm(model).booster_
    names = booster.feature_name()
    if list(names) != list(feature_columns):
        raise ValueError(f"feature_columns {list(feature_columns)} differ from the model's features {names}")
    gains = booster.feature_importance(importance_type="gain")
    importance = pd.Series(np.asarray(gains, dtype=np.float64), index=list(feature_columns), name="gain")
    return importance.sort_values(ascending=False, kind="mergesort")
