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
