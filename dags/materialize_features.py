"""
### materialize_features — gold → Feast online store

Runs when `build_lakehouse` updates the gold feature tables, and hourly as a fallback.

1. `apply_feature_repo` — `feast apply` of `include/feature_repo` (entities, views over gold, `risk_v1`).
2. `materialize` — writes the latest feature values per account and merchant to the online store, in chunks
   of at most one day of event time, adjacent ones joined up to 500,000 gold rows (empty days cost nothing):
   * asset-triggered and manual runs: the event-time range of the gold rows changed since the last
     materialization (late events and corrections included);
   * scheduled runs: their data interval;
   * "Trigger DAG w/ config" with `start` and `end` (ISO 8601): exactly that window.
   Clearing and rerunning any run is safe: the online store never goes back to older values.
   On success the `features_risk_v1_online` asset marks the features fresh.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, AssetOrTimeSchedule, Param
from airflow.timetables.trigger import CronTriggerTimetable

from decisionflow.assets import FEATURES_FRESH, GOLD
from decisionflow.notifications.failure import failure_alerts
from decisionflow.operators.feast import FeastApplyOperator, FeastMaterializeOperator

with DAG(
    dag_id="materialize_features",
    description="gold Delta -> Feast online store (changed rows, or the data interval)",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("15 * * * *", timezone="UTC"),
        assets=(GOLD["gold/account_features"] | GOLD["gold/merchant_features"]),
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one writer to the online store
    doc_md=__doc__,
    tags=["decisionflow", "features", "feast"],
    params={
        "start": Param(None, type=["null", "string"], description="window start, ISO 8601 (with end)"),
        "end": Param(None, type=["null", "string"], description="window end, ISO 8601 (with start)"),
    },
    default_args=failure_alerts({"retries": 2, "retry_delay": timedelta(seconds=30), "owner": "ml-platform"}),
) as dag:
    apply_feature_repo = FeastApplyOperator(task_id="apply_feature_repo")
    materialize = FeastMaterializeOperator(
        task_id="materialize",
        start="{{ params.start or '' }}",
        end="{{ params.end or '' }}",
        chunk=timedelta(days=1),
        fresh_asset=FEATURES_FRESH,
        execution_timeout=timedelta(hours=1),
    )

    apply_feature_repo >> materialize
