"""Bronze ingestion's pure parts: schema, sources, Kafka options, starting offsets, summaries, the job's args."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from decisionflow.contracts import CASE_NOTES, LABELS, SOURCE_TOPICS, TRANSACTIONS
from decisionflow.jobs import ingest_bronze
from decisionflow.lakehouse import bronze
from decisionflow.lakehouse.bronze import (
    BRONZE_COLUMNS,
    BRONZE_DDL,
    BRONZE_TABLES,
    DEFAULT_MAX_OFFSETS_PER_TRIGGER,
    BronzeError,
    BronzeSource,
    CheckpointWithoutTableError,
    IngestOptions,
    TopicMissingError,
    auto_min_partitions,
    bronze_source,
    build_summary,
    checkpoint_path,
    default_sources,
    kafka_source_options,
    offsets_by_partition,
    root_cause,
    rows_added,
    starting_offsets,
    table_path,
    task_slots,
)

BROKER_MESSAGE_MAX_BYTES = 1_048_588  # decisionflow.stack.kafka: message.max.bytes


# -- schema and locations -------------------------------------------------------------------------------------
def test_bronze_schema_is_the_agreed_one():
    assert BRONZE_COLUMNS == (
        ("topic", "STRING"), ("partition", "INT"), ("offset", "BIGINT"), ("kafka_timestamp", "TIMESTAMP"),
        ("key", "STRING"), ("value", "BINARY"), ("value_size", "INT"), ("ingested_at", "TIMESTAMP"),
        ("ingest_date", "DATE"),
    )
    assert BRONZE_DDL == ("`topic` STRING, `partition` INT, `offset` BIGINT, `kafka_timestamp` TIMESTAMP, "
                          "`key` STRING, `value` BINARY, `value_size` INT, `ingested_at` TIMESTAMP, "
                          "`ingest_date` DATE")
    assert bronze.PARTITION_COLUMNS == ("ingest_date",)
    assert all(c in dict(BRONZE_COLUMNS) for c in bronze.PARTITION_COLUMNS)
    stats = bronze.TABLE_PROPERTIES["delta.dataSkippingStatsColumns"].split(",")
    assert set(stats) <= set(dict(BRONZE_COLUMNS)) and "value" not in stats
    assert not set(stats) & set(bronze.PARTITION_COLUMNS)  # Delta refuses stats on partition columns


def test_tables_and_checkpoints_live_under_the_lake_root():
    assert BRONZE_TABLES == {TRANSACTIONS: "transactions", LABELS: "labels", CASE_NOTES: "case_notes"}
    assert table_path("/lake", "labels") == "/lake/bronze/labels"
    assert table_path("/lake/", "labels") == "/lake/bronze/labels"
    assert checkpoint_path("/lake", "case_notes") == "/lake/_checkpoints/bronze/case_notes"
    assert checkpoint_path("s3a://bucket/lake/", "transactions") == "s3a://bucket/lake/_checkpoints/bronze/transactions"
    source = BronzeSource(CASE_NOTES, "case_notes")
    assert source.path("/l") == "/l/bronze/case_notes"
    assert source.checkpoint("/l") == "/l/_checkpoints/bronze/case_notes"


def test_default_sources_are_the_three_contracted_topics_in_order():
    assert [s.topic for s in default_sources()] == list(SOURCE_TOPICS)
    assert [s.table for s in default_sources()] == ["transactions", "labels", "case_notes"]


def test_bronze_source_parsing():
    assert bronze_source("transactions") == BronzeSource(TRANSACTIONS, "transactions")
    assert bronze_source(" transaction-labels ") == BronzeSource(LABELS, "labels")
    assert bronze_source("case-notes=case_notes") == BronzeSource(CASE_NOTES, "case_notes")
    assert bronze_source("transactions.dlq=transactions_dlq") == BronzeSource("transactions.dlq", "transactions_dlq")
    with pytest.raises(ValueError, match=r"has no bronze table: pass other=TABLE"):
        bronze_source("other")
    with pytest.raises(ValueError, match="must match"):
        bronze_source("other=../escape")
    with pytest.raises(ValueError, match="must match"):
        bronze_source("other=Has-Dash")
    with pytest.raises(ValueError, match="lands in bronze/labels, not bronze/notes"):
        bronze_source("transaction-labels=notes")
    with pytest.raises(ValueError, match="empty topic"):
        bronze_source("=tbl")


# -- Kafka options --------------------------------------------------------------------------------------------
def test_kafka_source_options_defaults():
    opts = kafka_source_options(TRANSACTIONS, IngestOptions("127.0.0.1:9092"))
    assert opts["kafka.bootstrap.servers"] == "127.0.0.1:9092"
    assert opts["subscribe"] == TRANSACTIONS
    assert opts["startingOffsets"] == "earliest"
    assert opts["failOnDataLoss"] == "true"
    assert opts["maxOffsetsPerTrigger"] == str(DEFAULT_MAX_OFFSETS_PER_TRIGGER)
    assert int(opts["kafka.max.partition.fetch.bytes"]) > BROKER_MESSAGE_MAX_BYTES
    assert int(opts["kafka.fetch.max.bytes"]) >= int(opts["kafka.max.partition.fetch.bytes"])
    assert opts["groupIdPrefix"] == bronze.GROUP_ID_PREFIX
    assert "minPartitions" not in opts
    # offsets live in the checkpoint: nothing that would make a consumer group commit
    assert not {k for k in opts if k.lower() in ("kafka.group.id", "kafka.enable.auto.commit")}
    assert all(isinstance(v, str) for v in opts.values())


def test_kafka_source_options_overrides():
    options = IngestOptions("b:1", max_offsets_per_trigger=500, fail_on_data_loss=False, min_partitions=6,
                            kafka_options={"kafka.receive.buffer.bytes": 4096, "kafka.check.crcs": "false"})
    opts = kafka_source_options(LABELS, options, starting='{"x":{"0":1}}')
    assert opts["maxOffsetsPerTrigger"] == "500"
    assert opts["failOnDataLoss"] == "false"
    assert opts["minPartitions"] == "6"
    assert opts["startingOffsets"] == '{"x":{"0":1}}'
    assert opts["kafka.receive.buffer.bytes"] == "4096"
    assert opts["kafka.check.crcs"] == "false"


@pytest.mark.parametrize("kwargs, message", [
    ({"bootstrap_servers": ""}, "bootstrap_servers is required"),
    ({"max_offsets_per_trigger": 0}, "max_offsets_per_trigger must be >= 1"),
    ({"min_partitions": 0}, "min_partitions must be >= 1"),
    ({"min_partitions": "many"}, "min_partitions must be a number, None or 'auto'"),
    ({"kafka_options": {"kafka.group.id": "mine"}}, "set by bronze itself"),
    ({"kafka_options": {"kafka.enable.auto.commit": "true"}}, "set by bronze itself"),
    ({"kafka_options": {"subscribePattern": ".*"}}, "set by bronze itself"),
])
def test_ingest_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IngestOptions(**{"bootstrap_servers": "b:1", **kwargs})


def test_auto_min_partitions_fills_every_wave():
    assert IngestOptions("b:1").min_partitions == bronze.AUTO
    assert auto_min_partitions(3, 2) == 4  # 3 partitions on 2 cores: 2 full waves instead of 2 + 1
    assert auto_min_partitions(3, 4) == 4
    assert auto_min_partitions(3, 8) == 8
    assert auto_min_partitions(1, 2) == 2
    assert auto_min_partitions(4, 2) is None  # already a multiple: one task per partition
    assert auto_min_partitions(12, 2) is None
    assert auto_min_partitions(3, None) is None and auto_min_partitions(3, 1) is None
    assert auto_min_partitions(0, 2) is None


@pytest.mark.parametrize("master, conf, slots", [
    ("local[2]", {}, 2),
    ("local", {}, 1),
    ("local[3, 2]", {}, 3),
    ("local[*]", {}, os.cpu_count()),
    ("spark://h:7077", {"spark.executor.instances": "3", "spark.executor.cores": "4"}, 12),
    ("yarn", {}, None),
])
def test_task_slots(master, conf, slots):
    class Ctx:
        def __init__(self):
            self.master = master

        def getConf(self):
            return conf

    class Session:
        sparkContext = Ctx()

    assert task_slots(Session()) == slots


def test_starting_offsets_continue_after_the_table():
    assert starting_offsets(TRANSACTIONS, [0, 1, 2], {}) == "earliest"
    assert starting_offsets(TRANSACTIONS, [0, 1, 2], {(LABELS, 0): 5}) == "earliest"  # another topic's rows
    got = json.loads(starting_offsets(TRANSACTIONS, [0, 1, 2], {(TRANSACTIONS, 0): 41, (TRANSACTIONS, 2): 0}))
    assert got == {TRANSACTIONS: {"0": 42, "1": -2, "2": 1}}  # every partition named, -2 = earliest
    # a partition the table knows but the metadata does not list is still named (Spark then reports it)
    got = json.loads(starting_offsets(TRANSACTIONS, [0], {(TRANSACTIONS, 3): 9}))
    assert got == {TRANSACTIONS: {"0": -2, "3": 10}}


# -- summaries ------------------------------------------------------------------------------------------------
def test_rows_added_counts_streaming_commits_after_the_version():
    history = [
        {"version": 4, "operation": "STREAMING UPDATE", "operationMetrics": {"numOutputRows": "10"}},
        {"version": 3, "operation": "STREAMING UPDATE", "operationMetrics": {"numOutputRows": "7"}},
        {"version": 2, "operation": "OPTIMIZE", "operationMetrics": {"numOutputRows": "99"}},
        {"version": 1, "operation": "STREAMING UPDATE", "operationMetrics": {"numOutputRows": "5"}},
        {"version": 0, "operation": "CREATE TABLE", "operationMetrics": {}},
    ]
    assert rows_added(history, 1) == (17, 2)
    assert rows_added(history, 0) == (22, 3)
    assert rows_added(history, 4) == (0, 0)
    assert rows_added([{"version": 1, "operation": "STREAMING UPDATE", "operationMetrics": None}], 0) == (0, 1)


def test_offsets_by_partition_and_summary():
    offsets = {(TRANSACTIONS, 2): 30, (TRANSACTIONS, 0): 10, (LABELS, 0): 3}
    assert offsets_by_partition(offsets, TRANSACTIONS) == {"0": 10, "2": 30}
    assert list(offsets_by_partition(offsets, TRANSACTIONS)) == ["0", "2"]
    tables = {"transactions": {"rows_added": 5, "max_offsets": {"0": 10}}, "labels": {"rows_added": 2}}
    summary = build_summary(tables, lake_root="/l", bootstrap_servers="b:1", options=IngestOptions("b:1"),
                            errors={}, timings={"stream_s": 1.23456})
    assert summary["ok"] is True and summary["rows_added"] == 7 and summary["stream_s"] == 1.235
    assert summary["tables"]["transactions"]["max_offsets"] == {"0": 10}
    assert json.loads(json.dumps(summary)) == summary
    failed = build_summary({}, lake_root="/l", bootstrap_servers="b:1", options=IngestOptions("b:1"),
                           errors={"labels": "boom"}, timings={})
    assert failed["ok"] is False and failed["errors"] == {"labels": "boom"}


def test_errors_name_the_topic_and_the_remedy():
    err = TopicMissingError(["case-notes", "transactions"], "127.0.0.1:9")
    assert "'case-notes', 'transactions'" in str(err) and "127.0.0.1:9" in str(err)
    assert "--create-topics" in str(err)
    assert root_cause(err) == str(err)
    err = CheckpointWithoutTableError("/l/bronze/x", "/l/_checkpoints/bronze/x")
    assert "/l/bronze/x" in str(err) and "delete the checkpoint" in str(err)
    assert isinstance(err, BronzeError)
    assert root_cause(ValueError("first line\nsecond")) == "ValueError: first line"


# -- the job's arguments --------------------------------------------------------------------------------------
def test_job_args_default_from_the_environment(monkeypatch):
    monkeypatch.setenv("DECISIONFLOW_LAKE_ROOT", "/lake/")
    monkeypatch.setenv("DECISIONFLOW_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    args = ingest_bronze.parse_args([])
    assert args.lake_root == "/lake"
    assert args.sources == default_sources()
    assert args.options == IngestOptions("127.0.0.1:19092")
    assert args.summary_path is None


def test_job_args_override_everything(monkeypatch):
    monkeypatch.setenv("DECISIONFLOW_LAKE_ROOT", "/env-lake")
    monkeypatch.setenv("DECISIONFLOW_KAFKA_BOOTSTRAP_SERVERS", "env:1")
    args = ingest_bronze.parse_args([
        "--topics", "transactions", "scratch=scratch_raw", "--lake-root", "/arg-lake",
        "--bootstrap-servers", "arg:2", "--max-offsets-per-trigger", "1000", "--min-partitions", "4",
        "--no-fail-on-data-loss", "--kafka-option", "kafka.receive.buffer.bytes=65536", "--summary-path", "/s.json",
    ])
    assert args.lake_root == "/arg-lake"
    assert args.sources == [BronzeSource(TRANSACTIONS, "transactions"), BronzeSource("scratch", "scratch_raw")]
    assert args.options == IngestOptions("arg:2", max_offsets_per_trigger=1000, fail_on_data_loss=False,
                                         min_partitions=4, kafka_options={"kafka.receive.buffer.bytes": "65536"})
    assert args.summary_path == "/s.json"


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("AUTO", "auto"), ("none", None), ("6", 6)])
def test_job_min_partitions_arg(value, expected):
    args = ingest_bronze.parse_args(["--lake-root", "/l", "--bootstrap-servers", "b:1", "--min-partitions", value])
    assert args.options.min_partitions == expected


@pytest.mark.parametrize("argv, message", [
    (["--bootstrap-servers", "b:1"], "no lake root"),
    (["--lake-root", "/l"], "no Kafka bootstrap servers"),
    (["--lake-root", "/l", "--bootstrap-servers", "b:1", "--max-offsets-per-trigger", "0"], "must be >= 1"),
    (["--lake-root", "/l", "--bootstrap-servers", "b:1", "--min-partitions", "0"], "must be >= 1"),
    (["--lake-root", "/l", "--bootstrap-servers", "b:1", "--min-partitions", "lots"], "expected an integer"),
    (["--lake-root", "/l", "--bootstrap-servers", "b:1", "--topics", "nope"], "has no bronze table"),
    (["--lake-root", "/l", "--bootstrap-servers", "b:1", "--topics", "transactions", "x=transactions"],
     "its own table"),
    (["--lake-root", "/l", "--bootstrap-servers", "b:1", "--kafka-option", "novalue"], "expected KEY=VALUE"),
    (["--lake-root", "/l", "--bootstrap-servers", "b:1", "--kafka-option", "kafka.group.id=g"], "set by bronze"),
])
def test_job_args_errors(monkeypatch, capsys, argv, message):
    monkeypatch.delenv("DECISIONFLOW_LAKE_ROOT", raising=False)
    monkeypatch.delenv("DECISIONFLOW_KAFKA_BOOTSTRAP_SERVERS", raising=False)
    with pytest.raises(SystemExit) as exc:
        ingest_bronze.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_modules_stay_import_light():
    code = ("import sys, decisionflow.lakehouse, decisionflow.lakehouse.bronze, decisionflow.jobs.ingest_bronze; "
            "heavy = [m for m in ('pyspark', 'airflow', 'confluent_kafka', 'deltalake') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
