"""Declared tables of the silver, quarantine and gold layers, and their ordered schema migrations.

Pure Python: no Spark needed to import or inspect the declarations (``jobs/migrate_lakehouse.py`` applies
them, :mod:`decisionflow.lakehouse.silver` / :mod:`~decisionflow.lakehouse.gold` write them).

Every table is a :class:`TableSpec`: its name (also its path under the lake root, ``silver/transactions``),
columns as Spark DDL, merge keys, partitioning, Z-order columns, Delta properties, a description and its
:class:`Migration` list. The declared ``columns`` are always the *current* schema; a migration says which of
them were added at which schema version, so the schema at any version is known (:meth:`TableSpec.columns_at`).

Versioning, recorded in the Delta table's own properties (``SHOW TBLPROPERTIES``):

* ``decisionflow.table`` - the declared name; ``decisionflow.schema_version`` - the version the table is at
  (1 = as first created; migration N brings it from N-1 to N); ``decisionflow.migration.<N>`` - what
  migration N did.
* A missing table is created directly at the latest version (no migrations to replay).
* An existing table gets the migrations above its recorded version, in order; each migration is idempotent
  on its own (a column that is already there with the right type is not added again), and the version
  property is written last, so a crash half-way is repaired by the next run.
* A table whose columns do not match its declaration at its recorded version is refused
  (:class:`IncompatibleTableError`, naming the table and the column) - nothing is changed then.

Layers (``silver/<x>``, ``quarantine/<x>``, ``gold/<x>``) are described in :mod:`decisionflow.lakehouse.silver`
and :mod:`decisionflow.lakehouse.gold`; the bronze layout (written by
:mod:`decisionflow.lakehouse.bronze`) is restated here as :data:`BRONZE_DDL` because silver depends on it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decisionflow.exceptions import NonRetryableError

__all__ = [
    "AddColumn",
    "BRONZE_COLUMNS",
    "BRONZE_DDL",
    "BRONZE_TABLES",
    "CHECKPOINT_ROOT",
    "Column",
    "IncompatibleTableError",
    "LAYERS",
    "Migration",
    "PROPERTY_MIGRATION_PREFIX",
    "PROPERTY_SCHEMA_VERSION",
    "PROPERTY_TABLE",
    "REPORT_ROOT",
    "TABLES",
    "TableSpec",
    "checkpoint_path",
    "join_path",
    "normalize_type",
    "plan_migration",
    "schema_problems",
    "table",
    "table_path",
    "tables",
]

PROPERTY_TABLE = "decisionflow.table"
PROPERTY_SCHEMA_VERSION = "decisionflow.schema_version"
PROPERTY_MIGRATION_PREFIX = "decisionflow.migration."
LAYERS = ("silver", "quarantine", "gold", "serving")
CHECKPOINT_ROOT = "_checkpoints"
REPORT_ROOT = "_reports"

#: The bronze layout silver reads (owned by :mod:`decisionflow.lakehouse.bronze`; a unit test checks the two
#: agree). ``value`` is the raw bytes, NULL for a tombstone.
BRONZE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("topic", "STRING"), ("partition", "INT"), ("offset", "BIGINT"), ("kafka_timestamp", "TIMESTAMP"),
    ("key", "STRING"), ("value", "BINARY"), ("value_size", "INT"), ("ingested_at", "TIMESTAMP"),
    ("ingest_date", "DATE"),
)
BRONZE_DDL = ", ".join(f"`{name}` {sql_type}" for name, sql_type in BRONZE_COLUMNS)
#: Source topic -> bronze table name under the lake root.
BRONZE_TABLES: dict[str, str] = {
    "transactions": "bronze/transactions",
    "transaction-labels": "bronze/labels",
    "case-notes": "bronze/case_notes",
}

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_TYPE_ALIASES = {"integer": "int", "long": "bigint", "short": "smallint", "byte": "tinyint", "real": "float"}


def normalize_type(sql_type: str) -> str:
    """A Spark SQL type in the form ``StructField.dataType.simpleString()`` prints it (``array<string>``)."""
    text = re.sub(r"\s+", "", sql_type.strip().lower())
    return re.sub(r"[a-z]+", lambda m: _TYPE_ALIASES.get(m.group(0), m.group(0)), text)


def join_path(root: str, *parts: str) -> str:
    """``root/part/...`` for a local path or an object-store URI (no ``os.path``: URIs keep their ``//``)."""
    head = str(root).rstrip("/")
    tail = "/".join(p.strip("/") for p in parts if p)
    return f"{head}/{tail}" if tail else head


@dataclass(frozen=True)
class Column:
    """One column: Spark SQL ``type`` (``STRING``, ``BIGINT``, ``ARRAY<STRING>``...), NOT NULL unless ``nullable``."""

    name: str
    type: str
    nullable: bool = True
    comment: str = ""

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise ValueError(f"column name {self.name!r}: lower-case letters, digits and _ only")

    def ddl(self) -> str:
        comment = self.comment.replace("'", "\\'")
        return (f"`{self.name}` {self.type}{'' if self.nullable else ' NOT NULL'}"
                + (f" COMMENT '{comment}'" if comment else ""))


@dataclass(frozen=True)
class AddColumn:
    """Add a (nullable) column; ``default`` is a SQL literal written into every existing row (a backfill)."""

    column: Column
    default: str | None = None

    def describe(self) -> str:
        text = f"add column {self.column.name} {self.column.type}"
        return text + (f" default {self.default}" if self.default is not None else "")


@dataclass(frozen=True)
class Migration:
    """Schema change from ``version - 1`` to ``version``."""

    version: int
    description: str
    changes: tuple[AddColumn, ...]

    @property
    def added(self) -> tuple[Column, ...]:
        return tuple(change.column for change in self.changes)


@dataclass(frozen=True)
class TableSpec:
    """A declared Delta table (see the module docstring)."""

    name: str
    columns: tuple[Column, ...]
    keys: tuple[str, ...]
    description: str
    partition_by: tuple[str, ...] = ()
    zorder_by: tuple[str, ...] = ()
    properties: Mapping[str, str] = field(default_factory=dict)
    migrations: tuple[Migration, ...] = ()

    def __post_init__(self):
        layer, _, short = self.name.partition("/")
        if layer not in LAYERS or not _NAME.match(short or "-"):
            raise ValueError(f"table name {self.name!r} must be <layer>/<name> with layer in {LAYERS}")
        names = [c.name for c in self.columns]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate column names {sorted({n for n in names if names.count(n) > 1})}")
        by_name = {c.name: c for c in self.columns}
        for what, cols in (("keys", self.keys), ("partition_by", self.partition_by), ("zorder_by", self.zorder_by)):
            missing = [c for c in cols if c not in by_name]
            if missing:
                raise ValueError(f"{self.name}: {what} names undeclared columns {missing}")
        if not self.keys:
            raise ValueError(f"{self.name}: at least one key column is required")
        nullable_keys = [k for k in self.keys if by_name[k].nullable]
        if nullable_keys:
            raise ValueError(f"{self.name}: key columns must be NOT NULL, {nullable_keys} are nullable")
        both = set(self.partition_by) & set(self.zorder_by)
        if both:
            raise ValueError(f"{self.name}: Z-order on partition columns {sorted(both)} is useless (Delta refuses it)")
        expected = 2
        seen: set[str] = set()
        for migration in self.migrations:
            if migration.version != expected:
                raise ValueError(f"{self.name}: migrations must be numbered 2, 3, ... in order; got "
                                 f"{[m.version for m in self.migrations]}")
            expected += 1
            for column in migration.added:
                declared = by_name.get(column.name)
                if declared is None or normalize_type(declared.type) != normalize_type(column.type):
                    raise ValueError(f"{self.name}: migration {migration.version} adds {column.name} "
                                     f"{column.type}, which is not a declared column of that type")
                if not column.nullable or not declared.nullable:
                    raise ValueError(f"{self.name}: migration {migration.version} adds {column.name} as NOT NULL; "
                                     "Delta can only add nullable columns")
                if column.name in seen:
                    raise ValueError(f"{self.name}: column {column.name} is added by two migrations")
                seen.add(column.name)
        added_keys = seen & set(self.keys + self.partition_by)
        if added_keys:
            raise ValueError(f"{self.name}: keys/partition columns {sorted(added_keys)} cannot be added by a migration")

    @property
    def layer(self) -> str:
        return self.name.split("/", 1)[0]

    @property
    def short_name(self) -> str:
        return self.name.split("/", 1)[1]

    @property
    def schema_version(self) -> int:
        """The latest version: 1 + the number of migrations."""
        return 1 + len(self.migrations)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def column(self, name: str) -> Column:
        for item in self.columns:
            if item.name == name:
                return item
        raise KeyError(f"{self.name} has no column {name!r}")

    def columns_at(self, version: int) -> tuple[Column, ...]:
        """The declared columns as they were at ``version`` (those added by later migrations left out)."""
        if not 1 <= version <= self.schema_version:
            raise ValueError(f"{self.name}: no schema version {version} (1..{self.schema_version})")
        later = {c.name for m in self.migrations if m.version > version for c in m.added}
        return tuple(c for c in self.columns if c.name not in later)

    def ddl(self, version: int | None = None) -> str:
        cols = self.columns if version is None else self.columns_at(version)
        return ", ".join(c.ddl() for c in cols)

    def table_properties(self) -> dict[str, str]:
        """Delta properties of a freshly created table (at the latest version)."""
        props = {PROPERTY_TABLE: self.name, PROPERTY_SCHEMA_VERSION: str(self.schema_version)}
        for migration in self.migrations:
            props[f"{PROPERTY_MIGRATION_PREFIX}{migration.version}"] = migration.description
        return {**dict(self.properties), **props}

    def path(self, lake_root: str) -> str:
        return join_path(lake_root, self.name)

    def create_sql(self, lake_root: str) -> str:
        """``CREATE TABLE IF NOT EXISTS delta.`<path>` (...)`` at the latest version."""
        props = ", ".join(f"'{k}' = '{_quote(v)}'" for k, v in sorted(self.table_properties().items()))
        partition = f" PARTITIONED BY ({', '.join(self.partition_by)})" if self.partition_by else ""
        comment = _quote(self.description)
        return (f"CREATE TABLE IF NOT EXISTS delta.`{self.path(lake_root)}` ({self.ddl()}) USING DELTA"
                f"{partition} COMMENT '{comment}' TBLPROPERTIES ({props})")

    def pending(self, current_version: int) -> tuple[Migration, ...]:
        """Migrations still to apply to a table at ``current_version``, in order."""
        if current_version > self.schema_version:
            raise IncompatibleTableError(
                self.name, None, f"is at schema version {current_version}, newer than this code knows "
                f"({self.schema_version}); upgrade decisionflow instead of migrating down")
        return tuple(m for m in self.migrations if m.version > current_version)


def _quote(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("'", "\\'")


class IncompatibleTableError(NonRetryableError, RuntimeError):
    """An existing table cannot be brought to its declaration; names the table and (when known) the column."""

    def __init__(self, table: str, column: str | None, problem: str):
        self.table, self.column, self.problem = table, column, problem
        where = f"table {table}" + (f", column {column}" if column else "")
        super().__init__(f"{where}: {problem}")


def schema_problems(spec: TableSpec, actual: Mapping[str, str], version: int) -> list[tuple[str, str]]:
    """
    ``(column, problem)`` for each difference between a table's columns and ``spec`` at ``version``.

    :param actual: column name -> Spark type (``simpleString()`` form) of the existing table.
    """
    expected = {c.name: normalize_type(c.type) for c in spec.columns_at(version)}
    have = {name: normalize_type(t) for name, t in actual.items()}
    problems = []
    for name, sql_type in expected.items():
        if name not in have:
            problems.append((name, f"declared {sql_type} at schema version {version}, missing in the table"))
        elif have[name] != sql_type:
            problems.append((name, f"is {have[name]} in the table, declared {sql_type}"))
    for name in have:
        if name not in expected:
            problems.append((name, f"is in the table ({have[name]}) but not declared at schema version {version}"))
    return problems


def plan_migration(spec: TableSpec, properties: Mapping[str, str] | None, actual: Mapping[str, str]) -> tuple[int, tuple[Migration, ...]]:
    """
    Where an existing table stands and what to apply: ``(current version, pending migrations)``.

    A table without our version property (created by hand or by an older tool) is adopted at the highest
    version whose declared columns it matches exactly. Anything else raises :class:`IncompatibleTableError`.
    """
    properties = properties or {}
    recorded = properties.get(PROPERTY_SCHEMA_VERSION)
    owner = properties.get(PROPERTY_TABLE)
    if owner and owner != spec.name:
        raise IncompatibleTableError(spec.name, None, f"the Delta table at its path says it is {owner!r}")
    if recorded is None:
        for version in range(spec.schema_version, 0, -1):
            if not schema_problems(spec, actual, version):
                return version, spec.pending(version)
        column, problem = schema_problems(spec, actual, spec.schema_version)[0]
        raise IncompatibleTableError(spec.name, column, f"{problem} (table has no {PROPERTY_SCHEMA_VERSION} "
                                     "property and matches no declared version; refusing to touch it)")
    try:
        version = int(recorded)
    except ValueError:
        raise IncompatibleTableError(spec.name, None, f"{PROPERTY_SCHEMA_VERSION} is {recorded!r}, not a number") from None
    pending = spec.pending(version)
    # Columns added by a pending migration may already exist (a run that crashed before recording the
    # version): accept them when their type is right, the migration then skips them.
    half_done = {c.name for m in pending for c in m.added if c.name in actual}
    problems = [(col, problem) for col, problem in schema_problems(spec, actual, version)
                if not (col in half_done and "not declared at schema version" in problem
                        and normalize_type(actual[col]) == normalize_type(spec.column(col).type))]
    if problems:
        column, problem = problems[0]
        raise IncompatibleTableError(spec.name, column, f"{problem}; refusing to migrate")
    return version, pending


# -- the declarations ---------------------------------------------------------------------------------------
def _c(name: str, sql_type: str, comment: str = "", *, null: bool = True) -> Column:
    return Column(name, sql_type, nullable=null, comment=comment)


#: Change data feed on every silver and gold table: gold reads silver's row-level changes to recompute only
#: the affected accounts/merchants/transactions (see gold.py), and consumers can do the same with gold.
_CDF = {"delta.enableChangeDataFeed": "true"}

_SILVER_LINEAGE = (
    _c("unknown_fields", "ARRAY<STRING>", "top-level fields the contract does not declare (allowed, reported)"),
    _c("source_topic", "STRING", "Kafka topic", null=False),
    _c("source_partition", "INT", "Kafka partition", null=False),
    _c("source_offset", "BIGINT", "Kafka offset of the first arrival", null=False),
    _c("kafka_timestamp", "TIMESTAMP", "Kafka record timestamp of the first arrival"),
    _c("ingested_at", "TIMESTAMP", "when bronze received it"),
    _c("payload_sha256", "STRING", "SHA-256 of the raw value bytes (tells exact re-sends from conflicts)", null=False),
    _c("silver_loaded_at", "TIMESTAMP", "when silver accepted it", null=False),
)

_QUARANTINE_COLUMNS = (
    _c("source_topic", "STRING", "Kafka topic", null=False),
    _c("source_partition", "INT", "Kafka partition", null=False),
    _c("source_offset", "BIGINT", "Kafka offset", null=False),
    _c("kafka_timestamp", "TIMESTAMP"),
    _c("key", "STRING", "Kafka key"),
    _c("reason_kind", "STRING", "malformed_json | tombstone | oversized | schema_violation", null=False),
    _c("reason", "STRING", "e.g. 'schema_violation: amount: ...' (the first violation)", null=False),
    _c("violations", "ARRAY<STRING>", "every contract violation found, one line each"),
    _c("value", "BINARY", "the raw payload as received (NULL for a tombstone)"),
    _c("value_size", "INT", "bytes"),
    _c("value_preview", "STRING", "the first characters of the payload as text, invalid UTF-8 replaced"),
    _c("payload_sha256", "STRING"),
    _c("ingested_at", "TIMESTAMP", "when bronze received it"),
    _c("quarantined_at", "TIMESTAMP", null=False),
    _c("quarantine_date", "DATE", "UTC date of quarantined_at (partition)", null=False),
)


def _quarantine(short: str, topic: str) -> TableSpec:
    return TableSpec(
        name=f"quarantine/{short}",
        columns=_QUARANTINE_COLUMNS,
        keys=("source_topic", "source_partition", "source_offset"),
        partition_by=("quarantine_date",),
        zorder_by=("reason_kind",),
        description=f"Bronze records of {topic} that silver could not accept, with the reason; one row per "
                    "Kafka record (topic, partition, offset), raw bytes kept for replay.",
    )


_ACCOUNT_FEATURES = (
    _c("txn_count_1h", "BIGINT", "transactions of the account in (t-1h, t]"),
    _c("txn_count_24h", "BIGINT"),
    _c("txn_count_7d", "BIGINT"),
    _c("amount_sum_1h", "DOUBLE", "sum of amounts in (t-1h, t] (currency units, mixed currencies as sent)"),
    _c("amount_sum_24h", "DOUBLE"),
    _c("amount_sum_7d", "DOUBLE"),
    _c("distinct_devices_24h", "INT", "distinct non-null device_id in (t-24h, t]"),
    _c("distinct_devices_7d", "INT"),
    _c("distinct_countries_24h", "INT"),
    _c("distinct_countries_7d", "INT"),
    _c("seconds_since_prev_txn", "DOUBLE", "to the latest other transaction at or before t; NULL for the first"),
    _c("amount_to_avg_7d", "DOUBLE", "amount / average amount in (t-7d, t] (this transaction included)"),
)
_MERCHANT_FEATURES = (
    _c("merchant_txn_count_24h", "BIGINT", "transactions of the merchant in (t-24h, t]"),
    _c("merchant_txn_count_7d", "BIGINT"),
    _c("merchant_labels_known", "BIGINT", "labelled transactions of the merchant whose label was known at t"),
    _c("merchant_fraud_labels", "BIGINT", "of those, labelled fraud (latest label known at t)"),
    _c("merchant_fraud_rate", "DOUBLE", "merchant_fraud_labels / merchant_labels_known; NULL when none known"),
)
_UPDATED_AT = _c("updated_at", "TIMESTAMP", "when this row's values last changed (Feast created timestamp)",
                 null=False)

_TABLES: tuple[TableSpec, ...] = (
    TableSpec(
        name="silver/transactions",
        columns=(
            _c("event_id", "STRING", "UUID of the transaction", null=False),
            _c("event_time", "TIMESTAMP", "when it happened (UTC)", null=False),
            _c("account_id", "STRING", null=False),
            _c("merchant_id", "STRING", null=False),
            _c("amount", "DOUBLE", "currency units, > 0", null=False),
            _c("currency", "STRING", null=False),
            _c("mcc", "STRING", null=False),
            _c("channel", "STRING", null=False),
            _c("country", "STRING", null=False),
            _c("device_id", "STRING"),
            _c("ip", "STRING"),
            _c("memo", "STRING"),
            _c("schema_version", "BIGINT", "contract version the producer wrote", null=False),
            _c("event_date", "DATE", "UTC date of event_time (partition)", null=False),
            *_SILVER_LINEAGE,
        ),
        keys=("event_id",),
        partition_by=("event_date",),
        zorder_by=("account_id", "merchant_id"),
        properties=_CDF,
        description="Contract-valid transactions, typed, one row per event_id (first arrival wins); late and "
                    "out-of-order events included.",
    ),
    _quarantine("transactions", "transactions"),
    TableSpec(
        name="silver/labels",
        columns=(
            _c("event_id", "STRING", "the labelled transaction", null=False),
            _c("label", "STRING", "fraud | legit", null=False),
            _c("source", "STRING", "chargeback | investigation", null=False),
            _c("labelled_at", "TIMESTAMP", "when the label became known (UTC)", null=False),
            _c("schema_version", "BIGINT", null=False),
            *_SILVER_LINEAGE,
        ),
        keys=("event_id", "source", "labelled_at"),
        zorder_by=("event_id",),
        properties=_CDF,
        description="Contract-valid transaction labels, one row per (event_id, source, labelled_at).",
    ),
    _quarantine("labels", "transaction-labels"),
    TableSpec(
        name="silver/case_notes",
        columns=(
            _c("case_id", "STRING", null=False),
            _c("event_id", "STRING", "the transaction under review", null=False),
            _c("account_id", "STRING", null=False),
            _c("author", "STRING", null=False),
            _c("text", "STRING", null=False),
            _c("created_at", "TIMESTAMP", "when the note was written (UTC)", null=False),
            _c("schema_version", "BIGINT", null=False),
            *_SILVER_LINEAGE,
        ),
        keys=("case_id", "created_at", "author"),
        zorder_by=("event_id",),
        properties=_CDF,
        description="Contract-valid investigator notes, one row per (case_id, created_at, author).",
    ),
    _quarantine("case_notes", "case-notes"),
    TableSpec(
        name="gold/account_features",
        columns=(
            _c("event_id", "STRING", "the transaction the features are computed at", null=False),
            _c("account_id", "STRING", "Feast entity", null=False),
            _c("event_time", "TIMESTAMP", "feature timestamp (Feast event timestamp)", null=False),
            *_ACCOUNT_FEATURES,
            _UPDATED_AT,
        ),
        keys=("event_id",),
        zorder_by=("account_id", "event_time"),
        properties=_CDF,
        description="Point-in-time account features, one row per transaction, from the account's transactions "
                    "at or before event_time only.",
    ),
    TableSpec(
        name="gold/merchant_features",
        columns=(
            _c("event_id", "STRING", "the transaction the features are computed at", null=False),
            _c("merchant_id", "STRING", "Feast entity", null=False),
            _c("event_time", "TIMESTAMP", "feature timestamp (Feast event timestamp)", null=False),
            *_MERCHANT_FEATURES,
            _UPDATED_AT,
        ),
        keys=("event_id",),
        zorder_by=("merchant_id", "event_time"),
        properties=_CDF,
        description="Point-in-time merchant features, one row per transaction; the fraud rate counts only "
                    "labels with labelled_at <= event_time.",
    ),
    TableSpec(
        name="gold/transactions_enriched",
        columns=(
            _c("event_id", "STRING", null=False),
            _c("event_time", "TIMESTAMP", null=False),
            _c("account_id", "STRING", null=False),
            _c("merchant_id", "STRING", null=False),
            _c("amount", "DOUBLE", null=False),
            _c("currency", "STRING"),
            _c("mcc", "STRING"),
            _c("channel", "STRING"),
            _c("country", "STRING"),
            _c("device_id", "STRING"),
            _c("ip", "STRING"),
            _c("memo", "STRING"),
            *_ACCOUNT_FEATURES,
            *_MERCHANT_FEATURES,
            _c("label", "STRING", "latest known label (fraud | legit), NULL when unlabelled"),
            _c("labelled_at", "TIMESTAMP", "when that label became known"),
            _c("is_fraud", "BOOLEAN", "label = 'fraud'; NULL when unlabelled"),
            _c("label_source", "STRING", "chargeback | investigation (added in schema version 2)"),
            _UPDATED_AT,
        ),
        keys=("event_id",),
        zorder_by=("account_id", "event_time"),
        properties=_CDF,
        migrations=(
            Migration(2, "add label_source (where the latest label came from); filled by the next gold build",
                      (AddColumn(_c("label_source", "STRING", "chargeback | investigation (added in schema version 2)")),)),
        ),
        description="Silver transaction + account and merchant features at event_time + the latest label, "
                    "for decisions and evaluation.",
    ),
)

# The decision loop's own tables: written by delta-rs (decisionflow.decisions.audit / .outbox, no Spark), declared
# here so the migrate job, OPTIMIZE/VACUUM and the quality report cover them like every other table. delta-rs
# creates them with the same columns, NOT NULL flags and properties when a decision run comes first.
_DECISION_V2: tuple[Column, ...] = (
    _c("brain", "STRING", "who chose the decision: policy | agent (schema version 2)"),
    _c("escalation", "STRING", "JSON summary of the escalation step (NULL: not escalated)"),
    _c("review_decision", "STRING", "a reviewer's answer: approve | decline | escalate (NULL: not reviewed)"),
    _c("reviewed_by", "STRING", "who answered (Airflow user, or the CLI's --by)"),
    _c("reviewed_at", "TIMESTAMP", "when the answer was given (UTC)"),
    _c("review_note", "STRING", "the reviewer's note"),
    _c("review_source", "STRING", "hitl | cli | timeout"),
)
_DECISION_TABLES: tuple[TableSpec, ...] = (
    TableSpec(
        name="gold/decisions",
        columns=(
            _c("decision_id", "STRING", "uuid5 of (event_id, policy_version): the same decision on every retry",
               null=False),
            _c("event_id", "STRING", "the decided transaction", null=False),
            _c("account_id", "STRING", null=False),
            _c("merchant_id", "STRING", null=False),
            _c("event_time", "TIMESTAMP", "the transaction's event time (UTC)", null=False),
            _c("decided_at", "TIMESTAMP", "when the decision run decided it (UTC)", null=False),
            _c("run_id", "STRING", "the Airflow run that decided it", null=False),
            _c("decision", "STRING", "approve | review | decline", null=False),
            _c("reason_codes", "ARRAY<STRING>", "why, as stable codes", null=False),
            _c("score", "DOUBLE", "the model's fraud score", null=False),
            _c("model_name", "STRING", null=False),
            _c("model_version", "STRING", "registered model version pinned for the run", null=False),
            _c("model_run_id", "STRING", "MLflow run that trained that version", null=False),
            _c("features", "STRING", "JSON object of the feature values the model saw", null=False),
            _c("similar_cases", "STRING", "JSON list of similar past cases, or {searched: false, reason}",
               null=False),
            _c("policy_name", "STRING", null=False),
            _c("policy_version", "STRING", null=False),
            _c("escalated", "BOOLEAN", "handed to the review queue", null=False),
            _c("rationale", "STRING", "deterministic text: what decided it", null=False),
            _c("actions", "ARRAY<STRING>", "actions the decision triggers (empty: none)", null=False),
            *_DECISION_V2,
        ),
        keys=("decision_id",),
        zorder_by=("account_id", "event_time"),
        description="Audit trail: one row per decision (event_id x policy version), written once by MERGE "
                    "insert-if-absent; only the review columns are set later, once, by the reviewer's answer.",
        migrations=(
            Migration(2, "add brain and escalation (who chose the decision, the escalation summary) and the "
                         "review columns (set once by a reviewer's answer)",
                      tuple(AddColumn(c, "'policy'" if c.name == "brain" else None) for c in _DECISION_V2)),
        ),
    ),
    TableSpec(
        name="gold/escalations",
        columns=(
            _c("decision_id", "STRING", "the escalated decision (gold/decisions)", null=False),
            _c("run_id", "STRING", "the decision run", null=False),
            _c("event_id", "STRING", null=False),
            _c("brain", "STRING", "who chose the applied decision: agent | policy", null=False),
            _c("chat_model", "STRING", "the chat model the agent ran on (NULL: policy brain)"),
            _c("recommendation", "STRING", "the agent's accepted recommendation (NULL: none)"),
            _c("applied_decision", "STRING", "approve | review | decline", null=False),
            _c("accepted", "BOOLEAN", "the agent's recommendation was applied", null=False),
            _c("refused", "STRING", "JSON list of refused recommendations {decision, reason}", null=False),
            _c("fallback_reason", "STRING", "why the policy's decision stands (model error, limit, refusal)"),
            _c("model_calls", "INT", null=False),
            _c("tool_calls", "INT", null=False),
            _c("transcript", "STRING", "JSON list of every message the model saw and sent (masked)", null=False),
            _c("started_at", "TIMESTAMP", null=False),
            _c("finished_at", "TIMESTAMP", null=False),
        ),
        keys=("decision_id",),
        zorder_by=("run_id",),
        description="Escalation transcripts: one row per escalated decision with every prompt, tool call and "
                    "answer of its agent (or the policy brain's note), written once.",
    ),
    TableSpec(
        name="gold/decision_actions",
        columns=(
            _c("decision_id", "STRING", null=False),
            _c("channel", "STRING", "kafka | webhook", null=False),
            _c("event_id", "STRING", null=False),
            _c("run_id", "STRING", "the run that enqueued it", null=False),
            _c("idempotency_key", "STRING", "<decision_id>:<channel>, sent with the record", null=False),
            _c("payload", "STRING", "JSON: the audit record (kafka) or the decision's actions (webhook)",
               null=False),
            _c("status", "STRING", "pending | sent | failed", null=False),
            _c("attempts", "INT", "delivery attempts started", null=False),
            _c("last_error", "STRING", "why the last attempt failed"),
            _c("enqueued_at", "TIMESTAMP", null=False),
            _c("claimed_at", "TIMESTAMP", "first delivery attempt (kafka: with kafka_scan_from)"),
            _c("kafka_scan_from", "STRING", "JSON {partition: offset}: topic end offsets before the first send"),
            _c("sent_at", "TIMESTAMP"),
            _c("kafka_topic", "STRING"),
            _c("kafka_partition", "INT"),
            _c("kafka_offset", "BIGINT"),
            _c("http_status", "INT", "the webhook's answer"),
            _c("updated_at", "TIMESTAMP", "last status change", null=False),
        ),
        keys=("decision_id", "channel"),
        zorder_by=("status", "run_id"),
        description="Action outbox: one row per (decision_id, channel) with its delivery status; a row is sent "
                    "at most once per channel (Kafka read-back, webhook Idempotency-Key).",
    ),
)
_TABLES = _TABLES + _DECISION_TABLES

#: Every declared table by name, in dependency order (silver and quarantine first, gold last).
TABLES: dict[str, TableSpec] = {spec.name: spec for spec in _TABLES}


def table(name: str) -> TableSpec:
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"no declared table {name!r}; declared: {sorted(TABLES)}") from None


def tables(layer: str | None = None, specs: Iterable[TableSpec] | None = None) -> list[TableSpec]:
    """Declared tables (of one layer), in declaration order."""
    items = list(specs) if specs is not None else list(TABLES.values())
    return [s for s in items if layer is None or s.layer == layer]


def table_path(lake_root: str, name: str) -> str:
    """Path of a declared (or bronze) table under the lake root."""
    if name not in TABLES and name not in BRONZE_TABLES.values():
        raise KeyError(f"unknown table {name!r}")
    return join_path(lake_root, name)


def checkpoint_path(lake_root: str, layer: str, short_name: str) -> str:
    """``<lake root>/_checkpoints/<layer>/<table>``, e.g. the silver stream of ``transactions``."""
    return join_path(lake_root, CHECKPOINT_ROOT, layer, short_name)
