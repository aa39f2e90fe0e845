"""Silver, quarantine, gold, migrations, maintenance and quality gates on real Spark + Delta.

One in-process SparkSession (``local_spark_session``, module-scoped) and one lake built once from the seeded
generator: bronze tables are written here from ``decisionflow.risk.generator`` messages with fake Kafka
partitions/offsets (no Kafka needed), then migrate -> silver -> gold. Tests run in file order: the rerun
and late-correction tests change the module lake, the maintenance and gate-failure tests come last. One test
runs the real ``spark-submit`` of ``jobs/build_lakehouse.py`` on its own small lake.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest

import decisionflow.jobs
from decisionflow.contracts import CASE_NOTES, LABELS, TRANSACTIONS, validate_message
from decisionflow.lakehouse import gold, maintenance, quality, silver
from decisionflow.lakehouse.tables import (
    BRONZE_TABLES,
    PROPERTY_SCHEMA_VERSION,
    AddColumn,
    Column,
    IncompatibleTableError,
    Migration,
    TableSpec,
    join_path,
    table,
)
from decisionflow.risk.generator import REPLACING_KINDS, EventGenerator, GeneratorConfig
from .lake_builder import bronze_rows, write_bronze

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

JOB = Path(decisionflow.jobs.__file__).parent / "build_lakehouse.py"
GOLD = gold.GOLD_TABLES
SILVER_KEEPS = {"valid", "unknown_fields", "late", "out_of_order"}
EVENTS, SEED = 1500, 11


def contents(spark, lake: str, name: str, version: int | None = None) -> dict[str, dict]:
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    return {r["event_id"]: r.asDict() for r in reader.load(join_path(lake, name)).collect()}


def history(spark, lake: str, name: str):
    from delta.tables import DeltaTable

    return DeltaTable.forPath(spark, join_path(lake, name)).history().orderBy("version").collect()


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    from decisionflow.spark.conf import local_spark_session

    warehouse = tmp_path_factory.mktemp("warehouse")
    session = local_spark_session("test-lakehouse", conf={"spark.sql.shuffle.partitions": 2,
                                                          "spark.sql.warehouse.dir": str(warehouse)})
    yield session
    session.stop()


@pytest.fixture(scope="module")
def built(spark, tmp_path_factory):
    """The module lake: bronze from ~1500 generated transactions (+ labels, notes, 15% bad input), built once."""
    lake = str(tmp_path_factory.mktemp("lake"))
    messages = list(EventGenerator(GeneratorConfig(events=EVENTS, seed=SEED, bad_share=0.15)))
    rows, truth = bronze_rows(messages)
    write_bronze(spark, lake, rows)
    timings = {}
    mark = time.monotonic()
    migrations = maintenance.migrate(spark, lake)
    timings["migrate"] = time.monotonic() - mark
    mark = time.monotonic()
    silver_results = silver.run_silver(spark, lake)
    timings["silver"] = time.monotonic() - mark
    mark = time.monotonic()
    gold_results = gold.run_gold(spark, lake)
    timings["gold"] = time.monotonic() - mark
    print(f"\n[lakehouse build, {EVENTS} events, {sum(len(r) for r in rows.values())} bronze rows] "
          + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return {"lake": lake, "messages": messages, "rows": rows, "truth": truth, "migrations": migrations,
            "silver": silver_results, "gold": gold_results}


# -- silver and quarantine ----------------------------------------------------------------------------------
def test_silver_and_quarantine_account_for_every_bronze_row(spark, built):
    lake, truth = built["lake"], built["truth"]
    assert {m["action"] for m in built["migrations"]} == {"created"}
    for topic, bronze_name in BRONZE_TABLES.items():
        flow = silver.FLOWS[topic]
        result = built["silver"][flow.silver]
        totals = result.totals()
        bronze_count = len(built["rows"][topic])
        assert result.status == "ok" and result.batches, result.summary()
        assert totals["rows_in"] == bronze_count
        assert totals["inserted"] + totals["duplicates"] + totals["quarantined"] == bronze_count, totals
        assert totals["quarantine_inserted"] == totals["quarantined"]

        silver_df = spark.read.format("delta").load(join_path(lake, flow.silver))
        quarantine_df = spark.read.format("delta").load(join_path(lake, flow.quarantine))
        in_silver = {(r[0], r[1], r[2]) for r in silver_df.select("source_topic", "source_partition", "source_offset").collect()}
        in_quarantine = {(r[0], r[1], r[2]) for r in quarantine_df.select("source_topic", "source_partition", "source_offset").collect()}
        assert not in_silver & in_quarantine
        mine = {k: m for k, m in truth.items() if k[0] == topic}
        duplicates = {k for k, m in mine.items() if m.kind == "duplicate"}
        # every bronze record is in exactly one place: silver, quarantine, or a skipped exact re-send
        assert in_silver | in_quarantine | duplicates == set(mine)
        assert len(in_silver) + len(in_quarantine) + len(duplicates) == bronze_count
        assert len(duplicates) == totals["duplicates"] and totals["duplicates_conflicting"] == 0
        assert {k for k, m in mine.items() if m.kind in SILVER_KEEPS} == in_silver
        assert result.versions[flow.silver] == {"before": 0, "after": 1}


def test_no_duplicate_keys_and_duplicates_collapse_to_the_first_arrival(spark, built):
    from pyspark.sql import functions as F

    lake = built["lake"]
    for topic in (TRANSACTIONS, LABELS, CASE_NOTES):
        spec = silver.FLOWS[topic].silver_spec
        df = spark.read.format("delta").load(join_path(lake, spec.name))
        assert df.count() == df.select(*spec.keys).distinct().count(), spec.name
    txn = {r["event_id"]: r for r in spark.read.format("delta").load(join_path(lake, "silver/transactions"))
           .select("event_id", "source_partition", "source_offset").collect()}
    firsts = {}
    for (topic, partition, offset), m in sorted(built["truth"].items()):
        if topic == TRANSACTIONS and m.kind in SILVER_KEEPS:
            firsts[m.event_id] = (partition, offset)
    resent = [m for m in built["messages"] if m.topic == TRANSACTIONS and m.kind == "duplicate"]
    assert resent, "the generator produced no duplicate transactions: raise bad_share"
    for m in resent:
        assert (txn[m.event_id]["source_partition"], txn[m.event_id]["source_offset"]) == firsts[m.event_id]
    assert set(txn) == set(firsts)
    late = spark.read.format("delta").load(join_path(lake, "silver/transactions")).where(
        F.col("event_id").isin([m.event_id for m in built["messages"] if m.kind in ("late", "out_of_order")])).count()
    assert late == sum(1 for m in built["messages"] if m.topic == TRANSACTIONS and m.kind in ("late", "out_of_order"))


def test_quarantine_reasons_match_the_generator_and_python_contracts(spark, built):
    lake, truth = built["lake"], built["truth"]
    seen_kinds = set()
    for topic in (TRANSACTIONS, LABELS, CASE_NOTES):
        flow = silver.FLOWS[topic]
        rows = spark.read.format("delta").load(join_path(lake, flow.quarantine)).collect()
        expected = {k for k, m in truth.items() if k[0] == topic and m.kind in REPLACING_KINDS}
        assert {(r.source_topic, r.source_partition, r.source_offset) for r in rows} == expected
        for r in rows:
            m = truth[(r.source_topic, r.source_partition, r.source_offset)]
            assert r.reason_kind == m.kind, (r.reason, m.kind)
            assert r.reason.startswith(m.kind), r.reason
            seen_kinds.add(m.kind)
            if m.kind == "schema_violation":
                assert r.reason.startswith(f"schema_violation: {m.violation}:"), (r.reason, m.violation)
                assert r.violations and r.violations[0] == r.reason.split(": ", 1)[1]
            if m.kind == "tombstone":
                assert r.value is None and r.value_preview is None
            else:
                assert bytes(r.value) == m.value and r.value_size == len(m.value)
                assert r.value_preview and len(r.value_preview) <= silver.PREVIEW_CHARS
            assert r.quarantined_at is not None and r.key == (m.key.decode() if m.key else None)
        # Python's validator and the generated Spark SQL agree on every record
        accepted = {(r[0], r[1]) for r in spark.read.format("delta").load(join_path(lake, flow.silver))
                    .select("source_partition", "source_offset").collect()}
        for (t, partition, offset), m in truth.items():
            if t != topic or m.kind == "duplicate":
                continue
            assert validate_message(topic, m.value).ok == ((partition, offset) in accepted), (m.kind, m.violation)
    assert seen_kinds == set(REPLACING_KINDS)
    # unknown fields are kept as names, nothing else has any
    unknown = {r.event_id: r.unknown_fields for r in spark.read.format("delta")
               .load(join_path(lake, "silver/transactions")).select("event_id", "unknown_fields").collect()}
    extra = {m.event_id for m in built["messages"] if m.topic == TRANSACTIONS and m.kind == "unknown_fields"}
    assert extra and all(unknown[e] for e in extra)
    assert all(not v for e, v in unknown.items() if e not in extra)


# -- gold ---------------------------------------------------------------------------------------------------
def _reference_features(spark, lake):
    """Account and merchant features recomputed in plain Python from silver (the definitions, literally)."""
    from pyspark.sql import functions as F

    txns = [r.asDict() for r in spark.read.format("delta").load(join_path(lake, "silver/transactions"))
            .select("event_id", "account_id", "merchant_id", "amount", "device_id", "country",
                    F.unix_micros("event_time").alias("ts")).collect()]
    labels = [r.asDict() for r in spark.read.format("delta").load(join_path(lake, "silver/labels"))
              .select("event_id", "label", "source", F.unix_micros("labelled_at").alias("ts")).collect()]
    hour, day, week = 3600 * 10**6, 24 * 3600 * 10**6, 7 * 24 * 3600 * 10**6
    by_account, by_merchant, labels_of = defaultdict(list), defaultdict(list), defaultdict(list)
    for t in txns:
        by_account[t["account_id"]].append(t)
        by_merchant[t["merchant_id"]].append(t)
    for lab in labels:
        labels_of[lab["event_id"]].append(lab)
    account, merchant = {}, {}
    for t in txns:
        mine = by_account[t["account_id"]]

        def win(w):
            return [o for o in mine if t["ts"] - w < o["ts"] <= t["ts"]]

        w7 = win(week)
        others = [o["ts"] for o in mine if o["ts"] <= t["ts"] and o["event_id"] != t["event_id"]]
        account[t["event_id"]] = {
            "txn_count_1h": len(win(hour)), "txn_count_24h": len(win(day)), "txn_count_7d": len(w7),
            "amount_sum_24h": sum(o["amount"] for o in win(day)),
            "distinct_devices_24h": len({o["device_id"] for o in win(day) if o["device_id"] is not None}),
            "distinct_countries_7d": len({o["country"] for o in w7}),
            "seconds_since_prev_txn": (t["ts"] - max(others)) / 1e6 if others else None,
            "amount_to_avg_7d": t["amount"] / (sum(o["amount"] for o in w7) / len(w7)),
        }
        shop = by_merchant[t["merchant_id"]]
        known = fraud = 0
        for o in shop:
            visible = sorted((lab for lab in labels_of[o["event_id"]] if lab["ts"] <= t["ts"]),
                             key=lambda lab: (lab["ts"], lab["source"], lab["label"] == "fraud"))
            if visible:
                known += 1
                fraud += visible[-1]["label"] == "fraud"
        merchant[t["event_id"]] = {
            "merchant_txn_count_24h": sum(1 for o in shop if t["ts"] - day < o["ts"] <= t["ts"]),
            "merchant_txn_count_7d": sum(1 for o in shop if t["ts"] - week < o["ts"] <= t["ts"]),
            "merchant_labels_known": known, "merchant_fraud_labels": fraud,
            "merchant_fraud_rate": fraud / known if known else None,
        }
    return account, merchant


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def test_gold_matches_a_python_reference(spark, built):
    lake = built["lake"]
    silver_rows = spark.read.format("delta").load(join_path(lake, "silver/transactions")).count()
    for name in GOLD:
        result = built["gold"][name]
        assert result.mode == "full" and result.rows == silver_rows and result.inserted == silver_rows, result.summary()
    account_ref, merchant_ref = _reference_features(spark, lake)
    account = contents(spark, lake, "gold/account_features")
    merchant = contents(spark, lake, "gold/merchant_features")
    enriched = contents(spark, lake, "gold/transactions_enriched")
    assert set(account) == set(merchant) == set(enriched) == set(account_ref)
    for event_id, ref in account_ref.items():
        for key, value in ref.items():
            assert _close(account[event_id][key], value), (event_id, key, account[event_id][key], value)
            assert _close(enriched[event_id][key], value), (event_id, key)
    for event_id, ref in merchant_ref.items():
        for key, value in ref.items():
            assert _close(merchant[event_id][key], value), (event_id, key, merchant[event_id][key], value)
    labelled = [r for r in enriched.values() if r["label"] is not None]
    assert labelled and all(r["is_fraud"] == (r["label"] == "fraud") and r["label_source"] for r in labelled)
    assert any(r["merchant_fraud_rate"] is not None for r in merchant.values())


def test_rerun_changes_no_gold_row(spark, built):
    lake = built["lake"]
    names = [*GOLD, "silver/transactions", "quarantine/transactions", "silver/labels"]
    before = {name: quality.delta_version(spark, join_path(lake, name)) for name in names}
    snapshot = {name: contents(spark, lake, name) for name in GOLD}

    again = maintenance.migrate(spark, lake)
    assert {m["action"] for m in again} == {"up-to-date"} and not any(m["statements"] for m in again)
    rerun_silver = silver.run_silver(spark, lake)
    assert all(r.totals()["rows_in"] == 0 for r in rerun_silver.values())
    incremental = gold.run_gold(spark, lake)
    assert {r.mode for r in incremental.values()} == {"skipped"}
    full = gold.run_gold(spark, lake, full_refresh=True)
    for name, result in full.items():
        assert result.mode == "full" and result.source_rows == len(snapshot[name])
        assert (result.changed, result.inserted, result.updated, result.deleted) == (0, 0, 0, 0), result.summary()

    after = {name: quality.delta_version(spark, join_path(lake, name)) for name in names}
    assert after == before, "a rerun over the same data committed something"
    for name in GOLD:
        assert contents(spark, lake, name) == snapshot[name]  # updated_at included: no row was rewritten
        commits = history(spark, lake, name)
        assert commits[-1]["version"] == before[name]
        data_commits = [c for c in commits if c["operation"] == "MERGE"]
        assert len(data_commits) == 1  # the first build; reruns added none
        metrics = data_commits[0]["operationMetrics"]
        assert int(metrics["numTargetRowsUpdated"]) == 0 and int(metrics["numTargetRowsDeleted"]) == 0
        assert json.loads(data_commits[0]["userMetadata"])[gold.METADATA_KEY]["table"] == name
    built["versions_before_correction"] = before
    built["snapshot_before_correction"] = snapshot


def test_late_correction_changes_exactly_the_dependent_gold_rows(spark, built):
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    lake = built["lake"]
    before = built.get("versions_before_correction") or {n: quality.delta_version(spark, join_path(lake, n)) for n in GOLD}
    txn = spark.read.format("delta").load(join_path(lake, "silver/transactions")).select(
        "event_id", "account_id", "merchant_id", "amount", F.unix_micros("event_time").alias("ts")).collect()
    by_account = defaultdict(list)
    for r in txn:
        by_account[r.account_id].append(r)
    week = 7 * 24 * 3600 * 10**6

    def dependents(x):
        return {r.event_id for r in by_account[x.account_id] if x.ts <= r.ts < x.ts + week}

    # a transaction whose correction touches several, but not all, of its account's rows
    x = max((r for r in txn if len(dependents(r)) < len(by_account[r.account_id])), key=lambda r: len(dependents(r)))
    expected = dependents(x)
    assert 2 <= len(expected) < len(by_account[x.account_id])

    correction = spark.createDataFrame([(x.event_id, x.amount * 2 + 1.25)], "event_id string, amount double")
    (DeltaTable.forPath(spark, join_path(lake, "silver/transactions")).alias("t")
     .merge(correction.alias("s"), "t.event_id = s.event_id")
     .whenMatchedUpdate(set={"amount": "s.amount"}).execute())

    results = gold.run_gold(spark, lake)
    acc, mer, enr = (results[n] for n in GOLD)
    assert acc.mode == "incremental" and acc.scope == 1 and acc.updated == len(expected) and acc.inserted == 0
    assert mer.mode == "incremental" and mer.changed == 0 and mer.versions["after"] == before["gold/merchant_features"]
    assert enr.mode == "incremental" and enr.updated == len(expected)

    for name in ("gold/account_features", "gold/transactions_enriched"):
        old = contents(spark, lake, name, version=before[name])  # time travel to the version before
        new = contents(spark, lake, name)
        changed = {k for k in new if {c: v for c, v in new[k].items() if c != "updated_at"}
                   != {c: v for c, v in old[k].items() if c != "updated_at"}}
        assert changed == expected, name
        assert {k for k in new if new[k]["updated_at"] != old[k]["updated_at"]} == expected
        assert set(old) == set(new)
        if "snapshot_before_correction" in built:
            assert old == built["snapshot_before_correction"][name]
        merges = [c for c in history(spark, lake, name) if c["version"] > before[name]]
        assert [c["operation"] for c in merges] == ["MERGE"]
        assert int(merges[0]["operationMetrics"]["numTargetRowsUpdated"]) == len(expected)
    corrected = contents(spark, lake, "gold/transactions_enriched")[x.event_id]
    assert corrected["amount"] == x.amount * 2 + 1.25
    # and a rerun after the correction changes nothing (merchant features may recompute their scope again:
    # their no-op run made no commit to record its input versions in)
    versions = {n: quality.delta_version(spark, join_path(lake, n)) for n in GOLD}
    rerun = gold.run_gold(spark, lake)
    assert all(r.changed == 0 and r.deleted == 0 for r in rerun.values())
    assert {n: quality.delta_version(spark, join_path(lake, n)) for n in GOLD} == versions


# -- point in time on a hand-built example ------------------------------------------------------------------
def test_point_in_time_windows_and_merchant_fraud_rate(spark):
    from pyspark.sql import functions as F

    txn = spark.createDataFrame([
        ("e1", "a1", "m1", "2025-01-06T10:00:00Z", 10.0, "d1", "US"),
        ("e2", "a1", "m1", "2025-01-06T10:30:00Z", 20.0, "d2", "US"),
        ("e3", "a1", "m1", "2025-01-06T11:00:00Z", 30.0, "d1", "GB"),
        ("e7", "a2", "m1", "2025-01-06T12:00:00Z", 5.0, None, "US"),
        ("e8", "a2", "m1", "2025-01-06T14:00:00Z", 5.0, None, "US"),
        ("e4", "a1", "m1", "2025-01-07T10:00:00Z", 40.0, None, "US"),
        ("e5", "a1", "m1", "2025-01-07T10:00:00Z", 50.0, "d3", "US"),
        ("e6", "a1", "m1", "2025-01-14T10:00:00Z", 60.0, "d1", "US"),
        ("e9", "a3", "m2", "2025-01-06T09:00:00Z", 7.0, None, "FR"),
    ], "event_id string, account_id string, merchant_id string, t string, amount double, device_id string, country string"
    ).withColumn("event_time", F.col("t").cast("timestamp")).drop("t")
    labels = spark.createDataFrame([
        ("e1", "fraud", "investigation", "2025-01-06T12:00:00Z"),
        ("e2", "legit", "investigation", "2025-01-06T13:00:00Z"),
        ("e2", "fraud", "chargeback", "2025-01-07T09:00:00Z"),   # relabelled later
        ("e9", "fraud", "investigation", "2025-01-06T11:30:00Z"),  # another merchant's: never counts for m1
    ], "event_id string, label string, source string, t string").withColumn("labelled_at", F.col("t").cast("timestamp")).drop("t")

    acc = {r.event_id: r for r in gold.account_features(txn).collect()}
    # 1h window (10:00, 11:00]: e1 at exactly t-1h is out; future transactions never count
    assert (acc["e3"].txn_count_1h, acc["e3"].amount_sum_1h) == (2, 50.0)
    assert (acc["e3"].txn_count_24h, acc["e3"].amount_sum_24h, acc["e3"].txn_count_7d) == (3, 60.0, 3)
    assert (acc["e3"].distinct_devices_24h, acc["e3"].distinct_countries_24h) == (2, 2)
    assert acc["e3"].seconds_since_prev_txn == 1800.0 and acc["e3"].amount_to_avg_7d == 1.5
    assert acc["e1"].seconds_since_prev_txn is None and acc["e1"].amount_to_avg_7d == 1.0
    # e4 and e5 share a timestamp: both see each other (earlier-or-equal), e1 (exactly 24h before) is out
    for e in ("e4", "e5"):
        assert (acc[e].txn_count_24h, acc[e].amount_sum_24h, acc[e].txn_count_7d) == (4, 140.0, 5)
        assert acc[e].seconds_since_prev_txn == 0.0 and acc[e].distinct_devices_24h == 3
    assert acc["e5"].amount_to_avg_7d == pytest.approx(50 / (150 / 5))
    # 7d window (01-07 10:00, 01-14 10:00]: e4/e5 exactly 7d before are out
    assert (acc["e6"].txn_count_7d, acc["e6"].amount_sum_7d, acc["e6"].amount_to_avg_7d) == (1, 60.0, 1.0)
    assert acc["e6"].seconds_since_prev_txn == 7 * 24 * 3600.0

    mer = {r.event_id: r for r in gold.merchant_features(txn, labels).collect()}
    rate = {e: (r.merchant_labels_known, r.merchant_fraud_labels, r.merchant_fraud_rate) for e, r in mer.items()}
    assert rate["e3"] == (0, 0, None)    # e1's label (12:00) is not known at 11:00: no leakage
    assert rate["e7"] == (1, 1, 1.0)     # labelled_at == t counts
    assert rate["e8"] == (2, 1, 0.5)     # e2 legit at 13:00
    assert rate["e4"] == rate["e5"] == rate["e6"] == (2, 2, 1.0)  # e2 relabelled fraud at 01-07 09:00
    assert rate["e9"] == (0, 0, None)    # its own label comes after it
    assert (mer["e7"].merchant_txn_count_24h, mer["e4"].merchant_txn_count_24h, mer["e4"].merchant_txn_count_7d) == (4, 6, 7)

    latest = {r.event_id: (r.label, r.label_source, r.is_fraud) for r in gold.latest_labels(labels).collect()}
    assert latest == {"e1": ("fraud", "investigation", True), "e2": ("fraud", "chargeback", True),
                      "e9": ("fraud", "investigation", True)}

    # a failed gate names the table, the rule and the counts
    broken = (gold.merchant_features(txn, labels).withColumn("updated_at", F.current_timestamp())
              .withColumn("merchant_fraud_rate", F.when(F.col("event_id") == "e8", 1.5).otherwise(F.col("merchant_fraud_rate"))))
    with pytest.raises(quality.QualityGateError) as info:
        quality.check_table(broken, "gold/merchant_features")
    text = str(info.value)
    assert "table gold/merchant_features" in text and "rule merchant_fraud_rate_in_0_1" in text
    assert "1 of 9 rows violate" in text and "rows=9" in text and info.value.counts["violating[merchant_fraud_rate_in_0_1]"] == 1
    dup = broken.unionByName(broken.where("event_id = 'e1'")).withColumn("merchant_fraud_rate", F.lit(None).cast("double"))
    with pytest.raises(quality.QualityGateError, match=r"rule unique_event_id: 1 of 10 rows"):
        quality.check_table(dup.withColumn("merchant_labels_known", F.lit(0).cast("long"))
                            .withColumn("merchant_fraud_labels", F.lit(0).cast("long")), "gold/merchant_features")


# -- migrations ---------------------------------------------------------------------------------------------
def test_migrations_create_add_a_column_and_are_idempotent(spark, tmp_path):
    lake = str(tmp_path / "lake")
    columns = (Column("id", "STRING", nullable=False), Column("n", "BIGINT"), Column("tier", "STRING"))
    v1 = TableSpec("gold/test_items", columns[:2], keys=("id",), description="v1")
    v2 = TableSpec("gold/test_items", columns, keys=("id",), description="v2", migrations=(
        Migration(2, "add tier with a default", (AddColumn(Column("tier", "STRING"), default="'unknown'"),)),))
    path = v1.path(lake)

    assert maintenance.tables_needing_migration(lake, specs=[v1]) == {"gold/test_items": "missing"}
    assert [m["action"] for m in maintenance.migrate(spark, lake, [v1])] == ["created"]
    assert maintenance.tables_needing_migration(lake, specs=[v1]) == {}  # what lets build_lakehouse skip Spark
    assert maintenance.tables_needing_migration(lake, specs=[v2]) == {"gold/test_items": "schema version 1, declared 2"}
    spark.sql(f"INSERT INTO delta.`{path}` VALUES ('a', 1), ('b', 2)")
    first = maintenance.migrate(spark, lake, [v2])[0]
    assert first["action"] == "migrated" and first["from_version"] == 1 and first["applied"] == [2]
    assert any("ADD COLUMNS (`tier` STRING)" in s for s in first["statements"])
    assert sorted(tuple(r) for r in spark.read.format("delta").load(path).collect()) == [("a", 1, "unknown"), ("b", 2, "unknown")]
    props = {r.key: r.value for r in spark.sql(f"SHOW TBLPROPERTIES delta.`{path}`").collect()}
    assert props[PROPERTY_SCHEMA_VERSION] == "2" and props["decisionflow.migration.2"] == "add tier with a default"
    version = quality.delta_version(spark, path)
    second = maintenance.migrate(spark, lake, [v2])[0]
    assert second["action"] == "up-to-date" and second["statements"] == [] and second["version"] == version
    assert maintenance.tables_needing_migration(lake, specs=[v2]) == {}

    # the declared enriched table, created at schema version 1, gets its real migration
    enriched = table("gold/transactions_enriched")
    old = enriched.path(lake)
    spark.sql(f"CREATE TABLE delta.`{old}` ({enriched.ddl(1)}) USING DELTA TBLPROPERTIES "
              f"('{PROPERTY_SCHEMA_VERSION}' = '1', 'decisionflow.table' = '{enriched.name}', "
              "'delta.enableChangeDataFeed' = 'true')")
    step = maintenance.migrate(spark, lake, [enriched])[0]
    assert step["action"] == "migrated" and step["applied"] == [2]
    assert "label_source" in spark.read.format("delta").load(old).columns
    assert maintenance.migrate(spark, lake, [enriched])[0]["action"] == "up-to-date"
    assert maintenance.tables_needing_migration(lake, specs=[enriched]) == {}

    # the audit trail of a deployment from before schema version 2 (written by delta-rs) is migrated by Spark,
    # old rows backfilled brain = 'policy', and delta-rs writes v2 decisions into it afterwards
    import dataclasses

    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    from decisionflow.decisions import _delta, audit

    from unit.decision_rows import make_decisions  # tests/ is on sys.path (rootdir conftest)

    decisions = table("gold/decisions")
    v1_audit = dataclasses.replace(decisions, columns=decisions.columns_at(1), migrations=())
    _delta.open_table(v1_audit, lake, create=True)
    old_rows = make_decisions(3).drop(columns=["band", "brain"])
    write_deltalake(decisions.path(lake), _delta.conform(pa.Table.from_pandas(old_rows, preserve_index=False),
                                                  _delta.arrow_schema(v1_audit)),
                    mode="append")
    assert maintenance.tables_needing_migration(lake, specs=[decisions]) == {
        "gold/decisions": "schema version 1, declared 2"}
    step = maintenance.migrate(spark, lake, [decisions])[0]
    assert step["action"] == "migrated" and step["applied"] == [2]
    assert audit.write_decisions(lake, make_decisions(2, start=10)) == 2
    back = DeltaTable(decisions.path(lake)).to_pandas()
    assert len(back) == 5 and (back["brain"] == "policy").all() and back["reviewed_at"].isna().all()

    # an incompatible existing table is refused, naming table and column, and left alone
    bad = TableSpec("gold/test_bad", columns[:2], keys=("id",), description="bad")
    spark.sql(f"CREATE TABLE delta.`{bad.path(lake)}` (id STRING NOT NULL, n STRING) USING DELTA")
    with pytest.raises(IncompatibleTableError) as info:
        maintenance.migrate(spark, lake, [bad])
    assert "table gold/test_bad, column n: is string in the table, declared bigint" in str(info.value)
    assert quality.delta_version(spark, bad.path(lake)) == 0


def test_every_declared_table_is_current_after_migrate_and_build(built):
    """What the build_lakehouse DAG's migrate task reads (without Spark) before deciding to skip the job."""
    assert maintenance.tables_needing_migration(built["lake"]) == {}


# -- maintenance, report, and a gate failing inside a stage -------------------------------------------------
def test_optimize_vacuum_and_quality_report(spark, built):
    lake = built["lake"]
    optimized = {o["table"]: o for o in maintenance.optimize(spark, lake)}
    assert set(optimized) == {s.name for s in maintenance.tables()}
    assert optimized["silver/transactions"]["zorder_by"] == ["account_id", "merchant_id"]
    with pytest.raises(maintenance.RetentionError, match="--allow-short-retention"):
        maintenance.vacuum(spark, lake, 1)
    vacuumed = maintenance.vacuum(spark, lake)  # 168 h: nothing old enough to delete yet
    assert all(v["parquet_files_after"] == v["parquet_files_before"] for v in vacuumed)

    report = quality.quality_report(spark, lake)
    path = Path(quality.write_report(spark, lake, report))
    assert path.parent == Path(lake, "_reports", "quality") and path.suffix == ".json"
    saved = json.loads(path.read_text())
    tables = saved["tables"]
    assert tables["bronze/transactions"]["rows"] == len(built["rows"][TRANSACTIONS])
    assert tables["silver/transactions"]["null_share"]["event_id"] == 0.0
    assert 0 < tables["silver/transactions"]["null_share"]["device_id"] < 1
    assert tables["gold/account_features"]["version"] == quality.delta_version(spark, join_path(lake, "gold/account_features"))
    q = saved["quarantine"]["transactions"]
    assert set(q["by_reason"]) == set(REPLACING_KINDS)
    assert q["quarantined"] == sum(v["rows"] for v in q["by_reason"].values())
    assert q["share"] == pytest.approx(q["quarantined"] / q["bronze_rows"], abs=1e-6)


def test_failed_gate_inside_the_build_names_table_rule_and_counts(spark, built, tmp_path):
    from decisionflow.exceptions import EXIT_NON_RETRYABLE
    from decisionflow.jobs import build_lakehouse

    lake = built["lake"]
    path = join_path(lake, "gold/account_features")
    victim = min(contents(spark, lake, "gold/account_features"))
    spark.sql(f"UPDATE delta.`{path}` SET txn_count_1h = -1 WHERE event_id = '{victim}'")
    enriched_version = quality.delta_version(spark, join_path(lake, "gold/transactions_enriched"))
    summary_path = tmp_path / "summary.json"
    code = build_lakehouse.main(["--lake-root", lake, "--stage", "gold", "--no-migrate", "--summary-path", str(summary_path)])
    assert code == EXIT_NON_RETRYABLE  # a failed gate fails the same way on every try: the operator won't retry
    summary = json.loads(summary_path.read_text())
    assert summary["ok"] is False
    assert summary["failed_gate"]["table"] == "gold/account_features"
    assert summary["failed_gate"]["rule"] == "txn_count_1h_non_negative"
    assert summary["failed_gate"]["counts"]["violating[txn_count_1h_non_negative]"] == 1
    assert summary["failed_gate"]["counts"]["rows"] == len(contents(spark, lake, "gold/account_features"))
    assert "table gold/account_features, rule txn_count_1h_non_negative: 1 of" in summary["error"]
    # the stage stopped at the failing table: the enriched table did not consume the bad row
    assert quality.delta_version(spark, join_path(lake, "gold/transactions_enriched")) == enriched_version
    assert spark.range(1).count() == 1  # the job did not stop the session it did not create


# -- the real spark-submit ----------------------------------------------------------------------------------
def test_build_lakehouse_spark_submit(spark, tmp_path):
    from decisionflow.spark.conf import spark_env, spark_submit_argv

    lake = str(tmp_path / "lake")
    rows, _ = bronze_rows(EventGenerator(GeneratorConfig(events=400, seed=5, bad_share=0.1)))
    write_bronze(spark, lake, rows)
    summary_path = tmp_path / "summary.json"
    argv = spark_submit_argv(JOB, ["--stage", "all", "--summary-path", str(summary_path)], master="local[2]",
                             conf={"spark.sql.shuffle.partitions": 2, "spark.sql.warehouse.dir": str(tmp_path / "wh")},
                             name="build_lakehouse_test")
    started = time.monotonic()
    proc = subprocess.run(argv, env={**os.environ, **spark_env(lake_root=lake)}, capture_output=True, text=True,
                          timeout=1500)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = proc.stdout.strip().splitlines()[-1]
    summary = json.loads(line)
    assert summary == json.loads(summary_path.read_text())
    print(f"\n[spark-submit build_lakehouse, 400 events] {seconds:.1f}s wall; job: "
          f"{ {k: v for k, v in summary.items() if k.endswith('_s')} }")
    assert summary["ok"] is True and summary["spark_version"] == "4.2.0" and summary["lake_root"] == lake
    assert set(summary["migrations"].values()) == {"created"}
    t = summary["tables"]
    txn = t["silver/transactions"]
    assert txn["rows_in"] == len(rows[TRANSACTIONS]) == txn["rows_out"] + txn["duplicates"] + txn["quarantined"]
    assert t["quarantine/transactions"]["rows_out"] == txn["quarantined"]
    assert (txn["version_before"], txn["version_after"]) == (0, 1)
    assert t["bronze/transactions"]["version_after"] == 0
    for name in GOLD:
        assert t[name]["rows"] == txn["rows"] == txn["rows_out"]
        assert t[name]["mode"] == "full" and (t[name]["version_before"], t[name]["version_after"]) == (0, 1)
    assert t["gold/transactions_enriched"]["sources"]["silver/transactions"] == 1
    # per-batch accounting is logged (spark-submit merges the Python driver's stderr into its own stdout)
    assert "silver/transactions batch 0: {'batch_id': 0, 'rows_in': " in proc.stdout + proc.stderr
