"""Feast over gold Delta tables written and MERGEd by Spark: offline and online both see the current snapshot.

The gold tables are created by the project's migrations on a real Spark + Delta session; rows are then
changed the way gold changes them -- a MERGE that updates one account's features (late correction) and one
that deletes a row. The project's feature repo (``include/feature_repo``) is applied through ``FeastHook`` with
its default offline store, and must return the new values in a point-in-time training set and, after
materialization, from the online store. A control proves the scenario is one where reading the folder's raw
parquet files (what Feast's ``file`` store does) goes wrong.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from decisionflow.hooks.feast import FeastHook
from decisionflow.lakehouse import maintenance
from decisionflow.lakehouse.tables import join_path

from .fixtures_feast import applied_feast_hook

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

T0 = datetime(2025, 1, 6, 12, 0, tzinfo=timezone.utc)
ACCOUNT_COLUMNS = ("txn_count_1h", "txn_count_24h", "txn_count_7d", "amount_sum_1h", "amount_sum_24h",
                   "amount_sum_7d", "distinct_devices_24h", "distinct_devices_7d", "distinct_countries_24h",
                   "distinct_countries_7d", "seconds_since_prev_txn", "amount_to_avg_7d")


def account_row(event_id: str, account: str, minutes: int, ratio: float, updated: datetime) -> dict:
    row = {"event_id": event_id, "account_id": account, "event_time": T0 + timedelta(minutes=minutes)}
    row.update({name: 1 for name in ACCOUNT_COLUMNS if "count" in name or "distinct" in name})
    row.update({"amount_sum_1h": 10.0, "amount_sum_24h": 20.0, "amount_sum_7d": 30.0,
                "seconds_since_prev_txn": None, "amount_to_avg_7d": ratio, "updated_at": updated})
    return row


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    from decisionflow.spark.conf import local_spark_session

    session = local_spark_session("test-features", conf={
        "spark.sql.shuffle.partitions": 2, "spark.sql.warehouse.dir": str(tmp_path_factory.mktemp("warehouse"))})
    yield session
    session.stop()


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory) -> dict:
    """Gold tables as the migrations declare them; account a1 corrected and a2's second row deleted by MERGE."""
    root = str(tmp_path_factory.mktemp("lake"))
    maintenance.migrate(spark, root)
    accounts = join_path(root, "gold/account_features")
    written = T0 + timedelta(hours=1)
    rows = [account_row("e1", "a1", 0, 1.0, written), account_row("e2", "a2", 0, 2.0, written),
            account_row("e3", "a2", 30, 3.0, written), account_row("e4", "a3", 0, 4.0, written)]
    schema = spark.read.format("delta").load(accounts).schema
    spark.createDataFrame(pd.DataFrame(rows)[schema.fieldNames()], schema).write.format("delta") \
        .mode("append").save(accounts)
    # A late correction: a1's row at e1 gets a new value (and a new updated_at, as gold writes it).
    spark.createDataFrame(pd.DataFrame([account_row("e1", "a1", 0, 7.5, written + timedelta(hours=1))])
                          [schema.fieldNames()], schema).createOrReplaceTempView("correction")
    spark.sql(f"""MERGE INTO delta.`{accounts}` t USING correction s ON t.event_id = s.event_id
                  WHEN MATCHED THEN UPDATE SET *""")
    # A row withdrawn from gold (e.g. its transaction was re-keyed): a2's latest row is e2 again.
    spark.sql(f"""MERGE INTO delta.`{accounts}` t USING (SELECT 'e3' AS event_id) s ON t.event_id = s.event_id
                  WHEN MATCHED THEN DELETE""")
    current = {r["event_id"]: r["amount_to_avg_7d"] for r in spark.read.format("delta").load(accounts).collect()}
    assert current == {"e1": 7.5, "e2": 2.0, "e4": 4.0}, current
    return {"root": root, "accounts": accounts}


ENTITY_ROWS = pd.DataFrame({
    "account_id": ["a1", "a2", "a3"],
    "merchant_id": ["m-none"] * 3,
    "amount": [50.0, 60.0, 70.0],
    "event_timestamp": [T0 + timedelta(hours=2)] * 3,
})


def training_values(hook: FeastHook) -> dict[str, float]:
    store = hook.get_store()
    frame = store.get_historical_features(entity_df=ENTITY_ROWS.copy(),
                                          features=store.get_feature_service("risk_v1")).to_df()
    assert len(frame) == len(ENTITY_ROWS), frame
    return dict(zip(frame["account_id"], frame["amount_to_avg_7d"]))


def test_training_set_and_online_store_see_the_merged_value(tmp_path, lake):
    with applied_feast_hook(lake["root"], tmp_path / "feast") as hook:
        check_merged_values(hook, lake)


def check_merged_values(hook: FeastHook, lake: dict) -> None:
    store = hook.get_store()
    source = store.get_data_source("gold_account_features")
    assert source.path == lake["accounts"], "the registry must record the lake root of the lake connection"

    assert training_values(hook) == {"a1": 7.5, "a2": 2.0, "a3": 4.0}

    store.materialize(T0 - timedelta(days=1), T0 + timedelta(days=1), feature_views=["account_features"])
    online = store.get_online_features(
        features=["account_features:amount_to_avg_7d", "account_features:txn_count_24h",
                  "transaction_context:amount_to_avg_24h"],
        entity_rows=[{"account_id": a, "amount": 40.0} for a in ("a1", "a2", "a3", "nobody")],
    ).to_dict()
    assert online["amount_to_avg_7d"] == [7.5, 2.0, 4.0, None]
    # On-demand: amount / (amount_sum_24h / txn_count_24h) = 40 / 20.
    assert online["amount_to_avg_24h"][:3] == [2.0, 2.0, 2.0]
    assert online["amount_to_avg_24h"][3] is None


def test_the_parquet_files_still_hold_what_the_merges_replaced(lake):
    """Control: the folder's parquet files (what a plain parquet reader sees) hold the old value and the deleted
    row, so the test above passes only because the Delta log is honoured."""
    import pyarrow.dataset as ds

    files = ds.dataset(lake["accounts"], format="parquet", ignore_prefixes=["_delta_log", "_change_data", "."])
    raw = {(row["event_id"], row["amount_to_avg_7d"]) for row in files.to_table().to_pylist()}
    assert {("e1", 1.0), ("e3", 3.0)} <= raw, raw


def test_materialize_operator_joins_the_empty_days_of_a_long_window(tmp_path, lake):
    """Two years of one-day chunks with data on one day: one Feast materialization, the merged values online."""
    from decisionflow.operators.feast import FeastMaterializeOperator

    with applied_feast_hook(lake["root"], tmp_path / "feast") as hook:
        operator = FeastMaterializeOperator(
            task_id="materialize", feature_views=["account_features"], chunk=timedelta(days=1),
            start=(T0 - timedelta(days=730)).isoformat(), end=(T0 + timedelta(days=1)).isoformat())
        result = operator.execute({"dag_run": None})
        assert result["mode"] == "explicit" and [w["chunks"] for w in result["windows"]] == [1], result
        online = hook.get_store().get_online_features(
            features=["account_features:amount_to_avg_7d"],
            entity_rows=[{"account_id": a} for a in ("a1", "a2", "a3")]).to_dict()
        assert online["amount_to_avg_7d"] == [7.5, 2.0, 4.0]
