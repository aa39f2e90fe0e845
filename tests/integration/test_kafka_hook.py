"""KafkaHook against a real private KRaft broker: the platform check round trip and idempotent topics."""

from __future__ import annotations

import json
import uuid

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions

try:  # tests/integration is a package (has __init__.py)
    from .fixtures_kafka import kafka_broker, kafka_connection  # noqa: F401 - pytest fixtures
except ImportError:  # collected as a plain directory (rootdir-relative import mode)
    from fixtures_kafka import kafka_broker, kafka_connection  # noqa: F401

from decisionflow.hooks.kafka import KafkaHook, TopicMismatchError

pytestmark = pytest.mark.integration


def test_platform_check_round_trip_is_idempotent(kafka_connection):
    hook = KafkaHook()
    first = hook.platform_check()
    second = KafkaHook().platform_check()

    assert first["bootstrap_servers"] == kafka_connection
    assert first["topic"] == second["topic"] == KafkaHook.PLATFORM_CHECK_TOPIC
    assert second["topic_created"] is False
    assert first["message_id"] != second["message_id"]
    assert (second["partition"], second["offset"]) == (0, first["offset"] + 1)
    # a fresh group reads from the beginning: the earlier message is scanned before the new one
    assert second["messages_scanned"] >= 2
    assert second["round_trip_ms"] < 30_000
    json.dumps(second)  # XCom-able

    admin = hook.admin_client()
    topic = admin.list_topics(KafkaHook.PLATFORM_CHECK_TOPIC, timeout=10).topics[KafkaHook.PLATFORM_CHECK_TOPIC]
    assert len(topic.partitions) == 1
    # the throwaway consumer groups commit nothing, so none is left behind with offsets
    groups = admin.list_consumer_groups(request_timeout=10).result().valid
    leftovers = [g.group_id for g in groups if g.group_id.startswith("decisionflow.platform-check.")]
    for group_id in leftovers:
        offsets = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group_id)])[group_id].result()
        assert all(tp.offset < 0 for tp in offsets.topic_partitions), f"{group_id} committed offsets"


def test_ensure_topic_is_idempotent_and_reports_mismatch(kafka_connection):
    hook = KafkaHook()
    name = f"test.ensure.{uuid.uuid4().hex[:8]}"

    created = hook.ensure_topic(name, 3, retention_ms=3_600_000, config={"cleanup.policy": "delete"})
    assert created == {"topic": name, "created": True, "partitions": 3, "config_drift": {}}

    again = hook.ensure_topic(name, 3, retention_ms=3_600_000, config={"cleanup.policy": "delete"})
    assert again == {"topic": name, "created": False, "partitions": 3, "config_drift": {}}

    fewer_wanted = hook.ensure_topic(name, 2)  # more partitions than asked for is fine
    assert fewer_wanted["partitions"] == 3 and fewer_wanted["created"] is False

    drift = hook.ensure_topic(name, 3, retention_ms=60_000)
    assert drift["config_drift"] == {"retention.ms": {"wanted": "60000", "actual": "3600000"}}

    with pytest.raises(TopicMismatchError, match="3 partition\\(s\\) but 6 are required"):
        hook.ensure_topic(name, 6)
    # reported, not changed
    assert len(hook.admin_client().list_topics(name, timeout=10).topics[name].partitions) == 3


def test_producer_and_consumer_at_least_once(kafka_connection):
    hook = KafkaHook()
    topic = f"test.clients.{uuid.uuid4().hex[:8]}"
    hook.ensure_topic(topic, 2)

    producer = hook.producer()
    for i in range(20):
        producer.produce(topic, key=f"k{i % 4}".encode(), value=json.dumps({"i": i}).encode())
    assert producer.flush(30) == 0

    group = f"test-group-{uuid.uuid4().hex[:8]}"
    consumer = hook.consumer(group)
    consumer.subscribe([topic])
    seen = []
    try:
        for _ in range(60):
            seen += [m for m in consumer.consume(50, timeout=0.5) if m.error() is None]
            if len(seen) >= 20:
                break
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    assert sorted(json.loads(m.value())["i"] for m in seen) == list(range(20))

    # committed: the same group resumes after the 20 messages
    again = hook.consumer(group)
    again.subscribe([topic])
    try:
        leftovers = [m for m in again.consume(50, timeout=5) if m.error() is None]
    finally:
        again.close()
    assert leftovers == []
