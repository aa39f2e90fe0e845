"""delta-rs plumbing shared by the audit trail and the outbox: declared schema -> Arrow, create-if-missing, MERGE
with a bounded retry on concurrent commits.

The tables are declared once in :mod:`decisionflow.lakehouse.tables` (Spark DDL, for the migrate job and
maintenance); :func:`arrow_schema` turns a declaration into the Arrow schema delta-rs writes, with the same NOT
NULL flags, so a table created here and one created by the Spark migrate job are the same table.
Heavy imports (pyarrow, deltalake) happen inside the functions.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from decisionflow.lakehouse.tables import (
    PROPERTY_MIGRATION_PREFIX,
    IncompatibleTableError,
    TableSpec,
    normalize_type,
)

if TYPE_CHECKING:
    import pyarrow as pa
    from deltalake import DeltaTable

log = logging.getLogger(__name__)

#: Concurrent-commit retries of one MERGE (delta-rs raises CommitFailedError when another writer won the race).
MERGE_ATTEMPTS = 6


def arrow_type(sql_type: str) -> pa.DataType:
    """The Arrow type delta-rs uses for a declared Spark SQL type (TIMESTAMP = microseconds, UTC)."""
    import pyarrow as pa

    simple = {"string": pa.string(), "double": pa.float64(), "boolean": pa.bool_(), "int": pa.int32(),
              "bigint": pa.int64(), "date": pa.date32(), "timestamp": pa.timestamp("us", tz="UTC"),
              "float": pa.float32(), "binary": pa.binary()}
    text = normalize_type(sql_type)
    if text.startswith("array<") and text.endswith(">"):
        return pa.list_(arrow_type(text[len("array<"):-1]))
    try:
        return simple[text]
    except KeyError:
        raise ValueError(f"no Arrow mapping for declared type {sql_type!r}") from None


def arrow_schema(spec: TableSpec) -> pa.Schema:
    """The declared columns of ``spec`` as an Arrow schema (NOT NULL columns non-nullable)."""
    import pyarrow as pa

    return pa.schema([pa.field(c.name, arrow_type(c.type), nullable=c.nullable) for c in spec.columns])


def _properties(spec: TableSpec) -> dict[str, str]:
    # as the migrate job would leave a fresh table: name, version, the declared properties (no migration log)
    return {k: v for k, v in spec.table_properties().items() if not k.startswith(PROPERTY_MIGRATION_PREFIX)}


def open_table(spec: TableSpec, lake_root: str, storage_options: dict[str, str] | None = None, *,
               create: bool = False) -> DeltaTable | None:
    """The Delta table of ``spec`` under ``lake_root``; created (empty, declared schema and properties) when
    missing and ``create``, else None when missing."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError, TableNotFoundError

    path = spec.path(lake_root)
    try:
        return _checked(spec, DeltaTable(path, storage_options=storage_options or None))
    except TableNotFoundError:
        if not create:
            return None
    try:
        # raise_if_key_not_exists=False: our decisionflow.* properties are not Delta keys (delta-rs refuses them)
        DeltaTable.create(path, arrow_schema(spec), mode="ignore", partition_by=list(spec.partition_by) or None,
                          name=spec.short_name, description=spec.description, configuration=_properties(spec),
                          storage_options=storage_options or None, raise_if_key_not_exists=False)
    except DeltaError as exc:  # another writer created it first: use theirs
        log.info("%s: concurrent create (%s); opening the existing table", spec.name, exc)
    return _checked(spec, DeltaTable(path, storage_options=storage_options or None))


def _checked(spec: TableSpec, dt: DeltaTable) -> DeltaTable:
    """``dt`` if its columns are the declared ones; else :class:`IncompatibleTableError` naming the column (a
    table behind its declaration needs the migrate job; a MERGE would fail with a less helpful message)."""
    import pyarrow as pa

    have = {f.name: f for f in pa.schema(dt.schema().to_arrow())}
    for column in spec.columns:
        if column.name not in have:
            raise IncompatibleTableError(spec.name, column.name, "declared but missing in the Delta table -- remedy: "
                                         "run the lakehouse migrate job (build_lakehouse's migrate task, or "
                                         "jobs/migrate_lakehouse.py) to bring it to its declared schema")
    extra = sorted(set(have) - set(spec.column_names))
    if extra:
        raise IncompatibleTableError(spec.name, extra[0], "is in the Delta table but not declared -- remedy: declare "
                                     "it in decisionflow.lakehouse.tables (with a migration) or fix the table")
    return dt


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns, order and types (missing nullable columns as nulls)."""
    import pyarrow as pa

    arrays = []
    for field in schema:
        if field.name in table.column_names:
            arrays.append(table[field.name].cast(field.type))
        else:
            arrays.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def merge_with_retry(spec: TableSpec, lake_root: str, storage_options: dict[str, str] | None,
                     run: Callable[[DeltaTable], dict[str, Any]], *, what: str) -> dict[str, Any]:
    """
    ``run(table)`` (one MERGE, executed) against a freshly loaded table, again on a concurrent-commit conflict.

    Each attempt reloads the table, so the MERGE's match is evaluated against what the other writer committed:
    an insert-if-absent MERGE retried after losing a race inserts only what is still absent.

    :raises RuntimeError: naming the table and ``what`` after :data:`MERGE_ATTEMPTS` conflicts in a row.
    """
    from deltalake.exceptions import CommitFailedError

    last: Exception | None = None
    for attempt in range(1, MERGE_ATTEMPTS + 1):
        table = open_table(spec, lake_root, storage_options, create=True)
        try:
            return run(table)
        except CommitFailedError as exc:
            last = exc
            pause = min(2.0, 0.05 * 2 ** attempt) * (0.5 + random.random())
            log.warning("%s: %s lost a concurrent commit (attempt %d/%d: %s); retrying in %.2fs",
                        spec.name, what, attempt, MERGE_ATTEMPTS, exc, pause)
            time.sleep(pause)
    raise RuntimeError(f"[lakehouse] table {spec.name}: {what} failed after {MERGE_ATTEMPTS} concurrent-commit "
                       f"conflicts ({last}) -- remedy: another writer keeps committing to it (a second decision "
                       "run or maintenance); retry the task") from last


def select(spec: TableSpec, dt: DeltaTable, columns: list[str], where: dict[str, Any] | None = None) -> pa.Table:
    """
    ``SELECT columns FROM dt WHERE col = value AND ...`` (DataFusion, via delta-rs' ``QueryBuilder``), typed as
    declared. delta-rs writes ``string_view`` columns, which a plain pyarrow dataset filter cannot compare with a
    string, so filtering goes through delta-rs' own engine (it also skips files by their statistics).
    """
    import pyarrow as pa
    from deltalake import QueryBuilder

    schema = arrow_schema(spec)
    clauses = []
    for name, value in (where or {}).items():
        if isinstance(value, (list, tuple, set, frozenset)):
            values = ", ".join(sql_string(v) for v in value) or "NULL"
            clauses.append(f'"{name}" IN ({values})')
        else:
            clauses.append(f'"{name}" = {sql_string(value)}')
    projection = ", ".join(f'"{c}"' for c in columns)
    sql = f"SELECT {projection} FROM t" + (f" WHERE {' AND '.join(clauses)}" if clauses else "")
    reader = QueryBuilder().register("t", dt).execute(sql)
    table = pa.table(reader)
    return pa.Table.from_arrays([table[c].cast(schema.field(c).type) for c in columns],
                                schema=pa.schema([schema.field(c) for c in columns]))


def sql_string(value: str) -> str:
    """A SQL string literal for a delta-rs predicate."""
    return "'" + str(value).replace("'", "''") + "'"
