"""Online decisions into the audit trail: the ``decisions`` topic's online records -> ``gold/decisions``, exactly once.

The gateway (``POST /v1/decisions``) decides with the batch run's own code (:func:`~decisionflow.decisions.graph.
retrieve_similar`, :func:`~decisionflow.decisions.graph.decide_frame`) and publishes each decision with its full
audit (:func:`~decisionflow.decisions.outbox.kafka_payloads`) to the ``decisions`` topic, keyed by decision id,
with the header ``origin: online`` and ``run_id = "online"``; it makes no Delta commit per request.
:func:`import_online_decisions` brings those records into the lake; the ``import_online`` task of
``run_decisions`` runs it before the batch decides, so the batch's anti-join (``load_undecided``) already sees
every transaction decided online and never decides it again.

What one import does, per chunk of at most ``max_records`` records:

1. *read* - the topic from the offsets stored in ``gold/decisions`` itself (one Delta ``txn`` action per
   partition, app id :func:`app_id` ``(topic, partition)``, version = the next offset to read; no consumer-group
   offsets), up to the end offsets taken when the import started, ``isolation.level=read_committed``. Records
   without ``origin: online`` (the batch outbox's, which are in ``gold/decisions`` already) are skipped
   unparsed; a record without an ``origin`` header counts as online when its ``run_id`` is ``"online"``.
2. *validate* - each online record is parsed into an audit row and checked by
   :func:`decisionflow.decisions.audit.validate_decisions`. A malformed one is not dropped silently: it goes to
   ``quarantine/online_decisions`` (the same columns as silver's quarantine tables: topic, partition, offset,
   the raw bytes, the reason), keyed by (topic, partition, offset), and is counted in the report and logged.
3. *review queue* - the ``review`` decisions not yet in ``gold/decisions`` are queued
   (:func:`~decisionflow.decisions.review_queue.enqueue_reviews`, insert-if-absent by decision id).
4. *commit* - ONE Delta commit of ``gold/decisions``: a MERGE inserting the rows whose decision id is not there
   yet (a batch decision, an earlier import or a re-sent record stays one row), carrying the new offsets of
   every partition read. A chunk with nothing to insert still commits its offsets (an empty append).

Exactly once through a crash: rows and offsets are one atomic commit, so a crash before it re-reads the same
records next time (the quarantine and the review queue are keyed, so their second write is a no-op) and a
crash after it reads on from the new offsets. Even a lost or reset offset only costs a re-read: the MERGE is by
decision id. Before committing, the import checks that the stored offsets are still the ones it started from
(a concurrent import makes it stop with :class:`OnlineImportError`; the DAG runs one at a time anyway).

Plain Python (no Airflow): the operator passes ``KafkaHook(...).config`` as ``consumer_config``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from decisionflow import constants
from decisionflow.decisions import _delta, audit

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

__all__ = [
    "ONLINE_ORIGIN",
    "ONLINE_RUN_ID",
    "OnlineImportError",
    "OnlineImportReport",
    "QUARANTINE",
    "app_id",
    "import_online_decisions",
    "parse_online_record",
    "stored_offsets",
]

log = logging.getLogger(__name__)

#: Value of the ``origin`` header of a decision the gateway made.
ONLINE_ORIGIN = "online"
#: ``run_id`` of an online decision in the audit trail (and of its review-queue row).
ONLINE_RUN_ID = "online"
#: Prefix of the Delta ``txn`` app ids under which the import keeps its offsets.
APP_ID_PREFIX = "decisionflow.online_import"
#: Characters of a quarantined value kept as text (``value_preview``).
_PREVIEW = 500


def _quarantine_spec():
    from decisionflow.lakehouse.tables import _QUARANTINE_COLUMNS, TableSpec

    # Silver's quarantine columns, so the quality report and any replay read it like the others. Declared here,
    # like the review queue: only delta-rs writes this small table.
    return TableSpec(name="quarantine/online_decisions", columns=_QUARANTINE_COLUMNS,
                     keys=("source_topic", "source_partition", "source_offset"), partition_by=("quarantine_date",),
                     description="Online decision records of the decisions topic that are not valid audit rows, "
                                 "with the reason; one row per Kafka record, raw bytes kept for replay.")


QUARANTINE = _quarantine_spec()


class OnlineImportError(RuntimeError):
    """The import cannot go on; the message names the component, the cause and the remedy."""


def app_id(topic: str, partition: int) -> str:
    """The Delta ``txn`` app id under which ``gold/decisions`` keeps the next offset of ``topic``/``partition``."""
    return f"{APP_ID_PREFIX}/{topic}/{int(partition)}"


def stored_offsets(lake_root: str, topic: str, partitions, storage_options: dict[str, str] | None = None
                   ) -> dict[int, int | None]:
    """The next offset to read per partition as committed in ``gold/decisions`` (None: never imported)."""
    dt = _delta.open_table(audit.SPEC, lake_root, storage_options)
    return {int(p): (dt.transaction_version(app_id(topic, p)) if dt is not None else None) for p in partitions}


@dataclass
class OnlineImportReport:
    """What one import did (JSON-safe via :meth:`as_dict`: XCom, logs).

    ``read``: records read; ``online``: of them, online decisions; ``skipped``: not online (the batch
    outbox's); ``imported``: rows inserted into ``gold/decisions``; ``already_recorded``: online decisions whose id
    was there already (decided by the batch run, imported before, or re-sent); ``quarantined``: malformed online
    records; ``review_queued``: new review-queue rows; ``offsets``: per partition ``[from, to)`` read;
    ``complete``: every partition was read to the end offsets taken at the start."""

    topic: str
    read: int = 0
    online: int = 0
    skipped: int = 0
    imported: int = 0
    already_recorded: int = 0
    quarantined: int = 0
    review_queued: int = 0
    commits: int = 0
    chunks: int = 0
    complete: bool = True
    topic_missing: bool = False
    lost_to_retention: int = 0
    offsets: dict[str, list[int]] = field(default_factory=dict)
    gold_version: int | None = None
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "errors": self.errors[:20]}


# -- parsing ---------------------------------------------------------------------------------------------------
_NESTED = ("features", "similar_cases", "escalation")
_TIMESTAMPS = ("event_time", "decided_at")
_LISTS = ("reason_codes", "actions")
_REVIEW = ("review_decision", "reviewed_by", "reviewed_at", "review_note", "review_source")


class _Malformed(ValueError):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def _utc(value: Any, name: str):
    import pandas as pd

    if value is None or value == "":
        return None
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError) as exc:
        raise _Malformed("schema_violation", f"schema_violation: {name}: {value!r} is not a timestamp ({exc})") from None
    if pd.isna(stamp):
        return None
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def parse_online_record(key: bytes | None, value: bytes | None) -> dict[str, Any]:
    """
    The audit row (a dict of audit columns) of one online decision record, the inverse of
    :func:`~decisionflow.decisions.outbox.kafka_payloads`: nested JSON columns back to JSON text, ISO timestamps
    to UTC timestamps. Review columns are left NULL (an answer comes later, once); a payload without ``brain``
    is the policy's (the gateway has no escalation agent). Not validated here (that is
    :func:`~decisionflow.decisions.audit.validate_decisions`' job).

    :raises ValueError: (``_Malformed``) a tombstone, not JSON, not an object, or a key that is not the
        decision id; the message starts with the quarantine reason kind.
    """
    if value is None:
        raise _Malformed("tombstone", "tombstone: an online decision record without a value")
    try:
        record = json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Malformed("malformed_json", f"malformed_json: {exc}") from None
    if not isinstance(record, dict):
        raise _Malformed("malformed_json", f"malformed_json: a JSON {type(record).__name__}, not an object")
    row: dict[str, Any] = {}
    for name, _ in audit.AUDIT_COLUMNS:
        item = record.get(name)
        if name in _REVIEW:
            item = None
        elif name in _NESTED and item is not None and not isinstance(item, str):
            item = json.dumps(item, separators=(",", ":"))
        elif name in _TIMESTAMPS:
            item = _utc(item, name)
        elif name in _LISTS and item is not None and not isinstance(item, list):
            raise _Malformed("schema_violation", f"schema_violation: {name}: a {type(item).__name__}, not a list")
        row[name] = item
    if "brain" not in record:
        row["brain"] = "policy"
    decision_key = key.decode(errors="replace") if key is not None else None
    if decision_key is not None and row.get("decision_id") is not None and decision_key != row["decision_id"]:
        raise _Malformed("schema_violation", f"schema_violation: decision_id: the record key {decision_key!r} is "
                                             f"not the payload's decision_id {row['decision_id']!r}")
    return row


def _rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    import pandas as pd
    import pyarrow as pa

    frame = pd.DataFrame(rows, columns=[name for name, _ in audit.AUDIT_COLUMNS])
    for name in _TIMESTAMPS + ("reviewed_at",):
        frame[name] = pd.to_datetime(frame[name], utc=True)
    return pa.Table.from_pandas(frame, preserve_index=False)


def _validate(candidates: list[tuple[Any, dict[str, Any]]]) -> tuple[list[tuple[Any, dict]], list[tuple[Any, str]]]:
    """Split ``(message, row)`` pairs into valid ones and ``(message, reason)`` rejects. One batch validation when
    all are fine (the usual case), one per row to find the bad ones otherwise."""
    if not candidates:
        return [], []
    try:
        audit.validate_decisions(_rows_table([row for _, row in candidates]))
        return candidates, []
    except audit.AuditError:
        pass
    good, bad = [], []
    for msg, row in candidates:
        try:
            audit.validate_decisions(_rows_table([row]))
        except (audit.AuditError, ValueError, TypeError) as exc:
            bad.append((msg, f"schema_violation: {exc}"))
        else:
            good.append((msg, row))
    return good, bad


# -- writing ---------------------------------------------------------------------------------------------------
def _quarantine(lake_root: str, storage_options, rejects: list[tuple[Any, str, str]], topic: str) -> int:
    """MERGE the rejected records into ``quarantine/online_decisions`` (insert-if-absent by topic/partition/offset)."""
    import pyarrow as pa

    now = datetime.now(timezone.utc)
    rows = []
    for msg, kind, reason in rejects:
        value = msg.value()
        ts_type, ts = msg.timestamp()
        rows.append({
            "source_topic": topic, "source_partition": msg.partition(), "source_offset": msg.offset(),
            "kafka_timestamp": datetime.fromtimestamp(ts / 1000, timezone.utc) if ts_type and ts > 0 else None,
            "key": msg.key().decode(errors="replace") if msg.key() is not None else None,
            "reason_kind": kind, "reason": reason[:2000], "violations": [reason[:2000]],
            "value": value, "value_size": len(value) if value is not None else None,
            "value_preview": value[:_PREVIEW * 4].decode(errors="replace")[:_PREVIEW] if value is not None else None,
            "payload_sha256": hashlib.sha256(value).hexdigest() if value is not None else None,
            "ingested_at": now, "quarantined_at": now, "quarantine_date": now.date(),
        })
    table = _delta.conform(pa.Table.from_pylist(rows), _delta.arrow_schema(QUARANTINE))

    def merge(dt) -> dict[str, Any]:
        return (dt.merge(table, predicate="t.source_topic = s.source_topic AND t.source_partition = "
                         "s.source_partition AND t.source_offset = s.source_offset", source_alias="s",
                         target_alias="t").when_not_matched_insert_all().execute())

    metrics = _delta.merge_with_retry(QUARANTINE, lake_root, storage_options, merge, what="quarantine")
    return int(metrics.get("num_target_rows_inserted", 0))


def _existing_ids(lake_root: str, storage_options, ids: list[str]) -> set[str]:
    if not ids:
        return set()
    dt = _delta.open_table(audit.SPEC, lake_root, storage_options)
    if dt is None:
        return set()
    found: set[str] = set()
    for begin in range(0, len(ids), 5000):
        found.update(_delta.select(audit.SPEC, dt, ["decision_id"],
                                   {"decision_id": ids[begin:begin + 5000]})["decision_id"].to_pylist())
    return found


def _commit(lake_root: str, storage_options, rows: pa.Table, topic: str, previous: Mapping[int, int | None],
            new: Mapping[int, int]) -> tuple[int, int]:
    """One Delta commit of ``gold/decisions``: insert ``rows`` not there yet and set the offsets ``new``; fenced on
    the stored offsets still being ``previous``. Returns ``(rows inserted, table version)``."""
    from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

    txns = [Transaction(app_id(topic, p), int(o)) for p, o in sorted(new.items())]
    props = CommitProperties(app_transactions=txns,
                             custom_metadata={"decisionflow.online_import": json.dumps(
                                 {"topic": topic, "offsets": {str(p): int(o) for p, o in new.items()}})})

    def fence(dt) -> None:
        for p, expected in previous.items():
            have = dt.transaction_version(app_id(topic, p))
            if have != expected:
                raise OnlineImportError(
                    f"[online import] {audit.SPEC.name}: the stored offset of {topic}/{p} moved from {expected} to "
                    f"{have} while this import ran: another import committed first; nothing was written by this one "
                    "-- remedy: none needed, run it again (it goes on from the new offsets); run one import at a time")

    def run(dt) -> dict[str, Any]:
        fence(dt)
        if rows.num_rows:
            metrics = (dt.merge(rows, predicate="t.decision_id = s.decision_id", source_alias="s", target_alias="t",
                                commit_properties=props).when_not_matched_insert_all().execute())
            if int(metrics.get("num_target_rows_inserted", 0)):
                return metrics
            dt = DeltaTable(dt.table_uri, storage_options=storage_options or None)  # nothing inserted: no commit
            if all(dt.transaction_version(t.app_id) == t.version for t in txns):
                return metrics
        write_deltalake(dt, audit.audit_schema().empty_table(), mode="append", commit_properties=props)
        return {"num_target_rows_inserted": 0}

    metrics = _delta.merge_with_retry(audit.SPEC, lake_root, storage_options, run, what="online import commit")
    dt = _delta.open_table(audit.SPEC, lake_root, storage_options)
    return int(metrics.get("num_target_rows_inserted", 0)), dt.version()


# -- the import ------------------------------------------------------------------------------------------------
def _is_online(msg) -> bool:
    headers = msg.headers() or []
    for name, value in headers:
        if name == "origin":
            return (value or b"").decode(errors="replace").strip().lower() == ONLINE_ORIGIN
    value = msg.value()  # no origin header: online when its run_id says so (parsed only when it can be)
    if value is None or b'"run_id"' not in value or b'"online"' not in value:
        return False
    try:
        return json.loads(value).get("run_id") == ONLINE_RUN_ID
    except (ValueError, AttributeError):
        return False


def import_online_decisions(lake_root: str, consumer_config: Mapping[str, Any],
                            topic: str = constants.DECISIONS_TOPIC,
                            storage_options: dict[str, str] | None = None, *,
                            ensure_topic: Callable[[str], Any] | None = None, max_records: int = 100_000,
                            timeout: float = 120.0, on_stage: Callable[[str], None] | None = None
                            ) -> OnlineImportReport:
    """
    Import the online decisions of ``topic`` into ``gold/decisions``, exactly once (see the module docstring).

    :param lake_root: the lake root (``LakeHook().root``), a path or object-store URI.
    :param consumer_config: librdkafka settings, e.g. the ``kafka_default`` connection extra
        (``{"bootstrap.servers": ...}``); producer-only keys are dropped. The group id is a throwaway one and
        nothing is committed to Kafka: the offsets live in the Delta table.
    :param topic: the decisions topic.
    :param storage_options: delta-rs object-store options (``LakeHook().storage_options``).
    :param ensure_topic: called with ``topic`` first (``KafkaHook.ensure_topic``); without it a missing topic
        means nothing to import (reported as ``topic_missing``).
    :param max_records: records read per chunk; each chunk is one Delta commit (bounds memory and re-reads).
    :param timeout: seconds for broker calls, and the longest wait without any progress towards the end offsets
        taken at the start; then what was read is committed, the rest waits for the next import (``complete``
        False: the caller must not decide in batch yet, see the operator).
    :param on_stage: called with ``"read"``, ``"quarantined"``, ``"queued"`` and ``"committed"`` during each chunk
        (tests kill or fail the import exactly there).
    :raises OnlineImportError: the broker is unreachable, or another import committed meanwhile.
    """
    from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

    from decisionflow.decisions.outbox import _PRODUCER_ONLY
    from decisionflow.decisions.review_queue import enqueue_reviews

    started = time.monotonic()
    report = OnlineImportReport(topic=topic)
    options = dict(storage_options or {}) or None
    stage = on_stage or (lambda _name: None)
    bootstrap = consumer_config.get("bootstrap.servers", "?")
    consumer = Consumer({**{k: v for k, v in consumer_config.items() if k not in _PRODUCER_ONLY},
                         "group.id": f"decisionflow-online-import-{uuid.uuid4().hex[:12]}",
                         "isolation.level": "read_committed", "enable.auto.commit": False,
                         "enable.auto.offset.store": False, "enable.partition.eof": True,
                         "auto.offset.reset": "earliest"})
    try:
        try:
            if ensure_topic is not None:
                ensure_topic(topic)
            metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        except KafkaException as exc:
            raise OnlineImportError(f"[kafka] topic {topic} at {bootstrap}: {exc} -- remedy: check the broker "
                                    "(kafka_default), then retry") from exc
        if metadata is None or metadata.error is not None or not metadata.partitions:
            report.topic_missing = True
            log.info("[online import] topic %s does not exist at %s: no online decisions to import", topic, bootstrap)
            return report
        partitions = sorted(metadata.partitions)
        stored = stored_offsets(lake_root, topic, partitions, options)
        start: dict[int, int] = {}
        ends: dict[int, int] = {}
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout, cached=False)
            ends[p] = int(high)
            begin = stored[p] if stored[p] is not None else int(low)
            if begin < low:
                report.lost_to_retention += int(low) - begin
                log.error("[online import] %s/%d: offsets %d..%d were deleted by retention before they were "
                          "imported (%d records, online decisions among them may be missing from %s) -- remedy: "
                          "raise the topic's retention.ms above the import interval", topic, p, begin, low - 1,
                          low - begin, audit.SPEC.name)
                begin = int(low)
            if begin > high:
                log.warning("[online import] %s/%d: stored offset %d is beyond the end %d (the topic was "
                            "recreated?); reading it from the beginning (the MERGE by decision id keeps rows "
                            "single)", topic, p, begin, high)
                begin = int(low)
            start[p] = begin
        todo = {p: o for p, o in start.items() if o < ends[p]}
        report.offsets = {str(p): [start[p], start[p]] for p in partitions}
        if not todo:
            return report
        consumer.assign([TopicPartition(topic, p, o) for p, o in todo.items()])
        position = dict(start)
        committed = dict(stored)  # what the table says now (the fence of the next commit)
        remaining = set(todo)

        def done(partition: int) -> None:  # at its end: stop fetching what was written since the start
            if partition in remaining:
                remaining.discard(partition)
                consumer.pause([TopicPartition(topic, partition)])

        deadline = time.monotonic() + timeout
        while remaining:
            # -- 1. read one chunk
            messages = []
            read = 0
            while remaining and read < max_records:
                if time.monotonic() > deadline:
                    report.complete = False
                    report.errors.append(f"no progress for {timeout:.0f}s before the end offsets of partitions "
                                         f"{sorted(remaining)}; the rest waits for the next import")
                    log.warning("[online import] %s: %s", topic, report.errors[-1])
                    remaining.clear()
                    break
                for msg in consumer.consume(num_messages=min(5000, max_records - read), timeout=0.5):
                    err = msg.error()
                    p = msg.partition()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            # read_committed: the end is the last stable offset (an open transaction waits)
                            if p in remaining:
                                position[p] = max(position[p], int(msg.offset()))
                                deadline = time.monotonic() + timeout
                            done(p)
                            continue
                        raise OnlineImportError(f"[kafka] topic {topic} at {bootstrap}: read failed on partition "
                                                f"{p}: {err} -- remedy: check the broker, then retry")
                    if p not in remaining:
                        continue
                    read += 1
                    deadline = time.monotonic() + timeout  # progress
                    position[p] = int(msg.offset()) + 1
                    if _is_online(msg):
                        messages.append(msg)
                    if position[p] >= ends[p]:
                        done(p)
                if remaining:  # aborted records and transaction markers advance the position without a message
                    for tp in consumer.position([TopicPartition(topic, p) for p in remaining]):
                        if tp.offset >= 0:
                            position[tp.partition] = max(position[tp.partition], int(tp.offset))
                            if tp.offset >= ends[tp.partition]:
                                done(tp.partition)
            report.chunks += 1
            report.read += read
            report.online += len(messages)
            report.skipped += read - len(messages)
            moved = {p: position[p] for p in partitions if committed.get(p) != position[p]}
            if not moved:
                break
            stage("read")
            # -- 2. parse, validate; quarantine the malformed ones
            rejects: list[tuple[Any, str, str]] = []
            candidates: list[tuple[Any, dict[str, Any]]] = []
            seen: set[str] = set()
            for msg in messages:
                try:
                    row = parse_online_record(msg.key(), msg.value())
                except _Malformed as exc:
                    rejects.append((msg, exc.kind, exc.reason))
                    continue
                decision = row.get("decision_id")
                if decision in seen:  # re-sent within the chunk: the first one counts
                    report.already_recorded += 1
                    continue
                if decision:
                    seen.add(decision)
                candidates.append((msg, row))
            good, bad = _validate(candidates)
            rejects += [(msg, "schema_violation", reason) for msg, reason in bad]
            if rejects:
                for msg, _, reason in rejects[:5]:
                    log.error("[online import] %s/%d@%d quarantined to %s: %s", topic, msg.partition(), msg.offset(),
                              QUARANTINE.name, reason[:300])
                    report.errors.append(f"{topic}/{msg.partition()}@{msg.offset()}: {reason[:200]}")
                _quarantine(lake_root, options, rejects, topic)
                report.quarantined += len(rejects)
            stage("quarantined")
            # -- 3. review queue for the review decisions that are new
            ids = [row["decision_id"] for _, row in good]
            there = _existing_ids(lake_root, options, ids)
            new_rows = [row for _, row in good if row["decision_id"] not in there]
            report.already_recorded += len(good) - len(new_rows)
            table = audit.validate_decisions(_rows_table(new_rows)) if new_rows else audit.audit_schema().empty_table()
            if new_rows:
                frame = table.to_pandas()
                reviews = frame[frame["decision"] == "review"]
                if not reviews.empty:
                    report.review_queued += enqueue_reviews(lake_root, reviews, ONLINE_RUN_ID,
                                                            storage_options=options)
            stage("queued")
            # -- 4. rows + offsets, one commit
            inserted, version = _commit(lake_root, options, table, topic, {p: committed.get(p) for p in moved},
                                        moved)
            committed.update(moved)
            report.imported += inserted
            report.already_recorded += table.num_rows - inserted
            report.commits += 1
            report.gold_version = version
            for p, o in moved.items():
                report.offsets[str(p)][1] = o
            stage("committed")
            log.info("[online import] %s chunk %d: %d records read, %d online, %d imported, %d already recorded, "
                     "%d quarantined (gold/decisions v%d)", topic, report.chunks, read, len(messages), inserted,
                     len(good) - inserted, len(rejects), version)
    finally:
        consumer.close()
        report.seconds = round(time.monotonic() - started, 3)
    log.info("[online import] %s: %d read, %d online, %d imported, %d already recorded, %d quarantined, %d queued for "
             "review in %.2fs", topic, report.read, report.online, report.imported, report.already_recorded,
             report.quarantined, report.review_queued, report.seconds)
    return report
