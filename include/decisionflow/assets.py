"""Airflow Assets shared by the DAGs: what each DAG produces and what starts the next one.

URIs name things, they are not paths: ``delta://lake/<table>`` is a table under the lake root of the
``lake_default`` connection, ``kafka://decisionflow/<topic>`` a topic of ``kafka_default``.
"""

from __future__ import annotations

from airflow.sdk import Asset, AssetWatcher

from decisionflow.contracts import CASE_NOTES, LABELS, TRANSACTIONS
from decisionflow.triggers.kafka import KafkaBacklogTrigger

SOURCE_TOPICS = [TRANSACTIONS, LABELS, CASE_NOTES]

#: bronze table -> the topic it mirrors
BRONZE_TABLES = {"bronze/transactions": TRANSACTIONS, "bronze/labels": LABELS, "bronze/case_notes": CASE_NOTES}


def lake_asset(table: str) -> Asset:
    return Asset(name=table.replace("/", "_"), uri=f"delta://lake/{table}", group="lakehouse")


#: Fires when the source topics hold messages that bronze does not (see KafkaBacklogTrigger).
KAFKA_EVENTS = Asset(
    name="kafka_events",
    uri="kafka://decisionflow/events",
    group="kafka",
    watchers=[
        AssetWatcher(
            name="kafka_events_backlog",
            trigger=KafkaBacklogTrigger(topics=SOURCE_TOPICS, poll_interval=10.0),
        )
    ],
)

BRONZE = {table: lake_asset(table) for table in BRONZE_TABLES}
SILVER_TRANSACTIONS = lake_asset("silver/transactions")
SILVER_CASE_NOTES = lake_asset("silver/case_notes")
SILVER_LABELS = lake_asset("silver/labels")
GOLD = {table: lake_asset(table) for table in
        ("gold/account_features", "gold/merchant_features", "gold/transactions_enriched")}

#: Online features are fresh: emitted by ``materialize_features`` with the window and watermark in ``extra``.
FEATURES_FRESH = Asset(name="features_risk_v1_online", uri="feast://decisionflow/risk_v1", group="features")
#: A new champion risk model in the MLflow registry: emitted only when the promotion gate promotes.
MODEL_CHAMPION = Asset(name="model_risk_champion", uri="mlflow://registry/decisionflow-risk@champion", group="models")
#: The Milvus similar-case memory matches silver: emitted by ``sync_case_embeddings`` with its watermark in ``extra``.
CASE_EMBEDDINGS = Asset(name="case_embeddings", uri="milvus://decisionflow/case_notes", group="vectors")
#: Decisions were recorded: emitted by ``run_decisions`` with the run's mix, model and policy versions in ``extra``.
DECISIONS = Asset(name="decisions", uri="delta://lake/gold/decisions", group="decisions")
