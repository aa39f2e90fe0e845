"""Quality gates of the lakehouse stages and the data-quality report.

Gates (each failure raises :class:`QualityGateError`, whose message names the table, the rule and the counts):

* **balance** - rows in = rows out + duplicates skipped + quarantined, per silver micro-batch
  (:func:`check_balance`); gold tables hold exactly one row per silver transaction;
* **not null** - merge keys (and every NOT NULL column) never null (:func:`rules_for`);
* **unique** - merge keys unique (no duplicate ``event_id`` in silver or gold);
* **range** - ``amount > 0`` and finite, window counts/sums non-negative and nested (1h <= 24h <= 7d),
  ``merchant_fraud_rate`` in [0, 1], quarantine reasons starting with their kind (:data:`RANGE_RULES`).

:func:`check_table` evaluates every rule of a table in one aggregation. :func:`quality_report` builds the
report ``maintain_lakehouse.py`` writes to ``<lake root>/_reports/quality/<timestamp>.json``: per-table row
counts, null shares per column, quarantine share by reason, Delta versions.

Nothing here imports pyspark at module level.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from decisionflow.lakehouse.tables import (
    BRONZE_TABLES,
    REPORT_ROOT,
    TableSpec,
    join_path,
    table,
    tables,
)
from decisionflow.exceptions import NonRetryableError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = [
    "QualityGateError",
    "RANGE_RULES",
    "Rule",
    "check_balance",
    "check_equal",
    "check_table",
    "delta_version",
    "is_delta_table",
    "quality_report",
    "rules_for",
    "write_report",
]


class QualityGateError(NonRetryableError, RuntimeError):
    """A quality gate failed; ``table``, ``rule`` and ``counts`` say which and what was seen."""

    def __init__(self, table: str, rule: str, counts: Mapping[str, Any], detail: str = ""):
        self.table, self.rule, self.counts, self.detail = table, rule, dict(counts), detail
        shown = ", ".join(f"{k}={v}" for k, v in self.counts.items())
        super().__init__(f"quality gate failed: table {table}, rule {rule}: {detail or 'violated'} ({shown})")


@dataclass(frozen=True)
class Rule:
    """``condition`` (Spark SQL) must be TRUE for every row; FALSE or NULL counts as a violation."""

    name: str
    condition: str
    kind: str = "range"


def _nonneg(*cols: str) -> tuple[Rule, ...]:
    return tuple(Rule(f"{c}_non_negative", f"{c} >= 0") for c in cols)


_WINDOW_COUNTS = ("txn_count_1h", "txn_count_24h", "txn_count_7d", "amount_sum_1h", "amount_sum_24h",
                  "amount_sum_7d", "distinct_devices_24h", "distinct_devices_7d", "distinct_countries_24h",
                  "distinct_countries_7d")
_ACCOUNT_RULES = (
    *_nonneg(*_WINDOW_COUNTS),
    Rule("txn_count_includes_itself", "txn_count_1h >= 1"),
    Rule("txn_count_windows_nested", "txn_count_1h <= txn_count_24h AND txn_count_24h <= txn_count_7d"),
    Rule("amount_sum_windows_nested", "amount_sum_1h <= amount_sum_24h AND amount_sum_24h <= amount_sum_7d"),
    Rule("distinct_countries_at_least_one", "distinct_countries_24h >= 1 AND distinct_countries_24h <= distinct_countries_7d"),
    Rule("seconds_since_prev_txn_non_negative", "seconds_since_prev_txn IS NULL OR seconds_since_prev_txn >= 0"),
    Rule("amount_to_avg_7d_positive", "amount_to_avg_7d > 0"),
)
_MERCHANT_RULES = (
    *_nonneg("merchant_txn_count_24h", "merchant_txn_count_7d", "merchant_labels_known", "merchant_fraud_labels"),
    Rule("merchant_txn_count_includes_itself", "merchant_txn_count_24h >= 1 AND merchant_txn_count_24h <= merchant_txn_count_7d"),
    Rule("merchant_fraud_labels_le_known", "merchant_fraud_labels <= merchant_labels_known"),
    Rule("merchant_fraud_rate_in_0_1",
         "(merchant_labels_known = 0 AND merchant_fraud_rate IS NULL) OR merchant_fraud_rate BETWEEN 0 AND 1"),
)
_AMOUNT = Rule("amount_positive", "amount > 0 AND amount < double('Infinity')")
_QUARANTINE_RULES = (
    Rule("reason_kind_known", "reason_kind IN ('tombstone', 'oversized', 'malformed_json', 'schema_violation')"),
    Rule("reason_names_kind", "startswith(reason, reason_kind)"),
    Rule("payload_kept", "(reason_kind = 'tombstone') = (value IS NULL)"),
)

#: Rules beyond NOT NULL and uniqueness, per declared table.
RANGE_RULES: dict[str, tuple[Rule, ...]] = {
    "silver/transactions": (_AMOUNT, Rule("event_date_matches", "event_date = to_date(event_time)")),
    "silver/labels": (Rule("label_known", "label IN ('fraud', 'legit')"),),
    "silver/case_notes": (),
    "quarantine/transactions": _QUARANTINE_RULES,
    "quarantine/labels": _QUARANTINE_RULES,
    "quarantine/case_notes": _QUARANTINE_RULES,
    "gold/account_features": _ACCOUNT_RULES,
    "gold/merchant_features": _MERCHANT_RULES,
    "gold/transactions_enriched": (
        _AMOUNT, *_ACCOUNT_RULES, *_MERCHANT_RULES,
        Rule("label_consistent", "(label IS NULL) = (labelled_at IS NULL) AND (label IS NULL) = (is_fraud IS NULL)"),
    ),
    # written by decisionflow.decisions.audit / .outbox (delta-rs), which validate the same before writing
    "gold/decisions": (
        Rule("decision_known", "decision IN ('approve', 'review', 'decline')"),
        Rule("versions_filled", "model_version <> '' AND policy_version <> ''"),
        Rule("score_finite", "NOT isnan(score) AND abs(score) < double('Infinity')"),
        Rule("brain_known", "brain IS NULL OR brain IN ('policy', 'agent')"),
        Rule("review_complete", "(review_decision IS NULL) = (reviewed_at IS NULL)"),
    ),
    "gold/escalations": (
        Rule("applied_decision_known", "applied_decision IN ('approve', 'review', 'decline')"),
        Rule("accepted_has_recommendation", "NOT accepted OR recommendation IS NOT NULL"),
    ),
    "gold/decision_actions": (
        Rule("channel_known", "channel IN ('kafka', 'webhook')"),
        Rule("status_known", "status IN ('pending', 'sent', 'failed')"),
        Rule("sent_has_sent_at", "(status = 'sent') = (sent_at IS NOT NULL)"),
    ),
}


def rules_for(spec: TableSpec) -> tuple[Rule, ...]:
    """NOT NULL rules for every NOT NULL column (keys first), then the table's range rules."""
    ordered = list(spec.keys) + [c.name for c in spec.columns if not c.nullable and c.name not in spec.keys]
    not_null = tuple(Rule(f"{name}_not_null", f"{name} IS NOT NULL", "not_null") for name in ordered)
    return not_null + RANGE_RULES.get(spec.name, ())


def check_table(df: DataFrame, table_name: str, rules: Iterable[Rule] | None = None,
                unique_keys: Iterable[str] | None = None, *, raise_on_failure: bool = True) -> dict[str, Any]:
    """
    Evaluate ``rules`` (default: :func:`rules_for` of the declared table) and key uniqueness over ``df``
    in one aggregation.

    :return: ``{"rows": n, "violations": {rule: count}}`` (only rules with violations listed).
    :raises QualityGateError: for the first violated rule, with every violated rule's count in the message.
    """
    from pyspark.sql import functions as F

    spec = table(table_name) if rules is None or unique_keys is None else None
    rules = tuple(rules if rules is not None else rules_for(spec))
    keys = tuple(unique_keys if unique_keys is not None else spec.keys)
    aggs = [F.count(F.lit(1)).alias("rows")]
    for i, rule in enumerate(rules):
        aggs.append(F.sum(F.when(F.expr(rule.condition), 0).otherwise(1)).alias(f"r{i}"))
    if keys:
        aggs.append(F.count_distinct(F.struct(*[F.col(k) for k in keys])).alias("distinct_keys"))
    row = df.agg(*aggs).first()
    rows = int(row["rows"])
    violations = {rule.name: int(row[f"r{i}"] or 0) for i, rule in enumerate(rules) if (row[f"r{i}"] or 0) > 0}
    result: dict[str, Any] = {"rows": rows, "violations": violations}
    if keys:
        distinct = int(row["distinct_keys"])
        if distinct != rows:
            # count_distinct skips NULL structs only when the struct itself is NULL; keys NULL are caught above
            violations[f"unique_{'_'.join(keys)}"] = rows - distinct
    if violations and raise_on_failure:
        first = next(iter(violations))
        condition = next((r.condition for r in rules if r.name == first), f"({', '.join(keys)}) unique")
        raise QualityGateError(
            table_name, first, {"rows": rows, **{f"violating[{k}]": v for k, v in violations.items()}},
            f"{violations[first]} of {rows} rows violate {condition}")
    return result


def check_balance(table_name: str, rule: str, rows_in: int, parts: Mapping[str, int]) -> None:
    """Rows in must equal the sum of ``parts`` (e.g. inserted + duplicates + quarantined)."""
    total = sum(int(v) for v in parts.values())
    if int(rows_in) != total:
        raise QualityGateError(table_name, rule, {"rows_in": rows_in, **parts, "accounted": total},
                               f"rows in ({rows_in}) != {' + '.join(parts)} ({total}); "
                               f"{int(rows_in) - total:+d} rows unaccounted for")


def check_equal(table_name: str, rule: str, expected: int, actual: int, what: str,
                extra: Mapping[str, Any] | None = None) -> None:
    if int(expected) != int(actual):
        raise QualityGateError(table_name, rule, {"expected": expected, "actual": actual, **(extra or {})},
                               f"{what}: expected {expected}, got {actual}")


# -- Delta helpers (shared by the stages) -------------------------------------------------------------------
_COMMIT = re.compile(r"^(\d{20})\.json$")


def _local(path: str) -> str | None:
    if path.startswith("file:"):
        return re.sub(r"^file:(//)?", "", path)
    return None if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", path) else path


def is_delta_table(spark: SparkSession, path: str) -> bool:
    local = _local(path)
    if local is not None:
        return Path(local, "_delta_log").is_dir() and delta_version(spark, path) is not None
    from delta.tables import DeltaTable

    return DeltaTable.isDeltaTable(spark, path)


def delta_version(spark: SparkSession | None, path: str) -> int | None:
    """Latest committed version of the Delta table at ``path`` (None when there is none).

    Local tables: the highest ``_delta_log/<version>.json`` (no Spark job); object stores: DESCRIBE HISTORY.
    """
    local = _local(path)
    if local is not None:
        log = Path(local, "_delta_log")
        try:
            versions = [int(m.group(1)) for name in os.listdir(log) if (m := _COMMIT.match(name))]
        except FileNotFoundError:
            return None
        return max(versions) if versions else None
    from delta.tables import DeltaTable

    if not DeltaTable.isDeltaTable(spark, path):
        return None
    return int(DeltaTable.forPath(spark, path).history(1).select("version").first()[0])


# -- the report ---------------------------------------------------------------------------------------------
def _table_stats(spark: SparkSession, path: str) -> dict[str, Any]:
    from pyspark.sql import functions as F

    df = spark.read.format("delta").load(path)
    cols = [f.name for f in df.schema.fields]
    row = df.agg(F.count(F.lit(1)).alias("__rows"),
                 *[F.sum(F.col(f"`{c}`").isNull().cast("long")).alias(f"n{i}") for i, c in enumerate(cols)]).first()
    rows = int(row["__rows"])
    return {"rows": rows,
            "null_share": {c: (round(int(row[f"n{i}"] or 0) / rows, 6) if rows else None) for i, c in enumerate(cols)}}


def quality_report(spark: SparkSession, lake_root: str, specs: Iterable[TableSpec] | None = None,
                   now: datetime | None = None) -> dict[str, Any]:
    """Row counts, null shares, quarantine share by reason and Delta versions of bronze and declared tables."""
    from pyspark.sql import functions as F

    now = now or datetime.now(timezone.utc)
    report: dict[str, Any] = {"generated_at": now.isoformat(), "lake_root": lake_root, "tables": {},
                              "quarantine": {}}
    names = [*BRONZE_TABLES.values(), *(s.name for s in (specs if specs is not None else tables()))]
    for name in names:
        path = join_path(lake_root, name)
        version = delta_version(spark, path)
        entry: dict[str, Any] = {"path": path, "exists": version is not None, "version": version}
        if version is not None:
            entry.update(_table_stats(spark, path))
        report["tables"][name] = entry
    for topic, bronze_name in BRONZE_TABLES.items():
        short = bronze_name.split("/", 1)[1]
        q_name, s_name = f"quarantine/{short}", f"silver/{short}"
        bronze_rows = report["tables"].get(bronze_name, {}).get("rows")
        q = report["tables"].get(q_name, {})
        entry = {"topic": topic, "bronze_rows": bronze_rows, "silver_rows": report["tables"].get(s_name, {}).get("rows"),
                 "quarantined": q.get("rows"), "share": None, "by_reason": {}}
        if q.get("exists"):
            counts = {r["reason_kind"]: int(r["n"]) for r in spark.read.format("delta").load(q["path"])
                      .groupBy("reason_kind").agg(F.count(F.lit(1)).alias("n")).collect()}
            entry["by_reason"] = {kind: {"rows": n, "share": round(n / bronze_rows, 6) if bronze_rows else None}
                                  for kind, n in sorted(counts.items())}
            if bronze_rows:
                entry["share"] = round(sum(counts.values()) / bronze_rows, 6)
        report["quarantine"][short] = entry
    return report


def write_report(spark: SparkSession | None, lake_root: str, report: Mapping[str, Any], now: datetime | None = None) -> str:
    """Write ``report`` as JSON to ``<lake root>/_reports/quality/<UTC timestamp>.json``; returns the path."""
    now = now or datetime.now(timezone.utc)
    name = now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z.json"
    path = join_path(lake_root, REPORT_ROOT, "quality", name)
    text = json.dumps(report, indent=2, sort_keys=True, default=str) + "\n"
    local = _local(path)
    if local is not None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        Path(local).write_text(text)
        return local
    jvm = spark._jvm  # object store: through Hadoop's FileSystem, with the session's credentials
    hpath = jvm.org.apache.hadoop.fs.Path(path)
    fs = hpath.getFileSystem(spark._jsc.hadoopConfiguration())
    out = fs.create(hpath, True)
    try:
        out.write(bytearray(text.encode()))
    finally:
        out.close()
    return path
