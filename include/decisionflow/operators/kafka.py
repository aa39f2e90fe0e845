"""Kafka operators: declare topics from the event contracts, record ingestion progress markers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

if TYPE_CHECKING:
    from airflow.sdk import Asset, Context


class KafkaEnsureTopicsOperator(BaseOperator):
    """
    Create the platform's topics (and their dead-letter topics) if missing; idempotent.

    Partitions, retention and topic config come from :data:`decisionflow.contracts.TOPICS`. An existing
    topic with fewer partitions than declared fails the task (repartitioning changes key -> partition
    placement and must be a deliberate act); config drift is logged, not overwritten.

    :param topics: names to ensure; ``None`` means every declared topic.
    :param kafka_config_id: Airflow connection (type ``kafka``).
    """

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
            raise ValueError(f"topics {unknown} are not declared in decisionflow.contracts.TOPICS ({sorted(TOPICS)})")
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


class RecordBronzeProgressOperator(BaseOperator):
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
