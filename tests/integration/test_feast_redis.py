"""Feast's Redis online store against a real ``redis-server``: a connection edit, no code change.

Small gold tables are written with ``deltalake`` (no Spark) in the declared schemas; the ``feast_default``
connection names ``online_store: {type: redis, connection_string: host:port}`` of a private Redis started for
this module; the project's feature repo is applied through ``FeastHook`` and materialized. The ``risk_v1``
service must then read the latest gold row of each entity back (the on-demand ``amount_to_avg_24h``
included), NULL for an unknown entity, the keys must be in *that* Redis, and a second materialization after
a gold append must serve the newer row.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pytest

try:
    from .fixtures_redis import redis_server  # noqa: F401 - pytest fixture
except ImportError:  # collected as a plain directory (rootdir-relative import mode)
    from fixtures_redis import redis_server  # noqa: F401

from decisionflow.lakehouse import tables

from .fixtures_feast import applied_feast_hook

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

NOW = datetime.now(timezone.utc).replace(microsecond=0)
ACCOUNTS, MERCHANTS = "gold/account_features", "gold/merchant_features"


def gold_row(name: str, event_id: str, entity: str, minutes_ago: int, **values) -> dict:
    """A row of a declared gold table: every column, NULL unless given; keys and timestamps filled in."""
    key = "account_id" if name == ACCOUNTS else "merchant_id"
    row = {c.name: None for c in tables.table(name).columns}
    event_time = NOW - timedelta(minutes=minutes_ago)
    row.update(event_id=event_id, event_time=event_time, updated_at=event_time + timedelta(seconds=30))
    row[key] = entity
    unknown = set(values) - set(row)
    assert not unknown, f"{name} has no columns {unknown}"
    row.update(values)
    return row


def account(event_id, entity, minutes_ago, count_24h, sum_24h, seconds_since_prev, ratio_7d):
    return gold_row(ACCOUNTS, event_id, entity, minutes_ago, txn_count_1h=1, txn_count_24h=count_24h,
                    txn_count_7d=count_24h, amount_sum_1h=sum_24h / count_24h, amount_sum_24h=sum_24h,
                    amount_sum_7d=sum_24h, distinct_devices_24h=1, distinct_devices_7d=1, distinct_countries_24h=1,
                    distinct_countries_7d=1, seconds_since_prev_txn=seconds_since_prev, amount_to_avg_7d=ratio_7d)


def merchant(event_id, entity, minutes_ago, count_7d, known, frauds):
    return gold_row(MERCHANTS, event_id, entity, minutes_ago, merchant_txn_count_24h=count_7d,
                    merchant_txn_count_7d=count_7d, merchant_labels_known=known, merchant_fraud_labels=frauds,
                    merchant_fraud_rate=frauds / known if known else None)


ACCOUNT_ROWS = [
    account("e1", "a1", 300, 1, 60.0, None, 1.0),
    account("e2", "a1", 120, 2, 100.0, 10_800.0, 0.8),  # a1's latest row
    account("e3", "a2", 200, 1, 40.0, None, 1.0),
    account("e4", "a3", 90, 4, 400.0, 600.0, 1.5),
]
MERCHANT_ROWS = [
    merchant("e1", "m1", 300, 5, 2, 1),
    merchant("e2", "m1", 120, 6, 3, 1),
    merchant("e3", "m2", 200, 1, 0, 0),  # no label known: NULL fraud rate
    merchant("e4", "m1", 90, 7, 4, 2),  # m1's latest row
]


def write_gold(lake: str, name: str, rows: list[dict], mode: str) -> None:
    """``rows`` appended to (or creating) the Delta table ``name``, typed as ``lakehouse/tables.py`` declares."""
    import pyarrow as pa
    from deltalake import write_deltalake

    types = {"string": pa.string(), "bigint": pa.int64(), "int": pa.int32(), "double": pa.float64(),
             "timestamp": pa.timestamp("us", tz="UTC")}
    schema = pa.schema([pa.field(c.name, types[tables.normalize_type(c.type)], nullable=c.nullable)
                        for c in tables.table(name).columns])
    write_deltalake(tables.table_path(lake, name), pa.Table.from_pylist(rows, schema=schema), mode=mode)


def latest(rows: list[dict], key: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: (r["event_time"], r["updated_at"])):
        out[row[key]] = row
    return out


@pytest.fixture(scope="module")
def feast_redis(redis_server, tmp_path_factory):  # noqa: F811 - fixture injection
    """Gold written, connections pointing at the private Redis, repo applied and both views materialized."""
    root = tmp_path_factory.mktemp("feast-redis")
    lake = str(root / "lake")
    write_gold(lake, ACCOUNTS, ACCOUNT_ROWS, "error")
    write_gold(lake, MERCHANTS, MERCHANT_ROWS, "error")
    with applied_feast_hook(lake, root / "feast",
                            online_store={"type": "redis", "connection_string": redis_server.connection_string}) as hook:
        store = hook.get_store()
        assert store.config.online_store.type == "redis", store.config.online_store
        store.materialize(NOW - timedelta(days=8), NOW + timedelta(seconds=1),
                          feature_views=["account_features", "merchant_features"])
        yield {"hook": hook, "store": store, "lake": lake, "root": root}


def online(store, rows: list[dict]) -> dict[str, list]:
    return store.get_online_features(features=store.get_feature_service("risk_v1"), entity_rows=rows).to_dict()


def expected_values(accounts: dict, merchants: dict, row: dict) -> dict:
    acc, mer = accounts[row["account_id"]], merchants[row["merchant_id"]]
    account_cols = [c.name for c in tables.table(ACCOUNTS).columns][3:-1]
    merchant_cols = [c.name for c in tables.table(MERCHANTS).columns][3:-1]
    values = {c: acc[c] for c in account_cols} | {c: mer[c] for c in merchant_cols}
    values["amount_to_avg_24h"] = row["amount"] / (acc["amount_sum_24h"] / acc["txn_count_24h"])
    values["share_of_24h_spend"] = row["amount"] / acc["amount_sum_24h"]
    return values


def assert_served(response: dict, index: int, expected: dict) -> None:
    for name, value in expected.items():
        got = response[name][index]
        if value is None:
            assert got is None, (name, got)
        elif isinstance(value, float):
            assert got is not None and math.isclose(got, value, rel_tol=1e-12), (name, got, value)
        else:
            assert got == value, (name, got, value)


def test_risk_v1_reads_the_latest_gold_rows_from_redis(feast_redis, redis_server):  # noqa: F811
    rows = [{"account_id": "a1", "merchant_id": "m1", "amount": 25.0},
            {"account_id": "a2", "merchant_id": "m2", "amount": 80.0},
            {"account_id": "a3", "merchant_id": "m1", "amount": 10.0},
            {"account_id": "nobody", "merchant_id": "m-none", "amount": 5.0}]
    response = online(feast_redis["store"], rows)

    accounts, merchants = latest(ACCOUNT_ROWS, "account_id"), latest(MERCHANT_ROWS, "merchant_id")
    for i, row in enumerate(rows[:3]):
        assert_served(response, i, expected_values(accounts, merchants, row))
    # spelled out once: a1's latest row (e2), 25 / (100 / 2); a2 is a first transaction; m2 has no labels
    assert response["amount_to_avg_7d"][0] == 0.8
    assert response["amount_to_avg_24h"][:3] == [0.5, 2.0, 0.1]
    assert response["seconds_since_prev_txn"][1] is None and response["merchant_fraud_rate"][1] is None
    assert response["merchant_fraud_rate"][0] == 0.5  # m1's latest row (e4): 2 of 4
    served = set(response) - {"account_id", "merchant_id"}
    assert {name for name in served if response[name][3] is not None} == set(), "the unknown entity got values"

    # The values came from this Redis: one hash per entity key (3 accounts + 2 merchants), no SQLite file.
    client = redis_server.client()
    assert client.dbsize() == 5, client.dbsize()
    assert not list(feast_redis["root"].rglob("*online*.db")), "a SQLite online store was written"


def test_a_second_materialization_serves_the_newer_gold_row(feast_redis, redis_server):  # noqa: F811
    store, lake = feast_redis["store"], feast_redis["lake"]
    row = {"account_id": "a2", "merchant_id": "m2", "amount": 80.0}
    assert online(store, [row])["txn_count_24h"] == [1]

    newer = account("e5", "a2", 10, 2, 100.0, 11_400.0, 1.25)
    write_gold(lake, ACCOUNTS, [newer], "append")
    store.materialize(NOW - timedelta(days=8), NOW + timedelta(seconds=1), feature_views=["account_features"])

    response = online(store, [row])
    assert_served(response, 0, expected_values({"a2": newer}, latest(MERCHANT_ROWS, "merchant_id"), row))
    assert response["txn_count_24h"] == [2] and response["amount_to_avg_7d"] == [1.25]
    assert response["amount_to_avg_24h"] == [1.6]  # 80 / (100 / 2)
    assert redis_server.client().dbsize() == 5  # the entity's hash was overwritten, not duplicated

    # Control: with the Redis emptied the same store reads nothing -- no other store answered above.
    redis_server.client().flushdb()
    assert online(store, [row])["txn_count_24h"] == [None]
