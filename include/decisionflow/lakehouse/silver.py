"""Silver: bronze records parsed and validated against their contract; the rest quarantined, with a reason.

One flow per source topic (:data:`FLOWS`)::

    bronze/transactions -> silver/transactions + quarantine/transactions   checkpoint _checkpoints/silver/transactions
    bronze/labels       -> silver/labels       + quarantine/labels         checkpoint _checkpoints/silver/labels
    bronze/case_notes   -> silver/case_notes   + quarantine/case_notes     checkpoint _checkpoints/silver/case_notes

**Incremental, exactly once.** A Delta streaming read of the bronze table with ``trigger(availableNow=True)``
and ``foreachBatch``: each run processes what bronze got since the last run, then stops. The checkpoint
records which bronze versions were processed; both writes of a micro-batch are insert-only MERGEs keyed
on the record (silver: the contract key, e.g. ``event_id``; quarantine: topic/partition/offset), so a batch
re-run after a crash (silver committed, checkpoint not yet) inserts nothing twice. Bronze is append-only;
a bronze commit that updates or deletes rows stops the stream with Delta's error rather than being skipped.

**Validation, in Spark SQL, generated from the contract** (:func:`violation_columns`): ``contract(topic).fields``
gives per-field type, required, nullable, enum, const, bounds, length, pattern and formats; each becomes a
SQL check producing a message like ``amount: -3.0 is less than or equal to the minimum of 0 (must be > 0)``.
Values are parsed with ``try_parse_json`` into a VARIANT, which keeps the JSON type of every value (a
string ``"12.5"`` is not a number, a missing field is not a null one). Order of reasons, first match wins:

1. ``tombstone`` - ``value`` is NULL;
2. ``oversized`` - more than ``max_value_bytes`` (default 64 KiB; the largest contract-valid record, a
   10 000-character case note, is far below; nothing that large is parsed);
3. ``malformed_json`` - not valid UTF-8, not JSON, or not exactly one JSON value (``{..}{..}``, trailing
   garbage). Stricter than Python's ``json.loads`` in two ways: ``NaN``/``Infinity`` literals (not JSON) and
   duplicate keys are malformed here; numbers that overflow to infinity (``1e400``) are reported as not
   finite, as :func:`decisionflow.contracts.validate` does;
4. ``schema_violation: <field>: <problem>`` - the first contract violation (all of them in ``violations``).

Everything else is silver. Unknown fields are allowed (the contracts' policy) and listed in
``unknown_fields``. Dedup: the first arrival of a key wins (within a batch: lowest Kafka timestamp, then
partition, then offset; across batches: whatever silver already has); an exact re-send counts as a
duplicate, a re-send with different bytes too (``duplicates_conflicting``, logged: first arrival wins).
Late and out-of-order events are accepted whatever their event time: there is no watermark, gold
recomputes what they affect.

**Accounting** per micro-batch, a quality gate: bronze rows in = silver inserted + duplicates skipped +
quarantined, with ``inserted`` and the quarantine insert count taken from Delta's MERGE metrics and checked
against what the batch classified (:class:`BatchResult`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from decisionflow.contracts import CASE_NOTES, LABELS, TRANSACTIONS, Field, contract, versions
from decisionflow.lakehouse.quality import (
    check_balance,
    check_equal,
    check_table,
    delta_version,
    is_delta_table,
)
from decisionflow.lakehouse.tables import BRONZE_TABLES, TableSpec, checkpoint_path, join_path, table
from decisionflow.spark.conf import SMALL_BATCH_SQL_CONF
from decisionflow.spark.conf import sql_conf as _sql_conf

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

__all__ = [
    "BatchResult",
    "DEFAULT_MAX_VALUE_BYTES",
    "FLOWS",
    "FlowResult",
    "REASON_KINDS",
    "SilverFlow",
    "classify",
    "process_batch",
    "run_flow",
    "run_silver",
    "summarize",
    "violation_columns",
]

log = logging.getLogger(__name__)

#: Values above this many bytes are quarantined as ``oversized`` without being parsed.
DEFAULT_MAX_VALUE_BYTES = 64 * 1024
#: Characters of the payload kept as text in ``quarantine.value_preview``.
PREVIEW_CHARS = 1000
REASON_KINDS = ("tombstone", "oversized", "malformed_json", "schema_violation")
_SENTINEL = "__decisionflow_end_of_record__"


@dataclass(frozen=True)
class SilverFlow:
    """One bronze -> silver/quarantine flow. ``timestamp_fields`` are contract strings stored as TIMESTAMP;
    ``date_column`` = (silver DATE column, the timestamp it is derived from)."""

    topic: str
    bronze: str
    silver: str
    quarantine: str
    timestamp_fields: tuple[str, ...]
    date_column: tuple[str, str] | None = None

    @property
    def name(self) -> str:
        return self.silver.split("/", 1)[1]

    @property
    def silver_spec(self) -> TableSpec:
        return table(self.silver)

    @property
    def quarantine_spec(self) -> TableSpec:
        return table(self.quarantine)

    def checkpoint(self, lake_root: str) -> str:
        return checkpoint_path(lake_root, "silver", self.name)


FLOWS: dict[str, SilverFlow] = {
    TRANSACTIONS: SilverFlow(TRANSACTIONS, BRONZE_TABLES[TRANSACTIONS], "silver/transactions",
                             "quarantine/transactions", ("event_time",), ("event_date", "event_time")),
    LABELS: SilverFlow(LABELS, BRONZE_TABLES[LABELS], "silver/labels", "quarantine/labels", ("labelled_at",)),
    CASE_NOTES: SilverFlow(CASE_NOTES, BRONZE_TABLES[CASE_NOTES], "silver/case_notes", "quarantine/case_notes",
                           ("created_at",)),
}


@dataclass
class BatchResult:
    """Counts of one micro-batch; ``rows_in == inserted + duplicates + quarantined`` is the gate."""

    batch_id: int
    rows_in: int = 0
    valid: int = 0
    inserted: int = 0
    duplicates: int = 0
    duplicates_in_batch: int = 0
    duplicates_existing: int = 0
    duplicates_conflicting: int = 0
    quarantined: int = 0
    quarantine_inserted: int = 0
    quarantine_replayed: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    unknown_field_rows: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class FlowResult:
    """One flow's run: its batches and the tables' Delta versions before/after."""

    topic: str
    silver: str
    quarantine: str
    status: str = "ok"
    batches: list[BatchResult] = field(default_factory=list)
    versions: dict[str, dict[str, int | None]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    def totals(self) -> dict[str, Any]:
        keys = ("rows_in", "valid", "inserted", "duplicates", "duplicates_conflicting", "quarantined",
                "quarantine_inserted", "unknown_field_rows")
        out: dict[str, Any] = {k: sum(getattr(b, k) for b in self.batches) for k in keys}
        reasons: dict[str, int] = {}
        for b in self.batches:
            for k, v in b.by_reason.items():
                reasons[k] = reasons.get(k, 0) + v
        out["by_reason"] = dict(sorted(reasons.items()))
        return out

    def summary(self) -> dict[str, Any]:
        return {"topic": self.topic, "status": self.status, "batches": len(self.batches), **self.totals(),
                "rows": self.rows, "versions": self.versions, "seconds": round(self.seconds, 2),
                "timings": self.timings}


# -- validation: contract rules -> Spark SQL ----------------------------------------------------------------
_INT_TYPES = ("BIGINT", "INT", "SMALLINT", "TINYINT")
_NUM_TYPES = (*_INT_TYPES, "DOUBLE", "FLOAT")
#: Format checks (what JSON Schema's format names mean), as Java regexes or parse checks.
_IPV4 = r"^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$"
_H = "[0-9A-Fa-f]{1,4}"
_IPV6 = ("^(" + "|".join([
    f"({_H}:){{7}}{_H}",
    f"({_H}:){{1,7}}:",
    f"({_H}:){{1,6}}:{_H}",
    f"({_H}:){{1,5}}(:{_H}){{1,2}}",
    f"({_H}:){{1,4}}(:{_H}){{1,3}}",
    f"({_H}:){{1,3}}(:{_H}){{1,4}}",
    f"({_H}:){{1,2}}(:{_H}){{1,5}}",
    f"{_H}:(:{_H}){{1,6}}",
    f":((:{_H}){{1,7}}|:)",
    f"({_H}:){{6}}{_IPV4[1:-1]}",
    f"::(ffff(:0{{1,4}})?:)?{_IPV4[1:-1]}",
    f"({_H}:){{1,5}}:{_IPV4[1:-1]}",
]) + ")$")
_UUID = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


def _format_check(fmt: str, value: Column) -> Column:
    if fmt == "date-time":  # the contract's pattern fixes the shape; this rejects 2025-02-30 and 25:00
        return value.try_cast("timestamp").isNotNull()
    if fmt == "uuid":
        return value.rlike(_UUID)
    if fmt == "ipv4":
        return value.rlike(_IPV4)
    if fmt == "ipv6":
        return value.rlike(_IPV6)
    if fmt == "date":
        return value.try_cast("date").isNotNull()
    raise ValueError(f"format {fmt!r} has no SQL check yet: add one to silver._format_check")


def _path(name: str) -> str:
    return "$['" + name.replace("\\", "\\\\").replace("'", "\\'") + "']"


def _json_type_name(type_col: Column) -> Column:
    from pyspark.sql import functions as F

    return (F.when(type_col == "STRING", "string").when(type_col == "BOOLEAN", "boolean")
            .when(type_col == "VOID", "null").when(type_col.startswith("OBJECT"), "object")
            .when(type_col.startswith("ARRAY"), "array").when(type_col.isin(*_INT_TYPES), "integer")
            .otherwise("number"))


def _show(value: Column, limit: int = 60) -> Column:
    from pyspark.sql import functions as F

    text = F.to_json(value)
    return F.when(F.char_length(text) <= limit, text).otherwise(
        F.concat(F.substring(text, 1, limit), F.lit("... ("), F.char_length(text).cast("string"), F.lit(" chars)")))


def _num(x: float | int) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _field_checks(item: Field, rec: Column) -> list[Column]:
    """Violation messages (or NULL) of one contract field, for the record VARIANT ``rec``."""
    from pyspark.sql import functions as F

    n = item.name
    fv = F.variant_get(rec, _path(n), "variant")
    typ = F.schema_of_variant(fv)
    missing, is_null = fv.isNull(), F.is_variant_null(fv)
    if item.type == "string":
        type_ok = typ == "STRING"
    elif item.type == "boolean":
        type_ok = typ == "BOOLEAN"
    elif item.type in ("number", "integer"):
        numeric = typ.isin(*_NUM_TYPES) | typ.startswith("DECIMAL")
        if item.type == "number":
            type_ok = numeric
        else:
            as_double = F.try_variant_get(fv, "$", "double")
            type_ok = typ.isin(*_INT_TYPES) | (numeric & (as_double == F.floor(as_double)))
    else:
        raise ValueError(f"{n}: JSON type {item.type!r} has no SQL check")
    wanted = item.type + (" or null" if item.nullable else "")
    presence = (
        F.when(missing, F.lit(f"{n}: required field is missing") if item.required else F.lit(None))
        .when(is_null, F.lit(None) if item.nullable else F.lit(f"{n}: expected {item.type}, got null"))
        .when(~type_ok, F.concat(F.lit(f"{n}: expected {wanted}, got "), _json_type_name(typ), F.lit(" "), _show(fv)))
    )
    checks = [presence]
    typed = ~missing & ~is_null & type_ok  # value rules only apply to a present value of the right type
    shown = _show(fv)

    def rule(ok: Column, text: str | Column) -> None:
        message = F.concat(F.lit(f"{n}: "), text if not isinstance(text, str) else F.lit(text))
        checks.append(F.when(typed & ~F.coalesce(ok, F.lit(False)), message))

    if item.type == "string":
        s = F.try_variant_get(fv, "$", "string")
        if item.enum is not None:
            rule(s.isin(*item.enum), F.concat(shown, F.lit(f" is not one of {list(item.enum)}")))
        if item.const is not None:
            rule(s == F.lit(item.const), F.concat(shown, F.lit(f" must be {item.const!r}")))
        if item.min_length is not None:
            rule(F.char_length(s) >= item.min_length,
                 F.concat(F.lit("length "), F.char_length(s).cast("string"), F.lit(f" is shorter than minLength {item.min_length}")))
        if item.max_length is not None:
            rule(F.char_length(s) <= item.max_length,
                 F.concat(F.lit("length "), F.char_length(s).cast("string"), F.lit(f" exceeds maxLength {item.max_length}")))
        if item.pattern is not None:
            rule(s.rlike(item.pattern), F.concat(shown, F.lit(f" does not match {item.pattern}")))
        if item.formats:
            ok = None
            for fmt in item.formats:
                one = _format_check(fmt, s)
                ok = one if ok is None else (ok | one)
            rule(ok, F.concat(shown, F.lit(f" is not a valid {' or '.join(item.formats)}")))
    else:
        x = F.try_variant_get(fv, "$", "double")
        if item.type in ("number", "integer"):
            rule(~F.isnan(x) & (F.abs(x) != F.lit(float("inf"))), F.concat(shown, F.lit(" is not a finite number")))
        if item.enum is not None:
            rule(x.isin(*item.enum), F.concat(shown, F.lit(f" is not one of {list(item.enum)}")))
        if item.const is not None:
            rule(x == F.lit(item.const), F.concat(shown, F.lit(f" must be {item.const!r}")))
        if item.minimum is not None:
            rule(x >= item.minimum, F.concat(shown, F.lit(f" is less than the minimum {_num(item.minimum)}")))
        if item.exclusive_minimum is not None:
            m = _num(item.exclusive_minimum)
            rule(x > item.exclusive_minimum,
                 F.concat(shown, F.lit(f" is less than or equal to the minimum of {m} (must be > {m})")))
        if item.maximum is not None:
            rule(x <= item.maximum, F.concat(shown, F.lit(f" is greater than the maximum {_num(item.maximum)}")))
        if item.exclusive_maximum is not None:
            m = _num(item.exclusive_maximum)
            rule(x < item.exclusive_maximum,
                 F.concat(shown, F.lit(f" is greater than or equal to the maximum of {m} (must be < {m})")))
    return checks


def violation_columns(topic: str, rec: Column) -> Column:
    """``array<string>`` of every contract violation of the record VARIANT ``rec`` (empty when valid).

    The contract version is the one the record declares in ``schema_version`` (the latest when it declares
    none or an unknown one: then its ``const`` rule reports it), as :func:`decisionflow.contracts.validate` does.
    """
    from pyspark.sql import functions as F

    def for_version(version: int) -> Column:
        checks = [F.when(~F.schema_of_variant(rec).startswith("OBJECT"),
                         F.concat(F.lit("record: expected a JSON object, got "),
                                  _json_type_name(F.schema_of_variant(rec)), F.lit(" "), _show(rec)))]
        is_object = F.schema_of_variant(rec).startswith("OBJECT")
        for item in contract(topic, version).fields:
            checks += [F.when(is_object, c) for c in _field_checks(item, rec)]
        return F.filter(F.array(*checks), lambda m: m.isNotNull())

    known = versions(topic)
    declared = F.try_variant_get(rec, "$['schema_version']", "bigint")
    result = for_version(known[-1])
    for version in known[:-1]:
        result = F.when(declared == version, for_version(version)).otherwise(result)
    return result


def _typed_value(item: Field, rec: Column, timestamp: bool) -> Column:
    from pyspark.sql import functions as F

    if timestamp:
        return F.try_variant_get(rec, _path(item.name), "string").try_cast("timestamp")
    sql = {"string": "string", "number": "double", "integer": "bigint", "boolean": "boolean"}[item.type]
    return F.try_variant_get(rec, _path(item.name), sql)


def classify(bronze: DataFrame, flow: SilverFlow, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> DataFrame:
    """
    Every bronze row with its verdict: ``_valid`` (bool), ``reason_kind``/``reason``/``violations`` for the
    others, the typed contract fields, ``unknown_fields``, ``payload_sha256`` and ``_rank`` (1 = the first
    arrival of its key within this batch, NULL for invalid rows). Row count is unchanged (no filter).
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    spec = flow.silver_spec
    latest = contract(flow.topic)
    size = F.coalesce(F.col("value_size"), F.length("value"))
    text = F.col("value").cast("string")
    parseable = F.col("value").isNotNull() & (size <= max_value_bytes) & F.is_valid_utf8("value")
    df = bronze.select(
        "*",
        size.alias("_size"),
        parseable.alias("_parseable"),
        F.when(parseable, F.try_parse_json(F.concat(F.lit("["), text, F.lit(f',"{_SENTINEL}"]')))).alias("_wrapped"),
    )
    single = (F.col("_wrapped").isNotNull()
              & (F.try_variant_get("_wrapped", "$[1]", "string") == _SENTINEL)
              & F.variant_get("_wrapped", "$[2]", "variant").isNull())
    df = df.select("*", single.alias("_wellformed"),
                   F.when(single, F.variant_get("_wrapped", "$[0]", "variant")).alias("_rec"))
    df = df.select("*", F.when(F.col("_wellformed"), violation_columns(flow.topic, F.col("_rec"))).alias("violations"))
    kind = (F.when(F.col("value").isNull(), "tombstone")
            .when(F.col("_size") > max_value_bytes, "oversized")
            .when(~F.col("_wellformed"), "malformed_json")
            .when(F.size("violations") > 0, "schema_violation"))
    reason = (F.when(F.col("value").isNull(), F.lit("tombstone: null value where a JSON object is expected"))
              .when(F.col("_size") > max_value_bytes,
                    F.concat(F.lit("oversized: "), F.col("_size").cast("string"),
                             F.lit(f" bytes > the {max_value_bytes}-byte limit")))
              .when(~F.is_valid_utf8("value"), F.lit("malformed_json: value is not valid UTF-8"))
              .when(~F.col("_wellformed"), F.lit("malformed_json: value is not exactly one JSON value"))
              .when(F.size("violations") > 0, F.concat(F.lit("schema_violation: "), F.col("violations")[0])))
    df = df.select("*", kind.alias("reason_kind"), reason.alias("reason"))
    df = df.select("*", F.col("reason_kind").isNull().alias("_valid"))

    fields = {f.name: f for f in latest.fields}
    typed = []
    for column in spec.columns:
        if column.name in fields:
            typed.append(_typed_value(fields[column.name], F.col("_rec"), column.name in flow.timestamp_fields)
                         .alias(column.name))
    df = df.select("*", *typed)
    if flow.date_column:
        date_col, source_col = flow.date_column
        df = df.withColumn(date_col, F.to_date(source_col))
    known = list(fields)
    keys = F.json_object_keys(text)
    df = df.select(
        "*",
        F.when(F.col("_valid"), F.filter(keys, lambda k: ~k.isin(*known))).alias("unknown_fields"),
        F.sha2(F.col("value"), 256).alias("payload_sha256"),
    )
    order = [F.col("kafka_timestamp").asc_nulls_last(), F.col("partition"), F.col("offset")]
    by_key = Window.partitionBy(F.col("_valid"), *[F.col(k) for k in spec.keys])
    df = df.select(
        "*",
        F.when(F.col("_valid"), F.row_number().over(by_key.orderBy(*order))).alias("_rank"),
        F.when(F.col("_valid"), F.size(F.collect_set("payload_sha256").over(by_key)) > 1).alias("_conflict"),
    )
    return df


_LINEAGE_COLUMNS = {"source_topic", "source_partition", "source_offset", "kafka_timestamp", "ingested_at",
                    "silver_loaded_at", "unknown_fields", "payload_sha256"}


def _silver_rows(classified: DataFrame, flow: SilverFlow) -> DataFrame:
    from pyspark.sql import functions as F

    lineage = {
        "source_topic": F.col("topic"), "source_partition": F.col("partition"), "source_offset": F.col("offset"),
        "kafka_timestamp": F.col("kafka_timestamp"), "ingested_at": F.col("ingested_at"),
        "silver_loaded_at": F.current_timestamp(),
    }
    cols = [lineage[c.name].cast(c.type).alias(c.name) if c.name in lineage else F.col(c.name).cast(c.type).alias(c.name)
            for c in flow.silver_spec.columns]
    return classified.where(F.col("_valid") & (F.col("_rank") == 1)).select(*cols)


def _quarantine_rows(classified: DataFrame, flow: SilverFlow) -> DataFrame:
    from pyspark.sql import functions as F

    preview = F.make_valid_utf8(F.substring(F.col("value"), 1, PREVIEW_CHARS * 4).cast("string"))
    values = {
        "source_topic": F.col("topic"), "source_partition": F.col("partition"), "source_offset": F.col("offset"),
        "kafka_timestamp": F.col("kafka_timestamp"), "key": F.col("key"), "reason_kind": F.col("reason_kind"),
        "reason": F.col("reason"), "violations": F.coalesce(F.col("violations"), F.array().cast("array<string>")),
        "value": F.col("value"), "value_size": F.col("_size"), "value_preview": F.substring(preview, 1, PREVIEW_CHARS),
        "payload_sha256": F.col("payload_sha256"), "ingested_at": F.col("ingested_at"),
        "quarantined_at": F.current_timestamp(), "quarantine_date": F.current_date(),
    }
    return classified.where(~F.col("_valid")).select(
        *[values[c.name].cast(c.type).alias(c.name) for c in flow.quarantine_spec.columns])


def _key_condition(keys: Iterable[str]) -> str:
    return " AND ".join(f"t.`{k}` = s.`{k}`" for k in keys)


def _insert_only_merge(spark: SparkSession, path: str, spec: TableSpec, source: DataFrame) -> int:
    from delta.tables import DeltaTable

    result = (DeltaTable.forPath(spark, path).alias("t")
              .merge(source.alias("s"), _key_condition(spec.keys))
              .whenNotMatchedInsert(values={f"`{c}`": f"s.`{c}`" for c in spec.column_names})
              .execute().first())
    return int(result["num_inserted_rows"])


def process_batch(spark: SparkSession, lake_root: str, flow: SilverFlow, bronze_batch: DataFrame, batch_id: int,
                  max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> BatchResult:
    """Classify one bronze micro-batch, MERGE it into silver and quarantine, and check the accounting."""
    from pyspark.sql import functions as F

    started = time.monotonic()
    result = BatchResult(batch_id=batch_id)
    silver_path = join_path(lake_root, flow.silver)
    quarantine_path = join_path(lake_root, flow.quarantine)
    silver_spec, quarantine_spec = flow.silver_spec, flow.quarantine_spec
    # Materialized once, lineage cut: every later step then plans against a plain scan instead of re-analysing
    # the (large) generated validation expressions, and all steps see the very same verdicts.
    mark = time.monotonic()
    keep = ["topic", "partition", "offset", "kafka_timestamp", "key", "value", "ingested_at", "_size", "_valid",
            "reason_kind", "reason", "violations", "unknown_fields", "payload_sha256", "_rank", "_conflict",
            *[c for c in flow.silver_spec.column_names if c not in _LINEAGE_COLUMNS]]
    classified = classify(bronze_batch, flow, max_value_bytes).select(*dict.fromkeys(keep)).localCheckpoint(eager=True)

    def lap(step: str) -> None:
        nonlocal mark
        now = time.monotonic()
        result.timings[step] = round(now - mark, 2)
        mark = now

    lap("classify")
    stats = classified.agg(
        F.count(F.lit(1)).alias("rows_in"),
        F.sum(F.col("_valid").cast("long")).alias("valid"),
        F.sum((F.col("_rank") > 1).cast("long")).alias("dup_in_batch"),
        F.sum(((F.col("_rank") > 1) & F.col("_conflict")).cast("long")).alias("conflict_in_batch"),
        F.sum((F.col("_valid") & (F.size("unknown_fields") > 0)).cast("long")).alias("unknown"),
        *[F.sum((F.col("reason_kind") == kind).cast("long")).alias(f"reason_{kind}") for kind in REASON_KINDS],
    ).first()
    reasons = {kind: int(stats[f"reason_{kind}"]) for kind in REASON_KINDS if stats[f"reason_{kind}"]}
    result.rows_in = int(stats["rows_in"])
    result.valid = int(stats["valid"] or 0)
    result.duplicates_in_batch = int(stats["dup_in_batch"] or 0)
    conflicting = int(stats["conflict_in_batch"] or 0)
    result.unknown_field_rows = int(stats["unknown"] or 0)
    result.by_reason = dict(sorted(reasons.items()))
    result.quarantined = sum(reasons.values())
    lap("count")

    unique = _silver_rows(classified, flow)
    n_unique = result.valid - result.duplicates_in_batch
    if n_unique:
        existing = spark.read.format("delta").load(silver_path).select(
            *silver_spec.keys, F.col("payload_sha256").alias("_existing_sha"))
        seen = unique.join(existing, list(silver_spec.keys), "inner").agg(
            F.count(F.lit(1)).alias("existing"),
            F.sum((F.col("_existing_sha") != F.col("payload_sha256")).cast("long")).alias("conflicting"),
        ).first()
        result.duplicates_existing = int(seen["existing"])
        conflicting += int(seen["conflicting"] or 0)
        lap("silver_lookup")
        if result.duplicates_existing < n_unique:
            result.inserted = _insert_only_merge(spark, silver_path, silver_spec, unique)
            lap("silver_merge")
    result.duplicates = result.duplicates_in_batch + result.duplicates_existing
    result.duplicates_conflicting = conflicting
    if conflicting:
        log.warning("%s batch %s: %d re-sent keys with different bytes skipped (first arrival wins)",
                    flow.silver, batch_id, conflicting)

    if result.quarantined:
        bad = _quarantine_rows(classified, flow)
        already = bad.join(spark.read.format("delta").load(quarantine_path).select(*quarantine_spec.keys),
                           list(quarantine_spec.keys), "left_semi").count()
        result.quarantine_replayed = already
        lap("quarantine_lookup")
        if already < result.quarantined:
            result.quarantine_inserted = _insert_only_merge(spark, quarantine_path, quarantine_spec, bad)
            lap("quarantine_merge")
        if already:
            log.warning("%s batch %s: %d records already quarantined (batch replayed after a crash?)",
                        flow.quarantine, batch_id, already)

    # Gates: Delta's own insert counts must match what the batch classified, and every row is accounted for.
    check_equal(flow.silver, "merge_inserted_matches_classified", n_unique - result.duplicates_existing,
                result.inserted, f"batch {batch_id}: rows inserted by the MERGE",
                {"batch_id": batch_id, "unique_valid": n_unique, "already_in_silver": result.duplicates_existing})
    check_equal(flow.quarantine, "merge_inserted_matches_classified", result.quarantined - result.quarantine_replayed,
                result.quarantine_inserted, f"batch {batch_id}: rows inserted by the MERGE",
                {"batch_id": batch_id, "quarantined": result.quarantined, "already_quarantined": result.quarantine_replayed})
    check_balance(flow.silver, "bronze_rows_accounted", result.rows_in,
                  {"inserted": result.inserted, "duplicates": result.duplicates, "quarantined": result.quarantined})
    result.seconds = round(time.monotonic() - started, 2)
    log.info("%s batch %s: %s", flow.silver, batch_id, asdict(result))
    return result


def run_flow(spark: SparkSession, lake_root: str, flow: SilverFlow, *, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
             max_files_per_trigger: int | None = None, check: bool = True) -> FlowResult:
    """Process what bronze got since the last run (availableNow), then run the table gates."""
    from pyspark.errors import StreamingQueryException

    started = time.monotonic()
    result = FlowResult(flow.topic, flow.silver, flow.quarantine)
    bronze_path = join_path(lake_root, flow.bronze)
    silver_path, quarantine_path = join_path(lake_root, flow.silver), join_path(lake_root, flow.quarantine)
    for name, path in ((flow.silver, silver_path), (flow.quarantine, quarantine_path)):
        if not is_delta_table(spark, path):
            raise RuntimeError(f"table {name} does not exist at {path}: run jobs/migrate_lakehouse.py "
                               "(or decisionflow.lakehouse.maintenance.migrate) first")
    versions_before = {flow.silver: delta_version(spark, silver_path),
                       flow.quarantine: delta_version(spark, quarantine_path)}
    if not is_delta_table(spark, bronze_path):
        result.status = "no bronze table"
        result.versions = {k: {"before": v, "after": v} for k, v in versions_before.items()}
        result.versions[flow.bronze] = {"before": None, "after": None}
        result.seconds = time.monotonic() - started
        return result
    bronze_version = delta_version(spark, bronze_path)

    state: dict[str, Any] = {"error": None}

    def on_batch(batch_df: DataFrame, batch_id: int) -> None:
        try:
            result.batches.append(process_batch(batch_df.sparkSession, lake_root, flow, batch_df, batch_id,
                                                max_value_bytes))
        except BaseException as exc:  # kept so the caller re-raises the original (a QualityGateError), not Py4J's
            state["error"] = exc
            raise

    mark = time.monotonic()
    reader = spark.readStream.format("delta")
    if max_files_per_trigger:
        reader = reader.option("maxFilesPerTrigger", str(max_files_per_trigger))
    query = (reader.load(bronze_path).writeStream
             .queryName(f"silver_{flow.name}")
             .option("checkpointLocation", flow.checkpoint(lake_root))
             .foreachBatch(on_batch)
             .trigger(availableNow=True)
             .start())
    try:
        query.awaitTermination()
    except StreamingQueryException:
        if state["error"] is not None:
            raise state["error"] from None
        raise
    if state["error"] is not None:
        raise state["error"]
    result.timings["stream"] = round(time.monotonic() - mark, 2)
    result.timings["batches"] = round(sum(b.seconds for b in result.batches), 2)
    mark = time.monotonic()

    for spec, path in ((flow.silver_spec, silver_path), (flow.quarantine_spec, quarantine_path)):
        frame = spark.read.format("delta").load(path)
        if check and result.batches:  # the table gates; a run that wrote nothing has nothing new to check
            result.rows[spec.name] = check_table(frame, spec.name)["rows"]
        else:
            result.rows[spec.name] = frame.count()  # answered from the Delta log's file statistics
    result.timings["gates"] = round(time.monotonic() - mark, 2)
    result.versions = {
        flow.bronze: {"before": bronze_version, "after": bronze_version},
        flow.silver: {"before": versions_before[flow.silver], "after": delta_version(spark, silver_path)},
        flow.quarantine: {"before": versions_before[flow.quarantine], "after": delta_version(spark, quarantine_path)},
    }
    result.seconds = time.monotonic() - started
    return result


def run_silver(spark: SparkSession, lake_root: str, topics: Iterable[str] | None = None, *,
               sql_conf: Mapping[str, str] | None = SMALL_BATCH_SQL_CONF, **options: Any) -> dict[str, FlowResult]:
    """Run the silver flows (all three by default, transactions first); returns results by silver table name.

    ``sql_conf``: SQL properties set for the run (default: interpreted expressions,
    :data:`decisionflow.spark.conf.SMALL_BATCH_SQL_CONF`; ``None`` keeps the session's).
    """
    results: dict[str, FlowResult] = {}
    with _sql_conf(spark, sql_conf):
        for topic in (topics or FLOWS):
            flow = FLOWS[topic]
            results[flow.silver] = run_flow(spark, lake_root, flow, **options)
    return results


def summarize(results: Mapping[str, FlowResult]) -> dict[str, Any]:
    return {name: r.summary() for name, r in results.items()}

