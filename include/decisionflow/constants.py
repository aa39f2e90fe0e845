"""Names used in several places of the loop (DAGs, operators, serving, tests): defined once, here.

Plain strings only: importing this module costs nothing, so DAG files and the gateway can use it freely.
"""

from __future__ import annotations

#: The registered risk model in MLflow, and the aliases the promotion gate moves.
MODEL_NAME = "decisionflow-risk"
CHAMPION_ALIAS = "champion"
CHALLENGER_ALIAS = "challenger"

#: The Feast feature service the model is trained and served on.
FEATURE_SERVICE = "risk_v1"

#: Kafka topics written by the decision loop (the source topics live in :mod:`decisionflow.contracts`).
DECISIONS_TOPIC = "decisions"

#: Milvus collection of investigators' case notes (the similar-case memory).
CASE_NOTES_COLLECTION = "case_notes"

#: Delta tables of the decision loop, under the lake root (``lake_default``).
GOLD_ENRICHED_TABLE = "gold/transactions_enriched"
DECISIONS_TABLE = "gold/decisions"
DECISION_ACTIONS_TABLE = "gold/decision_actions"
ESCALATIONS_TABLE = "gold/escalations"
SILVER_CASE_NOTES_TABLE = "silver/case_notes"
SILVER_LABELS_TABLE = "silver/labels"

#: MLflow experiment of decision-quality evaluation runs.
DECISION_EVALUATION_EXPERIMENT = "decisionflow-decisions"

#: Airflow connections of the decision loop.
ACTIONS_WEBHOOK_CONN_ID = "actions_webhook"
#: The escalation agent's chat model (optional: without it the policy decides the escalated cases).
LLM_CONN_ID = "llm_default"

#: What a reviewer may answer a review case: approve / decline resolve it, escalate hands it on.
REVIEW_ANSWERS = ("approve", "decline", "escalate")

#: Kafka topic of the failure alerts (decisionflow.notifications.failure.FailureNotifier).
ALERTS_TOPIC = "platform-alerts"
#: HTTP connection of the alerts webhook; without it the notifier's webhook channel is off.
ALERTS_WEBHOOK_CONN_ID = "alerts_webhook"
