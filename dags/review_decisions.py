"""
### review_decisions — the riskiest review cases as human-in-the-loop tasks

Runs when `run_decisions` records decisions (the `decisions` asset), and hourly as a fallback. A DAG of its own:
an unanswered review never holds up the next decision run. A run lasts until its cases are answered (or time
out), so at most `max_active_runs` (8) × `tasks_per_run` tasks wait for people at once; later runs queue and
claim nothing until they start.

1. `pick` — claims the riskiest open cases of the review queue (`gold/review_queue`), at most the policy's
   `human_review.tasks_per_run` (param `tasks` overrides): each becomes `in_review`, owned by this run. The rest
   wait in the queue for the next run (or `decisionflow review answer`).
2. `review_case` — one mapped group per claimed case:
   * `review` — a HITL task (Browse → Required Actions, or `PATCH .../hitlDetails`): the transaction, score and
     band, reason codes, the top similar cases with their outcomes and the escalation step's rationale; answer
     **approve**, **decline** or **escalate**, with an optional note. Unanswered after the policy's
     `response_timeout_hours`, the policy's `on_timeout` answer applies.
   * `apply` — the answer, once: the audit row's review columns (who, when, what), the queue row resolved, the
     answer's actions through the outbox (Kafka `decisions` + the actions webhook), a label on
     `transaction-labels` (decline → fraud, approve → legit; none for escalate or a timeout) and the note as a
     `case-notes` event, so the next training run and the similar-case memory learn from it.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, AssetOrTimeSchedule, Param, task, task_group
from airflow.timetables.trigger import CronTriggerTimetable

from decisionflow.assets import DECISIONS
from decisionflow.notifications.failure import failure_alerts
from decisionflow.operators.review import DEFAULT_POLICY, ApplyReviewOperator, ReviewCaseOperator

with DAG(
    dag_id="review_decisions",
    description="review cases -> HITL tasks -> audit, actions, labels and case notes (once)",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("15 * * * *", timezone="UTC"), assets=DECISIONS),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=8,  # runs wait on people: several may be open at once, each owning its claimed cases
    doc_md=__doc__,
    tags=["decisionflow", "decisions", "review"],
    params={
        "tasks": Param(None, type=["null", "integer"], minimum=0,
                       description="review tasks to raise in this run (default: the policy's tasks_per_run)"),
    },
    default_args=failure_alerts({"retries": 2, "retry_delay": timedelta(seconds=20), "owner": "risk-decisions"}),
) as dag:

    @task(execution_timeout=timedelta(minutes=10))
    def pick(params=None, run_id=None) -> list[dict]:
        """Claim the riskiest open cases for this run (a retry gets back the same cases)."""
        from decisionflow.decisions.policy import Policy
        from decisionflow.decisions.review_queue import case_rows, claim_reviews
        from decisionflow.hooks.lake import LakeHook

        policy = Policy.load(DEFAULT_POLICY)
        wanted = (params or {}).get("tasks")
        limit = policy.human_review.tasks_per_run if wanted in (None, "", "None") else int(wanted)
        lake = LakeHook()
        claimed = claim_reviews(lake.root, run_id, limit, lake.storage_options or None)
        print(f"claimed {len(claimed)} case(s) for review (limit {limit})")
        return case_rows(claimed)

    @task_group
    def review_case(case: dict):
        review = ReviewCaseOperator(task_id="review", case=case)
        ApplyReviewOperator(task_id="apply", case=case, answer=review.output, execution_timeout=timedelta(minutes=10))

    review_case.expand(case=pick())
