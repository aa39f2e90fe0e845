"""Shared integration fixtures: one private single-node KRaft Kafka for the whole test session.

The broker runs from the Maven jars in ``$DECISIONFLOW_DATA/jars/kafka`` (``make jars``), on free loopback
ports, with its data and logs in a temporary directory, so it never collides with the developer's stack.
Import the fixtures into a test module (``from fixtures_kafka import kafka_broker, kafka_connection``);
several modules importing them still share one broker (reference-counted, stopped with the last user).
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from decisionflow import config


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((config.HOST, 0))
        return sock.getsockname()[1]


def kafka_connection_uri(bootstrap: str, group_id: str = "decisionflow-tests") -> str:
    """``AIRFLOW_CONN_*`` value (JSON form) of a ``kafka`` connection to ``bootstrap``."""
    return json.dumps({
        "conn_type": "kafka",
        "extra": {"bootstrap.servers": bootstrap, "group.id": group_id, "security.protocol": "PLAINTEXT"},
    })


@dataclass
class Broker:
    service: object  # decisionflow.stack.kafka.KafkaService
    bootstrap_servers: str
    data_dir: Path


_lock = threading.Lock()
_shared: dict[str, object] = {"broker": None, "users": 0}


def _acquire(tmp_root: Path) -> Broker:
    from decisionflow.stack.base import StackContext
    from decisionflow.stack.kafka import KafkaService

    with _lock:
        if _shared["broker"] is None:
            if not shutil.which("java"):
                pytest.fail("java is not on PATH: the Kafka broker needs Java 17+")
            if not list(config.jar_paths().kafka_broker.glob("kafka_2.13-*.jar")):
                pytest.fail(f"Kafka broker jars missing in {config.jar_paths().kafka_broker}: run `make jars`")
            ctx = StackContext(data=tmp_root, ports={"kafka": free_port(), "kafka_controller": free_port()})
            service = KafkaService(ctx)
            service.start()
            try:
                service.wait_healthy(timeout=180)
            except Exception:
                service.stop()
                raise
            _shared["broker"] = Broker(service, service.bootstrap_servers(), tmp_root)
        _shared["users"] += 1
        return _shared["broker"]  # type: ignore[return-value]


def _release() -> None:
    with _lock:
        _shared["users"] -= 1
        if _shared["users"] <= 0 and _shared["broker"] is not None:
            _shared["broker"].service.stop()  # type: ignore[union-attr]
            _shared["broker"] = None


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory) -> Broker:
    """A running private broker: ``.bootstrap_servers``, ``.service`` (a KafkaService), ``.data_dir``."""
    broker = _acquire(tmp_path_factory.mktemp("kafka-stack"))
    try:
        yield broker
    finally:
        _release()


@pytest.fixture
def kafka_connection(kafka_broker, monkeypatch) -> str:
    """Point the ``kafka_default`` Airflow connection at the private broker; returns its bootstrap servers."""
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_DEFAULT", kafka_connection_uri(kafka_broker.bootstrap_servers))
    return kafka_broker.bootstrap_servers


# -- helpers for the exactly-once tests -------------------------------------------------------------------------
def ensure_topic(bootstrap: str, topic: str, partitions: int = 3) -> None:
    """Create ``topic`` (when missing) and wait until every partition has a leader."""
    import time

    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    if topic not in admin.list_topics(timeout=10).topics:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[topic].result(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        meta = admin.list_topics(topic, timeout=10).topics[topic]
        if meta.error is None and meta.partitions and all(p.leader >= 0 for p in meta.partitions.values()):
            return
        time.sleep(0.2)
    raise TimeoutError(f"topic {topic}: partitions without a leader after 30 s")


def committed_records(bootstrap: str, topic: str) -> list:
    """Every committed record of ``topic`` from the beginning (``isolation.level=read_committed``), as confluent
    messages; fails when the read does not reach the end of every partition."""
    import time
    import uuid

    from confluent_kafka import Consumer, KafkaError, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex}",
                         "isolation.level": "read_committed", "enable.partition.eof": True,
                         "enable.auto.commit": False})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        done, records = set(), []
        deadline = time.monotonic() + 30
        while len(done) < len(parts) and time.monotonic() < deadline:
            for msg in consumer.consume(1000, timeout=0.5):
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        done.add(msg.partition())
                    continue
                records.append(msg)
        assert len(done) == len(parts), f"read-back of {topic} did not reach the end of the topic"
        return records
    finally:
        consumer.close()
