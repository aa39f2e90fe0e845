"""One training run end to end, in memory: validate, split by time, fit model and baseline, evaluate both.

:func:`train_and_evaluate` is what a training task calls between "read the training set" and "record the run"
(:mod:`decisionflow.models.tracking`): plain Python, no MLflow or Airflow, so the whole run is testable on a
synthetic frame. The result, :class:`TrainingOutcome`, carries everything the run record needs: the fitted
models, the thresholds chosen on validation, the holdout evaluation of both models with those thresholds, the
feature importance and the holdout rows themselves (logged as the evaluation set, so that a later promotion
gate can score another model on exactly the same rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from decisionflow.models.config import TrainingConfig
from decisionflow.models.dataset import Split, TrainingDataError, time_split, validate_training_frame
from decisionflow.models.metrics import Evaluation, Thresholds, choose_thresholds, evaluate
from decisionflow.models.training import feature_importance, predict_scores, train_baseline, train_risk_model

__all__ = ["BASELINE", "MODEL", "TrainingOutcome", "train_and_evaluate"]

#: Keys of the per-model dicts of :class:`TrainingOutcome`: the calibrated LightGBM and the logistic baseline.
MODEL = "model"
BASELINE = "baseline"


@dataclass(frozen=True)
class TrainingOutcome:
    """Everything one training run produced (see :func:`train_and_evaluate`).

    * ``split`` - the time split the models were fitted and evaluated on (train labels permuted when
      ``shuffle_labels``).
    * ``model`` / ``baseline`` - the fitted calibrated LightGBM and logistic-regression pipeline.
    * ``thresholds`` - per model (:data:`MODEL`, :data:`BASELINE`) the policy thresholds chosen on validation.
    * ``evaluations`` - per model, per split (``validation``, ``holdout``) an :class:`Evaluation` with those
      thresholds. Validation metrics are optimistic (thresholds and calibration were fitted there); the holdout
      ones are the honest estimate.
    * ``holdout_scores`` - per model, the holdout scores, in ``holdout_frame`` row order.
    * ``importance`` - LightGBM gain per feature, largest first.
    * ``feature_columns`` / ``config`` - what the run was given.
    * ``holdout_frame`` - the holdout rows: id, time, feature columns and the (true) 0/1 label, time-ordered.
    * ``shuffle_labels`` - whether the model was deliberately trained on permuted labels.
    """

    split: Split
    model: Any
    baseline: Any
    thresholds: dict[str, Thresholds]
    evaluations: dict[str, dict[str, Evaluation]]
    holdout_scores: dict[str, np.ndarray]
    importance: pd.Series
    feature_columns: tuple[str, ...]
    config: TrainingConfig
    holdout_frame: pd.DataFrame
    shuffle_labels: bool = False

    @property
    def holdout(self) -> Evaluation:
        """The model's holdout evaluation."""
        return self.evaluations[MODEL]["holdout"]

    @property
    def baseline_holdout(self) -> Evaluation:
        """The baseline's holdout evaluation."""
        return self.evaluations[BASELINE]["holdout"]

    def flat_metrics(self) -> dict[str, float]:
        """All evaluations as one flat dict: ``holdout_pr_auc``, ``validation_expected_cost``,
        ``baseline_holdout_pr_auc``, ...

        The model's metrics are prefixed with the split name, the baseline's with ``baseline_`` + split name.
        Values may be ``nan`` (one class only) or ``inf`` (a :data:`~decisionflow.models.metrics.NEVER`
        threshold): filter before handing them to a store that cannot hold them.
        """
        out: dict[str, float] = {}
        for model_name, by_split in self.evaluations.items():
            lead = "" if model_name == MODEL else f"{model_name}_"
            for split_name, evaluation in by_split.items():
                out.update(evaluation.as_dict(prefix=f"{lead}{split_name}_"))
        return out


def _shuffled(split: Split, seed: int) -> Split:
    """``split`` with its train labels permuted (validation and holdout keep the true labels)."""
    train = split.train.copy()
    labels = train[split.label_column].to_numpy()
    train[split.label_column] = np.random.default_rng(seed).permutation(labels)
    return replace(split, train=train)


def train_and_evaluate(frame: pd.DataFrame, feature_columns: Sequence[str], config: TrainingConfig,
                       shuffle_labels: bool = False) -> TrainingOutcome:
    """Train the risk model and the baseline on one time split of ``frame`` and evaluate both on its holdout.

    Steps: ``validate_training_frame`` and ``time_split`` (:mod:`decisionflow.models.dataset`), then for
    LightGBM (calibrated on validation) and the logistic baseline, both fitted on the same train rows: thresholds
    chosen on validation under ``config.costs`` / ``config.review_budget``, each model evaluated on validation
    and holdout with its own thresholds; finally LightGBM's feature importance.

    ``shuffle_labels=True`` permutes the *train* labels (seeded by ``config.random_seed``) before fitting: a
    deliberately useless model whose holdout PR-AUC sits near the fraud rate, for tests and promotion-gate
    drills. Validation and holdout keep their true labels, so the degradation shows in the metrics.

    :raises TrainingDataError: the frame cannot be trained on (message names the column, values or split).
    """
    columns = list(feature_columns)
    if isinstance(shuffle_labels, str) or not isinstance(shuffle_labels, (bool, np.bool_)):
        raise TypeError(f"shuffle_labels must be a bool, got {shuffle_labels!r}")
    keys = {config.id_column, config.time_column, config.label_column}
    clash = [c for c in columns if c in keys]
    if clash:
        raise TrainingDataError(f"feature column(s) {clash} are the id, time or label column: the model would "
                                "train on the answer or on a row key")
    validate_training_frame(frame, columns, config)
    split = time_split(frame, config)
    if shuffle_labels:
        split = _shuffled(split, config.random_seed)

    model = train_risk_model(split, columns, config)
    baseline = train_baseline(split, columns, config)

    thresholds: dict[str, Thresholds] = {}
    evaluations: dict[str, dict[str, Evaluation]] = {}
    holdout_scores: dict[str, np.ndarray] = {}
    for name, estimator in ((MODEL, model), (BASELINE, baseline)):
        validation_scores = predict_scores(estimator, split.validation, columns)
        chosen = choose_thresholds(validation_scores, split.labels("validation"), config.costs,
                                   config.review_budget)
        scores = predict_scores(estimator, split.holdout, columns)
        thresholds[name] = chosen
        holdout_scores[name] = scores
        evaluations[name] = {
            "validation": evaluate(validation_scores, split.labels("validation"), config.costs,
                                   config.review_budget, chosen),
            "holdout": evaluate(scores, split.labels("holdout"), config.costs, config.review_budget, chosen),
        }

    holdout_columns = [config.id_column, config.time_column, *columns, config.label_column]
    return TrainingOutcome(
        split=split,
        model=model,
        baseline=baseline,
        thresholds=thresholds,
        evaluations=evaluations,
        holdout_scores=holdout_scores,
        importance=feature_importance(model, columns),
        feature_columns=tuple(columns),
        config=config,
        holdout_frame=split.holdout[holdout_columns].reset_index(drop=True),
        shuffle_labels=bool(shuffle_labels),
    )
