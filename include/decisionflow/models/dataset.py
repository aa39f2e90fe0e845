"""Validation of an incoming training frame and its split by event time.

A training frame has one row per labelled transaction: the event time (tz-aware), a unique event id, the
label (bool or 0/1) and numeric feature columns, which may hold NULL/NaN (``seconds_since_prev_txn`` of an
account's first transaction, ``merchant_fraud_rate`` before any label is known). Everything that is wrong
with it raises :class:`TrainingDataError` with a message naming the column, values or split at fault, since
the message is what an operator reads in the failed task's log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from decisionflow.models.config import TrainingConfig
from decisionflow.exceptions import NonRetryableError

__all__ = [
    "SPLIT_NAMES",
    "Split",
    "TrainingDataError",
    "feature_matrix",
    "label_array",
    "time_split",
    "validate_training_frame",
]

#: The splits of :class:`Split`, oldest first.
SPLIT_NAMES: tuple[str, ...] = ("train", "validation", "holdout")

_MAX_LISTED = 10  # values or columns quoted in one error message


class TrainingDataError(NonRetryableError, ValueError):
    """The training data cannot be trained on; the message names the column, values or split at fault."""


def _listing(values: Sequence[Any]) -> str:
    """``a, b, c`` with at most ``_MAX_LISTED`` items, so a message stays readable for a wide frame."""
    shown = [str(v) for v in values[:_MAX_LISTED]]
    more = len(values) - len(shown)
    return ", ".join(shown) + (f" (+{more} more)" if more > 0 else "")


def _check_not_empty(frame: pd.DataFrame) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise TrainingDataError(f"training set must be a pandas DataFrame, got {type(frame).__name__}")
    if frame.empty:
        raise TrainingDataError("training set is empty (0 rows): nothing to train on")


def _check_columns_present(frame: pd.DataFrame, columns: Sequence[str], role: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise TrainingDataError(
            f"training set is missing {role} column(s) {_listing(missing)}; "
            f"columns present: {_listing(list(map(str, frame.columns)))}"
        )


def _check_label(frame: pd.DataFrame, label_column: str) -> None:
    """The label must be bool or 0/1 on every row: NULL means unlabelled, which must not reach training."""
    labels = frame[label_column]
    bad: list[Any] = []
    if labels.isna().any():
        bad.append("NULL")
    present = labels.dropna()
    # Compare as objects so that 1.0 / True are accepted but 2, -1, 0.5 and "yes" are not.
    for value in pd.unique(present.astype(object)):
        if not (isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, float, np.integer, np.floating))
                                                        and value in (0, 1))):
            bad.append(repr(value))
    if bad:
        raise TrainingDataError(
            f"label column {label_column!r} must hold only 0/1 or booleans; found {_listing(sorted(set(bad)))}"
        )


def _check_time(frame: pd.DataFrame, time_column: str) -> None:
    times = frame[time_column]
    if not isinstance(times.dtype, pd.DatetimeTZDtype):
        raise TrainingDataError(
            f"time column {time_column!r} must be a tz-aware datetime (UTC), got dtype {times.dtype}"
        )
    if times.isna().any():
        raise TrainingDataError(f"time column {time_column!r} has {int(times.isna().sum())} NULL value(s)")


def _check_ids(frame: pd.DataFrame, id_column: str) -> None:
    """An event twice (a re-sent or relabelled event joined twice) would leak between splits and weigh double."""
    ids = frame[id_column]
    if ids.isna().any():
        raise TrainingDataError(f"id column {id_column!r} has {int(ids.isna().sum())} NULL value(s)")
    duplicated = ids[ids.duplicated()]
    if not duplicated.empty:
        raise TrainingDataError(
            f"id column {id_column!r} has {len(duplicated)} duplicated value(s), e.g. "
            f"{_listing(list(pd.unique(duplicated)))}"
        )


def _check_features(frame: pd.DataFrame, feature_columns: Sequence[str]) -> None:
    if not feature_columns:
        raise TrainingDataError("no feature columns given")
    if len(set(feature_columns)) != len(feature_columns):
        repeated = sorted({c for c in feature_columns if list(feature_columns).count(c) > 1})
        raise TrainingDataError(f"feature column(s) listed twice: {_listing(repeated)}")
    _check_columns_present(frame, feature_columns, "feature")
    for column in feature_columns:
        dtype = frame[column].dtype
        # bool and nullable Int64/Float64 are numeric too; strings, decimals-as-objects and datetimes are drift.
        if not pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_complex_dtype(dtype):
            raise TrainingDataError(
                f"feature column {column!r} has non-numeric dtype {dtype} (schema drift?); expected a number"
            )


def validate_training_frame(frame: pd.DataFrame, feature_columns: Sequence[str], config: TrainingConfig) -> None:
    """Check that ``frame`` can be trained on; raise :class:`TrainingDataError` naming the first problem.

    Checks, in order: a non-empty DataFrame; the time, id, label and feature columns present; a tz-aware time
    without NULLs; unique, non-NULL ids; labels only 0/1/bool (no NULL); numeric feature dtypes; at least
    ``config.min_rows`` rows. NaN feature values are fine (the models handle them).
    """
    _check_not_empty(frame)
    _check_columns_present(frame, [config.time_column, config.id_column, config.label_column], "key")
    _check_time(frame, config.time_column)
    _check_ids(frame, config.id_column)
    _check_label(frame, config.label_column)
    _check_features(frame, list(feature_columns))
    if len(frame) < config.min_rows:
        raise TrainingDataError(f"training set has {len(frame)} rows, fewer than min_rows={config.min_rows}")


def label_array(frame: pd.DataFrame, label_column: str) -> np.ndarray:
    """The labels of ``frame`` as an int array of 0/1 (after :func:`validate_training_frame` accepted them)."""
    _check_columns_present(frame, [label_column], "label")
    _check_label(frame, label_column)
    return frame[label_column].astype(bool).to_numpy(dtype=np.int64)


def feature_matrix(frame: pd.DataFrame, feature_columns: Sequence[str]) -> pd.DataFrame:
    """The feature columns of ``frame``, in the given order, as float64 with NULL -> NaN.

    One dtype for training and scoring: nullable integer columns (``Int64`` with ``<NA>``, as BIGINT columns
    come out of Spark/Feast) become NaN floats that LightGBM treats as missing. Column names are kept so the
    fitted estimators remember them and refuse a frame whose columns differ.
    """
    _check_features(frame, list(feature_columns))
    return frame[list(feature_columns)].astype("float64")


@dataclass(frozen=True)
class Split:
    """A training frame cut by event time into ``train`` (oldest), ``validation`` and ``holdout`` (newest).

    ``validation_start`` / ``holdout_start`` are the boundaries: train has events before
    ``validation_start``, validation events from ``validation_start`` up to (excluded) ``holdout_start``,
    holdout events from ``holdout_start`` on. Rows sharing a timestamp always land in the same split, so no
    event (and no instant) appears in two splits. Each frame is sorted by time, its label normalised to 0/1.
    """

    train: pd.DataFrame
    validation: pd.DataFrame
    holdout: pd.DataFrame
    validation_start: pd.Timestamp
    holdout_start: pd.Timestamp
    label_column: str
    time_column: str

    def frames(self) -> dict[str, pd.DataFrame]:
        """The three frames by split name, oldest first."""
        return {"train": self.train, "validation": self.validation, "holdout": self.holdout}

    def labels(self, name: str) -> np.ndarray:
        """The 0/1 labels of split ``name`` (``train``, ``validation`` or ``holdout``)."""
        return self.frames()[name][self.label_column].to_numpy(dtype=np.int64)

    def summary(self) -> dict[str, Any]:
        """Rows, positives, fraud rate and time range per split, flat (e.g. for MLflow params)."""
        out: dict[str, Any] = {
            "validation_start": self.validation_start.isoformat(),
            "holdout_start": self.holdout_start.isoformat(),
        }
        for name, frame in self.frames().items():
            positives = int(frame[self.label_column].sum())
            out[f"{name}_rows"] = len(frame)
            out[f"{name}_positives"] = positives
            out[f"{name}_fraud_rate"] = positives / len(frame) if len(frame) else float("nan")
            out[f"{name}_first_event"] = frame[self.time_column].min().isoformat()
            out[f"{name}_last_event"] = frame[self.time_column].max().isoformat()
        return out


def time_split(frame: pd.DataFrame, config: TrainingConfig) -> Split:
    """Cut ``frame`` by event time into train / validation / holdout (see :class:`Split`).

    The newest ``config.holdout_share`` of rows become the holdout and the ``config.validation_share`` before
    them validation (boundaries move forward past rows sharing the boundary timestamp, so shares are
    approximate). Validates the time, id and label columns first. Raises :class:`TrainingDataError` naming
    the split when one is empty, lacks a class, or has fewer than ``config.min_positives`` positives.
    """
    _check_not_empty(frame)
    _check_columns_present(frame, [config.time_column, config.id_column, config.label_column], "key")
    _check_time(frame, config.time_column)
    _check_ids(frame, config.id_column)
    _check_label(frame, config.label_column)
    if len(frame) < config.min_rows:
        raise TrainingDataError(f"training set has {len(frame)} rows, fewer than min_rows={config.min_rows}")

    # Stable sort: equal timestamps keep their input order, so the result does not depend on the sort algorithm.
    ordered = frame.sort_values(config.time_column, kind="mergesort").reset_index(drop=True)
    ordered[config.label_column] = ordered[config.label_column].astype(bool).astype(np.int64)
    times = ordered[config.time_column]
    n = len(ordered)
    validation_start = times.iloc[min(n - 1, int(n * (1 - config.validation_share - config.holdout_share)))]
    holdout_start = times.iloc[min(n - 1, int(n * (1 - config.holdout_share)))]

    # Cut on timestamps, not positions: an instant shared by two rows must not straddle a boundary.
    split = Split(
        train=ordered[times < validation_start].reset_index(drop=True),
        validation=ordered[(times >= validation_start) & (times < holdout_start)].reset_index(drop=True),
        holdout=ordered[times >= holdout_start].reset_index(drop=True),
        validation_start=validation_start,
        holdout_start=holdout_start,
        label_column=config.label_column,
        time_column=config.time_column,
    )
    for name, part in split.frames().items():
        if part.empty:
            raise TrainingDataError(
                f"{name} split is empty: too many events share the boundary timestamp "
                f"(validation_start={validation_start.isoformat()}, holdout_start={holdout_start.isoformat()})"
            )
        positives = int(part[config.label_column].sum())
        if positives == 0 or positives == len(part):
            missing = "positives (fraud)" if positives == 0 else "negatives (legit)"
            raise TrainingDataError(
                f"{name} split has no {missing} among its {len(part)} rows "
                f"({part[config.time_column].min().isoformat()} .. {part[config.time_column].max().isoformat()}); "
                "both classes are needed in every split"
            )
        if positives < config.min_positives:
            raise TrainingDataError(
                f"{name} split has too few positives: {positives} < min_positives={config.min_positives} "
                f"among {len(part)} rows"
            )
    return split
