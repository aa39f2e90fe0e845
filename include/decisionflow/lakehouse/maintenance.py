"""Delta management of the declared tables: create and migrate, OPTIMIZE/Z-ORDER, VACUUM.

* :func:`migrate` - create missing tables at their latest schema version, apply pending migrations in order,
  refuse an incompatible existing table (:class:`~decisionflow.lakehouse.tables.IncompatibleTableError`
  naming table and column). Idempotent: a second run changes nothing and makes no commit.
* :func:`tables_needing_migration` - which tables :func:`migrate` would touch, read from the Delta logs with
  delta-rs in well under a second (no Spark), so an Airflow task can skip the Spark job when all are current.
* :func:`optimize` - ``OPTIMIZE ... ZORDER BY`` the declared Z-order columns (plain compaction when a table
  declares none).
* :func:`vacuum` - ``VACUUM`` with a retention in hours (default 168 = 7 days). Shorter retentions are refused
  unless ``allow_short_retention`` (as Delta itself does: a short retention breaks time travel and can break
  readers and streams still using old files - silver's bronze stream, gold's change-feed reads).

Used by ``jobs/migrate_lakehouse.py`` and ``jobs/maintain_lakehouse.py``; nothing imports pyspark at module
level (:func:`check_retention` is plain Python).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from decisionflow.lakehouse.quality import _local, delta_version, is_delta_table
from decisionflow.lakehouse.tables import (
    PROPERTY_MIGRATION_PREFIX,
    PROPERTY_SCHEMA_VERSION,
    PROPERTY_TABLE,
    IncompatibleTableError,
    Migration,
    TableSpec,
    plan_migration,
    tables,
)
from decisionflow.exceptions import NonRetryableError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = [
    "DEFAULT_RETENTION_HOURS",
    "RetentionError",
    "check_retention",
    "migrate",
    "migration_statements",
    "tables_needing_migration",
    "optimize",
    "vacuum",
]

log = logging.getLogger(__name__)

#: Delta's default ``delta.deletedFileRetentionDuration`` (7 days), and the shortest we accept by default.
DEFAULT_RETENTION_HOURS = 168.0


class RetentionError(NonRetryableError, ValueError):
    """A VACUUM retention below the safe minimum without the explicit override."""


def check_retention(hours: float, allow_short_retention: bool = False) -> float:
    """Validate a VACUUM retention: >= 0, and >= 168 h unless ``allow_short_retention``."""
    hours = float(hours)
    if hours < 0:
        raise RetentionError(f"retention must be >= 0 hours, got {hours:g}")
    if hours < DEFAULT_RETENTION_HOURS and not allow_short_retention:
        raise RetentionError(
            f"retention {hours:g} h is below {DEFAULT_RETENTION_HOURS:g} h: files still needed by time travel, "
            "by a running stream or by gold's change-feed reads could be deleted. Pass --allow-short-retention "
            "(allow_short_retention=True) if you really mean it."
        )
    return hours


def _sql_literal(text: str) -> str:
    return "'" + str(text).replace("\\", "\\\\").replace("'", "\\'") + "'"


def migration_statements(spec: TableSpec, path: str, migration: Migration, existing: Iterable[str] = ()) -> list[str]:
    """SQL applying ``migration`` to the table at ``path``; columns already in ``existing`` are not re-added
    (a run that crashed half-way), their default backfill is still run (it only touches NULLs)."""
    have = set(existing)
    statements = []
    for change in migration.changes:
        column = change.column
        if column.name not in have:
            comment = f" COMMENT {_sql_literal(column.comment)}" if column.comment else ""
            statements.append(f"ALTER TABLE delta.`{path}` ADD COLUMNS (`{column.name}` {column.type}{comment})")
        if change.default is not None:
            statements.append(f"UPDATE delta.`{path}` SET `{column.name}` = {change.default} "
                              f"WHERE `{column.name}` IS NULL")
    props = {PROPERTY_TABLE: spec.name, PROPERTY_SCHEMA_VERSION: str(migration.version),
             f"{PROPERTY_MIGRATION_PREFIX}{migration.version}": migration.description}
    statements.append(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ("
                      + ", ".join(f"{_sql_literal(k)} = {_sql_literal(v)}" for k, v in props.items()) + ")")
    return statements


def _describe(spark: SparkSession, path: str) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(column -> type, properties, partition columns) of the Delta table at ``path``."""
    from delta.tables import DeltaTable

    dt = DeltaTable.forPath(spark, path)
    detail = dt.detail().select("properties", "partitionColumns").first()
    columns = {f.name: f.dataType.simpleString() for f in dt.toDF().schema.fields}
    return columns, dict(detail["properties"] or {}), list(detail["partitionColumns"] or [])


def _wanted_properties(spec: TableSpec) -> dict[str, str]:
    """Properties every current table carries (the migration log entries are written by the migrations)."""
    wanted = {k: v for k, v in spec.table_properties().items()
              if not k.startswith(PROPERTY_MIGRATION_PREFIX) and k != PROPERTY_SCHEMA_VERSION}
    wanted[PROPERTY_SCHEMA_VERSION] = str(spec.schema_version)
    return wanted


def tables_needing_migration(lake_root: str, storage_options: dict[str, str] | None = None,
                             specs: Iterable[TableSpec] | None = None) -> dict[str, str]:
    """
    ``{table: why}`` for each declared table :func:`migrate` would create or change; empty when every table is
    at its declared schema version with the declared properties and partitioning.

    Reads only the Delta logs (delta-rs), no Spark. Anything it cannot read counts as needing migration: the
    Spark job then decides, and names the problem.
    """
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    needed: dict[str, str] = {}
    for spec in (list(specs) if specs is not None else tables()):
        try:
            metadata = DeltaTable(spec.path(lake_root), storage_options=storage_options or None).metadata()
        except TableNotFoundError:
            needed[spec.name] = "missing"
            continue
        except Exception as exc:  # noqa: BLE001 - unreadable: let the Spark job report it
            needed[spec.name] = f"unreadable ({type(exc).__name__}: {exc})"
            continue
        properties = dict(metadata.configuration or {})
        if list(metadata.partition_columns or []) != list(spec.partition_by):
            needed[spec.name] = f"partitioned by {list(metadata.partition_columns or [])}"
            continue
        differing = sorted(k for k, v in _wanted_properties(spec).items() if properties.get(k) != v)
        if differing:
            version = properties.get(PROPERTY_SCHEMA_VERSION)
            needed[spec.name] = (f"schema version {version}, declared {spec.schema_version}"
                                 if PROPERTY_SCHEMA_VERSION in differing else f"properties {differing}")
    return needed


def migrate(spark: SparkSession, lake_root: str, specs: Iterable[TableSpec] | None = None, *,
            dry_run: bool = False) -> list[dict[str, Any]]:
    """
    Create missing tables and apply pending migrations, in declaration order.

    :return: one entry per table: ``action`` (created / migrated / adopted / up-to-date, or would-* with
        ``dry_run``), ``from_version``, ``to_version``, ``statements`` run.
    :raises IncompatibleTableError: before changing that table (earlier tables may have been migrated).
    """
    out = []
    for spec in (list(specs) if specs is not None else tables()):
        path = spec.path(lake_root)
        entry: dict[str, Any] = {"table": spec.name, "path": path, "to_version": spec.schema_version}
        started = time.monotonic()
        if not is_delta_table(spark, path):
            local = _local(path)
            if local is not None and os.path.isdir(local) and os.listdir(local):
                raise IncompatibleTableError(spec.name, None, f"{path} exists and is not a Delta table; refusing "
                                             "to create the table over it")
            statements = [spec.create_sql(lake_root)]
            entry.update(action="would-create" if dry_run else "created", from_version=None)
        else:
            columns, properties, partitions = _describe(spark, path)
            if partitions != list(spec.partition_by):
                column = next(iter(set(partitions) ^ set(spec.partition_by)), None)
                raise IncompatibleTableError(spec.name, column, f"partitioned by {partitions}, declared "
                                             f"{list(spec.partition_by)}; refusing to migrate")
            version, pending = plan_migration(spec, properties, columns)
            entry["from_version"] = version
            statements = []
            have = set(columns)
            for migration in pending:
                statements += migration_statements(spec, path, migration, have)
                have |= {c.name for c in migration.added}
            wanted = _wanted_properties(spec)
            after = dict(properties)
            if pending:  # the migrations record the version and the table name themselves
                after.update({PROPERTY_SCHEMA_VERSION: str(spec.schema_version), PROPERTY_TABLE: spec.name})
            missing = {k: v for k, v in wanted.items() if after.get(k) != v}
            if missing:
                statements.append(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ("
                                  + ", ".join(f"{_sql_literal(k)} = {_sql_literal(v)}" for k, v in missing.items()) + ")")
            if pending:
                action = "migrated"
            elif statements:
                action = "adopted" if PROPERTY_SCHEMA_VERSION not in properties else "properties-updated"
            else:
                action = "up-to-date"
            entry.update(action=f"would-{action}" if dry_run and statements else action,
                         applied=[m.version for m in pending])
        if not dry_run:
            for statement in statements:
                log.info("%s: %s", spec.name, statement)
                spark.sql(statement)
        entry["statements"] = statements
        entry["version"] = delta_version(spark, path) if not dry_run else None
        entry["seconds"] = round(time.monotonic() - started, 2)
        out.append(entry)
    return out


def optimize(spark: SparkSession, lake_root: str, specs: Iterable[TableSpec] | None = None) -> list[dict[str, Any]]:
    """OPTIMIZE every existing declared table: ZORDER BY its declared columns, else compaction."""
    from delta.tables import DeltaTable

    out = []
    for spec in (list(specs) if specs is not None else tables()):
        path = spec.path(lake_root)
        if not is_delta_table(spark, path):
            out.append({"table": spec.name, "skipped": "no table"})
            continue
        started = time.monotonic()
        before = delta_version(spark, path)
        builder = DeltaTable.forPath(spark, path).optimize()
        frame = builder.executeZOrderBy(*spec.zorder_by) if spec.zorder_by else builder.executeCompaction()
        metrics = frame.select("metrics.numFilesAdded", "metrics.numFilesRemoved").first()
        out.append({"table": spec.name, "zorder_by": list(spec.zorder_by), "files_added": int(metrics[0] or 0),
                    "files_removed": int(metrics[1] or 0), "version_before": before,
                    "version_after": delta_version(spark, path), "seconds": round(time.monotonic() - started, 2)})
    return out


def _data_files(path: str) -> int | None:
    local = _local(path)
    if local is None:
        return None
    count = 0
    for root, dirs, files in os.walk(local):
        dirs[:] = [d for d in dirs if d != "_delta_log"]
        count += sum(1 for f in files if f.endswith(".parquet"))
    return count


#: Spark's default for ``spark.sql.sources.parallelPartitionDiscovery.parallelism``. VACUUM (FULL) lists the
#: table directory with that many tasks: on a small local machine that alone took ~2 minutes per table.
_LISTING_PARALLELISM_KEY = "spark.sql.sources.parallelPartitionDiscovery.parallelism"
_LISTING_PARALLELISM_DEFAULT = "10000"


def vacuum(spark: SparkSession, lake_root: str, retention_hours: float = DEFAULT_RETENTION_HOURS, *,
           allow_short_retention: bool = False, lite: bool = False,
           specs: Iterable[TableSpec] | None = None) -> list[dict[str, Any]]:
    """
    VACUUM every existing declared table with ``retention_hours`` (see :func:`check_retention`).

    :param lite: ``VACUUM ... LITE``: delete only files the Delta log says were removed (no directory listing,
        much faster; leaves files no commit ever referenced, e.g. from crashed writers, to a FULL run).
    """
    from delta.tables import DeltaTable

    hours = check_retention(retention_hours, allow_short_retention)
    check_key = "spark.databricks.delta.retentionDurationCheck.enabled"
    restore = {check_key: spark.conf.get(check_key, None),
               _LISTING_PARALLELISM_KEY: spark.conf.get(_LISTING_PARALLELISM_KEY, None)}
    if hours < DEFAULT_RETENTION_HOURS:
        spark.conf.set(check_key, "false")  # our own check above already demanded the explicit override
    if restore[_LISTING_PARALLELISM_KEY] in (None, _LISTING_PARALLELISM_DEFAULT):
        spark.conf.set(_LISTING_PARALLELISM_KEY, str(max(2, spark.sparkContext.defaultParallelism)))
    out = []
    try:
        for spec in (list(specs) if specs is not None else tables()):
            path = spec.path(lake_root)
            if not is_delta_table(spark, path):
                out.append({"table": spec.name, "skipped": "no table"})
                continue
            started = time.monotonic()
            files_before = _data_files(path)
            if lite:
                spark.sql(f"VACUUM delta.`{path}` LITE RETAIN {hours:g} HOURS").collect()
            else:
                DeltaTable.forPath(spark, path).vacuum(hours)
            files_after = _data_files(path)
            out.append({"table": spec.name, "retention_hours": hours, "mode": "lite" if lite else "full",
                        "parquet_files_before": files_before, "parquet_files_after": files_after,
                        "seconds": round(time.monotonic() - started, 2)})
    finally:
        for key, value in restore.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)
    return out

