"""
### ingest_transactions — Kafka → bronze Delta, exactly once

Started by the `kafka_events` asset, whose watcher fires while the source topics (`transactions`,
`transaction-labels`, `case-notes`) hold messages that bronze does not, and every 30 minutes as a fallback so
nothing waits forever.

1. `ensure_topics` — declares the topics and their `.dlq` dead-letter topics from the event contracts.
2. `check_backlog` — a watcher or fallback run whose topics hold nothing bronze lacks (the progress markers
   are at the end offsets) is *skipped* here, without starting Spark; a manual run always goes on.
3. `ingest_bronze` — a Spark Structured Streaming job (`trigger(availableNow=True)`): Kafka → `bronze/*` with
   raw bytes + topic/partition/offset/timestamp. Offsets live in Spark's checkpoint, committed together with
   the Delta write: a killed run is simply cleared and rerun, with no loss and no duplicates.
4. `record_progress` — only now, with the data in Delta, moves the "ingested up to" markers the watcher reads,
   and announces the `bronze_*` assets (which start `build_lakehouse`) when bronze grew; a run that found
   nothing new ends with this task *skipped*, so nothing is rebuilt for nothing.

The watcher never consumes and never commits a read position, so no message is lost to a failed run.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import DAG, AssetOrTimeSchedule
from airflow.timetables.trigger import CronTriggerTimetable

import decisionflow.jobs
from decisionflow.assets import BRONZE, BRONZE_TABLES, KAFKA_EVENTS, SOURCE_TOPICS
from decisionflow.notifications.failure import failure_alerts
from decisionflow.operators.kafka import (
    KafkaBacklogCheckOperator,
    KafkaEnsureTopicsOperator,
    RecordBronzeProgressOperator,
)
from decisionflow.operators.spark import DeltaSparkSubmitOperator

with DAG(
    dag_id="ingest_transactions",
    description="Kafka -> bronze Delta (event-triggered, exactly once)",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("*/30 * * * *", timezone="UTC"), assets=KAFKA_EVENTS
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one writer per streaming checkpoint
    doc_md=__doc__,
    tags=["decisionflow", "lakehouse", "bronze", "kafka"],
    # Records per micro-batch and topic: bounds memory and what a crash re-reads ("Trigger DAG w/ config").
    params={"max_offsets_per_trigger": 200_000},
    default_args=failure_alerts({"retries": 2, "retry_delay": timedelta(seconds=30), "owner": "data-platform"}),
) as dag:
    ensure_topics = KafkaEnsureTopicsOperator(task_id="ensure_topics")
    check_backlog = KafkaBacklogCheckOperator(task_id="check_backlog", topics=SOURCE_TOPICS)
    ingest_bronze = DeltaSparkSubmitOperator(
        task_id="ingest_bronze",
        application=str(Path(decisionflow.jobs.__file__).parent / "ingest_bronze.py"),
        name="ingest_bronze",
        application_args=["--max-offsets-per-trigger", "{{ params.max_offsets_per_trigger }}"],
        execution_timeout=timedelta(hours=1),
    )
    record_progress = RecordBronzeProgressOperator(task_id="record_progress", tables=BRONZE_TABLES, assets=BRONZE)

    ensure_topics >> check_backlog >> ingest_bronze >> record_progress
