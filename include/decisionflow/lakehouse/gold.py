"""Gold: point-in-time account and merchant features and the enriched transactions, kept with MERGE.

Tables (declared in :mod:`decisionflow.lakehouse.tables`), all keyed by ``event_id`` (one row per silver
transaction) and timestamped by ``event_time``, so Feast can join them point-in-time on ``account_id`` /
``merchant_id`` (``updated_at`` is the created timestamp):

* ``gold/account_features`` - from the account's transactions with ``event_time`` at or before the row's
  (ties included): count and amount sum over (t-1h, t], (t-24h, t], (t-7d, t]; distinct device_id and
  country over 24h/7d; seconds since the latest other transaction at or before t (0 when one shares the
  timestamp, NULL for the first); amount / average amount over (t-7d, t].
* ``gold/merchant_features`` - the merchant's transaction counts over 24h/7d and its fraud rate from labels
  known at t: a label counts only when ``labelled_at <= t``, and a transaction relabelled later counts with
  its latest label known at t (no leakage).
* ``gold/transactions_enriched`` - the silver transaction + both feature rows + its latest label
  (label, labelled_at, label_source, is_fraud) for decisions and evaluation.

Sums are computed in DECIMAL (exact, so independent of row order) and stored as DOUBLE: recomputing the same
data always yields bit-identical values, which is what makes the change detection below sound.

**Idempotent, change-detecting MERGE** (:func:`merge_changes`). A recomputed row that equals the stored one
is dropped *before* the MERGE (``EXCEPT ALL`` against the target read at a pinned version), so unchanged rows
never reach Delta: a rerun over the same data makes no commit at all (a MERGE whose source matches rows
rewrites their files even when no clause fires). The MERGE itself updates a matched row only when a value
differs (``NOT (t.c <=> s.c) OR ...``), inserts new keys and deletes keys of the scope that no longer exist.

**Scope: recompute only what is affected.** Silver and gold tables have Delta's change data feed on. Each
gold commit records, in its ``userMetadata``, the versions of the inputs it was computed from; the next run
reads the input changes since then and recomputes:

* account features of every account that appears in a changed silver transaction (pre- and post-image, so a
  corrected account_id recomputes both accounts) - all of their rows, since a late event changes the windows
  of the account's later events;
* merchant features of every merchant of a changed transaction or of a transaction whose label changed;
* enriched rows of every transaction whose silver row, label, account features or merchant features changed.

A full recompute is used when there is no recorded state (first build), when the change feed is not
readable any more (vacuumed, or the table was recreated) or on request (``full_refresh``); it is the same
code with "everything" as the scope, and it also deletes gold rows whose transaction left silver.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from decisionflow.lakehouse.quality import check_equal, check_table, delta_version, is_delta_table
from decisionflow.lakehouse.tables import TableSpec, join_path, table
from decisionflow.spark.conf import SMALL_BATCH_SQL_CONF
from decisionflow.spark.conf import sql_conf as _sql_conf

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

__all__ = [
    "ACCOUNT_FEATURES",
    "ENRICHED",
    "GOLD_TABLES",
    "GoldResult",
    "MERCHANT_FEATURES",
    "METADATA_KEY",
    "account_features",
    "enriched",
    "last_sources",
    "latest_labels",
    "merchant_features",
    "merge_changes",
    "run_gold",
    "summarize",
]

log = logging.getLogger(__name__)

ACCOUNT_FEATURES = "gold/account_features"
MERCHANT_FEATURES = "gold/merchant_features"
ENRICHED = "gold/transactions_enriched"
GOLD_TABLES = (ACCOUNT_FEATURES, MERCHANT_FEATURES, ENRICHED)
SILVER_TXN = "silver/transactions"
SILVER_LABELS = "silver/labels"
#: Inputs of each gold table (their versions are recorded with every gold commit).
SOURCES: dict[str, tuple[str, ...]] = {
    ACCOUNT_FEATURES: (SILVER_TXN,),
    MERCHANT_FEATURES: (SILVER_TXN, SILVER_LABELS),
    ENRICHED: (SILVER_TXN, SILVER_LABELS, ACCOUNT_FEATURES, MERCHANT_FEATURES),
}
#: Key of the JSON object gold writes into the Delta commit's userMetadata.
METADATA_KEY = "decisionflow.gold"
USER_METADATA_CONF = "spark.databricks.delta.commitInfo.userMetadata"
_HISTORY_LOOKBACK = 100

_US = 1_000_000
HOUR_US, DAY_US, WEEK_US = 3600 * _US, 24 * 3600 * _US, 7 * 24 * 3600 * _US
_AMOUNT_DECIMAL = "decimal(18,6)"


@dataclass
class GoldResult:
    """One gold table's run."""

    table: str
    mode: str = "skipped"  # full | incremental | skipped (no input change)
    reason: str = ""
    scope: int | None = None  # keys recomputed (accounts / merchants / transactions); None = all
    source_rows: int = 0
    changed: int = 0
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    rows: int | None = None
    sources: dict[str, int | None] = field(default_factory=dict)
    versions: dict[str, int | None] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {k: (round(v, 2) if k == "seconds" else v) for k, v in self.__dict__.items() if k != "table"}


# -- reading inputs -----------------------------------------------------------------------------------------
def _read(spark: SparkSession, lake_root: str, name: str, version: int | None) -> DataFrame:
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    return reader.load(join_path(lake_root, name))


def last_sources(spark: SparkSession, path: str) -> dict[str, int] | None:
    """Input versions recorded by the latest gold commit of the table at ``path`` (None when unknown)."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    rows = (DeltaTable.forPath(spark, path).history(_HISTORY_LOOKBACK)
            .where(F.col("userMetadata").contains(METADATA_KEY))
            .orderBy(F.col("version").desc()).select("userMetadata").limit(1).collect())
    if not rows:
        return None
    try:
        return {k: int(v) for k, v in json.loads(rows[0][0])[METADATA_KEY]["sources"].items()}
    except (ValueError, KeyError, TypeError):
        return None


def _changes(spark: SparkSession, lake_root: str, name: str, since: int, until: int, columns: Iterable[str]) -> list[tuple] | None:
    """Distinct ``columns`` of rows changed in ``name`` in versions (since, until]; None when unreadable."""
    if until <= since:
        return []
    try:
        df = (spark.read.format("delta").option("readChangeFeed", "true")
              .option("startingVersion", since + 1).option("endingVersion", until)
              .load(join_path(lake_root, name)))
        return [tuple(r) for r in df.select(*columns).distinct().collect()]
    except Exception as exc:  # noqa: BLE001 - vacuumed change files, CDF off at that version, recreated table
        log.warning("change feed of %s (%s..%s) not readable (%s): full recompute", name, since + 1, until,
                    str(exc).splitlines()[0][:300])
        return None


# -- features -----------------------------------------------------------------------------------------------
def _range(partition: str, width_us: int | None):
    """Frame (t - width, t] over ``_ts`` (microseconds), peers included; ``None`` = everything up to t."""
    from pyspark.sql import Window

    w = Window.partitionBy(partition).orderBy("_ts")
    return w.rangeBetween(Window.unboundedPreceding if width_us is None else -(width_us - 1), 0)


def account_features(txn: DataFrame) -> DataFrame:
    """The ``gold/account_features`` rows (without ``updated_at``) of the transactions in ``txn``.

    Each account must be complete in ``txn``: the windows only see what is there.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    df = txn.select("event_id", "account_id", "event_time", "device_id", "country",
                    F.col("amount").cast(_AMOUNT_DECIMAL).alias("_amount"), F.unix_micros("event_time").alias("_ts"))
    h1, h24, d7 = (_range("account_id", w) for w in (HOUR_US, DAY_US, WEEK_US))
    by_account = Window.partitionBy("account_id").orderBy("_ts")
    earlier = by_account.rangeBetween(Window.unboundedPreceding, -1)
    peers = by_account.rangeBetween(0, 0)
    df = df.select(
        "event_id", "account_id", "event_time", "_amount",
        F.count(F.lit(1)).over(h1).alias("txn_count_1h"),
        F.count(F.lit(1)).over(h24).alias("txn_count_24h"),
        F.count(F.lit(1)).over(d7).alias("txn_count_7d"),
        F.sum("_amount").over(h1).alias("_sum_1h"),
        F.sum("_amount").over(h24).alias("_sum_24h"),
        F.sum("_amount").over(d7).alias("_sum_7d"),
        F.size(F.collect_set("device_id").over(h24)).alias("distinct_devices_24h"),
        F.size(F.collect_set("device_id").over(d7)).alias("distinct_devices_7d"),
        F.size(F.collect_set("country").over(h24)).alias("distinct_countries_24h"),
        F.size(F.collect_set("country").over(d7)).alias("distinct_countries_7d"),
        F.max("_ts").over(earlier).alias("_prev_ts"),
        F.count(F.lit(1)).over(peers).alias("_peers"),
        F.col("_ts"),
    )
    return df.select(
        "event_id", "account_id", "event_time",
        "txn_count_1h", "txn_count_24h", "txn_count_7d",
        F.col("_sum_1h").cast("double").alias("amount_sum_1h"),
        F.col("_sum_24h").cast("double").alias("amount_sum_24h"),
        F.col("_sum_7d").cast("double").alias("amount_sum_7d"),
        F.col("distinct_devices_24h").cast("int").alias("distinct_devices_24h"),
        F.col("distinct_devices_7d").cast("int").alias("distinct_devices_7d"),
        F.col("distinct_countries_24h").cast("int").alias("distinct_countries_24h"),
        F.col("distinct_countries_7d").cast("int").alias("distinct_countries_7d"),
        F.when(F.col("_peers") > 1, F.lit(0.0))
        .otherwise((F.col("_ts") - F.col("_prev_ts")) / F.lit(float(_US))).alias("seconds_since_prev_txn"),
        # in DOUBLE from the exact inputs (a DECIMAL quotient would be cut to 6 digits); still deterministic
        (F.col("_amount").cast("double") * F.col("txn_count_7d") / F.col("_sum_7d").cast("double"))
        .alias("amount_to_avg_7d"),
    )


def _label_order() -> list[Column]:
    """Order of an event's labels; the last is its latest (at equal times, fraud after legit: fraud wins)."""
    from pyspark.sql import functions as F

    return [F.col("labelled_at").asc(), F.col("source").asc(), F.col("label").desc()]


def merchant_features(txn: DataFrame, labels: DataFrame) -> DataFrame:
    """The ``gold/merchant_features`` rows (without ``updated_at``) of the transactions in ``txn``.

    ``labels`` are silver labels; those of transactions outside ``txn`` are ignored. Each merchant must be
    complete in ``txn``. The fraud rate at t counts each of the merchant's labelled transactions once, with
    its latest label among those with ``labelled_at <= t``: label events become +1/-1 deltas on a per-merchant
    timeline and a running sum up to t (peers included) gives the counts.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    lab = labels.join(txn.select("event_id", "merchant_id"), "event_id", "inner")
    per_event = Window.partitionBy("event_id").orderBy(*_label_order())
    lab = lab.select("merchant_id", "labelled_at", (F.col("label") == "fraud").cast("long").alias("_fraud"),
                     F.lag((F.col("label") == "fraud").cast("long")).over(per_event).alias("_prev_fraud"))
    label_events = lab.select(
        "merchant_id", F.unix_micros("labelled_at").alias("_ts"), F.lit(None).cast("string").alias("event_id"),
        F.lit(None).cast("timestamp").alias("event_time"), F.lit(0).cast("long").alias("_is_txn"),
        F.when(F.col("_prev_fraud").isNull(), 1).otherwise(0).cast("long").alias("_d_known"),
        (F.col("_fraud") - F.coalesce(F.col("_prev_fraud"), F.lit(0))).cast("long").alias("_d_fraud"),
    )
    txn_events = txn.select(
        "merchant_id", F.unix_micros("event_time").alias("_ts"), "event_id", "event_time",
        F.lit(1).cast("long").alias("_is_txn"), F.lit(0).cast("long").alias("_d_known"),
        F.lit(0).cast("long").alias("_d_fraud"),
    )
    timeline = txn_events.unionByName(label_events)
    upto = _range("merchant_id", None)
    df = timeline.select(
        "*",
        F.sum("_is_txn").over(_range("merchant_id", DAY_US)).alias("merchant_txn_count_24h"),
        F.sum("_is_txn").over(_range("merchant_id", WEEK_US)).alias("merchant_txn_count_7d"),
        F.sum("_d_known").over(upto).alias("merchant_labels_known"),
        F.sum("_d_fraud").over(upto).alias("merchant_fraud_labels"),
    ).where(F.col("_is_txn") == 1)
    return df.select(
        "event_id", "merchant_id", "event_time",
        F.col("merchant_txn_count_24h").cast("long").alias("merchant_txn_count_24h"),
        F.col("merchant_txn_count_7d").cast("long").alias("merchant_txn_count_7d"),
        F.col("merchant_labels_known").cast("long").alias("merchant_labels_known"),
        F.col("merchant_fraud_labels").cast("long").alias("merchant_fraud_labels"),
        F.when(F.col("merchant_labels_known") > 0,
               F.col("merchant_fraud_labels") / F.col("merchant_labels_known")).cast("double")
        .alias("merchant_fraud_rate"),
    )


def latest_labels(labels: DataFrame) -> DataFrame:
    """Each labelled event's latest label: event_id, label, labelled_at, label_source, is_fraud."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    # the reverse of _label_order(): the first row is the latest label
    w = Window.partitionBy("event_id").orderBy(F.col("labelled_at").desc(), F.col("source").desc(), F.col("label").asc())
    return (labels.select("event_id", "label", "labelled_at", F.col("source").alias("label_source"),
                          F.row_number().over(w).alias("_n"))
            .where("_n = 1")
            .select("event_id", "label", "labelled_at", "label_source", (F.col("label") == "fraud").alias("is_fraud")))


def enriched(txn: DataFrame, labels: DataFrame, account: DataFrame, merchant: DataFrame) -> DataFrame:
    """The ``gold/transactions_enriched`` rows (without ``updated_at``) of the transactions in ``txn``."""
    spec = table(ENRICHED)
    acc_cols = [c for c in account.columns if c not in ("account_id", "event_time", "updated_at")]
    mer_cols = [c for c in merchant.columns if c not in ("merchant_id", "event_time", "updated_at")]
    df = (txn.join(account.select(*acc_cols), "event_id", "left")
          .join(merchant.select(*mer_cols), "event_id", "left")
          .join(latest_labels(labels), "event_id", "left"))
    return df.select(*[c for c in spec.column_names if c != "updated_at"])


# -- the change-detecting merge -----------------------------------------------------------------------------
def merge_changes(spark: SparkSession, spec: TableSpec, path: str, source: DataFrame, target: DataFrame,
                  metadata: Mapping[str, Any] | None = None, *, delete_missing: bool = True) -> dict[str, int]:
    """
    Make the rows of ``target`` (the table's rows in scope, read at a pinned version) equal ``source``.

    Only rows that differ reach the MERGE: ``source EXCEPT ALL target`` (new or changed rows, null-safe on
    every column) and, with ``delete_missing``, the keys of ``target`` absent from ``source``. Nothing to do
    -> no commit. ``updated_at`` is set to the commit time on insert and update. ``metadata`` goes into the
    commit's userMetadata under :data:`METADATA_KEY`.

    :return: ``{"changed", "deleted", "inserted", "updated", "deleted_rows"}`` (the last three from Delta).
    """
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    cols = [c for c in spec.column_names if c != "updated_at"]
    keys = list(spec.keys)
    changed = source.select(*cols).exceptAll(target.select(*cols))
    staged = changed.withColumn("_delete", F.lit(False))
    if delete_missing:
        gone = target.select(*keys).exceptAll(source.select(*keys))
        staged = staged.unionByName(gone.withColumn("_delete", F.lit(True)), allowMissingColumns=True)
    staged = staged.persist()
    try:
        counts = staged.agg(F.sum((~F.col("_delete")).cast("long")).alias("changed"),
                            F.sum(F.col("_delete").cast("long")).alias("deleted")).first()
        n_changed, n_deleted = int(counts["changed"] or 0), int(counts["deleted"] or 0)
        out = {"changed": n_changed, "deleted": n_deleted, "inserted": 0, "updated": 0, "deleted_rows": 0}
        if not n_changed and not n_deleted:
            return out
        differs = " OR ".join(f"NOT (t.`{c}` <=> s.`{c}`)" for c in cols if c not in keys)
        values = {f"`{c}`": f"s.`{c}`" for c in cols}
        values["`updated_at`"] = "current_timestamp()"
        builder = (DeltaTable.forPath(spark, path).alias("t")
                   .merge(staged.alias("s"), " AND ".join(f"t.`{k}` = s.`{k}`" for k in keys))
                   .whenMatchedDelete(condition="s._delete")
                   .whenMatchedUpdate(condition=f"NOT s._delete AND ({differs})", set=values)
                   .whenNotMatchedInsert(condition="NOT s._delete", values=values))
        if metadata is not None:
            spark.conf.set(USER_METADATA_CONF, json.dumps({METADATA_KEY: dict(metadata)}, sort_keys=True))
        try:
            metrics = builder.execute().first()
        finally:
            if metadata is not None:
                spark.conf.unset(USER_METADATA_CONF)
        out.update(inserted=int(metrics["num_inserted_rows"]), updated=int(metrics["num_updated_rows"]),
                   deleted_rows=int(metrics["num_deleted_rows"]))
        return out
    finally:
        staged.unpersist()


# -- the stage ----------------------------------------------------------------------------------------------
def _keys_frame(spark: SparkSession, column: str, values: Iterable[Any]):
    return spark.createDataFrame([(v,) for v in sorted(set(values))], f"`{column}` string")


def _build_one(spark: SparkSession, lake_root: str, name: str, versions: Mapping[str, int], full_refresh: bool,
               scope_fn, compute_fn, scope_column: str, check: bool = True) -> GoldResult:
    """Shared flow of one gold table: decide the scope, compute, merge, record the input versions."""
    from pyspark.sql import functions as F

    started = time.monotonic()
    spec = table(name)
    path = join_path(lake_root, name)
    sources = {s: versions[s] for s in SOURCES[name]}
    result = GoldResult(name, sources=sources)
    before = delta_version(spark, path)
    result.versions = {"before": before, "after": before}
    recorded = None if full_refresh else last_sources(spark, path)
    scope: list | None = None
    if full_refresh:
        result.mode, result.reason = "full", "full refresh requested"
    elif recorded is None or any(s not in recorded for s in sources):
        result.mode, result.reason = "full", "no recorded input versions (first build)"
    elif all(recorded[s] == v for s, v in sources.items()):
        result.mode, result.reason = "skipped", "inputs unchanged since the last build"
        result.seconds = time.monotonic() - started
        return result
    else:
        scope = scope_fn(recorded, sources)
        if scope is None:
            result.mode, result.reason = "full", "change feed not readable"
        elif not scope:
            result.mode, result.reason = "skipped", "input changes affect no row"
            result.seconds = time.monotonic() - started
            return result
        else:
            result.mode, result.reason = "incremental", f"inputs changed since {recorded}"
    target = _read(spark, lake_root, name, before)
    if scope is None:
        source = compute_fn(None)
    else:
        keys = _keys_frame(spark, scope_column, scope)
        result.scope = len(scope)
        source = compute_fn(keys)
        target = target.join(F.broadcast(keys), scope_column, "left_semi")
    source = source.persist()
    try:
        if check:  # gate the computed rows before they can reach the table
            result.source_rows = check_table(source.withColumn("updated_at", F.current_timestamp()), name)["rows"]
        else:
            result.source_rows = source.count()
        metadata = {"table": name, "mode": result.mode, "sources": sources}
        counts = merge_changes(spark, spec, path, source, target, metadata, delete_missing=True)
    finally:
        source.unpersist()
    result.changed, result.inserted, result.updated = counts["changed"], counts["inserted"], counts["updated"]
    result.deleted = counts["deleted_rows"]
    check_equal(name, "merge_matches_changes", counts["changed"], counts["inserted"] + counts["updated"],
                "rows inserted + updated by the MERGE vs rows that differ", {"deleted": counts["deleted"]})
    check_equal(name, "merge_matches_deletes", counts["deleted"], counts["deleted_rows"],
                "rows deleted by the MERGE vs keys gone from the input")
    result.versions["after"] = delta_version(spark, path)
    result.seconds = time.monotonic() - started
    return result


def run_gold(spark: SparkSession, lake_root: str, *, full_refresh: bool = False, check: bool = True,
             sql_conf: Mapping[str, str] | None = SMALL_BATCH_SQL_CONF) -> dict[str, GoldResult]:
    """Bring the three gold tables up to date with silver; returns results by table name.

    Gates (``check``): the computed rows of a table are checked before its MERGE, and the table as merged
    right after it - before the next gold table reads it - so a failure stops the stage at that table.
    ``sql_conf``: SQL properties set for the run (default: interpreted expressions,
    :data:`decisionflow.spark.conf.SMALL_BATCH_SQL_CONF`; ``None`` keeps the session's).
    """
    with _sql_conf(spark, sql_conf):
        return _run_gold(spark, lake_root, full_refresh=full_refresh, check=check)


def _run_gold(spark: SparkSession, lake_root: str, *, full_refresh: bool, check: bool) -> dict[str, GoldResult]:
    from pyspark.sql import functions as F

    for name in (SILVER_TXN, SILVER_LABELS, *GOLD_TABLES):
        if not is_delta_table(spark, join_path(lake_root, name)):
            raise RuntimeError(f"table {name} does not exist under {lake_root}: run jobs/migrate_lakehouse.py first")
    versions: dict[str, int] = {n: delta_version(spark, join_path(lake_root, n)) for n in (SILVER_TXN, SILVER_LABELS)}
    txn = _read(spark, lake_root, SILVER_TXN, versions[SILVER_TXN])
    labels = _read(spark, lake_root, SILVER_LABELS, versions[SILVER_LABELS])
    results: dict[str, GoldResult] = {}

    def txn_changes(recorded, columns):
        return _changes(spark, lake_root, SILVER_TXN, recorded[SILVER_TXN], versions[SILVER_TXN], columns)

    def label_changes(recorded):
        return _changes(spark, lake_root, SILVER_LABELS, recorded[SILVER_LABELS], versions[SILVER_LABELS], ["event_id"])

    # account features: every account of a changed transaction
    def account_scope(recorded, _sources):
        rows = txn_changes(recorded, ["account_id"])
        return None if rows is None else [r[0] for r in rows]

    def account_compute(keys):
        scoped = txn if keys is None else txn.join(F.broadcast(keys), "account_id", "left_semi")
        return account_features(scoped)

    silver_rows = txn.count()

    def gate(result: GoldResult) -> GoldResult:
        """The table as this run left it (never a later writer's version): rules + one row per transaction."""
        if check:
            stats = check_table(_read(spark, lake_root, result.table, result.versions["after"]), result.table)
            result.rows = stats["rows"]
            check_equal(result.table, "one_row_per_silver_transaction", silver_rows, stats["rows"],
                        f"rows vs silver/transactions@{versions[SILVER_TXN]}")
        return result

    results[ACCOUNT_FEATURES] = gate(_build_one(spark, lake_root, ACCOUNT_FEATURES, versions, full_refresh,
                                                account_scope, account_compute, "account_id", check))

    # merchant features: every merchant of a changed transaction or of a transaction whose label changed
    def merchant_scope(recorded, _sources):
        rows = txn_changes(recorded, ["merchant_id"])
        labelled = label_changes(recorded)
        if rows is None or labelled is None:
            return None
        merchants = {r[0] for r in rows}
        if labelled:
            ids = _keys_frame(spark, "event_id", [r[0] for r in labelled])
            merchants |= {r[0] for r in txn.join(ids, "event_id", "left_semi").select("merchant_id").distinct().collect()}
        return sorted(merchants)

    def merchant_compute(keys):
        scoped = txn if keys is None else txn.join(F.broadcast(keys), "merchant_id", "left_semi")
        return merchant_features(scoped, labels)

    results[MERCHANT_FEATURES] = gate(_build_one(spark, lake_root, MERCHANT_FEATURES, versions, full_refresh,
                                                 merchant_scope, merchant_compute, "merchant_id", check))

    # enriched: every transaction whose silver row, label or feature rows changed
    for name in (ACCOUNT_FEATURES, MERCHANT_FEATURES):
        versions[name] = delta_version(spark, join_path(lake_root, name))
    account = _read(spark, lake_root, ACCOUNT_FEATURES, versions[ACCOUNT_FEATURES])
    merchant = _read(spark, lake_root, MERCHANT_FEATURES, versions[MERCHANT_FEATURES])

    def enriched_scope(recorded, _sources):
        ids: set[str] = set()
        for name in (SILVER_TXN, SILVER_LABELS, ACCOUNT_FEATURES, MERCHANT_FEATURES):
            rows = _changes(spark, lake_root, name, recorded[name], versions[name], ["event_id"])
            if rows is None:
                return None
            ids |= {r[0] for r in rows}
        return sorted(ids)

    def enriched_compute(keys):
        scoped = txn if keys is None else txn.join(F.broadcast(keys), "event_id", "left_semi")
        return enriched(scoped, labels, account, merchant)

    results[ENRICHED] = gate(_build_one(spark, lake_root, ENRICHED, versions, full_refresh,
                                        enriched_scope, enriched_compute, "event_id", check))
    return results


def summarize(results: Mapping[str, GoldResult]) -> dict[str, Any]:
    return {name: r.summary() for name, r in results.items()}

