"""Kafka operators: declare topics from the event contracts, skip an ingestion with no backlog, record progress."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from decisionflow.operators.base import DecisionflowOperatorMixin

if TYPE_CHECKING:
    from airflow.sdk import Asset, Context


class KafkaEnsureTopicsOperator(DecisionflowOperatorMixin, BaseOperator):
    """
    Create the platform's topics (and their dead-letter topics) if missing; idempotent.

    Partitions, retention and topic config come from :data:`decisionflow.contracts.TOPICS`. An existing
    topic with fewer partitions than declared fails the task (repartitioning changes key -> partition
    placement and must be a deliberate act); config drift is logged, not overwritten.

    :param topics: names to ensure; ``None`` means every declared topic.
    :param kafka_config_id: Airflow connection (type ``kafka``).
    """

    layer = "kafka"

    template_fields: Sequence[str] = ("topics",)

    def __init__(self, *, topics: list[str] | None = None, kafka_config_id: str = "kafka_default", **kwargs) -> None:
        super().__init__(**kwargs)
        self.topics = topics
        self.kafka_config_id = kafka_config_id

    def execute(self, context: Context) -> list[dict[str, Any]]:
        from decisionflow.contracts import TOPICS
        from decisionflow.hooks.kafka import KafkaHook

        names = self.topics or list(TOPICS)
        unknown = sorted(set(names) - set(TOPICS))
        if unknown:
            from decisionflow.exceptions import ParamsError

            raise ParamsError(f"topics {unknown} are not declared in decisionflow.contracts.TOPICS ({sorted(TOPICS)})")
        hook = KafkaHook(kafka_config_id=self.kafka_config_id)
        results = []
        for name in names:
            spec = TOPICS[name]
            result = hook.ensure_topic(name, spec.partitions, retention_ms=spec.retention_ms, config=spec.config)
            if result.get("config_drift"):
                self.log.warning("topic %s: config differs from the declaration: %s", name, result["config_drift"])
            self.log.info("topic %s: %s", name, "created" if result.get("created") else "exists")
            results.append(result)
        return results


class KafkaBacklogCheckOperator(DecisionflowOperatorMixin, BaseOperator):
    """
    Let an ingestion run go on only when the source topics hold messages that bronze does not; else *skip*
    (and with it the Spark job and ``record_progress`` downstream: the run ends a success, doing nothing).

    The backlog is what :class:`~decisionflow.triggers.kafka.KafkaBacklogTrigger` watches: each partition's
    end offset minus the progress marker, which only moves after the data is durably in Delta. A backlog of
    zero therefore means bronze already holds every message; a marker left behind by a crash shows up as a
    backlog and the run proceeds. Runs whose type is in ``always_run_types`` (by default manual runs: someone
    asked for this one) never skip. Broker errors (say a coordinator still loading on a fresh broker) are
    retried for ``broker_wait_s`` before the task fails.

    :param topics: source topics to compare with the markers.
    :param progress_group: marker consumer group (default: the one ``RecordBronzeProgressOperator`` commits).
    :param always_run_types: ``DagRunType`` values (``"manual"``, ``"scheduled"``, ``"asset_triggered"``,
        ...) of runs that go on even without a backlog.
    :param kafka_config_id: Airflow connection (type ``kafka``).
    :param broker_wait_s: how long broker errors are retried (every 2 s) before the task fails.
    """

    layer = "kafka"

    template_fields: Sequence[str] = ("topics", "progress_group")

    def __init__(
        self,
        *,
        topics: list[str],
        progress_group: str | None = None,
        always_run_types: Sequence[str] = ("manual",),
        kafka_config_id: str = "kafka_default",
        broker_wait_s: float = 30.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not topics:
            raise ValueError("topics: give at least one source topic to check for a backlog")
        self.topics = list(topics)
        self.progress_group = progress_group
        self.always_run_types = tuple(always_run_types)
        self.kafka_config_id = kafka_config_id
        self.broker_wait_s = broker_wait_s

    def _backlog(self) -> dict[str, dict[str, int]]:
        import time

        from confluent_kafka import KafkaException

        from decisionflow.hooks.kafka import KafkaHook
        from decisionflow.triggers.kafka import BRONZE_PROGRESS_GROUP, topic_backlog

        config = KafkaHook(kafka_config_id=self.kafka_config_id).config
        deadline = time.monotonic() + self.broker_wait_s
        while True:
            try:
                return topic_backlog(config, self.topics, self.progress_group or BRONZE_PROGRESS_GROUP)
            except KafkaException as exc:
                if time.monotonic() > deadline:
                    raise
                self.log.warning("Kafka backlog check on %s failed, retrying: %s", self.topics, exc)
                time.sleep(2)

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowSkipException

        partitions = self._backlog()
        backlog = sum(p["backlog"] for p in partitions.values())
        self.log.info("backlog of %d message(s) on %s: %s", backlog, self.topics, partitions)
        run_type = getattr(context.get("dag_run"), "run_type", None)
        run_type = str(getattr(run_type, "value", run_type) or "")  # DagRunType is a str enum
        if backlog == 0 and run_type not in self.always_run_types:
            raise AirflowSkipException(f"no backlog on {self.topics}: bronze holds every message, nothing to ingest")
        return {"backlog": backlog, "partitions": partitions}


class RecordBronzeProgressOperator(DecisionflowOperatorMixin, BaseOperator):
    """
    Commit, per source partition, "bronze holds everything before this offset" to a marker consumer group,
    and announce the bronze assets only when bronze grew since their last announcement.

    Runs after the ingestion job: the marker only ever moves after the data is durably in Delta, and it
    is what :class:`~decisionflow.triggers.kafka.KafkaBacklogTrigger` compares end offsets with. Reading
    the maximum offsets from the Delta tables (not from the job's output) keeps it correct after a crash.

    With ``assets``, the task emits those assets with the markers in the event's ``extra`` when any table's
    markers differ from the ones in that table's last event, and is *skipped* otherwise: a fallback or watcher
    run that found nothing new does not start ``build_lakehouse`` for nothing. The comparison is against the
    last emitted event (not the committed markers), so a run that dies after committing still announces on
    its retry.

    :param tables: bronze table name (under the lake root) -> source topic.
    :param assets: bronze table name -> the Asset announcing it (become the task's inlets and outlets).
    :param progress_group: marker consumer group.
    :param kafka_config_id: Airflow connection (type ``kafka``).
    :param lake_conn_id: Airflow connection (type ``delta_lake``) with the lake root.
    """

    layer = "kafka"

    template_fields: Sequence[str] = ("tables", "progress_group")

    def __init__(
        self,
        *,
        tables: dict[str, str],
        assets: Mapping[str, Asset] | None = None,
        progress_group: str | None = None,
        kafka_config_id: str = "kafka_default",
        lake_conn_id: str = "lake_default",
        **kwargs,
    ) -> None:
        self.assets = dict(assets or {})
        unknown = sorted(set(self.assets) - set(tables))
        if unknown:
            raise ValueError(f"assets given for tables {unknown} that are not in tables ({sorted(tables)})")
        if self.assets:
            kwargs["inlets"] = [*kwargs.get("inlets", []), *self.assets.values()]
            kwargs["outlets"] = [*kwargs.get("outlets", []), *self.assets.values()]
        super().__init__(**kwargs)
        self.tables = tables
        self.progress_group = progress_group
        self.kafka_config_id = kafka_config_id
        self.lake_conn_id = lake_conn_id

    def execute(self, context: Context) -> dict[str, int]:
        from airflow.sdk.exceptions import AirflowSkipException

        from decisionflow.hooks.kafka import KafkaHook
        from decisionflow.hooks.lake import LakeHook
        from decisionflow.lakehouse.progress import max_offsets
        from decisionflow.operators._asset_events import latest_extra
        from decisionflow.triggers.kafka import BRONZE_PROGRESS_GROUP

        lake = LakeHook(lake_conn_id=self.lake_conn_id)
        markers: dict[tuple[str, int], int] = {}
        per_table: dict[str, dict[str, int]] = {}
        for table, topic in self.tables.items():
            per_table[table] = {}
            for (found_topic, partition), offset in max_offsets(lake.table_uri(table), lake.storage_options).items():
                if found_topic != topic:
                    raise ValueError(f"bronze table {table!r} holds rows of topic {found_topic!r}, expected {topic!r}")
                markers[(topic, partition)] = offset + 1
                per_table[table][str(partition)] = offset + 1
        KafkaHook(kafka_config_id=self.kafka_config_id).commit_offsets(
            self.progress_group or BRONZE_PROGRESS_GROUP, markers
        )
        summary = {f"{t}/{p}": o for (t, p), o in sorted(markers.items())}
        self.log.info("progress markers committed: %s", summary)
        if self.assets:
            grown = [table for table, asset in self.assets.items()
                     if per_table[table] != latest_extra(context, asset, "markers")]
            if not grown:
                raise AirflowSkipException("bronze has not grown since its last announcement: assets not emitted")
            self.log.info("bronze grew in %s: announcing %s", grown, sorted(a.name for a in self.assets.values()))
            for table, asset in self.assets.items():
                context["outlet_events"][asset].extra = {"markers": per_table[table]}
        return summary
