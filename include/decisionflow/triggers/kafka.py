"""A Kafka watcher for event-driven DAGs that never consumes and never commits.

Airflow's Kafka ``MessageQueueTrigger`` / ``AwaitMessageTrigger`` read messages and commit their offsets before
the DAG that should process them has run, so a failed run loses them. Here the trigger only *signals*: it
compares each partition's end offset with a progress marker -- the offsets the ingestion job has durably
written to Delta, committed by that job to a dedicated consumer group *after* the write -- and fires while
there is a backlog. The data itself is read by Spark from its own checkpoint.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

#: Consumer group that holds "ingested up to here" markers. Nothing ever consumes with it.
BRONZE_PROGRESS_GROUP = "decisionflow.bronze-progress"


def topic_backlog(config: dict[str, Any], topics: list[str], progress_group: str, timeout: float = 10.0) -> dict:
    """Per partition: end offset, the progress marker and the backlog (end - marker). Blocking; no commits.

    A partition without a marker counts from its low watermark (what retention still holds).
    """
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({**config, "group.id": progress_group, "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(timeout=timeout)
        partitions = []
        for topic in topics:
            info = metadata.topics.get(topic)
            if info is None or info.error is not None:
                raise LookupError(f"Kafka topic {topic!r} does not exist (create it: ingest_transactions' ensure_topics task)")
            partitions += [TopicPartition(topic, p) for p in sorted(info.partitions)]
        committed = {(tp.topic, tp.partition): tp.offset for tp in consumer.committed(partitions, timeout=timeout)}
        result = {}
        for tp in partitions:
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout, cached=False)
            marker = committed[(tp.topic, tp.partition)]
            start = marker if marker >= 0 else low
            result[f"{tp.topic}/{tp.partition}"] = {"end": high, "marker": marker, "backlog": max(0, high - start)}
        return result
    finally:
        consumer.close()


class KafkaBacklogTrigger(BaseEventTrigger):
    """
    Fire an event whenever the given topics hold messages beyond the ingestion progress marker.

    After firing it keeps watching, and fires again only when the end offsets move past what it last
    signalled (new data), or when a backlog is still there ``resignal_after`` seconds later (the run that
    should have drained it failed). It never consumes and never commits.

    :param topics: topics to watch.
    :param kafka_config_id: Airflow connection (type ``kafka``) whose extra is the confluent-kafka config.
    :param progress_group: consumer group holding the ingested-up-to markers.
    :param poll_interval: seconds between two looks at the offsets.
    :param min_backlog: messages of backlog needed before firing.
    :param resignal_after: seconds after which an undrained backlog is signalled again.
    """

    def __init__(
        self,
        *,
        topics: list[str],
        kafka_config_id: str = "kafka_default",
        progress_group: str = BRONZE_PROGRESS_GROUP,
        poll_interval: float = 10.0,
        min_backlog: int = 1,
        resignal_after: float = 900.0,
    ) -> None:
        super().__init__()
        self.topics = list(topics)
        self.kafka_config_id = kafka_config_id
        self.progress_group = progress_group
        self.poll_interval = poll_interval
        self.min_backlog = min_backlog
        self.resignal_after = resignal_after

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "topics": self.topics,
                "kafka_config_id": self.kafka_config_id,
                "progress_group": self.progress_group,
                "poll_interval": self.poll_interval,
                "min_backlog": self.min_backlog,
                "resignal_after": self.resignal_after,
            },
        )

    def _kafka_config(self) -> dict[str, Any]:
        from decisionflow.hooks.kafka import KafkaHook

        return KafkaHook(kafka_config_id=self.kafka_config_id).config

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from asgiref.sync import sync_to_async

        config = await sync_to_async(self._kafka_config)()
        signalled: dict[str, int] = {}
        signalled_at = float("-inf")
        while True:
            try:
                partitions = await sync_to_async(topic_backlog)(config, self.topics, self.progress_group)
            except Exception as exc:  # noqa: BLE001 - a broker blip must not kill the watcher
                self.log.warning("Kafka backlog check on %s failed (will retry): %s", self.topics, exc)
                await asyncio.sleep(self.poll_interval)
                continue
            backlog = sum(p["backlog"] for p in partitions.values())
            moved = any(p["end"] > signalled.get(key, -1) for key, p in partitions.items() if p["backlog"])
            stale = time.monotonic() - signalled_at > self.resignal_after
            if backlog >= self.min_backlog and (moved or stale):
                self.log.info("backlog of %d message(s) on %s: signalling", backlog, self.topics)
                yield TriggerEvent({"topics": self.topics, "backlog": backlog, "partitions": partitions})
                signalled = {key: p["end"] for key, p in partitions.items()}
                signalled_at = time.monotonic()
            await asyncio.sleep(self.poll_interval)
