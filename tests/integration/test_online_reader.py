"""``OnlineFeatureReader`` returns exactly what ``get_online_features(risk_v1).to_dict()`` returns.

Small gold tables are written with ``deltalake`` (no Spark), event times relative to now: several rows per
entity (a late correction with the same event time among them), an account whose latest row is older than the
account view's 7 d TTL and a merchant older than the merchant view's 30 d TTL (both inside the materialized
window, so they are in the online store), entities outside the window (never materialized) and entities that
never existed, NULL feature values. The project's repo is applied through ``FeastHook`` and materialized over
the last 40 days, into SQLite (Feast's default online store) and into a private Redis. Then, on the same
store, the reader's dict must equal Feast's for a batch of mixed rows (repeated entities, an ``int``, a ``NaN``
and a ``None`` amount included) and for a single row.

Feast 0.67 serves materialized rows whatever their age (no TTL at read time), so the stale entities read as
values, not ``None``: the test pins that, since the reader must do the same.
"""

from __future__ import annotations

import copy
import random
from datetime import datetime, timedelta, timezone

import pytest

from decisionflow.features.online import OnlineFeatureReader, UnsupportedFeatureServiceError
from decisionflow.lakehouse import tables

try:
    from .fixtures_feast import applied_feast_hook
    from .fixtures_redis import redis_server  # noqa: F401 - pytest fixture
except ImportError:  # collected as a plain directory (rootdir-relative import mode)
    from fixtures_feast import applied_feast_hook
    from fixtures_redis import redis_server  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

NOW = datetime.now(timezone.utc).replace(microsecond=0)
ACCOUNTS, MERCHANTS = "gold/account_features", "gold/merchant_features"
SERVICE = "risk_v1"
MINUTE, DAY = 1, 24 * 60
#: materialized window: the last 40 days (wider than both TTLs)
WINDOW_DAYS = 40


def gold_row(name: str, event_id: str, entity: str, minutes_ago: int, *, late_s: int = 30, **values) -> dict:
    """A row of a declared gold table: every column NULL unless given; ``updated_at`` ``late_s`` after the event."""
    key = "account_id" if name == ACCOUNTS else "merchant_id"
    row = {c.name: None for c in tables.table(name).columns}
    event_time = NOW - timedelta(minutes=minutes_ago)
    row.update(event_id=event_id, event_time=event_time, updated_at=event_time + timedelta(seconds=late_s))
    row[key] = entity
    unknown = set(values) - set(row)
    assert not unknown, f"{name} has no columns {unknown}"
    row.update(values)
    return row


def account(event_id, entity, minutes_ago, count_24h, sum_24h, *, late_s=30, **extra):
    values = dict(txn_count_1h=1, txn_count_24h=count_24h, txn_count_7d=count_24h + 1, amount_sum_1h=12.5,
                  amount_sum_24h=sum_24h, amount_sum_7d=(sum_24h or 0.0) + 7.25, distinct_devices_24h=1,
                  distinct_devices_7d=2, distinct_countries_24h=1, distinct_countries_7d=1,
                  seconds_since_prev_txn=600.0, amount_to_avg_7d=1.1)
    values.update(extra)
    return gold_row(ACCOUNTS, event_id, entity, minutes_ago, late_s=late_s, **values)


def merchant(event_id, entity, minutes_ago, count_7d, known, frauds, *, late_s=30):
    return gold_row(MERCHANTS, event_id, entity, minutes_ago, late_s=late_s, merchant_txn_count_24h=count_7d // 2,
                    merchant_txn_count_7d=count_7d, merchant_labels_known=known, merchant_fraud_labels=frauds,
                    merchant_fraud_rate=frauds / known if known else None)


ACCOUNT_ROWS = [
    account("a1-1", "a1", 3 * DAY, 1, 40.0, seconds_since_prev_txn=None),
    account("a1-2", "a1", 90 * MINUTE, 3, 120.0),
    account("a1-3", "a1", 30 * MINUTE, 4, 160.0),
    account("a1-3c", "a1", 30 * MINUTE, 4, 161.5, late_s=300),  # late correction of a1-3: wins (updated_at)
    account("a2-1", "a2", 2 * DAY, 1, 80.0, seconds_since_prev_txn=None),  # a first transaction
    account("a3-1", "a3", 5 * DAY, 2, 30.0),
    account("a3-2", "a3", 10 * MINUTE, 0, 0.0, amount_to_avg_7d=None),  # count 0: no average for the UDF
    account("a4-1", "a4", 6 * DAY, 1, None, amount_sum_1h=None),  # NULL sums
    account("stale-1", "stale", 12 * DAY, 2, 50.0),
    account("stale-2", "stale", 10 * DAY, 3, 75.0),  # latest row older than the 7 d TTL, inside the window
    account("gone-1", "gone", 60 * DAY, 2, 20.0),  # outside the materialized window: never in the store
]
MERCHANT_ROWS = [
    merchant("m1-1", "m1", 4 * DAY, 10, 3, 1),
    merchant("m1-2", "m1", 2 * DAY, 14, 4, 1),
    merchant("m1-3", "m1", 20 * MINUTE, 15, 5, 2),
    merchant("m2-1", "m2", 1 * DAY, 3, 0, 0),  # no label known: NULL fraud rate
    merchant("m3-1", "m3", 35 * DAY, 8, 2, 0),  # older than the 30 d TTL, inside the window
    merchant("m4-1", "m4", 55 * DAY, 1, 1, 1),  # outside the window
]
KNOWN_ACCOUNTS = ["a1", "a2", "a3", "a4", "stale"]
UNKNOWN_ACCOUNTS = ["gone", "nobody"]
KNOWN_MERCHANTS = ["m1", "m2", "m3"]
UNKNOWN_MERCHANTS = ["m4", "m-none"]


def write_gold(lake: str, name: str, rows: list[dict]) -> None:
    """``rows`` as the Delta table ``name``, typed as ``lakehouse/tables.py`` declares."""
    import pyarrow as pa
    from deltalake import write_deltalake

    types = {"string": pa.string(), "bigint": pa.int64(), "int": pa.int32(), "double": pa.float64(),
             "timestamp": pa.timestamp("us", tz="UTC")}
    schema = pa.schema([pa.field(c.name, types[tables.normalize_type(c.type)], nullable=c.nullable)
                        for c in tables.table(name).columns])
    write_deltalake(tables.table_path(lake, name), pa.Table.from_pylist(rows, schema=schema), mode="error")


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("online-reader") / "lake")
    write_gold(path, ACCOUNTS, ACCOUNT_ROWS)
    write_gold(path, MERCHANTS, MERCHANT_ROWS)
    return path


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def store(request, lake, tmp_path_factory):
    """The repo applied and both views materialized over the last ``WINDOW_DAYS`` days, per online store."""
    folder = tmp_path_factory.mktemp(f"feast-{request.param}")
    online = None
    if request.param == "redis":
        online = {"type": "redis", "connection_string": request.getfixturevalue("redis_server").connection_string}
    with applied_feast_hook(lake, folder, online_store=online) as hook:
        feature_store = hook.get_store()
        assert feature_store.config.online_store.type == request.param
        feature_store.materialize(NOW - timedelta(days=WINDOW_DAYS), NOW + timedelta(seconds=1),
                                  feature_views=["account_features", "merchant_features"])
        yield feature_store


def feast_dict(store, rows: list[dict]) -> dict[str, list]:
    return store.get_online_features(features=store.get_feature_service(SERVICE), entity_rows=rows).to_dict()


def assert_same(got: dict[str, list], expected: dict[str, list]) -> None:
    assert sorted(got) == sorted(expected), (sorted(got), sorted(expected))
    for name, values in expected.items():
        assert got[name] == values, (name, got[name], values)
        # == treats 1 and 1.0 alike: the types must match too
        assert [type(v) for v in got[name]] == [type(v) for v in values], name
    assert got == expected


def mixed_rows(count: int = 50, seed: int = 7) -> list[dict]:
    """Known, stale and unknown entities, repeated ones, and odd amounts (int, NaN, None, 0.0)."""
    rng = random.Random(seed)
    accounts = KNOWN_ACCOUNTS * 3 + UNKNOWN_ACCOUNTS
    merchants = KNOWN_MERCHANTS * 3 + UNKNOWN_MERCHANTS
    rows = [{"account_id": rng.choice(accounts), "merchant_id": rng.choice(merchants),
             "amount": round(rng.lognormvariate(3.0, 1.0), 2)} for _ in range(count)]
    rows[3]["amount"] = 25  # an int among floats: Feast stores it as a double
    rows[5]["amount"] = float("nan")  # NaN request value: None for the UDF
    rows[8]["amount"] = None
    rows[9]["amount"] = 0.0
    rows[10].update(account_id="stale", merchant_id="m3")
    rows[11].update(account_id="gone", merchant_id="m4")
    rows[12].update(account_id="a1", merchant_id="m1")
    return rows


def test_a_mixed_batch_reads_what_feast_reads(store):
    reader = OnlineFeatureReader(store, SERVICE)
    rows = mixed_rows()
    expected = feast_dict(store, rows)
    got = reader.read(rows)
    assert_same(got, expected)

    # the cases the batch was built for really occur
    assert expected["txn_count_24h"][10] == 3 and expected["merchant_txn_count_7d"][10] == 8, \
        "rows older than the TTL are served by Feast 0.67 (no TTL at read time)"
    assert all(expected[name][11] is None for name in expected if name not in ("account_id", "merchant_id"))
    assert expected["amount_sum_24h"][12] == 161.5  # the late correction won
    assert expected["amount_to_avg_24h"][5] is None and expected["share_of_24h_spend"][8] is None
    assert len({r["account_id"] for r in rows}) < len(rows)  # repeated entities


def test_a_single_row_reads_what_feast_reads(store):
    reader = OnlineFeatureReader(store, SERVICE)
    for row in ({"account_id": "a1", "merchant_id": "m2", "amount": 40.0},
                {"account_id": "a3", "merchant_id": "m1", "amount": 12.0},  # count 0, sum 0.0
                {"account_id": "a4", "merchant_id": "m3", "amount": 9.99},  # NULL sums
                {"account_id": "nobody", "merchant_id": "m-none", "amount": 1.0}):
        assert_same(reader.read([row]), feast_dict(store, [row]))


def test_event_times_per_view_say_how_old_each_row_is(store):
    """``read_with_event_times``: the same values, and per view the event time of the row each entity got."""
    reader = OnlineFeatureReader(store, SERVICE)
    rows = [{"account_id": "a1", "merchant_id": "m3", "amount": 5.0},
            {"account_id": "stale", "merchant_id": "m1", "amount": 5.0},
            {"account_id": "nobody", "merchant_id": "m1", "amount": 5.0},
            {"account_id": "a1", "merchant_id": "m-none", "amount": 5.0}]
    values, times = reader.read_with_event_times(rows)
    assert_same(values, feast_dict(store, rows))
    assert sorted(times) == ["account_features", "merchant_features"] == sorted(reader.view_names)
    accounts, merchants = times["account_features"], times["merchant_features"]
    assert accounts[0] == accounts[3] == NOW - timedelta(minutes=30)  # a1's latest (corrected) row
    assert accounts[1] == NOW - timedelta(days=10) and accounts[2] is None
    assert merchants[0] == NOW - timedelta(days=35) and merchants[1] == NOW - timedelta(minutes=20)
    assert merchants[3] is None
    assert reader.view_ttls["account_features"] == timedelta(days=7)


def test_row_key_order_and_entity_names_read_what_feast_reads(store):
    reader = OnlineFeatureReader(store, SERVICE)
    rows = [{"amount": 3.5, "merchant_id": "m1", "account_id": "a2"},
            {"amount": 7.0, "merchant_id": "m9", "account_id": "a1"}]
    assert_same(reader.read(rows), feast_dict(store, rows))
    by_name = [{"account": "a1", "merchant_id": "m1", "amount": 2.0}]  # deprecated: an entity name as key
    with pytest.warns(UserWarning):
        expected = feast_dict(store, by_name)
    with pytest.warns(UserWarning):
        assert_same(reader.read(by_name), expected)


def test_an_unsupported_on_demand_mode_is_refused(store, monkeypatch):
    registry = store.registry
    original = registry.get_any_feature_view

    def pandas_mode(name, project, allow_cache=False):
        view = original(name, project, allow_cache)
        if name == "transaction_context":
            view = copy.copy(view)
            view.mode = "pandas"
        return view

    monkeypatch.setattr(registry, "get_any_feature_view", pandas_mode)
    with pytest.raises(UnsupportedFeatureServiceError, match="transaction_context.*'pandas'"):
        OnlineFeatureReader(store, SERVICE)
