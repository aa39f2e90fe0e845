"""
### maintain_lakehouse — keep the Delta tables fast and honest

Daily, and on demand.

1. `compact_and_vacuum` — OPTIMIZE with Z-ORDER BY each table's declared columns, then VACUUM with the
   retention policy (default 168 h; Delta refuses shorter unless explicitly allowed, and so do we: time travel
   and running readers need the old files).
2. `quality_report` — per table row counts, null shares, quarantine share by reason and Delta versions,
   written to `<lake root>/_reports/quality/<timestamp>.json` and to the task log.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import DAG

import decisionflow.jobs
from decisionflow.notifications.failure import failure_alerts
from decisionflow.operators.spark import DeltaSparkSubmitOperator

JOB = str(Path(decisionflow.jobs.__file__).parent / "maintain_lakehouse.py")

with DAG(
    dag_id="maintain_lakehouse",
    description="OPTIMIZE / Z-ORDER, VACUUM with retention, data-quality report",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["decisionflow", "lakehouse", "maintenance", "quality"],
    params={"retention_hours": 168},
    default_args=failure_alerts({"retries": 2, "retry_delay": timedelta(minutes=2), "owner": "data-platform"}),
) as dag:
    compact_and_vacuum = DeltaSparkSubmitOperator(
        task_id="compact_and_vacuum",
        application=JOB,
        application_args=["--skip-report", "--retention-hours", "{{ params.retention_hours }}"],
        name="maintain_lakehouse",
        execution_timeout=timedelta(hours=2),
    )
    quality_report = DeltaSparkSubmitOperator(
        task_id="quality_report",
        application=JOB,
        application_args=["--skip-optimize", "--skip-vacuum"],
        name="lakehouse_quality_report",
    )

    compact_and_vacuum >> quality_report
