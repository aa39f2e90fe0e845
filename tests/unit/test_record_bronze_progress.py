"""RecordBronzeProgressOperator: commits markers from a real bronze Delta table, announces only growth."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow as pa
import pytest
from airflow.sdk import Asset
from airflow.sdk.exceptions import AirflowSkipException

from decisionflow.hooks.kafka import KafkaHook
from decisionflow.operators.kafka import RecordBronzeProgressOperator
from decisionflow.triggers.kafka import BRONZE_PROGRESS_GROUP

TABLES = {"bronze/transactions": "transactions", "bronze/labels": "transaction-labels"}
ASSETS = {table: Asset(name=table.replace("/", "_"), uri=f"delta://lake/{table}") for table in TABLES}


class OutletEvents(dict):
    def __missing__(self, asset):
        self[asset] = SimpleNamespace(extra={})
        return self[asset]


@pytest.fixture
def lake(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_LAKE_DEFAULT", json.dumps({"conn_type": "delta_lake",
                                                                "extra": {"root": str(tmp_path)}}))
    return tmp_path


@pytest.fixture
def commits(monkeypatch):
    calls = []
    monkeypatch.setattr(KafkaHook, "commit_offsets", lambda self, group, markers: calls.append((group, markers)))
    return calls


def append(lake, table: str, topic: str, rows: list[tuple[int, int]]) -> None:
    from deltalake import write_deltalake

    data = pa.table({"topic": [topic] * len(rows), "partition": [p for p, _ in rows],
                     "offset": pa.array([o for _, o in rows], pa.int64())})
    write_deltalake(str(lake / table), data, mode="append")


def run(operator, previous: dict | None = None):
    """Execute with the given last events per asset (``{table: extra}``); returns (result, outlet events)."""
    inlet = {ASSETS[t]: [SimpleNamespace(extra=e)] for t, e in (previous or {}).items()}
    for asset in ASSETS.values():
        inlet.setdefault(asset, [])
    outlets = OutletEvents()
    return operator.execute({"inlet_events": inlet, "outlet_events": outlets}), outlets


def operator(**kwargs):
    return RecordBronzeProgressOperator(task_id="record_progress", tables=TABLES, assets=ASSETS, **kwargs)


def test_markers_are_committed_and_every_asset_announced_with_its_markers(lake, commits):
    append(lake, "bronze/transactions", "transactions", [(0, 0), (0, 1), (1, 7)])
    result, outlets = run(operator())
    assert result == {"transactions/0": 2, "transactions/1": 8}
    assert commits == [(BRONZE_PROGRESS_GROUP, {("transactions", 0): 2, ("transactions", 1): 8})]
    assert outlets[ASSETS["bronze/transactions"]].extra == {"markers": {"0": 2, "1": 8}}
    assert outlets[ASSETS["bronze/labels"]].extra == {"markers": {}}


def test_nothing_new_since_the_last_announcement_skips_and_still_commits(lake, commits):
    append(lake, "bronze/transactions", "transactions", [(0, 4)])
    previous = {"bronze/transactions": {"markers": {"0": 5}}, "bronze/labels": {"markers": {}}}
    with pytest.raises(AirflowSkipException, match="not grown"):
        run(operator(), previous)
    assert commits and commits[-1][1] == {("transactions", 0): 5}


def test_growth_in_any_table_announces(lake, commits):
    append(lake, "bronze/transactions", "transactions", [(0, 4)])
    append(lake, "bronze/labels", "transaction-labels", [(2, 0)])
    previous = {"bronze/transactions": {"markers": {"0": 5}}, "bronze/labels": {"markers": {}}}
    _, outlets = run(operator(), previous)
    assert outlets[ASSETS["bronze/labels"]].extra == {"markers": {"2": 1}}


def test_a_retry_after_committing_still_announces(lake, commits):
    """The comparison is with the last *event*: committed markers without an event (a run that died after
    the commit) do not stop the announcement."""
    append(lake, "bronze/transactions", "transactions", [(0, 9)])
    previous = {"bronze/transactions": {"markers": {"0": 3}}}  # the last event, older than the commit
    _, outlets = run(operator(), previous)
    assert outlets[ASSETS["bronze/transactions"]].extra == {"markers": {"0": 10}}


def test_empty_bronze_never_announced_skips(lake, commits):
    with pytest.raises(AirflowSkipException):
        run(operator(), {"bronze/transactions": {"markers": {}}, "bronze/labels": {"markers": {}}})


def test_rows_of_another_topic_name_the_table(lake, commits):
    append(lake, "bronze/labels", "transactions", [(0, 0)])
    with pytest.raises(ValueError, match="bronze/labels.*'transactions'.*'transaction-labels'"):
        run(operator())
    assert commits == []


def test_assets_for_unknown_tables_are_refused():
    with pytest.raises(ValueError, match=r"bronze/nope"):
        RecordBronzeProgressOperator(task_id="t", tables=TABLES,
                                     assets={"bronze/nope": Asset(name="n", uri="delta://lake/bronze/nope")})


def test_assets_become_inlets_and_outlets():
    op = operator()
    assert set(op.inlets) == set(ASSETS.values()) and set(op.outlets) == set(ASSETS.values())


# -- KafkaBacklogCheckOperator: an ingestion run without a backlog skips before Spark ------------------------
@pytest.fixture
def backlog(monkeypatch):
    """Fake the marker comparison (the boundary: a broker); returns a setter for the per-partition backlog."""
    import decisionflow.triggers.kafka as triggers

    state = {"backlog": 0, "calls": []}

    def fake(config, topics, group, timeout=10.0):
        state["calls"].append((tuple(topics), group))
        return {f"{t}/0": {"end": 10, "marker": 10 - state["backlog"], "backlog": state["backlog"]} for t in topics}

    monkeypatch.setattr(triggers, "topic_backlog", fake)
    monkeypatch.setattr(KafkaHook, "config", property(lambda self: {"bootstrap.servers": "127.0.0.1:1"}))
    return state


def check(run_type: str, try_number: int = 1):
    from decisionflow.operators.kafka import KafkaBacklogCheckOperator

    op = KafkaBacklogCheckOperator(task_id="check_backlog", topics=["transactions", "case-notes"])
    return op.execute({"dag_run": SimpleNamespace(run_type=run_type), "ti": SimpleNamespace(try_number=try_number)})


@pytest.mark.parametrize("run_type", ["scheduled", "asset_triggered"])
def test_no_backlog_skips_watcher_and_fallback_runs(backlog, run_type):
    with pytest.raises(AirflowSkipException, match="no backlog on"):
        check(run_type)
    assert backlog["calls"] == [(("transactions", "case-notes"), BRONZE_PROGRESS_GROUP)]


def test_a_backlog_lets_the_run_go_on(backlog):
    backlog["backlog"] = 3
    assert check("asset_triggered")["backlog"] == 6  # two topics, 3 each


def test_manual_runs_never_skip(backlog):
    from airflow.utils.types import DagRunType

    assert check(DagRunType.MANUAL)["backlog"] == 0  # the enum as Airflow passes it
    assert check("manual")["backlog"] == 0
    with pytest.raises(AirflowSkipException):
        check("scheduled", try_number=2)  # a retry of a watcher or fallback run may skip too


def test_a_broker_error_is_retried_then_raised(backlog, monkeypatch):
    """A fresh broker answers NOT_COORDINATOR for a moment (seen on the test stack): retried, not failed."""
    import decisionflow.triggers.kafka as triggers
    from confluent_kafka import KafkaError, KafkaException

    from decisionflow.operators.kafka import KafkaBacklogCheckOperator

    monkeypatch.setattr("time.sleep", lambda s: None)
    fake, calls = triggers.topic_backlog, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) < 3:
            raise KafkaException(KafkaError(KafkaError.NOT_COORDINATOR))
        return fake(*args, **kwargs)

    monkeypatch.setattr(triggers, "topic_backlog", flaky)
    backlog["backlog"] = 1
    assert check("scheduled")["backlog"] == 2 and len(calls) == 3

    monkeypatch.setattr(triggers, "topic_backlog", lambda *a, **k: (_ for _ in ()).throw(
        KafkaException(KafkaError(KafkaError.NOT_COORDINATOR))))
    op = KafkaBacklogCheckOperator(task_id="c", topics=["transactions"], broker_wait_s=0)
    with pytest.raises(KafkaException):
        op.execute({"dag_run": SimpleNamespace(run_type="scheduled"), "ti": SimpleNamespace(try_number=1)})


def test_backlog_check_needs_topics():
    from decisionflow.operators.kafka import KafkaBacklogCheckOperator

    with pytest.raises(ValueError, match="topics"):
        KafkaBacklogCheckOperator(task_id="c", topics=[])
