"""Lakehouse declarations, migration planning, gates and job arguments: pure Python, no Spark."""

from __future__ import annotations

import ipaddress
import re

import pytest

from decisionflow.contracts import SOURCE_TOPICS, contract
from decisionflow.lakehouse import tables as T
from decisionflow.lakehouse.maintenance import RetentionError, check_retention, migration_statements
from decisionflow.lakehouse.quality import RANGE_RULES, QualityGateError, check_balance, check_equal, rules_for
from decisionflow.lakehouse.silver import _IPV4, _IPV6, FLOWS
from decisionflow.lakehouse.tables import (
    AddColumn,
    Column,
    IncompatibleTableError,
    Migration,
    TableSpec,
    normalize_type,
    plan_migration,
    schema_problems,
)

EXPECTED = {
    "silver/transactions", "quarantine/transactions", "silver/labels", "quarantine/labels", "silver/case_notes",
    "quarantine/case_notes", "gold/account_features", "gold/merchant_features", "gold/transactions_enriched",
    "gold/decisions", "gold/escalations", "gold/decision_actions",
}


def _spec(*migrations: Migration, columns=None) -> TableSpec:
    cols = columns or (Column("id", "STRING", nullable=False), Column("n", "BIGINT"), Column("tier", "STRING"),
                       Column("score", "DOUBLE"))
    return TableSpec(name="gold/test_items", columns=cols, keys=("id",), description="test", migrations=migrations)


M2 = Migration(2, "add tier", (AddColumn(Column("tier", "STRING"), default="'unknown'"),))
M3 = Migration(3, "add score", (AddColumn(Column("score", "DOUBLE")),))


# -- declarations -------------------------------------------------------------------------------------------
def test_every_table_is_declared_with_its_path():
    assert set(T.TABLES) == EXPECTED
    for name, spec in T.TABLES.items():
        assert spec.name == name and spec.layer in T.LAYERS and spec.description
        assert T.table_path("/lake", name) == f"/lake/{name}"
        assert spec.path("s3://bucket/lake/") == f"s3://bucket/lake/{name}"
    assert list(T.TABLES)[-6:] == ["gold/account_features", "gold/merchant_features", "gold/transactions_enriched",
                                   "gold/decisions", "gold/escalations", "gold/decision_actions"]
    with pytest.raises(KeyError, match="no declared table"):
        T.table("silver/nope")
    assert T.checkpoint_path("/lake", "silver", "transactions") == "/lake/_checkpoints/silver/transactions"


def test_keys_partitions_and_zorder_are_declared_columns():
    for spec in T.tables():
        names = set(spec.column_names)
        assert set(spec.keys) <= names and set(spec.partition_by) <= names and set(spec.zorder_by) <= names
        assert not set(spec.partition_by) & set(spec.zorder_by), spec.name
        assert all(not spec.column(k).nullable for k in spec.keys), spec.name
        assert spec.zorder_by, f"{spec.name} declares no Z-order columns"
    assert T.table("silver/transactions").partition_by == ("event_date",)
    assert T.table("gold/account_features").zorder_by[0] == "account_id"
    assert T.table("gold/merchant_features").zorder_by[0] == "merchant_id"


def test_silver_tables_cover_their_contract():
    for topic in SOURCE_TOPICS:
        flow = FLOWS[topic]
        spec = flow.silver_spec
        for item in contract(topic).fields:
            column = spec.column(item.name)  # KeyError = a contract field silver does not keep
            wanted = "timestamp" if item.name in flow.timestamp_fields else normalize_type(item.sql_type)
            assert normalize_type(column.type) == wanted, (spec.name, item.name)
            if item.required and not item.nullable:
                assert not column.nullable, (spec.name, item.name)
        for lineage in ("source_topic", "source_partition", "source_offset", "kafka_timestamp", "ingested_at",
                        "unknown_fields", "payload_sha256"):
            assert lineage in spec.column_names
        assert normalize_type(spec.column("unknown_fields").type) == "array<string>"
        assert spec.properties.get("delta.enableChangeDataFeed") == "true"
    assert T.table("silver/transactions").keys == ("event_id",)


def test_quarantine_tables_keep_payload_reason_and_source():
    for topic in SOURCE_TOPICS:
        spec = FLOWS[topic].quarantine_spec
        types = {c.name: normalize_type(c.type) for c in spec.columns}
        assert types["value"] == "binary" and types["value_preview"] == "string"
        assert {"reason", "reason_kind", "source_topic", "source_partition", "source_offset", "quarantined_at"} <= set(types)
        assert spec.keys == ("source_topic", "source_partition", "source_offset")


def test_gold_tables_are_keyed_and_timestamped_for_point_in_time_joins():
    for name, entity in (("gold/account_features", "account_id"), ("gold/merchant_features", "merchant_id"),
                         ("gold/transactions_enriched", "account_id")):
        spec = T.table(name)
        assert spec.keys == ("event_id",)
        assert normalize_type(spec.column("event_time").type) == "timestamp"
        assert not spec.column(entity).nullable
        assert normalize_type(spec.column("updated_at").type) == "timestamp"
    enriched = T.table("gold/transactions_enriched").column_names
    for name in ("label", "labelled_at", "is_fraud", "txn_count_7d", "merchant_fraud_rate", "amount"):
        assert name in enriched


def test_bronze_layout_matches_the_bronze_module():
    bronze = pytest.importorskip("decisionflow.lakehouse.bronze")
    assert T.BRONZE_DDL == bronze.BRONZE_DDL
    assert {f"bronze/{v}" for v in bronze.BRONZE_TABLES.values()} == set(T.BRONZE_TABLES.values())


def test_normalize_type_and_create_sql():
    assert normalize_type("ARRAY< STRING >") == "array<string>"
    assert normalize_type("INTEGER") == normalize_type("int") == "int"
    assert normalize_type("LONG") == "bigint"
    sql = T.table("silver/transactions").create_sql("/lake")
    assert sql.startswith("CREATE TABLE IF NOT EXISTS delta.`/lake/silver/transactions` (")
    assert "PARTITIONED BY (event_date)" in sql and "'delta.enableChangeDataFeed' = 'true'" in sql
    assert "'decisionflow.schema_version' = '1'" in sql and "'decisionflow.table' = 'silver/transactions'" in sql
    enriched = T.table("gold/transactions_enriched")
    assert enriched.schema_version == 2 and "'decisionflow.schema_version' = '2'" in enriched.create_sql("/l")
    assert "label_source" not in enriched.ddl(1) and "label_source" in enriched.ddl()


# -- migrations ---------------------------------------------------------------------------------------------
def test_migrations_must_be_numbered_in_order():
    assert _spec(M2, M3).schema_version == 3
    with pytest.raises(ValueError, match="numbered 2, 3"):
        _spec(M3, M2)
    with pytest.raises(ValueError, match="numbered 2, 3"):
        _spec(M3)
    with pytest.raises(ValueError, match="not a declared column"):
        _spec(Migration(2, "x", (AddColumn(Column("ghost", "STRING")),)))
    with pytest.raises(ValueError, match="not a declared column of that type"):
        _spec(Migration(2, "x", (AddColumn(Column("tier", "BIGINT")),)))
    with pytest.raises(ValueError, match="NOT NULL"):
        _spec(Migration(2, "x", (AddColumn(Column("tier", "STRING", nullable=False)),)))
    with pytest.raises(ValueError, match="added by two migrations"):
        _spec(M2, Migration(3, "again", (AddColumn(Column("tier", "STRING")),)))


def test_pending_migrations_and_columns_per_version():
    spec = _spec(M2, M3)
    assert [m.version for m in spec.pending(1)] == [2, 3]
    assert [m.version for m in spec.pending(2)] == [3]
    assert spec.pending(3) == ()
    with pytest.raises(IncompatibleTableError, match="newer than this code knows"):
        spec.pending(4)
    assert [c.name for c in spec.columns_at(1)] == ["id", "n"]
    assert [c.name for c in spec.columns_at(2)] == ["id", "n", "tier"]
    assert [c.name for c in spec.columns_at(3)] == ["id", "n", "tier", "score"]


def test_plan_migration():
    spec = _spec(M2, M3)
    v1 = {"id": "string", "n": "bigint"}
    props = {T.PROPERTY_SCHEMA_VERSION: "1", T.PROPERTY_TABLE: spec.name}
    version, pending = plan_migration(spec, props, v1)
    assert version == 1 and [m.version for m in pending] == [2, 3]
    # a crash after ADD COLUMN tier but before the version was recorded: accepted, tier is not re-added
    version, pending = plan_migration(spec, props, {**v1, "tier": "string"})
    assert [m.version for m in pending] == [2, 3]
    assert plan_migration(spec, {**props, T.PROPERTY_SCHEMA_VERSION: "3"}, {**v1, "tier": "string", "score": "double"}) == (3, ())
    # no version property: adopted at the highest version it matches
    assert plan_migration(spec, {}, {**v1, "tier": "string"})[0] == 2
    with pytest.raises(IncompatibleTableError) as info:
        plan_migration(spec, props, {"id": "string", "n": "string"})
    assert info.value.table == "gold/test_items" and info.value.column == "n"
    assert "table gold/test_items, column n: is string in the table, declared bigint" in str(info.value)
    with pytest.raises(IncompatibleTableError, match="column extra"):
        plan_migration(spec, props, {**v1, "extra": "int"})
    with pytest.raises(IncompatibleTableError, match="column id"):
        plan_migration(spec, {}, {"n": "bigint"})
    with pytest.raises(IncompatibleTableError, match="says it is 'gold/other'"):
        plan_migration(spec, {T.PROPERTY_TABLE: "gold/other"}, v1)
    assert schema_problems(spec, v1, 1) == []


def test_migration_statements():
    spec = _spec(M2, M3)
    statements = migration_statements(spec, "/lake/gold/test_items", M2)
    assert statements[0] == "ALTER TABLE delta.`/lake/gold/test_items` ADD COLUMNS (`tier` STRING)"
    assert statements[1] == "UPDATE delta.`/lake/gold/test_items` SET `tier` = 'unknown' WHERE `tier` IS NULL"
    assert "'decisionflow.schema_version' = '2'" in statements[2] and "'decisionflow.migration.2' = 'add tier'" in statements[2]
    again = migration_statements(spec, "/l", M2, existing={"id", "n", "tier"})
    assert not any("ADD COLUMNS" in s for s in again) and len(again) == 2


# -- quality gates and maintenance policy -------------------------------------------------------------------
def test_rules_cover_keys_and_ranges():
    for spec in T.tables():
        rules = rules_for(spec)
        names = [r.name for r in rules]
        assert names[: len(spec.keys)] == [f"{k}_not_null" for k in spec.keys]
        assert len(set(names)) == len(names), spec.name
    assert set(RANGE_RULES) == set(T.TABLES)
    merchant = {r.name: r.condition for r in rules_for(T.table("gold/merchant_features"))}
    assert "BETWEEN 0 AND 1" in merchant["merchant_fraud_rate_in_0_1"]
    assert "amount > 0" in {r.name: r.condition for r in rules_for(T.table("silver/transactions"))}["amount_positive"]


def test_gate_errors_name_table_rule_and_counts():
    check_balance("silver/transactions", "bronze_rows_accounted", 10, {"inserted": 7, "duplicates": 1, "quarantined": 2})
    with pytest.raises(QualityGateError) as info:
        check_balance("silver/transactions", "bronze_rows_accounted", 10, {"inserted": 7, "duplicates": 1, "quarantined": 1})
    text = str(info.value)
    assert "table silver/transactions" in text and "rule bronze_rows_accounted" in text
    assert "rows_in=10" in text and "inserted=7" in text and "quarantined=1" in text and "+1 rows unaccounted" in text
    assert info.value.counts["accounted"] == 9
    with pytest.raises(QualityGateError, match=r"table gold/x, rule r: n: expected 3, got 2"):
        check_equal("gold/x", "r", 3, 2, "n")


def test_vacuum_retention_policy():
    assert check_retention(168) == 168.0
    assert check_retention(500) == 500.0
    with pytest.raises(RetentionError, match="below 168 h"):
        check_retention(24)
    assert check_retention(0, allow_short_retention=True) == 0.0
    with pytest.raises(RetentionError, match=">= 0"):
        check_retention(-1, allow_short_retention=True)


def test_job_arguments(monkeypatch):
    from decisionflow.jobs import build_lakehouse, maintain_lakehouse, migrate_lakehouse

    monkeypatch.delenv("DECISIONFLOW_LAKE_ROOT", raising=False)
    with pytest.raises(SystemExit) as info:
        build_lakehouse.parse_args([])
    assert info.value.code == 2
    assert build_lakehouse.parse_args(["--lake-root", "/l"]).stage == "all"
    with pytest.raises(SystemExit):
        build_lakehouse.parse_args(["--lake-root", "/l", "--stage", "bronze"])
    monkeypatch.setenv("DECISIONFLOW_LAKE_ROOT", "/from-env")
    assert migrate_lakehouse.parse_args([]).lake_root == "/from-env"
    assert maintain_lakehouse.parse_args([]).retention_hours == 168
    with pytest.raises(SystemExit) as info:
        maintain_lakehouse.parse_args(["--retention-hours", "1"])
    assert info.value.code == 2
    assert maintain_lakehouse.parse_args(["--retention-hours", "1", "--allow-short-retention"]).retention_hours == 1


# -- silver's format checks agree with Python's ---------------------------------------------------------------
@pytest.mark.parametrize("value", [
    "1.2.3.4", "255.255.255.255", "256.1.1.1", "01.2.3.4", "1.2.3", "::", "::1", "2a03:1:2::3", "fe80::1:2:3:4",
    "1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8:9", "1::2::3", "::ffff:1.2.3.4", "64:ff9b::1.2.3.4", "12345::", "localhost", "",
])
def test_ip_format_regexes_match_python(value):
    def py(kind, text):
        try:
            kind(text)
            return True
        except ValueError:
            return False

    assert bool(re.match(_IPV4, value)) == py(ipaddress.IPv4Address, value), value
    assert bool(re.match(_IPV6, value)) == py(ipaddress.IPv6Address, value), value


def test_every_contract_format_has_a_sql_check():
    supported = {"date-time", "uuid", "ipv4", "ipv6", "date"}
    for topic in SOURCE_TOPICS:
        for item in contract(topic).fields:
            assert set(item.formats) <= supported, (topic, item.name, item.formats)
