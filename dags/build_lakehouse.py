"""
### build_lakehouse — bronze → silver / quarantine → gold

Runs whenever `ingest_transactions` lands new bronze data (asset-triggered).

1. `migrate` — creates missing tables and applies pending schema migrations (declared in
   `decisionflow.lakehouse.tables`); when the Delta logs show every table current, it ends without Spark.
2. `silver` — parses and validates every bronze row against its event contract: typed, deduplicated by
   `event_id` rows go to `silver/*`, everything else to `quarantine/*` with the raw payload, the reason and the
   source offset. Never dropped silently: rows in = silver + duplicates + quarantined, checked.
3. `gold` — point-in-time account and merchant features and `gold/transactions_enriched`, upserted by MERGE:
   a rerun over the same data changes no row.

A failed quality gate fails its task with the table, the rule and the counts in the message.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import DAG

import decisionflow.jobs
from decisionflow.assets import BRONZE, GOLD, SILVER_CASE_NOTES, SILVER_LABELS, SILVER_TRANSACTIONS
from decisionflow.notifications.failure import failure_alerts
from decisionflow.operators.spark import DeltaMigrateOperator, DeltaSparkSubmitOperator

JOBS = Path(decisionflow.jobs.__file__).parent

with DAG(
    dag_id="build_lakehouse",
    description="bronze -> silver/quarantine -> gold, idempotent MERGEs with quality gates",
    schedule=(BRONZE["bronze/transactions"] | BRONZE["bronze/labels"] | BRONZE["bronze/case_notes"]),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["decisionflow", "lakehouse", "silver", "gold"],
    default_args=failure_alerts({"retries": 2, "retry_delay": timedelta(seconds=30), "owner": "data-platform"}),
) as dag:
    migrate = DeltaMigrateOperator(task_id="migrate")
    silver = DeltaSparkSubmitOperator(
        task_id="silver",
        application=str(JOBS / "build_lakehouse.py"),
        application_args=["--stage", "silver", "--no-migrate"],
        name="build_silver",
        outlets=[SILVER_TRANSACTIONS, SILVER_LABELS, SILVER_CASE_NOTES],
        execution_timeout=timedelta(hours=1),
    )
    gold = DeltaSparkSubmitOperator(
        task_id="gold",
        application=str(JOBS / "build_lakehouse.py"),
        application_args=["--stage", "gold", "--no-migrate"],
        name="build_gold",
        outlets=list(GOLD.values()),
        execution_timeout=timedelta(hours=1),
    )

    migrate >> silver >> gold
