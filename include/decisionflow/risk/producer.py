"""Produce generated messages to Kafka and write the ground truth of what was produced.

Kept apart from :mod:`decisionflow.risk.generator` (pure) so that generation is testable without a broker.
Uses ``confluent_kafka`` directly (imported lazily), so it works without Airflow configured.

Truth file: JSON lines, one per message, in produce order (``seq`` 0, 1, 2, ...)::

    {"seq": 0, "topic": "transactions", "key": "acc-000876", "kind": "valid", "contract_valid": true,
     "violation": null, "event_id": "01e2...", "record_time": "2025-01-06T00:00:00.000Z",
     "sent_at": "2025-01-06T00:00:00.000Z", "is_fraud": false, "pattern": null, "decoy": null,
     "duplicate_of": null, "partition": 1, "offset": 0, "value_bytes": 371, "value_sha256": "9f2c...",
     "error": null}

``partition``/``offset`` are where the broker stored the message (``null`` in a dry run or on error);
``value_bytes``/``value_sha256`` are ``null`` for a tombstone. ``<truth stem>.summary.json`` next to it holds
the configuration, counts per topic and kind, fraud counts per pattern and the throughput.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from decisionflow.contracts import TOPICS, dlq_topic
from decisionflow.risk.generator import EventGenerator, Message

#: librdkafka settings of the generator's producer (each can be overridden through ``producer_config``).
PRODUCER_CONFIG: dict[str, Any] = {
    "enable.idempotence": True,  # retries neither duplicate nor reorder within a partition
    "acks": "all",
    "linger.ms": 20,
    "compression.type": "lz4",
    # Java clients' default partitioner, so a key lands on the same partition whoever produces it.
    "partitioner": "murmur2_random",
    "queue.buffering.max.messages": 200_000,
    "queue.buffering.max.kbytes": 262_144,
    "message.timeout.ms": 120_000,
    "client.id": "decisionflow-generator",
}


class ProduceError(RuntimeError):
    """Producing could not start or finish (broker unreachable, topic missing, messages not acknowledged)."""


@dataclass
class ProduceReport:
    """What one run produced; ``failed`` messages were not acknowledged (their truth row has ``error``)."""

    produced: int = 0
    delivered: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    generate_s: float = 0.0
    bytes: int = 0
    bootstrap_servers: str | None = None
    truth_path: str = ""
    summary_path: str = ""
    by_topic: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    transactions: int = 0
    fraud_by_pattern: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def messages_per_s(self) -> float:
        return self.produced / self.elapsed_s if self.elapsed_s else 0.0

    def describe(self) -> str:
        kinds = Counter()
        for per_topic in self.by_kind.values():
            kinds.update(per_topic)
        bad = sum(v for k, v in kinds.items() if k != "valid")
        where = self.bootstrap_servers or "nowhere (dry run)"
        lines = [
            f"produced {self.produced} messages ({self.bytes / 2**20:.1f} MiB) to {where} in {self.elapsed_s:.1f}s "
            f"= {self.messages_per_s:,.0f} msg/s; delivered {self.delivered}, failed {self.failed}",
            f"  per topic: {self.by_topic}",
            f"  bad input: {bad} ({bad / max(1, self.produced):.1%}): "
            + ", ".join(f"{k}={v}" for k, v in sorted(kinds.items()) if k != "valid"),
            f"  fraud transactions by pattern: {self.fraud_by_pattern}",
            f"  truth: {self.truth_path}  summary: {self.summary_path}",
        ]
        lines += [f"  error: {e}" for e in self.errors[:5]]
        return "\n".join(lines)


def summary_path_for(truth_path: Path) -> Path:
    """``truth.jsonl`` -> ``truth.summary.json``."""
    return truth_path.with_name(f"{truth_path.stem}.summary.json")


def read_truth(path: str | Path) -> list[dict[str, Any]]:
    """The truth rows of a run, in produce order."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _admin(bootstrap_servers: str):
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": bootstrap_servers, "client.id": "decisionflow-generator"})


def ensure_topics(bootstrap_servers: str, topics: Iterable[str], *, with_dlq: bool = True,
                  timeout: float = 30.0) -> dict[str, bool]:
    """
    Create ``topics`` (and their ``.dlq`` topics) with the defaults of :data:`decisionflow.contracts.TOPICS`
    when missing; existing topics are left as they are. Returns ``{topic: created?}``.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic

    names: list[str] = []
    for topic in topics:
        names.append(topic)
        if with_dlq:
            names.append(dlq_topic(topic))
    admin = _admin(bootstrap_servers)
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise ProduceError(f"cannot reach Kafka at {bootstrap_servers}: {exc}") from exc
    wanted = [TOPICS[name] for name in names if name not in existing]
    result = {name: False for name in names}
    if wanted:
        futures = admin.create_topics(
            [NewTopic(spec.name, num_partitions=spec.partitions, replication_factor=-1, config=spec.topic_config())
             for spec in wanted],
            request_timeout=timeout,
        )
        for name, future in futures.items():
            try:
                future.result(timeout=timeout)
                result[name] = True
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise ProduceError(f"cannot create topic {name}: {exc}") from exc
        _wait_for_leaders(admin, [spec.name for spec in wanted], timeout)
    return result


def _wait_for_leaders(admin, names: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(names)
    while pending:
        metadata = admin.list_topics(timeout=timeout)
        pending = [n for n in pending if not (
            n in metadata.topics and metadata.topics[n].error is None and metadata.topics[n].partitions
            and all(p.leader >= 0 for p in metadata.topics[n].partitions.values()))]
        if pending and time.monotonic() > deadline:
            raise ProduceError(f"topics {pending} have no leader after {timeout:.0f}s")
        if pending:
            time.sleep(0.2)


class _TruthWriter:
    """Writes truth rows in ``seq`` order although deliveries are acknowledged per partition."""

    def __init__(self, handle):
        self.handle = handle
        self.waiting: dict[int, dict] = {}
        self.next = 0

    def add(self, seq: int, row: dict) -> None:
        self.waiting[seq] = row
        while self.next in self.waiting:
            self.handle.write(json.dumps(self.waiting.pop(self.next), ensure_ascii=False) + "\n")
            self.next += 1


def produce(
    messages: Iterable[Message],
    *,
    bootstrap_servers: str | None,
    truth_path: str | Path,
    rate: float = 0.0,
    progress: bool = True,
    producer_config: dict[str, Any] | None = None,
    flush_timeout: float = 180.0,
) -> ProduceReport:
    """
    Produce ``messages`` (e.g. an :class:`EventGenerator`) in order, keyed as generated, and write the truth.

    :param bootstrap_servers: Kafka ``HOST:PORT``; ``None`` is a dry run (generation and truth only).
    :param truth_path: where the truth JSON lines go; ``<stem>.summary.json`` is written next to it.
    :param rate: messages per second across all topics; ``0`` = as fast as possible.
    :param progress: a tqdm bar on stderr (transactions generated out of ``config.events``).
    :param producer_config: librdkafka overrides on top of :data:`PRODUCER_CONFIG`.
    :raises ProduceError: when the topics are missing or the broker cannot be reached.
    """
    from tqdm import tqdm

    truth_path = Path(truth_path)
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    generator = messages if isinstance(messages, EventGenerator) else None
    config = generator.config if generator else None
    report = ProduceReport(bootstrap_servers=bootstrap_servers, truth_path=str(truth_path),
                           summary_path=str(summary_path_for(truth_path)))
    by_kind: dict[str, Counter] = {}
    fraud = Counter()

    producer = None
    if bootstrap_servers:
        producer = _producer(bootstrap_servers, producer_config)
        if config is not None:
            _check_topics(bootstrap_servers, config.topics)

    bar = tqdm(total=config.events if config else None, unit="txn", file=sys.stderr, disable=not progress,
               mininterval=0.5, dynamic_ncols=True, desc="produce")
    started = time.monotonic()
    generate_s = 0.0
    with open(truth_path, "w", encoding="utf-8") as handle:
        writer = _TruthWriter(handle)

        def delivered(seq: int, row: dict, err, msg) -> None:
            if err is not None:
                row["error"] = str(err)
                report.failed += 1
                if len(report.errors) < 20:
                    report.errors.append(f"seq {seq} ({row['topic']}): {err}")
            else:
                row["partition"], row["offset"] = msg.partition(), msg.offset()
                report.delivered += 1
            writer.add(seq, row)

        iterator = iter(messages)
        while True:
            t0 = time.perf_counter()
            message = next(iterator, None)
            generate_s += time.perf_counter() - t0
            if message is None:
                break
            row = message.truth()
            value = message.value
            row.update(partition=None, offset=None, value_bytes=len(value) if value is not None else None,
                       value_sha256=hashlib.sha256(value).hexdigest() if value is not None else None, error=None)
            report.produced += 1
            report.bytes += len(value or b"") + len(message.key or b"")
            report.by_topic[message.topic] = report.by_topic.get(message.topic, 0) + 1
            by_kind.setdefault(message.topic, Counter())[message.kind] += 1
            if message.topic == "transactions" and message.kind != "duplicate":
                report.transactions += 1
                if message.is_fraud:
                    fraud[message.pattern] += 1
            if rate > 0:
                _pace(producer, started, report.produced, rate)
            if producer is None:
                writer.add(message.seq, row)
            else:
                _send(producer, message, row, delivered)
                if report.produced % 64 == 0:
                    producer.poll(0)  # serve delivery reports in batches, not after every message
            if generator is not None and generator.transactions_done != bar.n:
                bar.update(generator.transactions_done - bar.n)
                if report.produced % 1000 == 0:
                    bar.set_postfix(msgs=report.produced, refresh=False)
        if producer is not None:
            remaining = producer.flush(flush_timeout)
            if remaining:
                report.errors.append(f"{remaining} message(s) not acknowledged after {flush_timeout:.0f}s")
                report.failed += remaining
        bar.set_postfix(msgs=report.produced, refresh=False)
        bar.close()
        if writer.waiting:  # only when the flush timed out: keep what we know, in order
            for seq in sorted(writer.waiting):
                handle.write(json.dumps(writer.waiting[seq], ensure_ascii=False) + "\n")
    report.elapsed_s = time.monotonic() - started
    report.generate_s = generate_s
    report.by_kind = {t: dict(sorted(c.items())) for t, c in by_kind.items()}
    report.fraud_by_pattern = dict(sorted(fraud.items()))
    summary = {"config": _config_dict(config), **asdict(report), "messages_per_s": round(report.messages_per_s, 1)}
    Path(report.summary_path).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return report


def _config_dict(config) -> dict[str, Any] | None:
    if config is None:
        return None
    out = asdict(config)
    out["start"] = config.start.isoformat()
    return out


def _producer(bootstrap_servers: str, overrides: dict[str, Any] | None):
    from confluent_kafka import Producer

    seen = Counter()

    def on_error(err) -> None:  # client-level trouble (broker down, ...): say so, but not a thousand times
        seen[str(err)] += 1
        if seen[str(err)] <= 3:
            print(f"kafka producer: {err}", file=sys.stderr)

    conf = {**PRODUCER_CONFIG, "bootstrap.servers": bootstrap_servers, **(overrides or {})}
    conf.setdefault("error_cb", on_error)
    return Producer(conf)


def _check_topics(bootstrap_servers: str, topics: Iterable[str]) -> None:
    from confluent_kafka import KafkaException

    try:
        existing = _admin(bootstrap_servers).list_topics(timeout=15).topics
    except KafkaException as exc:
        raise ProduceError(f"cannot reach Kafka at {bootstrap_servers}: {exc}") from exc
    missing = [t for t in topics if t not in existing]
    if missing:
        raise ProduceError(f"topic(s) {missing} do not exist on {bootstrap_servers} (auto-create is off): "
                           f"pass --create-topics or create them with the defaults in contracts.TOPICS")


def _send(producer, message: Message, row: dict, delivered) -> None:
    def on_delivery(err, msg, seq=message.seq, row=row):
        delivered(seq, row, err, msg)

    from confluent_kafka import KafkaException

    while True:
        try:
            producer.produce(message.topic, value=message.value, key=message.key, on_delivery=on_delivery)
            break
        except BufferError:  # local queue full: serve delivery reports, then retry
            producer.poll(0.05)
        except KafkaException as exc:  # refused locally (e.g. larger than message.max.bytes): record it
            delivered(message.seq, row, exc.args[0], None)
            break


def _pace(producer, started: float, sent: int, rate: float) -> None:
    """Sleep until message number ``sent`` is due at ``rate`` per second, serving callbacks meanwhile."""
    due = started + sent / rate
    while True:
        wait = due - time.monotonic()
        if wait <= 0:
            return
        if producer is not None:
            producer.poll(min(wait, 0.1))
        else:
            time.sleep(min(wait, 0.1))
