"""The action outbox: Delta table ``gold/decision_actions`` and its two deliverers, each exactly once.

One row per ``(decision_id, channel)``:

* ``kafka`` - every decision; payload = the full audit record as JSON (``features`` and ``similar_cases`` as
  nested JSON), sent to the topic ``decisions`` keyed by ``decision_id``;
* ``webhook`` - decisions with at least one action; payload = the decision's action list (+ ids, decision,
  reasons, policy), POSTed to the ``actions_webhook`` connection with ``Idempotency-Key: <decision_id>:webhook``.

Status ``pending`` -> ``sent`` (or ``failed`` for a webhook 4xx), ``attempts``, ``last_error``, timestamps and
the delivery's coordinates (topic/partition/offset, HTTP status). :meth:`Outbox.enqueue` is a MERGE
insert-if-absent (a re-enqueue is a no-op, a sent row is never reset to pending); status changes are one MERGE
update per delivered batch, never per row.

**Kafka, exactly one record per decision even after a kill mid-send and a retry** (:func:`deliver_kafka`):

1. *claim* - pending rows never tried before get ``kafka_scan_from`` = the topic's end offsets (high watermarks)
   read now, in one MERGE. Anything this or a later attempt writes for them lands at or after those offsets.
2. *fence* - a transactional producer with a ``transactional.id`` stable per (outbox, topic)
   (:meth:`Outbox.transactional_id`): ``init_transactions`` aborts the open transaction of a killed (or still
   running) earlier sender and fences it, so it can commit nothing more.
3. *read back* - from the smallest ``kafka_scan_from`` of the pending rows to the end, with
   ``isolation.level=read_committed``: decision ids already committed are marked sent (with their offsets)
   without being sent again. The scan is bounded by what was written since the oldest unfinished claim, not by
   the topic's retention.
4. *send* - the rest in batches, each batch one Kafka transaction; after ``commit_transaction`` the batch is
   marked sent (one Delta commit). A kill between the commit and the mark is what step 3 repairs; a kill before
   the commit leaves an open transaction that step 2 aborts (read_committed never shows it).

**Webhook, each key's effect once at the receiver** (:func:`deliver_webhook`): the receiver dedupes by
``Idempotency-Key`` (see :mod:`decisionflow.decisions.webhook`), so a row sent but not marked (kill, lost
response) is simply sent again. Connection errors, 408/429 and 5xx are retried with exponential backoff; other
4xx mark the row ``failed`` with the answer in ``last_error``. A webhook still unreachable after the retries
raises :class:`DeliveryError` naming the connection and the URL - after marking what was delivered.

Plain Python (no Airflow): the Airflow side passes ``KafkaHook(...).config`` as ``producer_config`` and
``KafkaHook(...).ensure_topic`` as ``ensure_topic``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from decisionflow import constants
from decisionflow.decisions import _delta
from decisionflow.lakehouse.tables import table as _declared

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

__all__ = [
    "CHANNELS",
    "DeliveryError",
    "DeliveryReport",
    "KAFKA",
    "Outbox",
    "OutboxError",
    "STATUSES",
    "WEBHOOK",
    "deliver_kafka",
    "deliver_webhook",
    "idempotency_key",
    "kafka_payloads",
]

log = logging.getLogger(__name__)

KAFKA, WEBHOOK = "kafka", "webhook"
CHANNELS = (KAFKA, WEBHOOK)
PENDING, SENT, FAILED = "pending", "sent", "failed"
STATUSES = (PENDING, SENT, FAILED)

SPEC = _declared(constants.DECISION_ACTIONS_TABLE)

#: Fields of the webhook payload (besides ``actions``), taken from the audit record.
_WEBHOOK_FIELDS = ("decision_id", "event_id", "account_id", "merchant_id", "decision", "reason_codes", "score",
                   "policy_name", "policy_version", "run_id", "decided_at")
#: librdkafka properties a producer does not understand (a connection extra may carry consumer settings).
_CONSUMER_ONLY = frozenset({
    "group.id", "group.instance.id", "group.protocol", "auto.offset.reset", "enable.auto.commit",
    "auto.commit.interval.ms", "enable.auto.offset.store", "isolation.level", "partition.assignment.strategy",
    "session.timeout.ms", "heartbeat.interval.ms", "max.poll.interval.ms", "fetch.min.bytes", "fetch.max.bytes",
    "fetch.wait.max.ms", "max.partition.fetch.bytes", "enable.partition.eof", "check.crcs", "on_commit",
})
_PRODUCER_ONLY = frozenset({
    "acks", "request.required.acks", "enable.idempotence", "linger.ms", "queue.buffering.max.ms", "batch.size",
    "batch.num.messages", "compression.type", "compression.codec", "message.timeout.ms", "delivery.timeout.ms",
    "retries", "message.send.max.retries", "max.in.flight.requests.per.connection", "max.in.flight",
    "transactional.id", "transaction.timeout.ms", "partitioner", "enable.gapless.guarantee",
    "queue.buffering.max.messages", "queue.buffering.max.kbytes", "dr_cb", "dr_msg_cb", "on_delivery",
})


class OutboxError(RuntimeError):
    """The outbox cannot be read, written or delivered; the message names the layer and the remedy."""


class DeliveryError(OutboxError):
    """A channel failed mid-delivery. Everything delivered before the failure is already marked sent."""

    def __init__(self, message: str, report: DeliveryReport | None = None):
        super().__init__(message)
        self.report = report


def idempotency_key(decision_id: str, channel: str) -> str:
    """``<decision_id>:<channel>``: the key a receiver dedupes by (one effect per decision and channel)."""
    return f"{decision_id}:{channel}"


@dataclass
class DeliveryReport:
    """What one delivery call did. ``already_delivered``: found delivered (Kafka read-back) and only marked."""

    channel: str
    target: str
    pending: int = 0
    sent: int = 0
    already_delivered: int = 0
    failed: int = 0
    batches: int = 0
    retries: int = 0
    scanned: int = 0
    duplicates_at_receiver: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Records sent per second (0 when nothing was sent)."""
        return round(self.sent / self.seconds, 1) if self.seconds > 0 and self.sent else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe (XCom, asset-event extra, logs)."""
        return {**asdict(self), "rate_per_s": self.rate, "errors": self.errors[:20]}


def _iso_utc(values: pd.Series) -> pd.Series:
    """Timestamps as ``2026-12-01T09:00:00.000000Z`` (microseconds, UTC; naive values are taken as UTC)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    array = pa.array(values)
    if array.type.tz is None:
        array = pc.assume_timezone(array, "UTC")
    array = array.cast(pa.timestamp("us", tz="UTC"), safe=False)
    return pc.strftime(array, format="%Y-%m-%dT%H:%M:%SZ").to_pandas().set_axis(values.index)


#: Audit columns nested as JSON (not as JSON strings) in the Kafka payload.
_NESTED = ("features", "similar_cases", "escalation")


def _payload_frame(decisions: pa.Table | pd.DataFrame, run_id: str | None = None) -> pd.DataFrame:
    """Audit rows ready for the payload builder: a fresh index, ``run_id`` set and checked, actions as lists and
    timestamps as ISO-8601 UTC text (vectorised: ``to_json``'s own datetime path is 4x slower)."""
    import pandas as pd
    import pyarrow as pa

    frame = decisions.to_pandas() if isinstance(decisions, pa.Table) else pd.DataFrame(decisions)
    frame = frame.reset_index(drop=True)
    missing = [c for c in ("decision_id", "event_id", "actions") if c not in frame.columns]
    if missing:
        raise OutboxError(f"[outbox] {SPEC.name}: enqueue needs the audit rows; columns {missing} are missing "
                          "-- remedy: pass the frame written by audit.write_decisions")
    if run_id is not None:
        frame["run_id"] = run_id
    if "run_id" not in frame.columns or frame["run_id"].isna().any() or (frame["run_id"] == "").any():
        raise OutboxError(f"[outbox] {SPEC.name}: rows without a run_id -- remedy: pass run_id to enqueue")
    frame["actions"] = [list(a) if a is not None else [] for a in frame["actions"]]
    for name in frame.columns:
        if pd.api.types.is_datetime64_any_dtype(frame[name]):
            frame[name] = _iso_utc(frame[name])
    return frame


def _kafka_columns(frame: pd.DataFrame) -> list[str]:
    """The audit columns of ``frame`` that go into the Kafka payload as plain JSON values (in table order)."""
    from decisionflow.decisions.audit import AUDIT_COLUMNS

    return [name for name, _ in AUDIT_COLUMNS if name in frame.columns and name not in _NESTED]


def _payloads(rows: pd.DataFrame, columns: list[str], channel: str) -> list[str]:
    """One JSON object per row: ``columns``, the ``idempotency_key`` and - for Kafka - the nested JSON columns."""
    if rows.empty:
        return []
    text = rows[columns].to_json(orient="records", lines=True, double_precision=15)
    lines = text.rstrip("\n").split("\n")
    keys = [json.dumps(idempotency_key(d, channel)) for d in rows["decision_id"]]
    extra = [[f'"idempotency_key":{k}' for k in keys]]
    nested = [c for c in _NESTED if c in rows.columns] if channel == KAFKA else []
    for name in nested:
        null = rows[name].isna().to_numpy()
        values = rows[name].astype(str)
        # already JSON (validated objects/lists): nest it; anything else stays a JSON string
        is_json = values.str.match(r"^\s*[\[{]").to_numpy()
        extra.append([f'"{name}":null' if none else f'"{name}":{v}' if ok else f'"{name}":{json.dumps(v)}'
                      for v, ok, none in zip(values, is_json, null)])
    return [line[:-1] + "," + ",".join(parts) + "}" for line, *parts in zip(lines, *extra)]


def kafka_payloads(frame: pa.Table | pd.DataFrame, run_id: str | None = None) -> list[str]:
    """
    The ``decisions``-topic record value of each audit row: the full audit record as JSON (``features``,
    ``similar_cases`` and ``escalation`` nested as JSON, timestamps ISO-8601 UTC, plus ``idempotency_key``),
    exactly what :meth:`Outbox.enqueue` stores as the ``kafka`` payload and :func:`deliver_kafka` sends.
    Columns that are not audit columns (``band``) are left out. The online gateway publishes these too.

    :param frame: audit rows (:func:`decisionflow.decisions.graph.decide_frame`'s output, or read back).
    :param run_id: set every row's ``run_id`` (default: each row's own; it must be filled).
    :return: one JSON text per row, in ``frame``'s order.
    :raises OutboxError: ``decision_id``, ``event_id``, ``actions`` or ``run_id`` missing.
    """
    prepared = _payload_frame(frame, run_id)
    return _payloads(prepared, _kafka_columns(prepared), KAFKA)


def _helper_types() -> dict[str, Any]:
    """Arrow types of MERGE source columns that are not table columns."""
    import pyarrow as pa

    return {"add_attempts": pa.int32(), "new_status": pa.string(), "no_error": pa.string()}


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Outbox:
    """
    The ``gold/decision_actions`` table under a lake root (see the module docstring).

    :param lake_root: the lake root (``LakeHook().root``), a path or object-store URI.
    :param storage_options: delta-rs object-store options (``LakeHook().storage_options``).
    """

    def __init__(self, lake_root: str, storage_options: dict[str, str] | None = None):
        self.lake_root = str(lake_root)
        self.storage_options = storage_options or None
        self.path = SPEC.path(self.lake_root)

    def __repr__(self) -> str:
        return f"Outbox({self.path!r})"

    def transactional_id(self, topic: str) -> str:
        """Kafka ``transactional.id`` of this outbox's sender to ``topic``: stable across processes and retries
        (that is what lets a restarted sender fence a killed one), distinct per lake and topic."""
        digest = hashlib.sha256(f"{self.path}\n{topic}".encode()).hexdigest()[:16]
        return f"decisionflow-outbox-{topic}-{digest}"

    # -- writing ---------------------------------------------------------------------------------------
    def _rows_for(self, decisions: pa.Table | pd.DataFrame, run_id: str | None) -> pa.Table:
        """Outbox rows of audit rows, payloads built column-wise (pandas ``to_json``; no per-row Python dicts)."""
        import numpy as np
        import pyarrow as pa

        frame = _payload_frame(decisions, run_id)
        kafka = _payloads(frame, _kafka_columns(frame), KAFKA)
        with_actions = frame[np.array([len(a) > 0 for a in frame["actions"]], dtype=bool)]
        hook_columns = [c for c in (*_WEBHOOK_FIELDS, "actions") if c in frame.columns]
        webhook = _payloads(with_actions, hook_columns, WEBHOOK)
        ids = frame["decision_id"].tolist() + with_actions["decision_id"].tolist()
        channels = [KAFKA] * len(frame) + [WEBHOOK] * len(with_actions)
        n = len(ids)
        ts = pa.array([_now()] * n, pa.timestamp("us", tz="UTC"))
        data = {
            "decision_id": pa.array(ids, pa.string()), "channel": pa.array(channels, pa.string()),
            "event_id": pa.array(frame["event_id"].tolist() + with_actions["event_id"].tolist(), pa.string()),
            "run_id": pa.array(frame["run_id"].tolist() + with_actions["run_id"].tolist(), pa.string()),
            "idempotency_key": pa.array([idempotency_key(d, c) for d, c in zip(ids, channels)], pa.string()),
            "payload": pa.array(kafka + webhook, pa.string()),
            "status": pa.array([PENDING] * n, pa.string()), "attempts": pa.array([0] * n, pa.int32()),
            "enqueued_at": ts, "updated_at": ts,
        }
        return _delta.conform(pa.table(data), _delta.arrow_schema(SPEC))

    def enqueue(self, decisions: pa.Table | pd.DataFrame, run_id: str | None = None) -> int:
        """
        Add the outbox rows of ``decisions`` (audit rows): one ``kafka`` row each, one ``webhook`` row for each
        decision with actions; status ``pending``. MERGE insert-if-absent: a re-enqueue is a no-op and a row
        already sent stays sent.

        :param run_id: the enqueuing run (default: each decision's ``run_id``).
        :return: rows inserted.
        """
        rows = self._rows_for(decisions, run_id)
        if rows.num_rows == 0:
            return 0

        def merge(dt) -> dict[str, Any]:
            return (dt.merge(rows, predicate="t.decision_id = s.decision_id AND t.channel = s.channel",
                             source_alias="s", target_alias="t").when_not_matched_insert_all().execute())

        metrics = _delta.merge_with_retry(SPEC, self.lake_root, self.storage_options, merge, what="enqueue")
        inserted = int(metrics.get("num_target_rows_inserted", 0))
        log.info("%s: %d outbox rows enqueued (%d already there)", SPEC.name, inserted, rows.num_rows - inserted)
        return inserted

    def _update(self, keys: Sequence[str], channel: str, columns: Mapping[str, Any], updates: Mapping[str, str],
                *, condition: str, what: str, run_id: str | None = None) -> int:
        """One MERGE update of the rows ``(keys, channel)`` matching ``condition``; ``columns`` (scalars or
        per-key sequences) become source columns ``s.<name>`` the ``updates`` expressions use (typed like the
        table column of that name, else by :func:`_helper_types`). ``run_id``: every key belongs to that run - a
        literal on the target lets delta-rs skip the files of other runs instead of scanning the whole outbox."""
        import pyarrow as pa

        if channel not in CHANNELS:
            raise ValueError(f"channel must be one of {CHANNELS}, got {channel!r}")
        keys = list(keys)
        if not keys:
            return 0
        types = {**{f.name: f.type for f in _delta.arrow_schema(SPEC)}, **_helper_types()}
        data: dict[str, pa.Array] = {"decision_id": pa.array(keys, pa.string()),
                                     "channel": pa.array([channel] * len(keys), pa.string())}
        for name, value in columns.items():
            values = list(value) if isinstance(value, (list, tuple)) else [value] * len(keys)
            if len(values) != len(keys):
                raise ValueError(f"{what}: {name} has {len(values)} values for {len(keys)} keys")
            data[name] = pa.array(values, types[name])
        source = pa.table(data)
        predicate = (f"t.decision_id = s.decision_id AND t.channel = s.channel AND t.channel = "
                     f"{_delta.sql_string(channel)}")
        if run_id is not None:
            predicate += f" AND t.run_id = {_delta.sql_string(run_id)}"

        def merge(dt) -> dict[str, Any]:
            return (dt.merge(source, predicate=predicate, source_alias="s", target_alias="t")
                    .when_matched_update(updates=dict(updates), predicate=condition).execute())

        metrics = _delta.merge_with_retry(SPEC, self.lake_root, self.storage_options, merge, what=what)
        return int(metrics.get("num_target_rows_updated", 0))

    def claim(self, keys: Sequence[str], channel: str, *, kafka_scan_from: str | None = None,
              run_id: str | None = None) -> int:
        """Start a delivery attempt of pending rows: ``attempts + 1``, ``claimed_at`` and ``kafka_scan_from``
        (kept when already set: the first claim's offsets bound every later read-back). One Delta commit."""
        now = _now()
        return self._update(keys, channel, {"claimed_at": now, "updated_at": now, "kafka_scan_from": kafka_scan_from},
                            {"attempts": "t.attempts + 1", "claimed_at": "coalesce(t.claimed_at, s.claimed_at)",
                             "kafka_scan_from": "coalesce(t.kafka_scan_from, s.kafka_scan_from)",
                             "updated_at": "s.updated_at"},
                            condition=f"t.status = {_delta.sql_string(PENDING)}", what="claim", run_id=run_id)

    def mark_sent(self, keys: Sequence[str], channel: str, *, sent_at: datetime | None = None,
                  attempts: int | Sequence[int] = 0, run_id: str | None = None, **info: Any) -> int:
        """
        Mark ``keys`` (decision ids) of ``channel`` sent, in one Delta commit. Rows already sent are left as
        they are (the first delivery's coordinates stay).

        :param attempts: delivery attempts made for each key in this call, added to ``attempts``.
        :param run_id: set when every key belongs to that run (the MERGE then skips other runs' files).
        :param info: delivery coordinates, a scalar or one value per key: ``kafka_topic``, ``kafka_partition``,
            ``kafka_offset``, ``http_status``.
        :return: rows marked.
        """
        allowed = {"kafka_topic", "kafka_partition", "kafka_offset", "http_status"}
        unknown = sorted(set(info) - allowed)
        if unknown:
            raise ValueError(f"mark_sent: unknown delivery info {unknown}; allowed {sorted(allowed)}")
        when = sent_at or _now()
        columns = {"sent_at": when, "updated_at": when, "add_attempts": attempts, **info}
        updates = {"status": _delta.sql_string(SENT), "sent_at": "s.sent_at", "updated_at": "s.updated_at",
                   "last_error": "s.no_error", "attempts": "t.attempts + s.add_attempts",
                   **{name: f"s.{name}" for name in info}}
        columns["no_error"] = None
        return self._update(keys, channel, columns, updates, condition=f"t.status <> {_delta.sql_string(SENT)}",
                            what="mark_sent", run_id=run_id)

    def mark_failed(self, keys: Sequence[str], channel: str, errors: str | Sequence[str], *,
                    http_status: int | Sequence[int] | None = None, attempts: int | Sequence[int] = 0,
                    final: bool = True, run_id: str | None = None) -> int:
        """Record a failed attempt: ``status = failed`` when ``final`` (a 4xx), else still pending; the error
        text in ``last_error``. One Delta commit."""
        now = _now()
        columns: dict[str, Any] = {"updated_at": now, "last_error": errors, "add_attempts": attempts,
                                   "new_status": FAILED if final else PENDING}
        updates = {"status": "s.new_status", "last_error": "s.last_error", "updated_at": "s.updated_at",
                   "attempts": "t.attempts + s.add_attempts"}
        if http_status is not None:
            columns["http_status"] = http_status
            updates["http_status"] = "s.http_status"
        return self._update(keys, channel, columns, updates, condition=f"t.status <> {_delta.sql_string(SENT)}",
                            what="mark_failed", run_id=run_id)

    # -- reading ---------------------------------------------------------------------------------------
    def _table(self):
        return _delta.open_table(SPEC, self.lake_root, self.storage_options)

    def rows(self, run_id: str | None = None, channel: str | None = None, status: str | None = None,
             columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Outbox rows (optionally of one run / channel / status) as a DataFrame; empty when no table yet."""
        wanted = list(columns) if columns else [f.name for f in _delta.arrow_schema(SPEC)]
        dt = self._table()
        if dt is None:
            return _delta.arrow_schema(SPEC).empty_table().select(wanted).to_pandas()
        where = {name: value for name, value in (("run_id", run_id), ("channel", channel), ("status", status))
                 if value is not None}
        return _delta.select(SPEC, dt, wanted, where).to_pandas()

    def pending(self, run_id: str | None = None, channel: str | None = None) -> pd.DataFrame:
        """Rows still to deliver (status ``pending``), oldest enqueue first."""
        frame = self.rows(run_id=run_id, channel=channel, status=PENDING)
        return frame.sort_values(["enqueued_at", "decision_id"], kind="stable").reset_index(drop=True)

    def counts(self, run_id: str | None = None) -> dict[str, dict[str, int]]:
        """``{channel: {status: rows}}``."""
        frame = self.rows(run_id=run_id, columns=["channel", "status"])
        out: dict[str, dict[str, int]] = {}
        for (channel, status), n in frame.groupby(["channel", "status"]).size().items():
            out.setdefault(channel, {})[status] = int(n)
        return out


def _one_run(rows: pd.DataFrame) -> str | None:
    """The run of every row, when there is exactly one (a MERGE pruning hint)."""
    runs = rows["run_id"].unique()
    return str(runs[0]) if len(runs) == 1 else None


# -- Kafka ---------------------------------------------------------------------------------------------------
def _end_offsets(consumer, topic: str, timeout: float) -> dict[int, int]:
    """High watermark of every partition of ``topic`` (a lower bound for the offset of anything written next)."""
    from confluent_kafka import TopicPartition

    metadata = consumer.list_topics(topic, timeout=timeout).topics[topic]
    out = {}
    for partition in sorted(metadata.partitions):
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout, cached=False)
        out[partition] = int(high)
    return out


def _scan_committed(consumer, topic: str, start: Mapping[int, int], wanted: set[str], timeout: float
                    ) -> tuple[dict[str, tuple[int, int]], int, int]:
    """
    Committed records of ``topic`` from ``start`` (partition -> offset) to the current end, read with the
    consumer's ``read_committed`` isolation: ``({decision_id: (partition, offset)} for keys in wanted,
    records scanned, keys seen more than once)``.
    """
    from confluent_kafka import KafkaError, TopicPartition

    ends = _end_offsets(consumer, topic, timeout)
    todo = {p: max(int(start.get(p, 0)), 0) for p in ends}
    todo = {p: offset for p, offset in todo.items() if offset < ends[p]}
    found: dict[str, tuple[int, int]] = {}
    scanned = dupes = 0
    if not todo:
        return found, scanned, dupes
    consumer.assign([TopicPartition(topic, p, offset) for p, offset in todo.items()])
    remaining = set(todo)
    deadline = time.monotonic() + timeout
    try:
        while remaining:
            if time.monotonic() > deadline:
                raise OutboxError(
                    f"[kafka] topic {topic}: read-back of committed records did not reach the end of partitions "
                    f"{sorted(remaining)} within {timeout:.0f}s -- nothing was sent (sending without knowing what "
                    "is already there could duplicate); remedy: check the broker and retry")
            for msg in consumer.consume(num_messages=5000, timeout=0.5):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        if msg.offset() >= ends[msg.partition()]:
                            remaining.discard(msg.partition())
                        continue
                    raise OutboxError(f"[kafka] topic {topic}: read-back failed: {err}")
                scanned += 1
                key = msg.key().decode() if msg.key() else None
                if key in wanted:
                    if key in found:
                        dupes += 1
                    else:
                        found[key] = (msg.partition(), msg.offset())
                if msg.offset() + 1 >= ends[msg.partition()]:
                    remaining.discard(msg.partition())
            if remaining:  # aborted records and transaction markers advance the position without a message
                for tp in consumer.position([TopicPartition(topic, p) for p in remaining]):
                    if tp.offset >= ends[tp.partition]:
                        remaining.discard(tp.partition)
    finally:
        consumer.unassign()
    return found, scanned, dupes


def _require_topic(admin_source, topic: str, timeout: float) -> None:
    metadata = admin_source.list_topics(timeout=timeout)
    found = metadata.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        raise OutboxError(f"[kafka] topic {topic} does not exist -- remedy: create it (KafkaHook.ensure_topic, or "
                          "pass ensure_topic= to deliver_kafka); the outbox does not rely on broker auto-creation")


def deliver_kafka(outbox: Outbox, producer_config: Mapping[str, Any], topic: str = constants.DECISIONS_TOPIC,
                  run_id: str | None = None, batch_size: int = 5000, *,
                  ensure_topic: Callable[[str], Any] | None = None, transactional_id: str | None = None,
                  timeout: float = 60.0, on_batch: Callable[[int, int], None] | None = None) -> DeliveryReport:
    """
    Deliver the pending ``kafka`` rows to ``topic``, exactly one committed record per decision id (see the
    module docstring for the claim / fence / read-back / send protocol).

    :param outbox: the outbox.
    :param producer_config: librdkafka settings, e.g. the ``kafka_default`` connection extra
        (``{"bootstrap.servers": ...}``); consumer-only keys are dropped for the producer and producer-only ones
        for the read-back consumer. ``transactional.id``, idempotence and ``acks=all`` are set here.
    :param topic: target topic (keyed by ``decision_id``, value = the audit record JSON).
    :param run_id: only that run's rows (default: every pending row).
    :param batch_size: records per Kafka transaction (and per Delta commit marking them sent).
    :param ensure_topic: called with ``topic`` before anything else (e.g. ``lambda t: hook.ensure_topic(t, 3)``);
        without it the topic must exist.
    :param transactional_id: override :meth:`Outbox.transactional_id` (keep it stable across retries).
    :param timeout: seconds for broker calls (init, commit, read-back).
    :param on_batch: called ``(batch number, records)`` after each batch is committed, before it is marked
        (tests use it to kill the sender exactly there).
    :raises DeliveryError: the topic could not be written; rows not committed stay pending.
    """
    from confluent_kafka import Consumer, KafkaError, KafkaException, Producer

    started = time.monotonic()
    report = DeliveryReport(KAFKA, topic)
    rows = outbox.pending(run_id=run_id, channel=KAFKA)
    report.pending = len(rows)
    if rows.empty:
        return report
    bootstrap = producer_config.get("bootstrap.servers", "?")
    base = dict(producer_config)  # callbacks (oauth_cb, error_cb...) serve both clients; dr_cb is producer-only
    consumer = Consumer({**{k: v for k, v in base.items() if k not in _PRODUCER_ONLY},
                         "group.id": f"decisionflow-outbox-readback-{uuid.uuid4().hex[:12]}",
                         "isolation.level": "read_committed", "enable.auto.commit": False,
                         "enable.partition.eof": True, "auto.offset.reset": "earliest"})
    producer = None
    fatal_errors: list[str] = []
    try:
        if ensure_topic is not None:
            ensure_topic(topic)
        _require_topic(consumer, topic, timeout)
        # 1. claim: the end offsets now bound the offset of anything sent for these rows from here on
        unclaimed = rows.loc[rows["kafka_scan_from"].isna(), "decision_id"].tolist()
        if unclaimed:
            scan_from = json.dumps({str(p): o for p, o in _end_offsets(consumer, topic, timeout).items()})
            outbox.claim(unclaimed, KAFKA, kafka_scan_from=scan_from, run_id=_one_run(rows))
        # 2. fence: aborts the open transaction of a killed sender with the same transactional.id
        tid = transactional_id or outbox.transactional_id(topic)
        user_error_cb = base.get("error_cb")

        def error_cb(err) -> None:
            if err.fatal():
                fatal_errors.append(str(err))
            if user_error_cb is not None:
                user_error_cb(err)

        producer = Producer({**{k: v for k, v in base.items() if k not in _CONSUMER_ONLY},
                             "error_cb": error_cb, "transactional.id": tid, "enable.idempotence": True, "acks": "all",
                             "linger.ms": 10, "transaction.timeout.ms": int(max(timeout, 10) * 1000)})
        producer.init_transactions(timeout)
        # 3. read back what is committed since the oldest claim (re-read: a concurrent claim may be older)
        rows = outbox.pending(run_id=run_id, channel=KAFKA)
        start: dict[int, int] = {}
        for text in rows["kafka_scan_from"].dropna().unique():
            for partition, offset in json.loads(text).items():
                start[int(partition)] = min(start.get(int(partition), offset), offset)
        wanted = set(rows["decision_id"])
        found, report.scanned, dupes = _scan_committed(consumer, topic, start, wanted, timeout)
        if dupes:
            report.errors.append(f"{dupes} decision id(s) already on the topic more than once (before this run)")
        if found:
            keys = list(found)
            outbox.mark_sent(keys, KAFKA, kafka_topic=topic, kafka_partition=[found[k][0] for k in keys],
                             kafka_offset=[found[k][1] for k in keys],
                             run_id=_one_run(rows[rows["decision_id"].isin(found)]))
            report.already_delivered = len(keys)
            log.info("%s: %d decisions were already committed to %s (an earlier attempt died before marking)",
                     SPEC.name, len(keys), topic)
        todo = rows[~rows["decision_id"].isin(found)]
        # 4. send, one transaction per batch, marked after the commit
        todo = todo.sort_values("run_id", kind="stable")  # a batch of one run marks only that run's files
        ids, payloads, runs = todo["decision_id"].tolist(), todo["payload"].tolist(), todo["run_id"].tolist()
        for number, begin in enumerate(range(0, len(ids), batch_size), start=1):
            batch_ids, batch_payloads = ids[begin:begin + batch_size], payloads[begin:begin + batch_size]
            batch_runs = set(runs[begin:begin + batch_size])
            delivered: dict[str, tuple[int, int]] = {}
            failures: list[str] = []

            def on_delivery(err, msg, delivered=delivered, failures=failures):
                # never raise from a librdkafka callback; and touch the message only when it was delivered
                if err is not None:
                    failures.append(str(err))
                else:
                    delivered[msg.key().decode()] = (msg.partition(), msg.offset())

            producer.begin_transaction()
            try:
                for key, payload in zip(batch_ids, batch_payloads):
                    headers = [("idempotency-key", idempotency_key(key, KAFKA).encode())]
                    while True:
                        try:
                            producer.produce(topic, key=key.encode(), value=payload.encode(), headers=headers,
                                             on_delivery=on_delivery)
                            break
                        except BufferError:  # local queue full: let deliveries drain
                            producer.poll(0.05)
                    producer.poll(0)
                producer.flush(timeout)
                if failures or len(delivered) != len(batch_ids):
                    raise OutboxError(f"{len(failures) or len(batch_ids) - len(delivered)} record(s) not "
                                      f"acknowledged: {failures[:3]}")
                producer.commit_transaction(timeout)
            except Exception as exc:
                try:
                    producer.abort_transaction(timeout)
                except Exception as abort_exc:  # noqa: BLE001 - fenced / fatal: the next init aborts it
                    log.warning("abort_transaction failed (%s); the next sender's init_transactions aborts it",
                                abort_exc)
                report.seconds = round(time.monotonic() - started, 3)
                # a fatal (fenced) producer can surface as a SystemError from inside a callback: find the cause
                root: BaseException | None = exc
                while root is not None and not isinstance(root, KafkaException):
                    root = root.__cause__ or root.__context__
                root = root or exc
                detail = str(root)
                if fatal_errors and not isinstance(root, KafkaException):
                    detail += f" ({fatal_errors[0]})"
                error = root.args[0] if isinstance(root, KafkaException) and root.args else None
                if fatal_errors and error is None:
                    error = KafkaError(KafkaError._FATAL)
                if isinstance(error, KafkaError) and (error.fatal() or
                                                      error.code() in (KafkaError._FATAL, KafkaError._FENCED)):
                    detail += (f"; fatal for this producer - typically fenced: another sender with transactional.id "
                               f"{tid} started (a concurrent or retried delivery) and took over")
                raise DeliveryError(
                    f"[kafka] delivery to topic {topic} at {bootstrap} failed in batch {number} ({detail}); "
                    f"{report.sent} records were committed and marked before it, the batch was aborted and "
                    "stays pending -- remedy: check the broker, then retry (the retry reads back what is "
                    "committed and sends only the rest)", report) from exc
            report.batches += 1
            if on_batch is not None:
                on_batch(number, len(batch_ids))
            outbox.mark_sent(batch_ids, KAFKA, kafka_topic=topic,
                             kafka_partition=[delivered[k][0] for k in batch_ids],
                             kafka_offset=[delivered[k][1] for k in batch_ids],
                             run_id=batch_runs.pop() if len(batch_runs) == 1 else None)
            report.sent += len(batch_ids)
    except KafkaException as exc:
        raise DeliveryError(f"[kafka] topic {topic} at {bootstrap}: {exc} -- remedy: check the broker (and that no "
                            "other sender with the same transactional.id is running), then retry", report) from exc
    finally:
        consumer.close()
        report.seconds = round(time.monotonic() - started, 3)
    log.info("%s -> %s: %d sent in %d batch(es), %d already delivered, %.1f records/s", SPEC.name, topic,
             report.sent, report.batches, report.already_delivered, report.rate)
    return report


# -- webhook -------------------------------------------------------------------------------------------------
_RETRY_STATUS = frozenset({408, 425, 429})


def deliver_webhook(outbox: Outbox, url: str, headers: Mapping[str, str] | None = None, *,
                    run_id: str | None = None, timeout: float = 10.0, retries: int = 4, backoff: float = 0.25,
                    batch_size: int = 500, conn_id: str = constants.ACTIONS_WEBHOOK_CONN_ID) -> DeliveryReport:
    """
    POST each pending ``webhook`` row's payload to ``url`` with ``Idempotency-Key: <decision_id>:webhook``.

    2xx -> sent; connection errors, 408/425/429 and 5xx -> retried up to ``retries`` times with exponential
    backoff (``backoff`` * 2^n, jittered); other 4xx -> ``failed`` with the answer in ``last_error``. Status
    changes are written once per ``batch_size`` rows.

    :param outbox: the outbox.
    :param url: the endpoint (``http(s)://host:port/path``), e.g. the ``actions_webhook`` connection's URL.
    :param headers: extra request headers (e.g. ``Authorization``).
    :param run_id: only that run's rows (default: every pending row).
    :param timeout: seconds per request.
    :param retries: retries of one row after the first attempt.
    :param backoff: first retry pause in seconds.
    :param batch_size: rows per Delta commit of their status.
    :param conn_id: the Airflow connection named in errors.
    :raises DeliveryError: the webhook stayed unreachable (or answered 5xx) after the retries; everything
        delivered before is marked sent first, the rest stays pending.
    """
    started = time.monotonic()
    report = DeliveryReport(WEBHOOK, url)
    rows = outbox.pending(run_id=run_id, channel=WEBHOOK)
    report.pending = len(rows)
    if rows.empty:
        return report
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DeliveryError(f"[webhook] connection {conn_id}: {url!r} is not an http(s) URL -- remedy: set the "
                            "connection's host (and schema/port) to the receiver's URL", report)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    base_headers = {"Content-Type": "application/json", **dict(headers or {})}
    state: dict[str, Any] = {"conn": None}
    sent: list[tuple[str, int, int]] = []      # (decision_id, http status, attempts)
    failed: list[tuple[str, int, int, str]] = []
    batch_runs: set[str] = set()

    def flush() -> None:
        """Write the statuses gathered so far: one Delta commit for the sent rows, one for the failed ones."""
        run = next(iter(batch_runs)) if len(batch_runs) == 1 else None
        if sent:
            outbox.mark_sent([k for k, _, _ in sent], WEBHOOK, http_status=[s for _, s, _ in sent],
                             attempts=[a for _, _, a in sent], run_id=run)
            sent.clear()
            report.batches += 1
        if failed:
            outbox.mark_failed([k for k, *_ in failed], WEBHOOK, [e for *_, e in failed],
                               http_status=[s for _, s, _, _ in failed], attempts=[a for _, _, a, _ in failed],
                               run_id=run)
            failed.clear()
        batch_runs.clear()

    def post(body: bytes, key: str) -> tuple[int, bytes]:
        if state["conn"] is None:
            state["conn"] = connection_class(parts.hostname, parts.port, timeout=timeout)
        conn = state["conn"]
        try:
            conn.request("POST", target, body=body, headers={**base_headers, "Idempotency-Key": key})
            response = conn.getresponse()
            return response.status, response.read()
        except Exception:
            conn.close()
            state["conn"] = None
            raise

    try:
        rows = rows.sort_values("run_id", kind="stable")
        for key, decision, payload, row_run in zip(rows["idempotency_key"], rows["decision_id"], rows["payload"],
                                                   rows["run_id"]):
            batch_runs.add(row_run)
            body = payload.encode()
            attempt = 0
            while True:
                attempt += 1
                problem: str | None = None
                try:
                    status, answer = post(body, key)
                except (OSError, http.client.HTTPException) as exc:
                    status, answer, problem = 0, b"", f"{type(exc).__name__}: {exc}"
                if 200 <= status < 300:
                    try:
                        if json.loads(answer or b"{}").get("duplicate"):
                            report.duplicates_at_receiver += 1
                    except (ValueError, AttributeError):
                        pass
                    sent.append((decision, status, attempt))
                    report.sent += 1
                    break
                if status and 400 <= status < 500 and status not in _RETRY_STATUS:
                    text = f"HTTP {status}: {answer[:300].decode(errors='replace')}"
                    failed.append((decision, status, attempt, text))
                    report.failed += 1
                    report.errors.append(f"{key}: {text}")
                    break
                problem = problem or f"HTTP {status}: {answer[:200].decode(errors='replace')}"
                if attempt > retries:
                    flush()
                    report.seconds = round(time.monotonic() - started, 3)
                    what = "unreachable" if not status else "answering errors"
                    raise DeliveryError(
                        f"[webhook] connection {conn_id}: {url} {what} after {attempt} attempts ({problem}); "
                        f"{report.sent} action(s) delivered and marked sent, {len(rows) - report.sent - report.failed}"
                        " still pending -- remedy: start or fix the receiver (or the connection's URL), then "
                        "retry: the receiver dedupes by Idempotency-Key, so nothing applies twice", report)
                report.retries += 1
                time.sleep(backoff * 2 ** (attempt - 1) * (0.5 + random.random()))
            if len(sent) + len(failed) >= batch_size:
                flush()
        flush()
    finally:
        if state["conn"] is not None:
            state["conn"].close()
        report.seconds = round(time.monotonic() - started, 3)
    log.info("%s -> %s: %d sent (%d duplicates at the receiver), %d failed, %d retries", SPEC.name, url,
             report.sent, report.duplicates_at_receiver, report.failed, report.retries)
    return report

