"""Bronze: every Kafka record of the source topics, as received, in Delta - exactly once.

One Spark Structured Streaming query per source topic reads Kafka and appends to a Delta table, with
``trigger(availableNow=True)``: a bounded run that processes what the topic held when it started (in
micro-batches of at most ``maxOffsetsPerTrigger`` records) and then stops, so Airflow can schedule it like
a batch job. Tables and checkpoints (paths under the lake root)::

    transactions        -> bronze/transactions   checkpoint _checkpoints/bronze/transactions
    transaction-labels  -> bronze/labels         checkpoint _checkpoints/bronze/labels
    case-notes          -> bronze/case_notes     checkpoint _checkpoints/bronze/case_notes

Nothing is parsed or filtered here: malformed JSON, tombstones (``value`` NULL) and oversized values land in
bronze as they are; silver decides what they mean. The schema is fixed (:data:`BRONZE_COLUMNS`).

Exactly once, across crashes:

* Spark writes the offset range of micro-batch N to ``<checkpoint>/offsets/N`` *before* running it and
  ``<checkpoint>/commits/N`` after the sink finished, and a restarted query re-runs an uncommitted batch
  with the very same offsets.
* The Delta sink commits each batch together with a ``SetTransaction(queryId, N)`` action, in one atomic
  log commit, and skips a batch whose N the table already recorded. So a crash before the Delta commit
  loses nothing (the batch is re-read), a crash after it duplicates nothing (the re-run is skipped).
* Kafka consumer-group offsets are never committed: Spark tracks positions only in the checkpoint (its
  Kafka source refuses ``enable.auto.commit`` and never calls ``commitSync``); the consumers use throwaway
  group ids prefixed :data:`GROUP_ID_PREFIX`.
* The table is the last line of defence: when a checkpoint is lost, the new query starts right after the
  highest offset per partition already in the table (:func:`starting_offsets`), not at ``earliest``, so a
  lost checkpoint cannot duplicate rows. A checkpoint whose table was deleted is refused (it would skip
  everything it already processed).

Nothing in this module imports pyspark at import time; the Spark application is
``decisionflow/jobs/ingest_bronze.py``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from decisionflow.contracts import CASE_NOTES, LABELS, SOURCE_TOPICS, TRANSACTIONS
from decisionflow.exceptions import NonRetryableError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.streaming import StreamingQuery

__all__ = [
    "BRONZE_COLUMNS",
    "BRONZE_DDL",
    "BRONZE_TABLES",
    "BronzeError",
    "AUTO",
    "BronzeSource",
    "CheckpointWithoutTableError",
    "DEFAULT_MAX_OFFSETS_PER_TRIGGER",
    "GROUP_ID_PREFIX",
    "IngestOptions",
    "PARTITION_COLUMNS",
    "TopicMissingError",
    "auto_min_partitions",
    "bronze_frame",
    "bronze_offsets",
    "bronze_source",
    "build_summary",
    "checkpoint_path",
    "default_sources",
    "delta_version",
    "ensure_bronze_table",
    "ingest",
    "kafka_source_options",
    "kafka_topic_partitions",
    "rows_added",
    "starting_offsets",
    "table_path",
    "task_slots",
]

#: The bronze schema, column by column (fixed: silver reads it). ``value`` is the raw message bytes, NULL
#: for a tombstone; ``value_size`` its length in bytes (NULL for a tombstone); ``key`` the UTF-8 key;
#: ``ingested_at`` the start time of the micro-batch that wrote the row, ``ingest_date`` its UTC date.
BRONZE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("topic", "STRING"),
    ("partition", "INT"),
    ("offset", "BIGINT"),
    ("kafka_timestamp", "TIMESTAMP"),
    ("key", "STRING"),
    ("value", "BINARY"),
    ("value_size", "INT"),
    ("ingested_at", "TIMESTAMP"),
    ("ingest_date", "DATE"),
)
#: The same as a Spark DDL string (``spark.createDataFrame([], BRONZE_DDL)``, ``CREATE TABLE ... (BRONZE_DDL)``).
BRONZE_DDL = ", ".join(f"`{name}` {sql_type}" for name, sql_type in BRONZE_COLUMNS)

#: Partitioned by ``ingest_date``. Every micro-batch has a single ``ingested_at`` and hence a single date, so
#: the partitioning costs no extra files per batch, while it makes retention (``DELETE ... WHERE ingest_date <
#: x`` drops whole files, no rewrite), ``OPTIMIZE ... WHERE ingest_date = d`` compaction of the many small
#: streaming files of a day and "what arrived yesterday" reads cheap. Partitioning by Kafka partition or by
#: topic would not help (one topic per table, and offsets are served by file statistics).
PARTITION_COLUMNS: tuple[str, ...] = ("ingest_date",)

#: Source topic -> bronze table name (the table lives at ``<lake root>/bronze/<name>``).
BRONZE_TABLES: dict[str, str] = {TRANSACTIONS: "transactions", LABELS: "labels", CASE_NOTES: "case_notes"}

#: Records per micro-batch and query (across the topic's partitions). Bounds the work per batch and how much
#: is re-read after a crash. Memory does not grow with it: tasks stream records from the Kafka fetch buffer
#: into one Parquet file each (at most a row group, 128 MiB, buffered). Large, because every batch has a
#: fixed cost of 1-3 CPU seconds locally (planning, code generation, Delta transaction and commit, offset
#: and commit logs): measured on 2 cores, 300k records in 3 batches took about twice the CPU of 1 batch.
DEFAULT_MAX_OFFSETS_PER_TRIGGER = 500_000
#: ``IngestOptions.min_partitions`` value that sizes each batch's tasks to the cores (:func:`auto_min_partitions`).
AUTO = "auto"
#: Per-partition fetch size: above the broker's ``message.max.bytes`` (1 MiB + 12 bytes of batch overhead),
#: so a batch holding one of the 200-900 KiB messages is fetched whole in one round trip.
MAX_PARTITION_FETCH_BYTES = 2 * 1024 * 1024
#: Whole-fetch size (the Kafka client's default, 50 MiB, stated explicitly).
FETCH_MAX_BYTES = 50 * 1024 * 1024
#: Socket receive buffer of the consumers (the Kafka client's default, which Spark also sets, is 64 KiB): 1 MiB
#: lets the 2 MiB fetches of large records arrive with fewer window-limited round trips.
RECEIVE_BUFFER_BYTES = 1024 * 1024
#: Prefix of the (throwaway, never committed) consumer group ids Spark's Kafka source uses.
GROUP_ID_PREFIX = "decisionflow-bronze"
#: Delta table properties of a new bronze table: statistics only on the columns that are filtered on
#: (``value`` is binary and never has statistics anyway; ``key`` ones are useless).
TABLE_PROPERTIES: dict[str, str] = {
    "delta.dataSkippingStatsColumns": "topic,partition,offset,kafka_timestamp,ingested_at",
}
#: Operation name of a Delta streaming-sink commit in ``DESCRIBE HISTORY``.
STREAMING_OPERATION = "STREAMING UPDATE"

_TABLE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_EARLIEST = -2  # Spark's startingOffsets JSON: -2 = earliest, -1 = latest


class BronzeError(RuntimeError):
    """Bronze ingestion cannot run as asked; the message names the cause and the remedy."""


class TopicMissingError(NonRetryableError, BronzeError):
    """A source topic does not exist on the broker (auto-create is off on purpose)."""

    def __init__(self, topics: Iterable[str], bootstrap_servers: str):
        self.topics = sorted(topics)
        self.bootstrap_servers = bootstrap_servers
        names = ", ".join(repr(t) for t in self.topics)
        super().__init__(
            f"Kafka topic(s) {names} do not exist on {bootstrap_servers}: create them with the platform "
            f"defaults (`decisionflow produce --create-topics`, or decisionflow.risk.producer.ensure_topics / "
            f"KafkaHook.ensure_topic with contracts.TOPICS), then rerun; topics are never auto-created"
        )


class CheckpointWithoutTableError(NonRetryableError, BronzeError):
    """A checkpoint says batches were written, but the Delta table it wrote them to is gone."""

    def __init__(self, table: str, checkpoint: str):
        self.table, self.checkpoint = table, checkpoint
        super().__init__(
            f"checkpoint {checkpoint} has progress but the Delta table {table} does not exist: resuming would "
            f"skip every record the checkpoint already covers. Restore the table, or delete the checkpoint "
            f"too to rebuild the table from the earliest offsets Kafka still retains"
        )


# -- locations ------------------------------------------------------------------------------------------------
def _join(root: str, *parts: str) -> str:
    return "/".join([str(root).rstrip("/"), *parts])


def table_path(lake_root: str, table: str) -> str:
    """``<lake root>/bronze/<table>`` (``table`` is the bronze table name, e.g. ``case_notes``)."""
    return _join(lake_root, "bronze", table)


def checkpoint_path(lake_root: str, table: str) -> str:
    """``<lake root>/_checkpoints/bronze/<table>``: the streaming checkpoint of one bronze table."""
    return _join(lake_root, "_checkpoints", "bronze", table)


@dataclass(frozen=True)
class BronzeSource:
    """One Kafka topic and the bronze table it lands in."""

    topic: str
    table: str

    def path(self, lake_root: str) -> str:
        return table_path(lake_root, self.table)

    def checkpoint(self, lake_root: str) -> str:
        return checkpoint_path(lake_root, self.table)


def bronze_source(spec: str) -> BronzeSource:
    """
    A source from ``TOPIC`` (one of the contracted topics, which have a fixed table) or ``TOPIC=TABLE``.

    :raises ValueError: for an unknown topic without ``=TABLE``, or a table name that is not
        ``[a-z][a-z0-9_]*``, or a contracted topic mapped to another table than its own.
    """
    topic, sep, table = spec.strip().partition("=")
    topic, table = topic.strip(), table.strip()
    if not topic:
        raise ValueError(f"empty topic in {spec!r}")
    if not sep:
        if topic not in BRONZE_TABLES:
            raise ValueError(f"topic {topic!r} has no bronze table: pass {topic}=TABLE, or one of "
                             f"{list(BRONZE_TABLES)}")
        table = BRONZE_TABLES[topic]
    if not _TABLE_NAME.match(table):
        raise ValueError(f"bronze table name {table!r} must match {_TABLE_NAME.pattern}")
    if topic in BRONZE_TABLES and table != BRONZE_TABLES[topic]:
        raise ValueError(f"topic {topic!r} lands in bronze/{BRONZE_TABLES[topic]}, not bronze/{table}")
    return BronzeSource(topic, table)


def default_sources() -> list[BronzeSource]:
    """The three contracted source topics, in the order the loop depends on them."""
    return [BronzeSource(topic, BRONZE_TABLES[topic]) for topic in SOURCE_TOPICS]


# -- options --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IngestOptions:
    """
    How to read Kafka.

    :param bootstrap_servers: Kafka ``HOST:PORT[,...]``.
    :param max_offsets_per_trigger: records per micro-batch and query (``maxOffsetsPerTrigger``).
    :param fail_on_data_loss: fail when offsets the checkpoint expects were deleted by retention (or the topic
        was recreated). ``True`` by default: bronze is the record of everything, a gap must be noticed.
    :param min_partitions: Spark tasks per batch (``minPartitions``): a number; ``None`` = one per Kafka
        partition; ``"auto"`` (default) = :func:`auto_min_partitions` of the topic's partitions and the cores.
    :param kafka_options: further source options, ``kafka.``-prefixed consumer settings included; they
        override the defaults of :func:`kafka_source_options`.
    :param admin_timeout_s: how long the topic check waits for the broker.
    """

    bootstrap_servers: str
    max_offsets_per_trigger: int = DEFAULT_MAX_OFFSETS_PER_TRIGGER
    fail_on_data_loss: bool = True
    min_partitions: int | str | None = AUTO
    kafka_options: Mapping[str, str] = field(default_factory=dict)
    admin_timeout_s: float = 30.0

    def __post_init__(self):
        if not self.bootstrap_servers:
            raise ValueError("bootstrap_servers is required")
        if self.max_offsets_per_trigger < 1:
            raise ValueError(f"max_offsets_per_trigger must be >= 1, got {self.max_offsets_per_trigger}")
        if isinstance(self.min_partitions, str) and self.min_partitions != AUTO:
            raise ValueError(f"min_partitions must be a number, None or {AUTO!r}, got {self.min_partitions!r}")
        if isinstance(self.min_partitions, int) and self.min_partitions < 1:
            raise ValueError(f"min_partitions must be >= 1, got {self.min_partitions}")
        forbidden = {"kafka.enable.auto.commit", "kafka.group.id", "subscribe", "subscribepattern", "assign"}
        bad = sorted(k for k in self.kafka_options if k.lower() in forbidden)
        if bad:
            raise ValueError(f"kafka option(s) {bad} are set by bronze itself (no commits, one topic per query)")


def kafka_source_options(topic: str, options: IngestOptions, starting: str = "earliest") -> dict[str, str]:
    """The Kafka source options of one bronze query (all strings, as ``DataStreamReader.options`` wants)."""
    out = {
        "kafka.bootstrap.servers": options.bootstrap_servers,
        "subscribe": topic,
        "startingOffsets": starting,
        "failOnDataLoss": str(options.fail_on_data_loss).lower(),
        "maxOffsetsPerTrigger": str(options.max_offsets_per_trigger),
        "groupIdPrefix": GROUP_ID_PREFIX,
        "includeHeaders": "false",
        "kafka.max.partition.fetch.bytes": str(MAX_PARTITION_FETCH_BYTES),
        "kafka.fetch.max.bytes": str(FETCH_MAX_BYTES),
        "kafka.receive.buffer.bytes": str(RECEIVE_BUFFER_BYTES),
        "kafka.client.id": f"{GROUP_ID_PREFIX}-{topic}",
    }
    if isinstance(options.min_partitions, int):
        out["minPartitions"] = str(options.min_partitions)
    out.update({str(k): str(v) for k, v in options.kafka_options.items()})
    return out


def auto_min_partitions(kafka_partitions: int, task_slots: int | None) -> int | None:
    """
    Tasks per micro-batch: the smallest multiple of the cores (task slots) that is >= the topic's partitions.

    Spark's Kafka source makes one task per partition; with 3 partitions on 2 cores the third task runs alone
    (2 waves for 1.5 waves of work). Asking for 4 splits the offset ranges so every wave is full - measured
    1.3-1.8x quicker on 2 cores. ``None`` (one task per partition) when that is already a multiple, or the
    cores are unknown.
    """
    if not task_slots or task_slots < 1 or kafka_partitions < 1:
        return None
    wanted = -(-kafka_partitions // task_slots) * task_slots
    return wanted if wanted > kafka_partitions else None


def starting_offsets(topic: str, partitions: Iterable[int], table_offsets: Mapping[tuple[str, int], int]) -> str:
    """
    ``startingOffsets`` for a query without a checkpoint: right after what the table already holds.

    ``"earliest"`` when the table holds nothing of ``topic``; otherwise Spark's JSON form, which must name every
    partition of the topic: ``max offset + 1`` where the table has rows, ``-2`` (earliest) elsewhere.
    (Spark only uses it when the checkpoint has no offsets yet; a resumed query continues from its checkpoint.)
    """
    known = {p: o for (t, p), o in table_offsets.items() if t == topic}
    if not known:
        return "earliest"
    every = sorted(set(partitions) | set(known))
    return json.dumps({topic: {str(p): (known[p] + 1 if p in known else _EARLIEST) for p in every}},
                      separators=(",", ":"))


# -- summaries (pure) -----------------------------------------------------------------------------------------
def rows_added(history: Iterable[Mapping[str, Any]], since_version: int) -> tuple[int, int]:
    """
    (rows, batches) the streaming sink committed after ``since_version``, from ``DESCRIBE HISTORY`` rows
    (dicts with ``version``, ``operation`` and ``operationMetrics``).
    """
    rows = batches = 0
    for entry in history:
        if int(entry["version"]) <= since_version or entry.get("operation") != STREAMING_OPERATION:
            continue
        metrics = entry.get("operationMetrics") or {}
        rows += int(metrics.get("numOutputRows", 0) or 0)
        batches += 1
    return rows, batches


def offsets_by_partition(offsets: Mapping[tuple[str, int], int], topic: str) -> dict[str, int]:
    """``{(topic, partition): offset}`` -> ``{"<partition>": offset}`` for one topic (JSON-friendly, sorted)."""
    return {str(p): int(o) for (t, p), o in sorted(offsets.items()) if t == topic}


def build_summary(tables: Mapping[str, Mapping[str, Any]], *, lake_root: str, bootstrap_servers: str,
                  options: IngestOptions, errors: Mapping[str, str], timings: Mapping[str, float]) -> dict[str, Any]:
    """The job's one-line JSON summary: per table rows added, max offsets, Delta version; totals; errors."""
    return {
        "job": "ingest_bronze",
        "ok": not errors,
        "lake_root": lake_root,
        "bootstrap_servers": bootstrap_servers,
        "max_offsets_per_trigger": options.max_offsets_per_trigger,
        "min_partitions": options.min_partitions,
        "fail_on_data_loss": options.fail_on_data_loss,
        "rows_added": sum(int(t.get("rows_added") or 0) for t in tables.values()),
        "tables": {name: dict(t) for name, t in tables.items()},
        "errors": dict(errors),
        **{k: round(v, 3) for k, v in timings.items()},
    }


def root_cause(exc: BaseException) -> str:
    """One line for a failure: the root cause of a JVM exception, else the first line of the message."""
    if isinstance(exc, BronzeError):
        return str(exc)
    java = getattr(exc, "java_exception", None) or getattr(exc, "_origin", None)
    if java is not None:
        try:
            while java.getCause() is not None:
                java = java.getCause()
            return str(java.toString())
        except Exception:  # noqa: BLE001 - the gateway may be gone; fall back to the Python text
            pass
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# -- Spark ----------------------------------------------------------------------------------------------------
def bronze_frame(kafka: DataFrame) -> DataFrame:
    """The bronze columns from a Kafka source frame (streaming or batch); nothing is parsed or dropped."""
    from pyspark.sql import functions as F

    return (kafka.select(
        F.col("topic").cast("string").alias("topic"),
        F.col("partition").cast("int").alias("partition"),
        F.col("offset").cast("bigint").alias("offset"),
        F.col("timestamp").cast("timestamp").alias("kafka_timestamp"),
        F.col("key").cast("string").alias("key"),
        F.col("value").alias("value"),
        F.octet_length("value").cast("int").alias("value_size"),
        F.current_timestamp().alias("ingested_at"),  # in a micro-batch: the batch's start, the same for all rows
    ).withColumn("ingest_date", F.to_date("ingested_at")))


def _jvm(spark: SparkSession) -> Any:
    """The py4j gateway to the driver JVM (classic Spark, as spark-submit runs it; not Spark Connect)."""
    jvm = spark.sparkContext._jvm
    if jvm is None:
        raise BronzeError("no JVM gateway: bronze ingestion needs a classic SparkSession, not Spark Connect")
    return jvm


def _hadoop_path_exists(spark: SparkSession, path: str) -> bool:
    jvm = _jvm(spark)
    hpath = jvm.org.apache.hadoop.fs.Path(path)
    fs = hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    return bool(fs.exists(hpath))


def _checkpoint_has_progress(spark: SparkSession, checkpoint: str) -> bool:
    """True when the checkpoint planned at least one batch: a numbered file in ``offsets/`` (not ``offsets/0``
    itself: Spark purges all but the last ``spark.sql.streaming.minBatchesToRetain`` batches)."""
    folder = _join(checkpoint, "offsets")
    if not _hadoop_path_exists(spark, folder):
        return False
    jvm = _jvm(spark)
    hpath = jvm.org.apache.hadoop.fs.Path(folder)
    fs = hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    return any(status.getPath().getName().isdigit() for status in fs.listStatus(hpath))


def is_delta_table(spark: SparkSession, path: str) -> bool:
    return _hadoop_path_exists(spark, _join(path, "_delta_log"))


def delta_version(spark: SparkSession, path: str) -> int | None:
    """Latest version of the Delta table at ``path``; ``None`` when there is no table."""
    if not is_delta_table(spark, path):
        return None
    row = spark.sql(f"DESCRIBE HISTORY delta.`{path}` LIMIT 1").select("version").first()
    return int(row["version"]) if row is not None else None


def _check_schema(spark: SparkSession, path: str) -> None:
    fields = spark.read.format("delta").load(path).schema.fields
    got = [(f.name, f.dataType.simpleString()) for f in fields]
    wanted = [(name, sql_type.lower()) for name, sql_type in BRONZE_COLUMNS]  # simpleString() spelling
    if got != wanted:
        raise BronzeError(f"Delta table {path} does not have the bronze schema: has {got}, expected {wanted}; "
                          f"move it away (bronze tables are written only by ingest_bronze)")


def ensure_bronze_table(spark: SparkSession, path: str) -> tuple[int, bool]:
    """Create the bronze table at ``path`` when missing (schema, partitioning, properties).

    An existing table must have exactly the bronze schema (:class:`BronzeError` otherwise).

    :return: (its latest version, whether it was created now).
    """
    if not is_delta_table(spark, path):
        props = ", ".join(f"'{k}' = '{v}'" for k, v in TABLE_PROPERTIES.items())
        spark.sql(f"CREATE TABLE IF NOT EXISTS delta.`{path}` ({BRONZE_DDL}) USING delta "
                  f"PARTITIONED BY ({', '.join(PARTITION_COLUMNS)}) TBLPROPERTIES ({props})")
        version = delta_version(spark, path)
        if version == 0:  # we created it (a concurrent creator would have left version 0 too: same DDL)
            return 0, True
    _check_schema(spark, path)
    version = delta_version(spark, path)
    assert version is not None
    return version, False


def bronze_offsets(spark: SparkSession, table_path: str) -> dict[tuple[str, int], int]:
    """
    ``{(topic, partition): max offset}`` of the bronze table at ``table_path``; ``{}`` when it does not exist
    or is empty. (Max offset + 1 is where ingestion continues; a DAG or test compares it with the topic's end.)
    """
    from pyspark.sql import functions as F

    if not is_delta_table(spark, table_path):
        return {}
    rows = (spark.read.format("delta").load(table_path)
            .groupBy("topic", "partition").agg(F.max("offset").alias("max_offset")).collect())
    return {(r["topic"], int(r["partition"])): int(r["max_offset"]) for r in rows}


def kafka_topic_partitions(spark: SparkSession, bootstrap_servers: str, topics: Iterable[str],
                           timeout_s: float = 30.0) -> dict[str, list[int]]:
    """
    The partitions of each topic, asked with the Kafka admin client of Spark's own classpath (the same
    ``kafka-clients`` the source uses; no Python Kafka client needed on the driver).

    :raises TopicMissingError: naming every missing topic and how to create it.
    :raises BronzeError: when the broker does not answer within ``timeout_s``.
    """
    topics = list(dict.fromkeys(topics))
    jvm = _jvm(spark)
    props = jvm.java.util.Properties()
    props.setProperty("bootstrap.servers", bootstrap_servers)
    props.setProperty("client.id", f"{GROUP_ID_PREFIX}-admin")
    props.setProperty("request.timeout.ms", str(int(timeout_s * 1000)))
    props.setProperty("default.api.timeout.ms", str(int(timeout_s * 1000)))
    seconds = jvm.java.util.concurrent.TimeUnit.SECONDS
    admin = jvm.org.apache.kafka.clients.admin.Admin.create(props)
    try:
        try:
            existing = set(admin.listTopics().names().get(int(timeout_s), seconds))
        except Exception as exc:  # noqa: BLE001 - py4j wraps the TimeoutException/ExecutionException
            raise BronzeError(f"cannot list topics on Kafka at {bootstrap_servers} within {timeout_s:.0f}s: "
                              f"{root_cause(exc)}; is the broker up and DECISIONFLOW_KAFKA_BOOTSTRAP_SERVERS "
                              f"(--bootstrap-servers) right?") from exc
        missing = [t for t in topics if t not in existing]
        if missing:
            raise TopicMissingError(missing, bootstrap_servers)
        names = jvm.java.util.ArrayList()
        for topic in topics:
            names.add(topic)
        described = admin.describeTopics(names).allTopicNames().get(int(timeout_s), seconds)
        return {t: sorted(int(p.partition()) for p in described.get(t).partitions()) for t in topics}
    finally:
        admin.close()


def task_slots(spark: SparkSession) -> int | None:
    """Tasks Spark runs at once: N of ``local[N]`` (``local[*]``: the CPUs), else executors x cores if set."""
    master = spark.sparkContext.master or ""
    match = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\s*\d+)?\])?", master)
    if match:
        count = match.group(1) or "1"
        return os.cpu_count() if count == "*" else int(count)
    conf = spark.sparkContext.getConf()
    executors, cores = conf.get("spark.executor.instances"), conf.get("spark.executor.cores")
    return int(executors) * int(cores) if executors and cores else None


def start_query(spark: SparkSession, source: BronzeSource, lake_root: str, options: IngestOptions,
                starting: str = "earliest") -> StreamingQuery:
    """Start the availableNow Kafka -> Delta query of one source (the table must exist already)."""
    reader = spark.readStream.format("kafka").options(**kafka_source_options(source.topic, options, starting))
    return (bronze_frame(reader.load()).writeStream
            .format("delta")
            .queryName(f"bronze_{source.table}")
            .outputMode("append")
            .partitionBy(*PARTITION_COLUMNS)
            .option("checkpointLocation", source.checkpoint(lake_root))
            .trigger(availableNow=True)
            .start(source.path(lake_root)))


def _jvm_cpu_s(spark: SparkSession) -> float | None:
    """CPU seconds the driver JVM (with ``local[*]``: the whole job) has used so far; ``None`` if unknown."""
    try:
        duration = _jvm(spark).java.lang.ProcessHandle.current().info().totalCpuDuration()
        return int(duration.get().toNanos()) / 1e9 if duration.isPresent() else None
    except Exception:  # noqa: BLE001 - no JVM access (Spark Connect) or no such information on this OS
        return None


def _history(spark: SparkSession, path: str, limit: int) -> list[dict[str, Any]]:
    if limit <= 0:
        return []
    rows = spark.sql(f"DESCRIBE HISTORY delta.`{path}` LIMIT {int(limit)}") \
        .select("version", "operation", "operationMetrics").collect()
    return [{"version": r["version"], "operation": r["operation"],
             "operationMetrics": dict(r["operationMetrics"] or {})} for r in rows]


def ingest(spark: SparkSession, lake_root: str, sources: Iterable[BronzeSource],
           options: IngestOptions, *, poll_s: float = 0.1) -> dict[str, Any]:
    """
    Run one bounded bronze ingestion of ``sources`` (all queries concurrently) and return the summary.

    Never raises for a failed query: its error is in ``summary["errors"][table]`` and ``summary["ok"]`` is
    ``False``. Setup problems (missing topic, checkpoint without table, unreachable broker) raise
    :class:`BronzeError` before any query starts.

    Timings: ``prepare_s`` (topic check, tables, offsets), ``stream_s`` (first query started -> last one
    finished), per table ``stream_s``; the bench divides rows by ``stream_s``. ``stream_cpu_s`` is the CPU
    time the JVM spent meanwhile (all its threads): on a shared machine, wall time measures the neighbours too.
    """
    sources = list(sources)
    if len({s.table for s in sources}) != len(sources):
        raise BronzeError(f"two sources write the same table: {[s.table for s in sources]}")
    started = time.monotonic()
    slots = task_slots(spark) if options.min_partitions == AUTO else None
    partitions = kafka_topic_partitions(spark, options.bootstrap_servers, [s.topic for s in sources],
                                        options.admin_timeout_s)
    tables: dict[str, dict[str, Any]] = {}
    plans: list[tuple[BronzeSource, str, IngestOptions]] = []
    for source in sources:
        path, checkpoint = source.path(lake_root), source.checkpoint(lake_root)
        resumed = _checkpoint_has_progress(spark, checkpoint)
        if resumed and not is_delta_table(spark, path):
            raise CheckpointWithoutTableError(path, checkpoint)
        version, created = ensure_bronze_table(spark, path)
        # A resumed query continues from its checkpoint (startingOffsets is ignored); a new one after the
        # table's offsets - looked up only when the table can hold any (the scan is a Spark job).
        before = bronze_offsets(spark, path) if not (resumed or created or version == 0) else {}
        starting = starting_offsets(source.topic, partitions[source.topic], before)
        min_partitions = (auto_min_partitions(len(partitions[source.topic]), slots)
                          if options.min_partitions == AUTO else options.min_partitions)
        tables[source.table] = {
            "topic": source.topic, "path": path, "checkpoint": checkpoint, "partitions": len(partitions[source.topic]),
            "min_partitions": min_partitions,
            "start": "checkpoint" if resumed else ("earliest" if starting == "earliest" else "table offsets"),
            "previous_version": version,
        }
        plans.append((source, starting, replace(options, min_partitions=min_partitions)))
    prepared = time.monotonic()
    cpu_before = _jvm_cpu_s(spark)

    queries: dict[str, tuple[StreamingQuery, float]] = {}
    errors: dict[str, str] = {}
    try:
        for source, starting, query_options in plans:
            queries[source.table] = (start_query(spark, source, lake_root, query_options, starting),
                                     time.monotonic())
    except Exception as exc:  # noqa: BLE001 - a query that cannot even start: stop the others, report
        errors[plans[len(queries)][0].table] = root_cause(exc)
        for query, _ in queries.values():
            query.stop()
    pending = dict(queries)
    while pending:
        for table, (query, t0) in list(pending.items()):
            try:
                done = query.awaitTermination(poll_s)  # type: ignore[arg-type]  # seconds, float is fine
            except Exception as exc:  # noqa: BLE001 - StreamingQueryException: the query failed
                errors[table] = root_cause(exc)
                done = True
            if done:
                tables[table]["stream_s"] = round(time.monotonic() - t0, 3)
                del pending[table]
    streamed = time.monotonic()
    cpu_after = _jvm_cpu_s(spark)

    for source in sources:
        info = tables[source.table]
        path = info["path"]
        latest = delta_version(spark, path)
        info["delta_version"] = latest
        history = _history(spark, path, (latest or 0) - info["previous_version"])
        info["rows_added"], info["batches"] = rows_added(history, info["previous_version"])
        info["max_offsets"] = offsets_by_partition(bronze_offsets(spark, path), source.topic)
    timings = {"prepare_s": prepared - started, "stream_s": streamed - prepared,
               "report_s": time.monotonic() - streamed}
    if cpu_before is not None and cpu_after is not None:
        timings["stream_cpu_s"] = cpu_after - cpu_before  # JVM CPU time while streaming (all threads)
    return build_summary(tables, lake_root=lake_root, bootstrap_servers=options.bootstrap_servers,
                         options=options, errors=errors, timings=timings)
