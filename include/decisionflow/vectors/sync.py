"""Keep the ``case_notes`` Milvus collection equal to ``silver/case_notes`` joined with ``silver/labels``.

One sync:

1. reads the Delta versions of both tables; when they equal the watermark of the previous sync (and the
   embedding model is the same) nothing has changed and nothing is read (``skipped``);
2. otherwise reads both tables (deltalake, no Spark), builds one row per note (its latest label as
   ``outcome``) with a ``row_hash`` over every non-vector field;
3. reads ``note_id`` + ``row_hash`` of what the collection holds and plans: rows missing or with another hash
   are upserted (a label that arrived later changes the hash, so already-synced notes get their outcome),
   rows no longer in silver are deleted, the rest is left alone;
4. embeds only the texts to upsert (through the embedder's text-hash cache: an outcome change re-encodes
   nothing), upserts and deletes in bounded batches, flushes;
5. returns a :class:`SyncReport` whose ``watermark`` is the next sync's starting point.

``full=True`` ignores the watermark and the hashes (everything is upserted, extras deleted);
``recreate=True`` drops the collection first (a schema or dimension change).
Idempotent: a rerun after a crash redoes only what is still different.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from decisionflow.constants import CASE_NOTES_COLLECTION, SILVER_CASE_NOTES_TABLE, SILVER_LABELS_TABLE
from decisionflow.exceptions import NonRetryableError, NotReadyError
from decisionflow.vectors.collection import DENSE_FIELD, PRIMARY_FIELD, truncate_utf8

if TYPE_CHECKING:
    import pandas as pd
    from pymilvus import MilvusClient

    from decisionflow.vectors.embedders import Embedder

__all__ = [
    "NOTE_ID_NAMESPACE",
    "SyncError",
    "SyncPlan",
    "SyncReport",
    "build_rows",
    "note_id",
    "plan_sync",
    "read_silver",
    "sync_case_notes",
]

#: uuid5 namespace of note ids (fixed: ids must not change between releases).
NOTE_ID_NAMESPACE = uuid.UUID("5b0c7a52-2f4e-4b8e-9a51-6a1f1e0c4d21")
NOTE_COLUMNS = ["case_id", "event_id", "account_id", "author", "text", "created_at"]
LABEL_COLUMNS = ["event_id", "label", "source", "labelled_at"]
UNKNOWN = "unknown"


class SyncError(NonRetryableError, RuntimeError):
    """The sync cannot run: the message names the table or collection and the remedy."""


class SilverMissingError(SyncError, NotReadyError):
    """silver/case_notes or silver/labels has not been built yet (a fresh platform)."""


@dataclass
class SyncPlan:
    """What a sync changes: rows to upsert (without vectors), note ids to delete, how many are already equal."""

    upserts: list[dict[str, Any]] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    unchanged: int = 0
    #: upserts of notes already in the collection whose outcome (label) changed
    outcome_updates: int = 0
    #: upserts of notes not yet in the collection
    inserts: int = 0


@dataclass
class SyncReport:
    """Counts of one sync, JSON-safe via :meth:`as_dict`."""

    collection: str
    notes_in_silver: int = 0
    upserted: int = 0
    inserted: int = 0
    outcome_updates: int = 0
    deleted: int = 0
    unchanged: int = 0
    encoded: int = 0
    skipped: bool = False
    full: bool = False
    created_collection: bool = False
    watermark: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- rows -------------------------------------------------------------------------------------------------
def note_id(case_id: str, created_at_us: int, author: str) -> str:
    """Deterministic note id from the silver key ``(case_id, created_at, author)``; created_at in epoch µs."""
    return str(uuid.uuid5(NOTE_ID_NAMESPACE, f"{case_id}|{int(created_at_us)}|{author}"))


def _epoch(series: pd.Series, unit_ns: int) -> pd.Series:
    import pandas as pd

    values = pd.to_datetime(series, utc=True)
    return values.astype("datetime64[ns, UTC]").astype("int64") // unit_ns


def build_rows(notes: pd.DataFrame, labels: pd.DataFrame, model_id: str) -> list[dict[str, Any]]:
    """One collection row (no vector) per note: metadata, latest label of its event, ``row_hash``.

    :param notes: silver/case_notes columns :data:`NOTE_COLUMNS`.
    :param labels: silver/labels columns :data:`LABEL_COLUMNS`; the latest ``labelled_at`` per event wins.
    :param model_id: the embedder's model id (stored, and part of the hash so a new model re-embeds).
    """
    if notes.empty:
        return []
    latest: dict[str, tuple[str, int, str]] = {}
    if not labels.empty:
        ordered = labels.assign(_ms=_epoch(labels["labelled_at"], 1_000_000)).sort_values(
            ["event_id", "_ms", "source", "label"], kind="mergesort")
        for event_id, label, source, ms in zip(ordered["event_id"], ordered["label"], ordered["source"],
                                               ordered["_ms"], strict=True):
            latest[str(event_id)] = (str(label), int(ms), str(source))  # later rows overwrite earlier ones
    created_us = _epoch(notes["created_at"], 1_000)
    rows = []
    for case_id, event_id, account_id, author, text, us in zip(
            notes["case_id"], notes["event_id"], notes["account_id"], notes["author"], notes["text"], created_us,
            strict=True):
        outcome, outcome_at_ms, source = latest.get(str(event_id), (UNKNOWN, -1, ""))
        if outcome not in ("fraud", "legit"):
            outcome, outcome_at_ms, source = UNKNOWN, -1, ""
        row = {
            PRIMARY_FIELD: note_id(case_id, int(us), author),
            "text": truncate_utf8(str(text or "")),
            "case_id": str(case_id),
            "event_id": str(event_id),
            "account_id": str(account_id),
            "author": str(author),
            "created_at_ms": int(us) // 1000,
            "outcome": outcome,
            "outcome_at_ms": int(outcome_at_ms),
            "label_source": source,
            "embedding_model": model_id,
        }
        row["row_hash"] = _row_hash(row)
        rows.append(row)
    return rows


def _row_hash(row: Mapping[str, Any]) -> str:
    payload = json.dumps({k: v for k, v in row.items() if k not in ("row_hash", DENSE_FIELD)}, sort_keys=True,
                         ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def plan_sync(desired: Sequence[Mapping[str, Any]], existing: Mapping[str, tuple[str, str]], *,
              full: bool = False) -> SyncPlan:
    """Diff the desired rows against the collection.

    :param desired: rows from :func:`build_rows` (duplicated note ids: the last one wins).
    :param existing: note_id -> (row_hash, outcome) of what the collection holds.
    :param full: upsert every desired row even when its hash is equal.
    """
    by_id = {row[PRIMARY_FIELD]: row for row in desired}
    plan = SyncPlan()
    for nid, row in by_id.items():
        held = existing.get(nid)
        if held is None:
            plan.upserts.append(dict(row))
            plan.inserts += 1
        elif full or held[0] != row["row_hash"]:
            plan.upserts.append(dict(row))
            if held[1] != row["outcome"]:
                plan.outcome_updates += 1
        else:
            plan.unchanged += 1
    plan.deletes = sorted(set(existing) - set(by_id))
    return plan


# -- lake -------------------------------------------------------------------------------------------------
def _open(lake_root: str, table: str, storage_options: Mapping[str, str] | None):
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    from decisionflow.lakehouse.tables import join_path

    path = join_path(lake_root, table)
    try:
        return DeltaTable(path, storage_options=dict(storage_options) if storage_options else None)
    except TableNotFoundError as exc:
        raise SilverMissingError(f"vectors: table {table} does not exist at {path}; run build_lakehouse first (its "
                        "migrate task creates the silver tables)") from exc


def table_versions(lake_root: str, storage_options: Mapping[str, str] | None = None) -> dict[str, int]:
    """Current Delta versions of silver/case_notes and silver/labels (the watermark's content)."""
    return {SILVER_CASE_NOTES_TABLE: _open(lake_root, SILVER_CASE_NOTES_TABLE, storage_options).version(),
            SILVER_LABELS_TABLE: _open(lake_root, SILVER_LABELS_TABLE, storage_options).version()}


def read_silver(lake_root: str, storage_options: Mapping[str, str] | None = None
                ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """silver/case_notes and silver/labels (only the columns the collection needs) and their versions."""
    frames, versions = [], {}
    for table, columns in ((SILVER_CASE_NOTES_TABLE, NOTE_COLUMNS), (SILVER_LABELS_TABLE, LABEL_COLUMNS)):
        dt = _open(lake_root, table, storage_options)
        present = {f.name for f in dt.schema().fields}
        missing = [c for c in columns if c not in present]
        if missing:
            raise SyncError(f"vectors: table {table} lacks column(s) {missing} (has {sorted(present)}); run "
                            "build_lakehouse's migrate task")
        versions[table] = dt.version()
        frames.append(dt.to_pandas(columns=columns))
    return frames[0], frames[1], versions


# -- collection -----------------------------------------------------------------------------------------
def existing_rows(client: MilvusClient, collection: str = CASE_NOTES_COLLECTION, batch_size: int = 5000
                  ) -> dict[str, tuple[str, str]]:
    """note_id -> (row_hash, outcome) of every row in the collection."""
    held: dict[str, tuple[str, str]] = {}
    for row in iterate_rows(client, collection, "", [PRIMARY_FIELD, "row_hash", "outcome"], batch_size):
        held[row[PRIMARY_FIELD]] = (row.get("row_hash") or "", row.get("outcome") or "")
    return held


def iterate_rows(client: MilvusClient, collection: str, flt: str, fields: list[str], batch_size: int = 5000):
    """Every row matching ``flt`` (``query_iterator``), without its Milvus Lite warning (no mvcc timestamp:
    harmless with Strong consistency)."""
    import logging

    logger = logging.getLogger("pymilvus")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        iterator = client.query_iterator(collection, batch_size=batch_size, filter=flt, output_fields=fields)
        try:
            while batch := iterator.next():
                yield from batch
        finally:
            iterator.close()
    finally:
        logger.setLevel(previous)


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def warm_up(client: MilvusClient, collection: str, dim: int) -> float:
    """One throwaway search after a write, so the server builds what it builds lazily now: the first search
    after an upsert takes ~15 s on Milvus Lite (then ~2-5 ms a query), and it should be the sync that pays it,
    not the next decision run. Returns the seconds it took."""
    started = time.monotonic()
    client.search(collection, data=[[0.0] * (dim - 1) + [1.0]], anns_field=DENSE_FIELD, limit=1,
                  search_params={"metric_type": "COSINE"})
    return time.monotonic() - started


def sync_case_notes(
    client: MilvusClient,
    lake_root: str,
    embedder: Embedder,
    *,
    storage_options: Mapping[str, str] | None = None,
    collection: str = CASE_NOTES_COLLECTION,
    watermark: Mapping[str, Any] | None = None,
    full: bool = False,
    recreate: bool = False,
    batch_size: int = 500,
    log: Callable[[str], None] | None = None,
) -> SyncReport:
    """Bring the collection up to date with silver (see the module docstring). Returns the counts.

    :param client: an open ``MilvusClient`` (Milvus Lite served, or a Milvus server).
    :param lake_root: the lake root (``LakeHook.root``).
    :param embedder: the note embedder (use a cached one: :func:`~decisionflow.vectors.embedders.embedder_from_config`).
    :param storage_options: delta-rs storage options of an object-store lake.
    :param collection: the collection name.
    :param watermark: the previous report's ``watermark``; ``None`` the first time.
    :param full: ignore the watermark and the stored hashes: upsert every note.
    :param recreate: drop the collection first (needed after a dim or schema change).
    :param batch_size: rows per embedding + upsert call and ids per delete call (bounds memory and RPC size).
    :raises SyncError: a silver table is missing or lacks a column.
    :raises CollectionSchemaError: the collection exists with another schema (use ``recreate=True``).
    """
    from decisionflow.vectors.collection import drop_collection, ensure_collection

    log = log or (lambda message: None)
    started = time.monotonic()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    report = SyncReport(collection=collection, full=full or recreate)
    if recreate:
        drop_collection(client, collection)
    report.created_collection = ensure_collection(client, embedder.dim, collection=collection)

    versions = table_versions(lake_root, storage_options)
    current = {"versions": versions, "embedding_model": embedder.model_id, "collection": collection}
    previous = dict(watermark or {})
    if not (full or recreate or report.created_collection) and previous == current:
        report.skipped, report.watermark = True, current
        report.seconds = round(time.monotonic() - started, 3)
        log(f"silver unchanged since the last sync ({versions}): nothing to do")
        return report

    notes, labels, versions = read_silver(lake_root, storage_options)
    current["versions"] = versions
    desired = build_rows(notes, labels, embedder.model_id)
    report.notes_in_silver = len({row[PRIMARY_FIELD] for row in desired})
    plan = plan_sync(desired, existing_rows(client, collection), full=full or recreate)
    log(f"{report.notes_in_silver} notes in silver: {len(plan.upserts)} to upsert ({plan.inserts} new, "
        f"{plan.outcome_updates} outcome changes), {len(plan.deletes)} to delete, {plan.unchanged} unchanged")

    misses_before = getattr(embedder, "misses", None)
    encoded = 0
    for batch in _batches(plan.upserts, batch_size):
        vectors = embedder.encode([row["text"] for row in batch])
        for row, vector in zip(batch, vectors, strict=True):
            row[DENSE_FIELD] = vector.tolist()
        client.upsert(collection, list(batch))
        report.upserted += len(batch)
        if misses_before is None:
            encoded += len(batch)
    for batch in _batches(plan.deletes, batch_size):
        client.delete(collection, ids=list(batch))
        report.deleted += len(batch)
    if plan.upserts or plan.deletes:
        client.flush(collection)
        warm_up(client, collection, embedder.dim)
    report.encoded = (embedder.misses - misses_before) if misses_before is not None else encoded
    report.inserted, report.outcome_updates, report.unchanged = plan.inserts, plan.outcome_updates, plan.unchanged
    report.watermark = current
    report.seconds = round(time.monotonic() - started, 3)
    log(f"synced in {report.seconds}s: upserted {report.upserted}, deleted {report.deleted}, "
        f"encoded {report.encoded}")
    return report
