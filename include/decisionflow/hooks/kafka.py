"""Kafka for decisionflow: clients with safe defaults, idempotent topics and a produce -> consume self-check.

Uses the standard ``kafka`` connection type owned by ``apache-airflow-providers-apache-kafka``: the
connection's extra is the confluent-kafka (librdkafka) config dict, for example::

    {"bootstrap.servers": "127.0.0.1:9092", "group.id": "decisionflow", "security.protocol": "PLAINTEXT"}

The config is built by the provider's ``KafkaBaseHook`` (callback allow-list, Amazon MSK IAM and Google
Managed Kafka token callbacks), reached lazily so that importing this module stays cheap.
"""

from __future__ import annotations

import json
import time
import uuid
from functools import cached_property
from typing import TYPE_CHECKING, Any

from decisionflow.hooks.base import CheckableHook, LayerCheckError
from decisionflow.exceptions import NonRetryableError

if TYPE_CHECKING:
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient

#: librdkafka properties that only a consumer understands (a producer or admin client warns about them).
_CONSUMER_ONLY = frozenset({
    "group.id", "group.instance.id", "group.protocol", "group.remote.assignor", "auto.offset.reset",
    "enable.auto.commit", "auto.commit.interval.ms", "enable.auto.offset.store", "isolation.level",
    "partition.assignment.strategy", "session.timeout.ms", "heartbeat.interval.ms", "max.poll.interval.ms",
    "fetch.min.bytes", "fetch.max.bytes", "fetch.wait.max.ms", "max.partition.fetch.bytes",
    "enable.partition.eof", "check.crcs", "on_commit",
})
#: librdkafka properties that only a producer understands.
_PRODUCER_ONLY = frozenset({
    "acks", "request.required.acks", "enable.idempotence", "linger.ms", "queue.buffering.max.ms",
    "batch.size", "batch.num.messages", "compression.type", "compression.codec", "message.timeout.ms",
    "delivery.timeout.ms", "retries", "message.send.max.retries", "max.in.flight.requests.per.connection",
    "max.in.flight", "transactional.id", "transaction.timeout.ms", "partitioner", "enable.gapless.guarantee",
    "queue.buffering.max.messages", "queue.buffering.max.kbytes",
})

PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
}
CONSUMER_DEFAULTS: dict[str, Any] = {
    "auto.offset.reset": "earliest",
    # The caller commits after it has processed a batch (at-least-once), not librdkafka on a timer.
    "enable.auto.commit": False,
}


class TopicMismatchError(NonRetryableError, ValueError):
    """An existing topic does not match what ``ensure_topic`` was asked for (fewer partitions)."""


class KafkaHook(CheckableHook):
    """
    Kafka clients, idempotent topic management and an end-to-end self-check over a ``kafka`` connection.

    :param kafka_config_id: Airflow connection id of type ``kafka`` whose extra is the confluent-kafka
        config dict (``bootstrap.servers`` required). Defaults to ``kafka_default``.
    :param client_id: librdkafka ``client.id`` for every client this hook builds, unless the connection or
        an override sets one; shows up in broker logs and quotas.
    """

    conn_name_attr = "kafka_config_id"
    default_conn_name = "kafka_default"
    conn_type = "kafka"
    hook_name = "Apache Kafka (decisionflow)"

    layer = "kafka"
    remedy = (
        "check the broker is running and healthy (its log is $DECISIONFLOW_DATA/logs/kafka.log) and that the "
        "Airflow connection's extra has the right bootstrap.servers"
    )

    #: Scratch topic written by ``platform_check`` and read back by the Spark lakehouse check.
    PLATFORM_CHECK_TOPIC = "decisionflow.platform-check"
    PLATFORM_CHECK_RETENTION_MS = 7 * 24 * 3600 * 1000

    def __init__(self, kafka_config_id: str = default_conn_name, client_id: str = "decisionflow", **kwargs):
        super().__init__(**kwargs)
        self.kafka_config_id = kafka_config_id
        self.client_id = client_id

    # -- configuration ----------------------------------------------------------------------------------
    @cached_property
    def config(self) -> dict[str, Any]:
        """The connection's librdkafka config, resolved by the provider's ``KafkaBaseHook``."""
        from airflow.providers.apache.kafka.hooks.base import KafkaBaseHook

        base = KafkaBaseHook(kafka_config_id=self.kafka_config_id)
        build = getattr(base, "_build_config", None)  # provider >= 1.x; private, so guard against a rename
        if build is None:
            self.log.warning("KafkaBaseHook._build_config not found: using the connection extra as is")
            resolved = dict(self.get_connection(self.kafka_config_id).extra_dejson)
        else:
            resolved = dict(build())
        resolved.setdefault("client.id", self.client_id)
        return resolved

    @property
    def bootstrap_servers(self) -> str:
        """``bootstrap.servers`` of the connection, e.g. ``127.0.0.1:9092`` (what Spark's Kafka source needs)."""
        return str(self.config["bootstrap.servers"])

    def _config_for(self, drop: frozenset[str], defaults: dict[str, Any], overrides: dict[str, Any]) -> dict:
        base = {k: v for k, v in self.config.items() if k not in drop}
        return {**defaults, **base, **overrides}

    def _error_cb(self, err: Any) -> None:
        self.log.warning("Kafka client error (%s): %s", self.kafka_config_id, err)

    # -- clients ----------------------------------------------------------------------------------------
    def admin_client(self, **overrides: Any) -> AdminClient:
        """A confluent-kafka ``AdminClient`` (consumer/producer-only properties of the connection dropped)."""
        from confluent_kafka.admin import AdminClient

        return AdminClient(self._config_for(_CONSUMER_ONLY | _PRODUCER_ONLY, {}, overrides))

    def producer(self, **overrides: Any) -> Producer:
        """
        A confluent-kafka ``Producer``: idempotent and ``acks=all`` unless the connection or ``overrides`` say
        otherwise, so a retried send neither duplicates nor reorders within a partition.

        :param overrides: librdkafka properties that win over the connection and the defaults.
        """
        from confluent_kafka import Producer

        conf = self._config_for(_CONSUMER_ONLY, PRODUCER_DEFAULTS, overrides)
        conf.setdefault("error_cb", self._error_cb)
        return Producer(conf)

    def consumer(self, group_id: str, **overrides: Any) -> Consumer:
        """
        A confluent-kafka ``Consumer`` in ``group_id``, not yet subscribed.

        Starts from the earliest offset when the group has none, and does not auto-commit: commit after
        processing (``consumer.commit(asynchronous=False)``) for at-least-once delivery.

        :param group_id: Consumer group; overrides the connection's ``group.id``.
        :param overrides: librdkafka properties that win over the connection and the defaults.
        """
        from confluent_kafka import Consumer

        conf = self._config_for(_PRODUCER_ONLY, CONSUMER_DEFAULTS, {**overrides, "group.id": group_id})
        conf.setdefault("error_cb", self._error_cb)
        return Consumer(conf)

    def commit_offsets(self, group_id: str, offsets: dict[tuple[str, int], int], timeout: float = 30.0) -> None:
        """
        Commit explicit ``{(topic, partition): next_offset}`` for ``group_id`` without consuming anything.

        Used to record progress markers (e.g. "bronze holds everything before this offset") that watchers
        compare with end offsets; the group is never used to read.
        """
        from confluent_kafka import TopicPartition

        if not offsets:
            return
        consumer = self.consumer(group_id)
        try:
            parts = [TopicPartition(topic, partition, offset) for (topic, partition), offset in sorted(offsets.items())]
            results = consumer.commit(offsets=parts, asynchronous=False)
            failed = [f"{tp.topic}/{tp.partition}: {tp.error}" for tp in results or [] if tp.error]
            if failed:
                raise RuntimeError(f"commit of progress markers for group {group_id!r} failed: {failed}")
        finally:
            consumer.close()

    def get_conn(self) -> AdminClient:
        """BaseHook's generic accessor: the admin client."""
        return self.admin_client()

    # -- topics -----------------------------------------------------------------------------------------
    def ensure_topic(
        self,
        name: str,
        partitions: int,
        retention_ms: int | None = None,
        config: dict[str, Any] | None = None,
        *,
        replication_factor: int = -1,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """
        Create ``name`` if it does not exist; safe to call on every run.

        An existing topic with at least ``partitions`` partitions is accepted as is. One with fewer raises
        :class:`TopicMismatchError` rather than being silently accepted or silently grown (adding partitions
        changes which partition a key maps to). Config differences on an existing topic are reported in
        the result (``config_drift``) and logged, never altered: lowering retention deletes data.

        :param name: Topic name.
        :param partitions: Wanted number of partitions (a minimum for an existing topic).
        :param retention_ms: ``retention.ms`` for a new topic; ``None`` keeps the broker default.
        :param config: Further topic properties for a new topic (``cleanup.policy``, ``min.insync.replicas``...).
        :param replication_factor: Replicas for a new topic; ``-1`` takes the broker's
            ``default.replication.factor``, which fits both the single local node and a real cluster.
        :param timeout: Seconds to wait for the broker to answer and the new topic to be ready.
        :return: ``{"topic", "created", "partitions", "config_drift"}``.
        """
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        wanted = {str(k): str(v) for k, v in (config or {}).items()}
        if retention_ms is not None:
            wanted["retention.ms"] = str(int(retention_ms))

        from confluent_kafka import KafkaError, KafkaException
        from confluent_kafka.admin import NewTopic

        admin = self.admin_client()
        created = False
        existing = self._partition_count(admin, name, timeout)
        if existing is None:
            futures = admin.create_topics(
                [NewTopic(name, num_partitions=partitions, replication_factor=replication_factor, config=wanted)],
                request_timeout=timeout,
            )
            try:
                futures[name].result(timeout=timeout)
                created = True
                self.log.info("Created topic %s (%d partitions, config %s)", name, partitions, wanted)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
                self.log.info("Topic %s was created concurrently", name)
            existing = self._wait_topic_ready(admin, name, timeout)

        if existing < partitions:
            raise TopicMismatchError(
                f"topic {name!r} exists with {existing} partition(s) but {partitions} are required; grow it "
                f"deliberately (AdminClient.create_partitions, which remaps keys) or delete and recreate it"
            )
        drift = {} if created else self._config_drift(admin, name, wanted, timeout)
        if drift:
            self.log.warning("Topic %s exists with a different config (not altered): %s", name, drift)
        return {"topic": name, "created": created, "partitions": existing, "config_drift": drift}

    @staticmethod
    def _partition_count(admin: AdminClient, name: str, timeout: float) -> int | None:
        """Partitions of ``name`` per cluster metadata, or None if it does not exist."""
        metadata = admin.list_topics(timeout=timeout)
        topic = metadata.topics.get(name)
        if topic is None or topic.error is not None:
            return None
        return len(topic.partitions)

    def _wait_topic_ready(self, admin: AdminClient, name: str, timeout: float) -> int:
        """Wait until every partition of a fresh topic has a leader; return the partition count."""
        deadline = time.monotonic() + timeout
        while True:
            topic = admin.list_topics(topic=name, timeout=timeout).topics.get(name)
            if topic is not None and topic.error is None and topic.partitions:
                if all(p.leader >= 0 for p in topic.partitions.values()):
                    return len(topic.partitions)
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {name!r} has no leader for every partition after {timeout:.0f}s")
            time.sleep(0.2)

    @staticmethod
    def _config_drift(admin: AdminClient, name: str, wanted: dict[str, str], timeout: float) -> dict[str, Any]:
        if not wanted:
            return {}
        from confluent_kafka.admin import ConfigResource, ResourceType

        resource = ConfigResource(ResourceType.TOPIC, name)
        entries = admin.describe_configs([resource], request_timeout=timeout)[resource].result(timeout=timeout)
        drift = {}
        for key, value in wanted.items():
            actual = entries[key].value if key in entries else None
            if actual != value:
                drift[key] = {"wanted": value, "actual": actual}
        return drift

    # -- read-only probe --------------------------------------------------------------------------------
    def probe(self, timeout: float = 10.0) -> dict[str, Any]:
        """List the cluster's brokers and topics (metadata only: nothing created, produced or committed)."""
        metadata = self.admin_client().list_topics(timeout=timeout)
        topics = sorted(name for name in metadata.topics if not name.startswith("__"))
        return {"bootstrap_servers": self.bootstrap_servers, "brokers": len(metadata.brokers),
                "topics": len(topics), "some_topics": topics[:10]}

    # -- self-check -------------------------------------------------------------------------------------
    def platform_check(self, timeout: float = 30.0) -> dict[str, Any]:
        """
        Prove Kafka works end to end: ensure the scratch topic, produce one uniquely identified message
        (idempotent producer, ``acks=all``), then consume the topic from the beginning in a brand-new group
        until that message is seen.

        Idempotent: the topic is only created once, each run adds one small message (kept
        ``PLATFORM_CHECK_RETENTION_MS``), and the throwaway group commits nothing, so nothing accumulates on
        the broker besides the messages the Spark lakehouse check reads back.

        :param timeout: Bound, in seconds, on each phase (topic, produce, consume).
        :return: the message id, its partition/offset, how many messages were scanned and the latencies.
        :raises LayerCheckError: with the layer, the cause and the remedy.
        """
        topic = self.PLATFORM_CHECK_TOPIC
        message_id = uuid.uuid4().hex
        started = time.monotonic()
        try:
            ensured = self.ensure_topic(topic, 1, retention_ms=self.PLATFORM_CHECK_RETENTION_MS, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - librdkafka errors come in several types
            raise LayerCheckError(self.layer, f"cannot ensure topic {topic!r}: {exc}", self.remedy) from exc
        topic_done = time.monotonic()
        produced = self._produce_one(topic, message_id, timeout)
        produce_done = time.monotonic()
        scanned = self._consume_until(topic, message_id, timeout)
        consume_done = time.monotonic()
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "topic": topic,
            "topic_created": ensured["created"],
            "message_id": message_id,
            "partition": produced["partition"],
            "offset": produced["offset"],
            "messages_scanned": scanned,
            "topic_ms": round((topic_done - started) * 1000, 1),
            "produce_ms": round((produce_done - topic_done) * 1000, 1),
            "consume_ms": round((consume_done - produce_done) * 1000, 1),
            "round_trip_ms": round((consume_done - started) * 1000, 1),
        }

    def send(self, topic: str, value: bytes, *, key: bytes | None = None, headers: dict[str, str] | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        """
        Produce one message with this hook's producer and wait for its acknowledgement.

        :param topic: an existing topic.
        :param value: the message bytes.
        :param key: the message key (partitioning), or ``None``.
        :param headers: message headers (values as text).
        :param timeout: seconds for the acknowledgement (also the message timeout).
        :return: ``{"topic", "partition", "offset"}``.
        :raises LayerCheckError: naming the topic, the cause and the remedy, when it is not acknowledged.
        """
        delivered: dict[str, Any] = {}

        def on_delivery(err: Any, msg: Any) -> None:
            if err is not None:
                delivered["error"] = err
            else:
                delivered.update(partition=msg.partition(), offset=msg.offset())

        producer = self.producer(**{"message.timeout.ms": max(1, int(timeout * 1000))})
        try:
            producer.produce(topic, key=key, value=value, on_delivery=on_delivery,
                             headers=[(k, str(v).encode()) for k, v in (headers or {}).items()] or None)
            remaining = producer.flush(timeout)
        except Exception as exc:  # noqa: BLE001
            raise LayerCheckError(self.layer, f"produce to {topic!r} failed: {exc}", self.remedy) from exc
        if "error" in delivered or remaining or "offset" not in delivered:
            cause = delivered.get("error") or f"not acknowledged within {timeout:.0f}s"
            raise LayerCheckError(self.layer, f"produce to {topic!r} failed: {cause}", self.remedy)
        return {"topic": topic, **delivered}

    def _produce_one(self, topic: str, message_id: str, timeout: float) -> dict[str, Any]:
        payload = json.dumps({"id": message_id, "check": "platform_check", "ts": time.time()}).encode()
        return self.send(topic, payload, key=b"platform-check", timeout=timeout)

    def _consume_until(self, topic: str, message_id: str, timeout: float) -> int:
        """Read ``topic`` from the beginning in a fresh group until ``message_id``; return messages scanned."""
        started = time.monotonic()
        consumer = self.consumer(
            f"decisionflow.platform-check.{uuid.uuid4().hex[:12]}",
            **{"auto.offset.reset": "earliest", "enable.auto.commit": False, "session.timeout.ms": 10000},
        )
        scanned = 0
        try:
            consumer.subscribe([topic])
            deadline = started + timeout
            while time.monotonic() < deadline:
                for msg in consumer.consume(num_messages=500, timeout=0.5):
                    if msg.error() is not None:
                        self.log.warning("Consumer error on %s: %s", topic, msg.error())
                        continue
                    scanned += 1
                    try:
                        body = json.loads(msg.value() or b"{}")
                    except ValueError:
                        continue  # not ours: anything may be written to a scratch topic
                    if isinstance(body, dict) and body.get("id") == message_id:
                        return scanned
        except Exception as exc:  # noqa: BLE001
            raise LayerCheckError(self.layer, f"consume from {topic!r} failed: {exc}", self.remedy) from exc
        finally:
            consumer.close()
        raise LayerCheckError(
            self.layer,
            f"message {message_id} was acknowledged but not read back from {topic!r} within {timeout:.0f}s "
            f"({scanned} message(s) scanned)",
            self.remedy,
        )
