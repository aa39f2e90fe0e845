"""
### sync_case_embeddings — silver case notes → Milvus similar-case memory

Runs when `build_lakehouse`'s silver task updates `silver/case_notes` or `silver/labels`, and hourly at :30
as a fallback.

`sync` (`MilvusSyncOperator`) makes the Milvus collection `case_notes` equal to silver: one row per note with
its text embedded (all-MiniLM-L6-v2, ONNX, offline), Milvus' own BM25 over the text, and the outcome of its
transaction (latest silver label: fraud / legit / unknown, with when it became known — decisions only see
outcomes known before their transaction). New and changed notes are upserted by `note_id`, notes no longer in
silver are deleted, a label arriving later updates already-synced notes; all in batches of 500. Texts are
embedded once (a text-hash cache under `$DECISIONFLOW_DATA/embeddings`).

The watermark (Delta versions of both tables + the embedding model) travels in the `case_embeddings` asset
event: when nothing changed, a run reads nothing. Clearing and rerunning is safe.
"Trigger DAG w/ config" with `full: true` re-upserts every note; `recreate: true` drops and rebuilds the
collection (after an embedding-model or schema change).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, AssetOrTimeSchedule, Param
from airflow.timetables.trigger import CronTriggerTimetable

from decisionflow.assets import CASE_EMBEDDINGS, SILVER_CASE_NOTES, SILVER_LABELS
from decisionflow.notifications.failure import failure_alerts
from decisionflow.operators.vectors import MilvusSyncOperator

with DAG(
    dag_id="sync_case_embeddings",
    description="silver/case_notes + silver/labels -> Milvus case_notes (dense + BM25, outcomes)",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("30 * * * *", timezone="UTC"),
        assets=(SILVER_CASE_NOTES | SILVER_LABELS),
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one writer to the collection
    doc_md=__doc__,
    tags=["decisionflow", "vectors", "milvus"],
    params={
        "full": Param(False, type="boolean", description="re-upsert every note (ignore watermark and hashes)"),
        "recreate": Param(False, type="boolean", description="drop and rebuild the collection first"),
    },
    default_args=failure_alerts({"retries": 2, "retry_delay": timedelta(seconds=30), "owner": "ml-platform"}),
) as dag:
    sync = MilvusSyncOperator(
        task_id="sync",
        synced_asset=CASE_EMBEDDINGS,
        full="{{ params.full }}",
        recreate="{{ params.recreate }}",
        batch_size=500,
        execution_timeout=timedelta(hours=1),
    )
