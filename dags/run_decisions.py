"""
### run_decisions — every transaction decided once: approve, review or decline

Runs when `build_lakehouse` updates `gold/transactions_enriched` or a new champion is promoted, and hourly as
a fallback. Before the first champion (or the first gold build) `decide` is skipped: nothing is decided, and
the transactions wait for the run the first promotion starts.

1. `import_online` — the decisions the online gateway made (`POST /v1/decisions`, published to the `decisions`
   topic with `origin: online`) into `gold/decisions`, exactly once: the topic's offsets are kept in the same Delta
   commit as the rows; a decision id already there stays one row; review decisions go to the review queue; a
   malformed record goes to `quarantine/online_decisions`. First, so `decide` never decides again a transaction
   decided online.
2. `decide` — the decision graph (LangGraph) over every gold transaction without a decision yet:
   load (point-in-time gold features) → score (the champion version, pinned for the run) → retrieve (similar
   past cases from Milvus, only where they can change the outcome) → decide (the versioned policy in
   `include/decisionflow/policies/transaction_risk.yaml`) → escalate (review cases to the escalation agent on
   the `llm_default` chat model, bound to what the policy allows — or, without that connection, to the policy
   itself; the cases still at review go to the review queue, where `review_decisions` raises HITL tasks) →
   record (`gold/decisions`, one audit row per decision) → act (the outbox: Kafka topic `decisions`, the
   `actions_webhook`). Each step is checkpointed per run: clearing or retrying the task resumes after the last
   finished step, and nothing is sent twice. Emits the `decisions` asset.
3. `evaluate` — decision quality against the labels known so far (and the generator's truth on generated data),
   beside approve-all and the model's thresholds alone; logged to MLflow (`decisionflow-decisions`).

Param `max_transactions` bounds one run (oldest first; the rest wait for the next run).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, AssetOrTimeSchedule, Param
from airflow.timetables.trigger import CronTriggerTimetable

from decisionflow.assets import DECISIONS, GOLD, MODEL_CHAMPION
from decisionflow.notifications.failure import failure_alerts
from decisionflow.operators.decisions import (
    DecisionRunOperator,
    EvaluateDecisionsOperator,
    ImportOnlineDecisionsOperator,
)

with DAG(
    dag_id="run_decisions",
    description="undecided gold transactions -> policy decisions, audit trail, actions (exactly once)",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("45 * * * *", timezone="UTC"),
        # New gold transactions, or a new champion (the first promotion decides what waited for a model).
        assets=(GOLD["gold/transactions_enriched"] | MODEL_CHAMPION),
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one writer of the audit table and the outbox at a time
    doc_md=__doc__,
    tags=["decisionflow", "decisions"],
    params={
        "max_transactions": Param(None, type=["null", "integer"], minimum=1,
                                  description="decide at most this many transactions in this run"),
    },
    default_args=failure_alerts({"retries": 2, "retry_delay": timedelta(seconds=20), "owner": "risk-decisions"}),
) as dag:
    import_online = ImportOnlineDecisionsOperator(task_id="import_online", execution_timeout=timedelta(minutes=20))
    decide = DecisionRunOperator(
        task_id="decide",
        max_transactions="{{ params.max_transactions }}",
        decisions_asset=DECISIONS,
        execution_timeout=timedelta(hours=1),
    )
    evaluate = EvaluateDecisionsOperator(task_id="evaluate", execution_timeout=timedelta(minutes=30))

    import_online >> decide >> evaluate
