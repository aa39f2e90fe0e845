"""Configuration of training, evaluation and the decision policy of the transaction-risk model.

Plain, frozen dataclasses validated on construction, so a bad value fails when the run starts rather than
deep inside a fit. Configurations usually arrive as JSON (Airflow DAG params, a run conf): ``from_dict`` builds
them and rejects unknown keys by name, because a misspelt key silently falling back to its default is the
kind of mistake nobody notices until the model is worse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

# CostModel and the validation helpers moved to the policy (decisions.costs); re-exported here unchanged.
from decisionflow.decisions.costs import ConfigError, CostModel, _check_keys, _number

__all__ = [
    "CALIBRATION_METHODS",
    "DEFAULT_FEATURE_COLUMNS",
    "GOLD_FEATURE_COLUMNS",
    "REQUEST_FEATURE_COLUMNS",
    "ConfigError",
    "CostModel",
    "LightGBMParams",
    "TrainingConfig",
]

#: Point-in-time account and merchant features of the gold layer (``gold/account_features`` and
#: ``gold/merchant_features``), in table order.
GOLD_FEATURE_COLUMNS: tuple[str, ...] = (
    "txn_count_1h",
    "txn_count_24h",
    "txn_count_7d",
    "amount_sum_1h",
    "amount_sum_24h",
    "amount_sum_7d",
    "distinct_devices_24h",
    "distinct_devices_7d",
    "distinct_countries_24h",
    "distinct_countries_7d",
    "seconds_since_prev_txn",
    "amount_to_avg_7d",
    "merchant_txn_count_24h",
    "merchant_txn_count_7d",
    "merchant_labels_known",
    "merchant_fraud_labels",
    "merchant_fraud_rate",
)

#: Features known from the scoring request itself (not looked up in the feature store).
REQUEST_FEATURE_COLUMNS: tuple[str, ...] = ("amount",)

#: What the model uses unless told otherwise.
DEFAULT_FEATURE_COLUMNS: tuple[str, ...] = GOLD_FEATURE_COLUMNS + REQUEST_FEATURE_COLUMNS

#: Accepted values of :attr:`TrainingConfig.calibration_method` (those of ``CalibratedClassifierCV``).
CALIBRATION_METHODS: tuple[str, ...] = ("sigmoid", "isotonic")


def _string(owner: str, name: str, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a non-empty string."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{owner}.{name} must be a non-empty string, got {value!r}")


@dataclass(frozen=True)
class LightGBMParams:
    """Hyper-parameters of the LightGBM classifier (the names and meaning of ``lightgbm.LGBMClassifier``).

    ``n_jobs`` defaults to 1: with a fixed seed LightGBM is then bit-for-bit reproducible, and the workers
    this runs on are shared with other tasks.
    """

    n_estimators: int = 300
    learning_rate: float = 0.05
    num_leaves: int = 15
    max_depth: int = -1
    min_child_samples: int = 20
    subsample: float = 0.8
    subsample_freq: int = 1
    colsample_bytree: float = 0.8
    reg_lambda: float = 1.0
    n_jobs: int = 1

    def __post_init__(self) -> None:
        owner = "LightGBMParams"
        _number(owner, "n_estimators", self.n_estimators, minimum=1, integer=True)
        _number(owner, "learning_rate", self.learning_rate, minimum=0, min_inclusive=False)
        _number(owner, "num_leaves", self.num_leaves, minimum=2, integer=True)
        _number(owner, "max_depth", self.max_depth, minimum=-1, integer=True)
        _number(owner, "min_child_samples", self.min_child_samples, minimum=1, integer=True)
        _number(owner, "subsample", self.subsample, minimum=0, maximum=1, min_inclusive=False)
        _number(owner, "subsample_freq", self.subsample_freq, minimum=0, integer=True)
        _number(owner, "colsample_bytree", self.colsample_bytree, minimum=0, maximum=1, min_inclusive=False)
        _number(owner, "reg_lambda", self.reg_lambda, minimum=0)
        _number(owner, "n_jobs", self.n_jobs, minimum=1, integer=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LightGBMParams:
        """Build from a JSON-like mapping; unknown keys raise :class:`ConfigError` naming them."""
        _check_keys(cls, data)
        return cls(**data)


@dataclass(frozen=True)
class TrainingConfig:
    """Everything a training run needs besides the data and the feature list.

    * ``label_column`` / ``time_column`` / ``id_column`` - the label (bool or 0/1), the event time (tz-aware)
      and the unique event id of the training frame.
    * ``validation_share`` / ``holdout_share`` - the newest events held out, by event time: the holdout is the
      newest ``holdout_share``, validation the ``validation_share`` before it, train everything older.
      Validation calibrates the model and picks the policy thresholds; the holdout only measures.
    * ``review_budget`` - the largest share of transactions the policy may send to manual review.
    * ``costs`` - the :class:`CostModel` the policy thresholds minimise.
    * ``lightgbm`` - :class:`LightGBMParams`; ``calibration_method`` - ``sigmoid`` (Platt, robust with few
      positives) or ``isotonic`` (needs many positives in validation).
    * ``baseline_c`` / ``baseline_max_iter`` - the logistic-regression baseline's regularisation and solver
      iterations.
    * ``random_seed`` - every random choice of a run derives from it.
    * ``min_rows`` - fewest rows the whole frame must have; ``min_positives`` - fewest positives (fraud) each
      split must have: fewer make calibration and the metrics noise.
    """

    label_column: str = "is_fraud"
    time_column: str = "event_timestamp"
    id_column: str = "event_id"
    validation_share: float = 0.2
    holdout_share: float = 0.2
    review_budget: float = 0.02
    costs: CostModel = field(default_factory=CostModel)
    lightgbm: LightGBMParams = field(default_factory=LightGBMParams)
    calibration_method: str = "sigmoid"
    baseline_c: float = 1.0
    baseline_max_iter: int = 1000
    random_seed: int = 42
    min_rows: int = 500
    min_positives: int = 10

    def __post_init__(self) -> None:
        owner = "TrainingConfig"
        for name in ("label_column", "time_column", "id_column"):
            _string(owner, name, getattr(self, name))
        if len({self.label_column, self.time_column, self.id_column}) < 3:
            raise ConfigError(f"{owner}: label_column, time_column and id_column must differ, got "
                              f"{self.label_column!r}, {self.time_column!r}, {self.id_column!r}")
        for name in ("validation_share", "holdout_share"):
            _number(owner, name, getattr(self, name), minimum=0, maximum=1, min_inclusive=False,
                    max_inclusive=False)
        if self.validation_share + self.holdout_share >= 1:
            raise ConfigError(f"{owner}.validation_share + holdout_share must be < 1 to leave rows to train on, "
                              f"got {self.validation_share} + {self.holdout_share}")
        _number(owner, "review_budget", self.review_budget, minimum=0, maximum=1)
        if not isinstance(self.costs, CostModel):
            raise ConfigError(f"{owner}.costs must be a CostModel, got {type(self.costs).__name__}")
        if not isinstance(self.lightgbm, LightGBMParams):
            raise ConfigError(f"{owner}.lightgbm must be a LightGBMParams, got {type(self.lightgbm).__name__}")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ConfigError(f"{owner}.calibration_method must be one of {', '.join(CALIBRATION_METHODS)}, "
                              f"got {self.calibration_method!r}")
        _number(owner, "baseline_c", self.baseline_c, minimum=0, min_inclusive=False)
        _number(owner, "baseline_max_iter", self.baseline_max_iter, minimum=1, integer=True)
        _number(owner, "random_seed", self.random_seed, minimum=0, maximum=2**31 - 1, integer=True)
        _number(owner, "min_rows", self.min_rows, minimum=1, integer=True)
        _number(owner, "min_positives", self.min_positives, minimum=1, integer=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingConfig:
        """Build from a JSON-like mapping (DAG params); ``costs`` and ``lightgbm`` may be nested mappings.

        Missing keys take their defaults; unknown keys, at any level, raise :class:`ConfigError` naming them.
        """
        _check_keys(cls, data)
        values = dict(data)
        if isinstance(values.get("costs"), Mapping):
            values["costs"] = CostModel.from_dict(values["costs"])
        if isinstance(values.get("lightgbm"), Mapping):
            values["lightgbm"] = LightGBMParams.from_dict(values["lightgbm"])
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable nested dict that :meth:`from_dict` turns back into an equal config."""
        return asdict(self)

    def as_params(self) -> dict[str, Any]:
        """A flat dict (``costs.review``, ``lightgbm.num_leaves``, ...) for MLflow params."""
        flat: dict[str, Any] = {}
        for key, value in self.as_dict().items():
            if isinstance(value, dict):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        return flat
