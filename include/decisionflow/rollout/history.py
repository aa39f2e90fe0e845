"""Rollout history: every step of every rollout, in the Delta table ``serving/rollouts`` and on the MLflow version.

``serving/rollouts`` (delta-rs only, created when missing; declared here like the review queue) holds one row per
``(rollout_id, step)``: what the step did (``action``), the serving state after it, the analysis verdict and its
measurements, and the reason. Rows are MERGEd insert-if-absent, so a retried task records nothing twice.

On the MLflow registered model: alias ``live`` is the version that serves 100 % (moved on a first deploy and on a
promotion only); tags on the rolled-out version say how its last rollout ended
(``decisionflow.rollout.status`` = ``live`` | ``rolled_back`` | ``replaced``, ``decisionflow.rollout.id``,
``decisionflow.rollout.reason``, ``decisionflow.rollout.at``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from decisionflow.decisions import _delta
from decisionflow.lakehouse.tables import Column, TableSpec

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

ROLLOUTS_TABLE = "serving/rollouts"
LIVE_ALIAS = "live"
STATUS_TAG = "decisionflow.rollout.status"
ROLLOUT_ID_TAG = "decisionflow.rollout.id"
REASON_TAG = "decisionflow.rollout.reason"
AT_TAG = "decisionflow.rollout.at"

#: Actions a history row records.
ACTIONS = ("first_deploy", "canary_deployed", "analysis", "promoted", "rolled_back", "noop")


def _c(name: str, sql_type: str, comment: str = "", *, null: bool = True) -> Column:
    return Column(name, sql_type, nullable=null, comment=comment)


SPEC = TableSpec(
    name=ROLLOUTS_TABLE,
    columns=(
        _c("rollout_id", "STRING", "<dag_id>/<run_id>/<task_id> of the rollout task", null=False),
        _c("step", "INT", "0, 1, 2... in the order the rollout took them", null=False),
        _c("action", "STRING", "first_deploy | canary_deployed | analysis | promoted | rolled_back | noop",
           null=False),
        _c("model_name", "STRING", null=False),
        _c("from_version", "STRING", "the stable version when the rollout started (NULL: nothing served)"),
        _c("to_version", "STRING", "the version being rolled out", null=False),
        _c("canary_weight", "DOUBLE", "percent of requests the canary answered during this step"),
        _c("shadow", "BOOLEAN", "shadow mirroring on during this step"),
        _c("status", "STRING", "ok | pass | fail | inconclusive", null=False),
        _c("reason", "STRING", "why (the analysis verdict, the rollback reason)"),
        _c("measurements", "STRING", "JSON: the analysis window's measurements"),
        _c("serving_state", "STRING", "JSON: stable / canary versions and routing after the step"),
        _c("window_seconds", "DOUBLE", "how long the analysis window ran"),
        _c("recorded_at", "TIMESTAMP", null=False),
    ),
    keys=("rollout_id", "step"),
    description="Model rollouts on Ray Serve: one row per step (canary deployed, each analysis window, "
                "promotion or rollback) with the verdict and its reason.",
)


@dataclass(frozen=True)
class StepRecord:
    """One history row (see the table's columns)."""

    rollout_id: str
    step: int
    action: str
    model_name: str
    to_version: str
    status: str
    from_version: str | None = None
    canary_weight: float | None = None
    shadow: bool | None = None
    reason: str | None = None
    measurements: Mapping[str, Any] | None = None
    serving_state: Mapping[str, Any] | None = None
    window_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"history action {self.action!r} is not one of {ACTIONS}")

    def row(self, recorded_at: datetime | None = None) -> dict[str, Any]:
        return {
            "rollout_id": self.rollout_id, "step": int(self.step), "action": self.action,
            "model_name": self.model_name, "from_version": self.from_version, "to_version": str(self.to_version),
            "canary_weight": None if self.canary_weight is None else float(self.canary_weight),
            "shadow": self.shadow, "status": self.status, "reason": self.reason,
            "measurements": None if self.measurements is None else json.dumps(dict(self.measurements), default=str),
            "serving_state": None if self.serving_state is None else json.dumps(dict(self.serving_state), default=str),
            "window_seconds": self.window_seconds,
            "recorded_at": recorded_at or datetime.now(timezone.utc),
        }


def record_step(lake_root: str, record: StepRecord, storage_options: Mapping[str, str] | None = None) -> bool:
    """Append one step (insert-if-absent by ``(rollout_id, step)``); True when it was new."""
    import pyarrow as pa

    schema = _delta.arrow_schema(SPEC)
    table = _delta.conform(pa.Table.from_pylist([record.row()], schema=schema), schema)

    def merge(dt) -> dict[str, Any]:
        return (dt.merge(table, predicate="t.rollout_id = s.rollout_id AND t.step = s.step", source_alias="s",
                         target_alias="t").when_not_matched_insert_all().execute())

    result = _delta.merge_with_retry(SPEC, lake_root, dict(storage_options or {}) or None, merge,
                                     what=f"record rollout step {record.rollout_id}#{record.step}")
    inserted = int(result.get("num_target_rows_inserted", 0)) > 0
    log.info("rollout %s step %d %s (%s): %s%s", record.rollout_id, record.step, record.action, record.status,
             record.reason or "", "" if inserted else " [already recorded]")
    return inserted


def read_history(lake_root: str, rollout_id: str | None = None,
                 storage_options: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The recorded steps (of one rollout), oldest first; empty with the table's columns when none."""
    options = dict(storage_options or {}) or None
    dt = _delta.open_table(SPEC, lake_root, options)
    if dt is None:
        return _delta.arrow_schema(SPEC).empty_table().to_pandas()
    where = {"rollout_id": rollout_id} if rollout_id is not None else None
    frame = _delta.select(SPEC, dt, list(SPEC.column_names), where).to_pandas()
    return frame.sort_values(["recorded_at", "rollout_id", "step"], kind="stable").reset_index(drop=True)


def next_step(lake_root: str, rollout_id: str, storage_options: Mapping[str, str] | None = None) -> int:
    """The step number after the last recorded one of ``rollout_id`` (0 when none)."""
    frame = read_history(lake_root, rollout_id, storage_options)
    return 0 if frame.empty else int(frame["step"].max()) + 1


# -- MLflow -----------------------------------------------------------------------------------------------------
def live_version(client: MlflowClient, model_name: str) -> str | None:
    """The version alias ``live`` points at (None when none)."""
    from decisionflow.models.registry import model_aliases

    return model_aliases(client, model_name).get(LIVE_ALIAS)


def _tag(client: MlflowClient, model_name: str, version: str, status: str, rollout_id: str, reason: str) -> None:
    client.set_model_version_tag(model_name, version, STATUS_TAG, status)
    client.set_model_version_tag(model_name, version, ROLLOUT_ID_TAG, rollout_id[:5000])
    client.set_model_version_tag(model_name, version, REASON_TAG, reason[:5000])
    client.set_model_version_tag(model_name, version, AT_TAG, datetime.now(timezone.utc).isoformat(timespec="seconds"))


def mark_live(client: MlflowClient, model_name: str, version: str, *, rollout_id: str, reason: str,
              replaced: str | None = None) -> None:
    """``version`` serves 100 %: tags, then alias ``live`` (the commit point, set last); the replaced one tagged."""
    _tag(client, model_name, version, "live", rollout_id, reason)
    if replaced and replaced != version:
        _tag(client, model_name, replaced, "replaced", rollout_id, f"replaced by version {version}")
    client.set_registered_model_alias(model_name, LIVE_ALIAS, str(version))


def mark_rolled_back(client: MlflowClient, model_name: str, version: str, *, rollout_id: str, reason: str) -> None:
    """``version`` was rolled back: tags only (``live`` stays where it is)."""
    _tag(client, model_name, version, "rolled_back", rollout_id, reason)
