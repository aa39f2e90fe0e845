"""A reviewer's answer to a review case, applied once: audit row, queue, actions, label and case note.

Plain Python (no Airflow): the HITL apply task (:mod:`decisionflow.operators.review`) and
``decisionflow review answer`` both call :func:`apply_review` with a :class:`ReviewAnswer`.

**What an answer does**, in this order (each step idempotent on its own, so a retried apply is safe):

1. *check* - the decision must be in ``gold/decisions`` and in the review queue; an answer to a case already
   answered is refused with :class:`ReviewError` naming the decision id and who answered it, when and how. The
   very same answer again (same decision id, answer, reviewer and ``answered_at``) is not a refusal: it is a
   retry, and it finishes whatever steps an earlier attempt did not.
2. *audit* - the decision's review columns (``review_decision``, ``reviewed_by``, ``reviewed_at``,
   ``review_note``, ``review_source``) are set ONCE: a MERGE ``WHEN MATCHED AND t.review_decision IS NULL``.
   Two answers racing each other: one wins the MERGE, the other is refused.
3. *queue* - the queue row becomes ``resolved`` (``escalated`` for an escalate answer).
4. *actions* - the policy's actions for the answer (``policy.human_review.actions_for``) go through the outbox
   (``gold/decision_actions``) under a resolution id of their own, :func:`resolution_id` = uuid5 of
   ``(decision_id, "review")``: one ``kafka`` row (a ``review_resolution`` record on the ``decisions`` topic,
   keyed by the resolution id, saying which decision it resolves) and one ``webhook`` row when there are
   actions. The same deliverers as the decision run deliver them, exactly once (read-back, Idempotency-Key).
5. *label and note* - ``approve`` -> label ``legit``, ``decline`` -> ``fraud`` on ``transaction-labels``
   (contract transaction-labels.v1, ``source: investigation``); none for ``escalate`` or for a timeout (the
   policy's default is not a judgement). A non-empty note becomes a ``case-notes`` event (case-notes.v1,
   ``case_id`` ``REVIEW-<first 12 of the decision id>``, author = the reviewer). Both are sent once, with the
   outbox's protocol in small: the topics' end offsets are recorded in the queue row before the first send
   (``events_scan_from``); a transactional producer with a ``transactional.id`` stable per resolution fences
   any earlier attempt; what is committed since those offsets is read back (``read_committed``, by the
   ``idempotency-key`` header ``<decision_id>:label`` / ``:note``); only the missing events are sent, label
   and note in one Kafka transaction; then ``events_sent_at`` is set.

Every event and the note are validated before anything is written, so a refused answer changes nothing.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol

from decisionflow import constants
from decisionflow.decisions import _delta, audit, review_queue
from decisionflow.exceptions import NonRetryableError

if TYPE_CHECKING:
    from decisionflow.decisions.outbox import Outbox
    from decisionflow.decisions.policy import Policy

__all__ = [
    "ANSWERS",
    "KafkaReviewEvents",
    "ReviewAnswer",
    "ReviewError",
    "ReviewEvent",
    "ReviewPorts",
    "SOURCES",
    "apply_review",
    "case_markdown",
    "case_subject",
    "load_case",
    "resolution_id",
    "review_events",
]

log = logging.getLogger(__name__)

ANSWERS = constants.REVIEW_ANSWERS
HITL, CLI, TIMEOUT = "hitl", "cli", "timeout"
SOURCES = (HITL, CLI, TIMEOUT)
#: ``reviewed_by`` of an answer nobody gave (the policy's default after the response timeout).
TIMEOUT_REVIEWER = "policy:on_timeout"
#: The decision a review answer leaves the transaction with.
FINAL_DECISION = {"approve": "approve", "decline": "decline", "escalate": "review"}
LABEL_FOR = {"approve": "legit", "decline": "fraud"}
_REVIEW_CODES = {"approve": "REVIEW_APPROVED", "decline": "REVIEW_DECLINED", "escalate": "REVIEW_ESCALATED"}
_SEP = "\x1f"
MAX_NOTE = 10000

REVIEW_COLUMNS = ("review_decision", "reviewed_by", "reviewed_at", "review_note", "review_source")


class ReviewError(NonRetryableError, RuntimeError):
    """An answer that cannot be applied (unknown decision, not a review case, already answered, bad input)."""

    def __init__(self, message: str, decision_id: str | None = None):
        super().__init__(message)
        self.decision_id = decision_id


def resolution_id(decision_id: str) -> str:
    """The outbox id of a decision's review resolution: uuid5 of ``(decision_id, "review")``."""
    return str(uuid.uuid5(audit.DECISION_ID_NAMESPACE, f"{decision_id}{_SEP}review"))


def _utc(value: datetime | str) -> datetime:
    """UTC, microsecond precision (what a Delta TIMESTAMP keeps: an answer compares equal after a round trip)."""
    import pandas as pd

    stamp = pd.Timestamp(value)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.floor("us").to_pydatetime()


def _iso(value: datetime) -> str:
    return _utc(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class ReviewAnswer:
    """
    One answer to one review case.

    :param decision_id: the reviewed decision (``gold/decisions``).
    :param decision: ``approve`` | ``decline`` | ``escalate``.
    :param reviewed_by: who answered (the Airflow user, the CLI's ``--by``, or :data:`TIMEOUT_REVIEWER`).
    :param reviewed_at: when (UTC; kept to the microsecond).
    :param note: the reviewer's note (``None`` or blank: no note).
    :param source: ``hitl`` | ``cli`` | ``timeout``.
    :param review_run_id: the Airflow run that asked (the outbox rows' ``run_id``); ``None`` for the CLI.
    """

    decision_id: str
    decision: str
    reviewed_by: str
    reviewed_at: datetime
    note: str | None = None
    source: str = HITL
    review_run_id: str | None = None

    def __post_init__(self):
        if self.decision not in ANSWERS:
            raise ReviewError(f"review of decision {self.decision_id}: answer {self.decision!r} is not one of "
                              f"{list(ANSWERS)}", self.decision_id)
        if self.source not in SOURCES:
            raise ReviewError(f"review of decision {self.decision_id}: source {self.source!r} is not one of "
                              f"{list(SOURCES)}", self.decision_id)
        if not str(self.reviewed_by or "").strip():
            raise ReviewError(f"review of decision {self.decision_id}: who answered is empty", self.decision_id)
        object.__setattr__(self, "reviewed_at", _utc(self.reviewed_at))
        note = (self.note or "").strip()
        object.__setattr__(self, "note", note or None)
        if note and len(note) > MAX_NOTE:
            raise ReviewError(f"review of decision {self.decision_id}: the note has {len(note)} characters, at "
                              f"most {MAX_NOTE} are allowed", self.decision_id)

    @property
    def is_timeout(self) -> bool:
        return self.source == TIMEOUT

    @classmethod
    def from_hitl(cls, decision_id: str, result: Mapping[str, Any], review_run_id: str | None = None
                  ) -> ReviewAnswer:
        """The answer in a HITL task's result (its XCom: ``chosen_options``, ``params_input``,
        ``responded_at``, ``responded_by_user``). No ``responded_by_user``: the scheduler applied the defaults
        after the response timeout -> source ``timeout``, reviewer :data:`TIMEOUT_REVIEWER`, no note."""
        chosen = list(result.get("chosen_options") or [])
        if len(chosen) != 1:
            raise ReviewError(f"review of decision {decision_id}: expected one chosen option, got {chosen}",
                              decision_id)
        user = result.get("responded_by_user") or None
        params = result.get("params_input") or {}
        when = result.get("responded_at") or datetime.now(timezone.utc)
        if user is None:
            return cls(decision_id, chosen[0], TIMEOUT_REVIEWER, when, None, TIMEOUT, review_run_id)
        name = user.get("name") or user.get("id") if isinstance(user, Mapping) else str(user)
        return cls(decision_id, chosen[0], str(name), when, params.get("note"), HITL, review_run_id)


@dataclass(frozen=True)
class ReviewEvent:
    """One message to publish once: ``topic``, Kafka ``key``, JSON ``value``, and its ``idempotency_key``."""

    topic: str
    key: str
    value: dict[str, Any]
    idempotency_key: str


class EventPublisher(Protocol):
    """What publishes the label and note (:class:`KafkaReviewEvents`; tests pass a fake)."""

    def end_offsets(self, topics: Sequence[str]) -> dict[str, dict[int, int]]: ...

    def publish(self, transactional_id: str, events: Sequence[ReviewEvent],
                scan_from: Mapping[str, Mapping[int, int]]) -> dict[str, int]: ...


@dataclass
class ReviewPorts:
    """
    The boundaries an answer reaches.

    :param deliverers: ``(channel, deliver(outbox) -> report)`` pairs, as the decision run's ``act`` step uses
        (``deliver_kafka`` / ``deliver_webhook`` bound to their connections); empty: the outbox rows wait for
        the next delivery (the next decision run delivers every pending row).
    :param events: publishes the label and the note; ``None``: they stay unsent (``events_sent_at`` NULL) and a
        re-apply of the same answer sends them.
    """

    deliverers: Sequence[tuple[str, Callable[[Outbox], Any]]] = ()
    events: EventPublisher | None = None


# -- reading a case ---------------------------------------------------------------------------------------
def _audit_row(lake_root: str, decision_id: str, storage_options: dict[str, str] | None) -> dict[str, Any] | None:
    dt = _delta.open_table(audit.SPEC, lake_root, storage_options)
    if dt is None:
        return None
    rows = _delta.select(audit.SPEC, dt, list(audit.SPEC.column_names), {"decision_id": decision_id}).to_pylist()
    return rows[0] if rows else None


def _transaction(lake_root: str, event_id: str, storage_options: dict[str, str] | None) -> dict[str, Any] | None:
    """The gold transaction of ``event_id`` (its transaction columns), or None when not readable."""
    import pyarrow as pa
    from deltalake import DeltaTable, QueryBuilder

    from decisionflow.decisions.graph import TRANSACTION_COLUMNS
    from decisionflow.lakehouse.tables import table_path

    try:
        dt = DeltaTable(table_path(lake_root, "gold/transactions_enriched"), storage_options=storage_options)
        have = set(pa.schema(dt.schema().to_arrow()).names)
        columns = ", ".join(f'"{c}"' for c in TRANSACTION_COLUMNS if c in have)
        reader = QueryBuilder().register("t", dt).execute(
            f"SELECT {columns} FROM t WHERE event_id = {_delta.sql_string(event_id)} LIMIT 1")
        rows = pa.table(reader).to_pylist()
    except Exception as exc:  # noqa: BLE001 - the body says it could not be read; the review still works
        log.warning("transaction %s not readable from gold (%s)", event_id, exc)
        return None
    return rows[0] if rows else None


def load_case(lake_root: str, decision_id: str, storage_options: dict[str, str] | None = None
              ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(audit row, gold transaction or None)`` of a decision; :class:`ReviewError` when it is unknown."""
    row = _audit_row(lake_root, decision_id, storage_options)
    if row is None:
        raise ReviewError(f"decision {decision_id} is unknown: no such decision in {constants.DECISIONS_TABLE} "
                          f"under {lake_root}", decision_id)
    return row, _transaction(lake_root, row["event_id"], storage_options)


# -- the HITL task's text -----------------------------------------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+!|~])")


def _md(value: Any, limit: int = 300) -> str:
    """Untrusted text as inert Markdown: one line, special characters escaped, bounded."""
    text = " ".join(str(value).split())
    if len(text) > limit:
        text = text[:limit] + "…"
    return _MD_SPECIAL.sub(r"\\\1", text) if text else "—"


def band_of(row: Mapping[str, Any], policy: Policy) -> str:
    """The score band of an audit row: the band whose reason code it carries (the band code comes first)."""
    codes = list(row.get("reason_codes") or [])
    for name, band in policy.bands.items():
        if band.reason_code in codes:
            return name
    return "unknown"


def case_subject(row: Mapping[str, Any], policy: Policy) -> str:
    """One line: what the reviewer decides on."""
    amount = None
    try:
        amount = json.loads(row.get("features") or "{}").get("amount")
    except ValueError:
        pass
    shown = f" {amount:,.2f}" if isinstance(amount, (int, float)) else ""
    return (f"Review transaction{shown} on account {row['account_id']}: score {row['score']:.3f} "
            f"({band_of(row, policy)} band), decision {row['decision_id'][:12]}")


def case_markdown(row: Mapping[str, Any], transaction: Mapping[str, Any] | None, policy: Policy,
                  top_similar: int = 5) -> str:
    """
    The HITL task's body (Markdown): the transaction, score and band, reason codes with their meaning, the top
    similar past cases with their outcomes, and the escalation step's (agent's) assessment and rationale. Free
    text from the event (memo) and from the agent is escaped and shown as quoted data.
    """
    lines = [f"**Decision** `{row['decision_id']}` · event `{row['event_id']}` · policy "
             f"{_md(row.get('policy_name'))} {_md(row.get('policy_version'))} · model "
             f"{_md(row.get('model_name'))} v{_md(row.get('model_version'))}", ""]
    lines += ["### Transaction", "", "| field | value |", "|---|---|"]
    features: dict[str, Any] = {}
    try:
        features = json.loads(row.get("features") or "{}")
    except ValueError:
        pass
    txn = dict(transaction or {})
    shown = {"event time": row.get("event_time"), "account": row.get("account_id"),
             "merchant": row.get("merchant_id")}
    for name in ("amount", "currency", "channel", "country", "mcc", "device_id", "ip"):
        if name in txn or (name == "amount" and "amount" in features):
            shown[name.replace("_", " ")] = txn.get(name, features.get(name))
    for name, value in shown.items():
        lines.append(f"| {name} | {_md(value)} |")
    if txn.get("memo"):
        lines += ["", "Memo (customer text, shown as data):", "", f"> {_md(txn['memo'], 500)}"]
    if transaction is None:
        lines += ["", "_The gold transaction could not be read; the values are the decision's._"]
    band = band_of(row, policy)
    lines += ["", "### Score", "",
              f"**{float(row['score']):.4f}** — **{band}** band; the policy decided **{row.get('decision')}** "
              f"(brain: {_md(row.get('brain') or 'policy')})."]
    lines += ["", "### Reason codes", ""]
    for code in row.get("reason_codes") or []:
        lines.append(f"- `{code}` — {_md(policy.reason_codes.get(code, 'undeclared code'))}")
    key_features = {k: v for k, v in features.items() if k != "amount"}
    if key_features:
        lines += ["", "<details><summary>Features the model saw</summary>", "", "| feature | value |", "|---|---|"]
        lines += [f"| {_md(k)} | {_md(round(v, 4) if isinstance(v, float) else v)} |"
                  for k, v in sorted(key_features.items())]
        lines += ["", "</details>"]
    lines += ["", "### Similar past cases", ""]
    try:
        similar = json.loads(row.get("similar_cases") or "[]")
    except ValueError:
        similar = {"searched": False, "reason": "unreadable"}
    if isinstance(similar, dict):
        lines.append(f"Not searched: {_md(similar.get('reason'))}.")
    elif not similar:
        lines.append("Searched: nothing similar before the event time.")
    else:
        lines += ["| # | case | outcome | similarity | noted |", "|---|---|---|---|---|"]
        for i, case in enumerate(similar[:top_similar], start=1):
            lines.append(f"| {i} | {_md(case.get('case_id'))} | **{_md(case.get('outcome') or 'unknown')}** | "
                         f"{float(case.get('score') or 0):.3f} | {_md(str(case.get('created_at') or '')[:10])} |")
        outcomes = [c.get("outcome") for c in similar[:top_similar]]
        lines.append("")
        lines.append(f"Outcomes of the top {len(outcomes)}: " + ", ".join(
            f"{n} {o}" for o, n in sorted({o: outcomes.count(o) for o in set(outcomes)}.items(), key=str)))
    lines += ["", "### Assessment", ""]
    escalation = None
    if row.get("escalation"):
        try:
            escalation = json.loads(row["escalation"])
        except ValueError:
            escalation = None
    if escalation:
        lines.append(f"Escalation brain: **{_md(escalation.get('brain'))}**"
                     + (f" ({_md(escalation.get('chat_model'))})" if escalation.get("chat_model") else "")
                     + f"; recommendation: **{_md(escalation.get('recommendation') or 'none')}**"
                     + f"; accepted: {bool(escalation.get('accepted'))}.")
        for refused in escalation.get("refused") or []:
            lines.append(f"- refused: {_md(refused.get('action') or refused.get('decision'))} — "
                         f"{_md(refused.get('reason'))}")
        if escalation.get("fallback_reason"):
            lines.append(f"- fallback: {_md(escalation['fallback_reason'])}")
    lines += ["", "Rationale:", "", f"> {_md(row.get('rationale'), 2000)}"]
    lines += ["", "---", "Answer **approve** (release it; label legit), **decline** (decline it; label fraud) "
              "or **escalate** (hand it to investigations; no label). The note becomes a case note."]
    return "\n".join(lines)


# -- events -------------------------------------------------------------------------------------------------
def review_events(row: Mapping[str, Any], answer: ReviewAnswer) -> list[ReviewEvent]:
    """The label (approve/decline by a person) and the case note (a non-empty note) of an answer, validated
    against their contracts; :class:`ReviewError` names the violation."""
    from decisionflow import contracts

    events = []
    if answer.decision in LABEL_FOR and not answer.is_timeout:
        events.append(ReviewEvent(contracts.LABELS, str(row["account_id"]), {
            "event_id": row["event_id"], "label": LABEL_FOR[answer.decision], "source": "investigation",
            "labelled_at": _iso(answer.reviewed_at), "schema_version": 1,
            "decision_id": answer.decision_id, "reviewed_by": answer.reviewed_by}, f"{answer.decision_id}:label"))
    if answer.note:
        events.append(ReviewEvent(contracts.CASE_NOTES, str(row["account_id"]), {
            "case_id": f"REVIEW-{answer.decision_id[:12]}", "event_id": row["event_id"],
            "account_id": row["account_id"], "author": answer.reviewed_by[:128], "text": answer.note,
            "created_at": _iso(answer.reviewed_at), "schema_version": 1, "decision_id": answer.decision_id,
            "review_decision": answer.decision}, f"{answer.decision_id}:note"))
    for event in events:
        problems = contracts.validate(event.topic, event.value)
        if problems:
            raise ReviewError(f"review of decision {answer.decision_id}: the {event.topic} event would break its "
                              f"contract ({'; '.join(problems[:3])}); nothing was written", answer.decision_id)
    return events


class KafkaReviewEvents:
    """
    Publishes review events exactly once (see the module docstring: end offsets recorded first, a fencing
    transactional producer, a ``read_committed`` read-back by the ``idempotency-key`` header, one transaction).

    :param producer_config: librdkafka settings (``KafkaHook(...).config``); consumer-only keys are dropped for
        the producer, producer-only ones for the read-back consumer.
    :param ensure_topic: called with each topic before its offsets are read (``KafkaHook.ensure_topic``).
    :param timeout: seconds per broker call.
    """

    def __init__(self, producer_config: Mapping[str, Any], *, ensure_topic: Callable[[str], Any] | None = None,
                 timeout: float = 30.0):
        self.config = dict(producer_config)
        self.ensure_topic = ensure_topic
        self.timeout = timeout

    def _consumer(self):
        from confluent_kafka import Consumer

        from decisionflow.decisions.outbox import _PRODUCER_ONLY

        return Consumer({**{k: v for k, v in self.config.items() if k not in _PRODUCER_ONLY},
                         "group.id": f"decisionflow-review-readback-{uuid.uuid4().hex[:12]}",
                         "isolation.level": "read_committed", "enable.auto.commit": False,
                         "enable.partition.eof": True, "auto.offset.reset": "earliest"})

    def end_offsets(self, topics: Sequence[str]) -> dict[str, dict[int, int]]:
        from decisionflow.decisions.outbox import _end_offsets

        consumer = self._consumer()
        try:
            out = {}
            for topic in topics:
                if self.ensure_topic is not None:
                    self.ensure_topic(topic)
                out[topic] = _end_offsets(consumer, topic, self.timeout)
            return out
        finally:
            consumer.close()

    def committed(self, scan_from: Mapping[str, Mapping[int, int]], keys: set[str]) -> set[str]:
        """The ``idempotency-key`` headers among ``keys`` committed since ``scan_from`` (topic -> partition ->
        offset; partitions not listed are read from their start)."""
        from confluent_kafka import KafkaError, TopicPartition

        from decisionflow.decisions.outbox import _end_offsets

        found: set[str] = set()
        consumer = self._consumer()
        try:
            for topic, start in scan_from.items():
                ends = _end_offsets(consumer, topic, self.timeout)
                todo = {p: max(int(start.get(p, 0)), 0) for p in ends}
                todo = {p: o for p, o in todo.items() if o < ends[p]}
                if not todo:
                    continue
                consumer.assign([TopicPartition(topic, p, o) for p, o in todo.items()])
                remaining = set(todo)
                deadline = time.monotonic() + self.timeout
                while remaining:
                    if time.monotonic() > deadline:
                        raise ReviewError(f"[kafka] topic {topic}: the read-back of committed review events did "
                                          f"not reach the end of partitions {sorted(remaining)} in "
                                          f"{self.timeout:.0f}s; nothing was sent -- remedy: check the broker, retry")
                    for msg in consumer.consume(num_messages=1000, timeout=0.5):
                        err = msg.error()
                        if err is not None:
                            if err.code() == KafkaError._PARTITION_EOF:
                                if msg.offset() >= ends[msg.partition()]:
                                    remaining.discard(msg.partition())
                                continue
                            raise ReviewError(f"[kafka] topic {topic}: read-back failed: {err}")
                        for name, value in msg.headers() or []:
                            if name == "idempotency-key" and value and value.decode() in keys:
                                found.add(value.decode())
                        if msg.offset() + 1 >= ends[msg.partition()]:
                            remaining.discard(msg.partition())
                    if remaining:  # transaction markers advance the position without a message
                        for tp in consumer.position([TopicPartition(topic, p) for p in remaining]):
                            if tp.offset >= ends[tp.partition]:
                                remaining.discard(tp.partition)
                consumer.unassign()
        finally:
            consumer.close()
        return found

    def publish(self, transactional_id: str, events: Sequence[ReviewEvent],
                scan_from: Mapping[str, Mapping[int, int]]) -> dict[str, int]:
        """Fence earlier senders of ``transactional_id``, read back, send what is missing in one transaction."""
        from confluent_kafka import KafkaException, Producer

        from decisionflow.decisions.outbox import _CONSUMER_ONLY

        producer = Producer({**{k: v for k, v in self.config.items() if k not in _CONSUMER_ONLY},
                             "transactional.id": transactional_id, "enable.idempotence": True, "acks": "all",
                             "transaction.timeout.ms": int(max(self.timeout, 10) * 1000)})
        try:
            producer.init_transactions(self.timeout)  # aborts and fences an earlier attempt's open transaction
            found = self.committed(scan_from, {e.idempotency_key for e in events})
            todo = [e for e in events if e.idempotency_key not in found]
            if todo:
                failures: list[str] = []
                producer.begin_transaction()
                for event in todo:
                    producer.produce(event.topic, key=event.key.encode(),
                                     value=json.dumps(event.value, sort_keys=True).encode(),
                                     headers=[("idempotency-key", event.idempotency_key.encode())],
                                     on_delivery=lambda err, msg: failures.append(str(err)) if err else None)
                producer.flush(self.timeout)
                if failures:
                    producer.abort_transaction(self.timeout)
                    raise ReviewError(f"[kafka] review events not acknowledged: {failures[:3]} -- remedy: check "
                                      "the broker, then retry the apply (it sends only what is missing)")
                producer.commit_transaction(self.timeout)
            return {"sent": len(todo), "already_delivered": len(found)}
        except KafkaException as exc:
            raise ReviewError(f"[kafka] publishing review events ({transactional_id}) failed: {exc} -- remedy: "
                              "check the broker, then retry the apply (it sends only what is missing)") from exc


# -- applying -----------------------------------------------------------------------------------------------
def _same(row: Mapping[str, Any], answer: ReviewAnswer) -> bool:
    return (row.get("review_decision") == answer.decision and row.get("reviewed_by") == answer.reviewed_by
            and row.get("reviewed_at") is not None and _utc(row["reviewed_at"]) == answer.reviewed_at)


def _refusal(decision_id: str, row: Mapping[str, Any], answer: ReviewAnswer) -> ReviewError:
    when = _iso(row["reviewed_at"]) if row.get("reviewed_at") is not None else "an unknown time"
    return ReviewError(
        f"decision {decision_id} is already resolved: {row.get('review_decision')} by {row.get('reviewed_by')} at "
        f"{when} (via {row.get('review_source')}); this answer ({answer.decision} by {answer.reviewed_by}) was "
        "refused and changed nothing", decision_id)


def _set_review_columns(lake_root: str, answer: ReviewAnswer, storage_options: dict[str, str] | None) -> int:
    import pyarrow as pa

    source = pa.table({
        "decision_id": pa.array([answer.decision_id], pa.string()),
        "review_decision": pa.array([answer.decision], pa.string()),
        "reviewed_by": pa.array([answer.reviewed_by], pa.string()),
        "reviewed_at": pa.array([answer.reviewed_at], pa.timestamp("us", tz="UTC")),
        "review_note": pa.array([answer.note], pa.string()),
        "review_source": pa.array([answer.source], pa.string()),
    })

    def merge(dt) -> dict[str, Any]:
        return (dt.merge(source, predicate="t.decision_id = s.decision_id", source_alias="s", target_alias="t")
                .when_matched_update(updates={c: f"s.{c}" for c in REVIEW_COLUMNS},
                                     predicate="t.review_decision IS NULL").execute())

    metrics = _delta.merge_with_retry(audit.SPEC, lake_root, storage_options, merge, what="MERGE of a review")
    return int(metrics.get("num_target_rows_updated", 0))


def _resolution_payload(row: Mapping[str, Any], answer: ReviewAnswer, policy: Policy, actions: list[str],
                        run_id: str) -> dict[str, Any]:
    code = "REVIEW_TIMEOUT" if answer.is_timeout else _REVIEW_CODES[answer.decision]
    return {
        "record_type": "review_resolution", "decision_id": resolution_id(answer.decision_id),
        "resolves_decision_id": answer.decision_id, "event_id": row["event_id"], "account_id": row["account_id"],
        "merchant_id": row["merchant_id"], "decision": FINAL_DECISION[answer.decision],
        "reason_codes": [code] if code in policy.reason_codes else [],
        "actions": actions, "score": float(row["score"]), "policy_name": policy.name,
        "policy_version": policy.version, "run_id": run_id, "decided_at": _iso(answer.reviewed_at),
        "review_decision": answer.decision, "reviewed_by": answer.reviewed_by,
        "reviewed_at": _iso(answer.reviewed_at), "review_note": answer.note, "review_source": answer.source,
    }


def _enqueue_resolution(lake_root: str, payload: dict[str, Any], storage_options: dict[str, str] | None) -> int:
    """The resolution's outbox rows (kafka; webhook when it has actions), MERGE insert-if-absent."""
    import pyarrow as pa

    from decisionflow.decisions import outbox as ob

    rid = payload["decision_id"]
    channels = [ob.KAFKA] + ([ob.WEBHOOK] if payload["actions"] else [])
    now = datetime.now(timezone.utc)
    bodies = [json.dumps({**payload, "idempotency_key": ob.idempotency_key(rid, c)}, sort_keys=True)
              for c in channels]
    n = len(channels)
    rows = _delta.conform(pa.table({
        "decision_id": pa.array([rid] * n, pa.string()), "channel": pa.array(channels, pa.string()),
        "event_id": pa.array([payload["event_id"]] * n, pa.string()),
        "run_id": pa.array([payload["run_id"]] * n, pa.string()),
        "idempotency_key": pa.array([ob.idempotency_key(rid, c) for c in channels], pa.string()),
        "payload": pa.array(bodies, pa.string()), "status": pa.array([ob.PENDING] * n, pa.string()),
        "attempts": pa.array([0] * n, pa.int32()),
        "enqueued_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
        "updated_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
    }), _delta.arrow_schema(ob.SPEC))

    def merge(dt) -> dict[str, Any]:
        return (dt.merge(rows, predicate="t.decision_id = s.decision_id AND t.channel = s.channel",
                         source_alias="s", target_alias="t").when_not_matched_insert_all().execute())

    metrics = _delta.merge_with_retry(ob.SPEC, lake_root, storage_options, merge, what="enqueue of a review")
    return int(metrics.get("num_target_rows_inserted", 0))


@dataclass
class ReviewResult:
    """What :func:`apply_review` did (JSON-safe through :meth:`as_dict`)."""

    decision_id: str
    resolution_id: str
    review_decision: str
    final_decision: str
    review_source: str
    reviewed_by: str
    actions: list[str]
    retry: bool = False
    outbox_enqueued: int = 0
    delivery: dict[str, Any] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    events_sent: dict[str, int] | str = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_answerable(lake_root: str, decision_id: str, storage_options: dict[str, str] | None = None
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(audit row, queue row)`` of a case that can still take an answer; :class:`ReviewError` otherwise."""
    row = _audit_row(lake_root, decision_id, storage_options)
    if row is None:
        raise ReviewError(f"decision {decision_id} is unknown: no such decision in {constants.DECISIONS_TABLE}",
                          decision_id)
    queued = review_queue.read_queue(lake_root, storage_options, decision_ids=[decision_id])
    if queued.empty:
        raise ReviewError(f"decision {decision_id} is not a review case: the policy decided {row['decision']} "
                          f"in run {row['run_id']} and never queued it for review", decision_id)
    return row, queued.iloc[0].to_dict()


def apply_review(lake_root: str, answer: ReviewAnswer, policy: Policy, ports: ReviewPorts | None = None, *,
                 storage_options: dict[str, str] | None = None) -> ReviewResult:
    """
    Apply ``answer`` once (see the module docstring for the steps).

    :param lake_root: the lake root (``gold/decisions``, ``gold/review_queue``, ``gold/decision_actions``).
    :param answer: the answer.
    :param policy: the policy (the answer's actions, reason codes).
    :param ports: deliverers of the outbox and the label/note publisher.
    :param storage_options: delta-rs object-store options.
    :raises ReviewError: unknown decision, not a review case, already answered differently, or an event that
        breaks its contract - before anything is written.
    """
    ports = ports or ReviewPorts()
    decision_id = answer.decision_id
    row, queued = check_answerable(lake_root, decision_id, storage_options)
    retry = False
    if row.get("review_decision") is not None:
        if not _same(row, answer):
            raise _refusal(decision_id, row, answer)
        retry = True
    actions = policy.human_review.actions_for(answer.decision)
    events = review_events(row, answer)
    if not retry and _set_review_columns(lake_root, answer, storage_options) == 0:
        row = _audit_row(lake_root, decision_id, storage_options) or row  # lost a race with another answer?
        if not _same(row, answer):
            raise _refusal(decision_id, row, answer)
        retry = True
    review_queue.mark_resolved(lake_root, decision_id, resolution=answer.decision, resolved_by=answer.reviewed_by,
                               resolved_at=answer.reviewed_at, review_source=answer.source,
                               storage_options=storage_options)
    run_id = answer.review_run_id or f"review-{answer.source}"
    payload = _resolution_payload(row, answer, policy, actions, run_id)
    result = ReviewResult(decision_id, payload["decision_id"], answer.decision, payload["decision"], answer.source,
                          answer.reviewed_by, actions, retry=retry,
                          events=[f"{e.topic}:{e.idempotency_key}" for e in events])
    result.outbox_enqueued = _enqueue_resolution(lake_root, payload, storage_options)
    if ports.deliverers:
        from decisionflow.decisions.outbox import Outbox

        box = Outbox(lake_root, storage_options=storage_options)
        for channel, deliver in ports.deliverers:
            report = deliver(box)
            result.delivery[channel] = dict(report.as_dict() if hasattr(report, "as_dict") else report)
    if not events:
        result.events_sent = "none"
    elif queued.get("events_sent_at") is not None and not _is_nat(queued.get("events_sent_at")):
        result.events_sent = "already sent"
    elif ports.events is None:
        result.events_sent = "pending (no publisher)"
    else:
        topics = sorted({e.topic for e in events})
        scan_from = review_queue.claim_events(lake_root, decision_id, ports.events.end_offsets(topics),
                                              storage_options)
        result.events_sent = ports.events.publish(f"decisionflow-review-{payload['decision_id']}", events, scan_from)
        review_queue.mark_events_sent(lake_root, decision_id, storage_options)
    log.info("review of %s applied: %s by %s (%s), actions %s, events %s%s", decision_id, answer.decision,
             answer.reviewed_by, answer.source, actions, result.events_sent, " (a retry)" if retry else "")
    return result


def _is_nat(value: Any) -> bool:
    try:
        import pandas as pd

        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False
