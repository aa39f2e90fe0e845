"""The generator against a real private KRaft broker: what the truth file says was produced is exactly what
the topics hold, message for message (partition, offset, key, bytes), tombstones included."""

from __future__ import annotations

import hashlib
import shutil
import socket
import time
from collections import Counter

import pytest

from decisionflow import config
from decisionflow.contracts import SOURCE_TOPICS, TOPICS, TRANSACTIONS
from decisionflow.risk.generator import main
from decisionflow.risk.producer import ProduceError, _check_topics, read_truth, summary_path_for

pytestmark = pytest.mark.integration

EVENTS = 2000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((config.HOST, 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """A private single-node Kafka on free ports, its data in a temporary directory; stopped afterwards."""
    from decisionflow.stack.base import StackContext
    from decisionflow.stack.kafka import KafkaService

    if not shutil.which("java"):
        pytest.fail("java is not on PATH: the Kafka broker needs Java 17+")
    if not list(config.jar_paths().kafka_broker.glob("kafka_2.13-*.jar")):
        pytest.fail(f"Kafka broker jars missing in {config.jar_paths().kafka_broker}: run `make jars`")
    ctx = StackContext(data=tmp_path_factory.mktemp("generator-kafka"),
                       ports={"kafka": _free_port(), "kafka_controller": _free_port()})
    service = KafkaService(ctx)
    service.start()
    try:
        service.wait_healthy(timeout=180)
        yield service.bootstrap_servers()
    finally:
        service.stop()


@pytest.fixture(scope="module")
def produced(broker, tmp_path_factory):
    truth = tmp_path_factory.mktemp("truth") / "truth.jsonl"
    with pytest.raises(ProduceError, match="do not exist"):  # auto-create is off: say so before producing
        _check_topics(broker, SOURCE_TOPICS)
    started = time.monotonic()
    code = main(["produce", "--events", str(EVENTS), "--seed", "2024", "--bad-share", "0.08",
                 "--bootstrap-servers", broker, "--truth", str(truth), "--create-topics", "--no-progress"])
    elapsed = time.monotonic() - started
    assert code == 0
    rows = read_truth(truth)
    print(f"\n[generator->kafka] {len(rows)} messages in {elapsed:.1f}s = {len(rows) / elapsed:,.0f} msg/s")
    return rows, truth


def _consume_all(bootstrap: str, topic: str) -> list:
    """Every message of every partition, from the low to the high watermark (no consumer group needed)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"generator-test-{topic}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                         "fetch.max.bytes": 52_428_800, "max.partition.fetch.bytes": 2_097_152})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {}
        assignment = []
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
                assignment.append(TopicPartition(topic, p, low))
        consumer.assign(assignment)
        out, done = [], set()
        deadline = time.monotonic() + 120
        while len(done) < len(ends) and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=1000, timeout=1.0):
                assert msg.error() is None, msg.error()
                out.append(msg)
                if msg.offset() + 1 >= ends[msg.partition()]:
                    done.add(msg.partition())
        assert len(done) == len(ends), f"{topic}: partitions {set(ends) - done} not read to the end"
        return out
    finally:
        consumer.close()


def test_topics_and_dead_letter_topics_are_created_with_the_defaults(broker, produced):
    from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

    admin = AdminClient({"bootstrap.servers": broker})
    metadata = admin.list_topics(timeout=10).topics
    for name in TOPICS:
        assert len(metadata[name].partitions) == TOPICS[name].partitions == 3
    resource = ConfigResource(ResourceType.TOPIC, TRANSACTIONS)
    entries = admin.describe_configs([resource])[resource].result(timeout=10)
    assert entries["retention.ms"].value == str(TOPICS[TRANSACTIONS].retention_ms)


def test_every_produced_message_is_on_the_broker_exactly_where_the_truth_says(broker, produced):
    rows, truth = produced
    undelivered = [r for r in rows if r["error"] is not None or r["partition"] is None or r["offset"] is None]
    assert not undelivered, f"{len(undelivered)} of {len(rows)} truth rows not delivered: {undelivered[:3]}"
    assert sum(r["topic"] == TRANSACTIONS and r["kind"] != "duplicate" for r in rows) == EVENTS
    for topic in SOURCE_TOPICS:
        expected = {(r["partition"], r["offset"]): r for r in rows if r["topic"] == topic}
        consumed = _consume_all(broker, topic)
        assert len(consumed) == len(expected), topic
        assert {(m.partition(), m.offset()) for m in consumed} == set(expected), topic
        for msg in consumed:
            row = expected[(msg.partition(), msg.offset())]
            assert msg.key().decode() == row["key"]
            if row["kind"] == "tombstone":
                assert msg.value() is None  # a null value, not an empty string
            else:
                assert msg.value() is not None
                assert len(msg.value()) == row["value_bytes"]
                assert hashlib.sha256(msg.value()).hexdigest() == row["value_sha256"]
        # produce order is kept per partition (idempotent producer): offsets grow with seq
        for partition in {p for p, _ in expected}:
            offsets = [r["offset"] for r in rows if r["topic"] == topic and r["partition"] == partition]
            assert offsets == sorted(offsets) and offsets == list(range(offsets[0], offsets[0] + len(offsets)))
    # one key, one partition - the same on every topic (same partition count and partitioner: co-partitioned)
    partitions_of: dict[str, set] = {}
    for r in rows:
        partitions_of.setdefault(r["key"], set()).add(r["partition"])
    assert all(len(p) == 1 for p in partitions_of.values())
    summary = summary_path_for(truth).read_text()
    assert '"failed": 0' in summary


def test_bad_input_reaches_the_broker(produced):
    rows, _ = produced
    kinds = Counter(r["kind"] for r in rows)
    for kind in ("malformed_json", "schema_violation", "tombstone", "oversized", "unknown_fields", "duplicate",
                 "late", "out_of_order"):
        assert kinds[kind] > 0, kind
    by_seq = {r["seq"]: r for r in rows}
    for r in rows:
        if r["kind"] == "duplicate":
            original = by_seq[r["duplicate_of"]]
            assert (original["value_sha256"], original["key"], original["topic"]) == (
                r["value_sha256"], r["key"], r["topic"])
            assert (original["partition"], original["offset"]) != (r["partition"], r["offset"])
