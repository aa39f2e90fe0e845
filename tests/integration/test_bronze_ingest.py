"""Bronze ingestion for real: generator -> private Kafka -> spark-submit ingest_bronze -> Delta, reconciled exactly.

* ``test_bronze_reconciles_exactly_and_is_idempotent``: ~3k generated messages (10% bad input: malformed JSON,
  tombstones, oversized, duplicates...) produced with the truth file; the job (through
  ``DeltaSparkSubmitOperator``, as a DAG runs it) must land exactly the topic's records, value bytes equal
  (sha256), tombstones as NULL; a rerun adds nothing; after more messages (and a lost checkpoint) only those.
* ``test_bronze_survives_sigkill_mid_run``: a 50k-message backlog in small micro-batches, the whole
  spark-submit process group SIGKILLed twice (once after Delta committed a batch the checkpoint had not,
  once with a batch planned but not written), then a clean run: no loss, no duplicates.
* ``test_missing_topic_fails_with_the_remedy``.

The broker is the shared private one of ``fixtures_kafka`` (other modules may have written the same topics
before): each test notes the topics' end offsets before producing, reconciles everything above them against
its truth file and everything below against what the topic holds.

Bronze tables are read back with delta-rs (``deltalake``), an independent Delta reader: no JVM in pytest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

try:  # tests/integration is a package (has __init__.py)
    from .fixtures_kafka import kafka_broker, kafka_connection  # noqa: F401 - pytest fixtures
except ImportError:  # collected as a plain directory (rootdir-relative import mode)
    from fixtures_kafka import kafka_broker, kafka_connection  # noqa: F401

import decisionflow.jobs
from decisionflow.contracts import SOURCE_TOPICS, TRANSACTIONS
from decisionflow.exceptions import EXIT_NON_RETRYABLE, NON_RETRYABLE_MARKER
from decisionflow.lakehouse.bronze import BRONZE_TABLES, GROUP_ID_PREFIX, checkpoint_path, table_path
from decisionflow.risk.generator import EventGenerator, GeneratorConfig
from decisionflow.risk.producer import ensure_topics, produce, read_truth

pytestmark = pytest.mark.integration

JOB = Path(decisionflow.jobs.__file__).parent / "ingest_bronze.py"
MASTER = "local[2]"  # a 2-core machine shared with others


# -- helpers --------------------------------------------------------------------------------------------------
def _sha(value: bytes | None) -> str | None:
    return hashlib.sha256(value).hexdigest() if value is not None else None


def _watermarks(consumer, topic: str, partition: int) -> tuple[int, int]:
    """(low, high) of a partition, retried: a just-created topic may answer NOT_LEADER for a moment."""
    from confluent_kafka import KafkaException, TopicPartition

    deadline = time.monotonic() + 30
    while True:
        try:
            return consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _end_offsets(bootstrap: str, topics=SOURCE_TOPICS) -> dict[tuple[str, int], int]:
    """High watermark of every partition: where the next message of each will land."""
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bronze-test-watermarks",
                         "enable.auto.commit": False})
    try:
        out = {}
        for topic in topics:
            for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions:
                out[(topic, p)] = _watermarks(consumer, topic, p)[1]
        return out
    finally:
        consumer.close()


def _topic_contents(bootstrap: str, topic: str) -> dict[tuple[str, int, int], str | None]:
    """Every record the topic holds now: (topic, partition, offset) -> sha256 of the value (None: tombstone).

    Read with ``assign`` and no commits, from the low to the high watermark of each partition.
    """
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bronze-test-reader",
                         "enable.auto.commit": False, "fetch.max.bytes": 52_428_800,
                         "max.partition.fetch.bytes": 2_097_152})
    try:
        ends, assignment = {}, []
        for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions:
            low, high = _watermarks(consumer, topic, p)
            if high > low:
                ends[p] = high
                assignment.append(TopicPartition(topic, p, low))
        consumer.assign(assignment)
        out, done = {}, set()
        deadline = time.monotonic() + 180
        while len(done) < len(ends):
            assert time.monotonic() < deadline, f"{topic}: partitions {set(ends) - done} not read to the end"
            for msg in consumer.consume(num_messages=5000, timeout=1.0):
                assert msg.error() is None, msg.error()
                out[(topic, msg.partition(), msg.offset())] = _sha(msg.value())
                if msg.offset() + 1 >= ends[msg.partition()]:
                    done.add(msg.partition())
        return out
    finally:
        consumer.close()


def _read_bronze(path: Path) -> list[dict]:
    """The bronze rows (value hashed) read with delta-rs; [] when there is no table yet."""
    from deltalake import DeltaTable

    if not (path / "_delta_log").is_dir():
        return []
    table = DeltaTable(str(path)).to_pyarrow_table()
    rows = table.to_pylist()
    for row in rows:
        row["sha"] = _sha(row.pop("value"))
    return rows


def _keys(rows) -> list[tuple[str, int, int]]:
    return [(r["topic"], r["partition"], r["offset"]) for r in rows]


def _produce(bootstrap: str, truth: Path, *, events: int, seed: int, bad_share: float = 0.1, **config) -> list[dict]:
    ensure_topics(bootstrap, SOURCE_TOPICS)
    report = produce(EventGenerator(GeneratorConfig(events=events, seed=seed, bad_share=bad_share, **config)),
                     bootstrap_servers=bootstrap, truth_path=truth, progress=False)
    assert report.failed == 0, report.errors
    rows = read_truth(truth)
    assert all(r["offset"] is not None for r in rows)
    return rows


def _reconcile(lake: Path, bootstrap: str, truth_rows: list[dict], baseline: dict[tuple[str, int], int],
               topics=SOURCE_TOPICS) -> dict[str, list[dict]]:
    """Bronze == what each topic holds (no loss, no duplicate, same bytes); above ``baseline`` == the truth."""
    tables = {}
    for topic in topics:
        rows = _read_bronze(lake / "bronze" / BRONZE_TABLES[topic])
        keys = _keys(rows)
        assert len(keys) == len(set(keys)), f"{topic}: {len(keys) - len(set(keys))} duplicate rows in bronze"
        got = {k: r["sha"] for k, r in zip(keys, rows)}
        held = _topic_contents(bootstrap, topic)
        assert set(got) == set(held), (f"{topic}: missing {len(set(held) - set(got))}, "
                                       f"unexpected {len(set(got) - set(held))}")
        assert got == held, f"{topic}: value bytes differ"
        # exactly the truth file above the baseline: every produced message, its bytes, its key, its size
        truth = {(r["topic"], r["partition"], r["offset"]): r for r in truth_rows if r["topic"] == topic}
        ours = {k: r for k, r in zip(keys, rows) if k[2] >= baseline[(topic, k[1])]}
        assert set(ours) == set(truth), f"{topic}: bronze above the baseline is not the truth file"
        for key, row in ours.items():
            want = truth[key]
            assert row["sha"] == want["value_sha256"], key
            assert row["value_size"] == want["value_bytes"], key
            assert row["key"] == want["key"], key
            if want["kind"] == "tombstone":
                assert row["sha"] is None and row["value_size"] is None, key
        for row in rows:
            assert row["kafka_timestamp"] is not None and row["ingested_at"] is not None
            assert row["ingest_date"] == row["ingested_at"].date()
        tables[topic] = rows
    return tables


def _max_offsets(rows) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[str(r["partition"])] = max(out.get(str(r["partition"]), -1), r["offset"])
    return out


def _summary_line(stdout: str) -> dict:
    """The job's JSON summary: the last stdout line that is a JSON object (spark-submit merges the Python
    driver's stderr into its stdout, so "ingest_bronze FAILED: ..." may come after it)."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON summary in the output:\n{stdout[-3000:]}"
    return json.loads(lines[-1])


def _spark_env(lake: Path, bootstrap: str) -> dict[str, str]:
    from decisionflow.spark.conf import spark_env

    return {**os.environ, **spark_env(lake, bootstrap)}


def _argv(lake: Path, tmp: Path, *args: str) -> list[str]:
    from decisionflow.spark.conf import spark_submit_argv

    return spark_submit_argv(JOB, list(args), master=MASTER, name="ingest_bronze_test",
                             conf={"spark.sql.warehouse.dir": str(tmp / "warehouse")})


# -- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture
def lakehouse(kafka_connection, tmp_path, monkeypatch):
    """Connections for the operator: the private broker, a tmp lake root, Spark local[2] in client mode."""
    lake = tmp_path / "lake"
    monkeypatch.setenv("AIRFLOW_CONN_LAKE_DEFAULT", json.dumps({"conn_type": "delta_lake", "extra": {"root": str(lake)}}))
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", json.dumps({
        "conn_type": "spark", "host": MASTER, "extra": {"deploy-mode": "client", "spark-binary": "spark-submit"},
    }))
    return {"lake": lake, "bootstrap": kafka_connection, "tmp": tmp_path}


def _submit(lakehouse, run: str, *extra_args: str) -> dict:
    """Run ingest_bronze once through DeltaSparkSubmitOperator (as a DAG does); returns its JSON summary."""
    from decisionflow.operators.spark import DeltaSparkSubmitOperator

    summary_path = lakehouse["tmp"] / f"summary-{run}.json"
    op = DeltaSparkSubmitOperator(
        task_id=f"ingest_bronze_{run}",
        application=str(JOB),
        name=f"ingest_bronze_{run}",
        application_args=["--summary-path", str(summary_path), *extra_args],
        conf={"spark.sql.warehouse.dir": str(lakehouse["tmp"] / "warehouse")},
    )
    started = time.monotonic()
    op.execute(context={})
    summary = json.loads(summary_path.read_text())
    print(f"\n[ingest_bronze {run}] {time.monotonic() - started:.1f}s wall; rows added {summary['rows_added']}; "
          + ", ".join(f"{k}={summary[k]}" for k in ("session_s", "prepare_s", "stream_s", "report_s")))
    return summary


# -- tests ----------------------------------------------------------------------------------------------------
def test_bronze_reconciles_exactly_and_is_idempotent(lakehouse):
    lake, bootstrap, tmp = lakehouse["lake"], lakehouse["bootstrap"], lakehouse["tmp"]
    ensure_topics(bootstrap, SOURCE_TOPICS)
    baseline = _end_offsets(bootstrap)
    truth = _produce(bootstrap, tmp / "truth-1.jsonl", events=2600, seed=11)
    kinds = {r["kind"] for r in truth}
    assert {"malformed_json", "tombstone", "oversized", "duplicate"} <= kinds, kinds
    assert 2800 <= len(truth) <= 3600
    assert sum(r["kind"] != "valid" for r in truth) / len(truth) > 0.07

    first = _submit(lakehouse, "first")
    assert first["ok"] is True, first
    held = {t: sum(1 for _ in _topic_contents(bootstrap, t)) for t in SOURCE_TOPICS}
    assert first["rows_added"] == sum(held.values())
    tables = _reconcile(lake, bootstrap, truth, baseline)
    for topic in SOURCE_TOPICS:
        info = first["tables"][BRONZE_TABLES[topic]]
        assert info["topic"] == topic and info["start"] == "earliest"
        assert info["rows_added"] == held[topic] and info["batches"] >= 1
        assert info["delta_version"] == info["previous_version"] + info["batches"]
        assert info["max_offsets"] == _max_offsets(tables[topic])  # bronze_offsets (Spark) == delta-rs
        assert info["path"] == table_path(str(lake), BRONZE_TABLES[topic])
        assert Path(checkpoint_path(str(lake), BRONZE_TABLES[topic]), "commits").is_dir()
    oversized = [r for r in tables["case-notes"] + tables["transactions"] if (r["value_size"] or 0) > 200 * 1024]
    assert oversized, "the 200-900 KiB messages must land in bronze too"

    # idempotent: nothing new on the topics -> no row, no commit
    again = _submit(lakehouse, "rerun")
    assert again["ok"] is True, again
    assert again["rows_added"] == 0
    for table, info in again["tables"].items():
        assert info["start"] == "checkpoint"
        assert (info["batches"], info["delta_version"]) == (0, first["tables"][table]["delta_version"])
        assert info["max_offsets"] == first["tables"][table]["max_offsets"]

    # more messages: only they are added - also for a table whose checkpoint was lost (restarts after the
    # table's max offsets, not at earliest)
    baseline_2 = _end_offsets(bootstrap)
    truth_2 = _produce(bootstrap, tmp / "truth-2.jsonl", events=400, seed=12)
    shutil.rmtree(checkpoint_path(str(lake), "labels"))
    third = _submit(lakehouse, "more")
    assert third["ok"] is True, third
    assert third["rows_added"] == len(truth_2)
    for topic in SOURCE_TOPICS:
        info = third["tables"][BRONZE_TABLES[topic]]
        assert info["rows_added"] == sum(r["topic"] == topic for r in truth_2)
        assert info["start"] == ("table offsets" if topic == "transaction-labels" else "checkpoint")
    _reconcile(lake, bootstrap, truth + truth_2, baseline)
    _reconcile(lake, bootstrap, truth_2, baseline_2)  # (the rows above the second baseline are truth_2 alone)

    # Spark tracked offsets in the checkpoints only: no consumer group of ours ever committed an offset
    _assert_no_committed_offsets(bootstrap)


def _assert_no_committed_offsets(bootstrap: str) -> None:
    from confluent_kafka import ConsumerGroupTopicPartitions
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    listed = admin.list_consumer_groups(request_timeout=10).result()
    ours = [g.group_id for g in listed.valid if g.group_id.startswith(GROUP_ID_PREFIX)]
    for group in ours:
        result = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[group].result()
        committed = [tp for tp in result.topic_partitions if tp.offset >= 0]
        assert not committed, f"group {group} committed offsets: {committed}"


def test_bronze_survives_sigkill_mid_run(kafka_broker, tmp_path):
    """Two crashes, one in each dangerous place, then a clean run: bronze == the topics, exactly.

    1. SIGKILL when the Delta table already holds batch N but the checkpoint has no ``commits/N`` yet: the
       restarted query re-plans N with the same offsets and the Delta sink must skip it (else duplicates).
    2. SIGKILL while batch N is planned (``offsets/N``) but neither in Delta nor committed: the restarted
       query must write N (else loss).
    """
    bootstrap = kafka_broker.bootstrap_servers
    lake = tmp_path / "lake"
    ensure_topics(bootstrap, SOURCE_TOPICS)
    baseline = _end_offsets(bootstrap)
    # ~50k messages on the three topics (the larger backlog), still 10% bad input; few oversized (size)
    truth = _produce(bootstrap, tmp_path / "truth-kill.jsonl", events=44_000, seed=21, oversized_cap=20)
    assert len(truth) >= 48_000, len(truth)
    expected_rows = {t: len(_topic_contents(bootstrap, t)) for t in SOURCE_TOPICS}

    commits = Path(checkpoint_path(str(lake), "transactions"), "commits")
    offsets = Path(checkpoint_path(str(lake), "transactions"), "offsets")
    delta_log = Path(table_path(str(lake), "transactions"), "_delta_log")

    def numbered(folder: Path) -> int:
        return sum(1 for p in folder.glob("[0-9]*")) if folder.is_dir() else 0

    def progress() -> dict:
        return {"commits": numbered(commits), "offsets": numbered(offsets),
                "delta_batches": max(0, len(list(delta_log.glob("*.json"))) - 1)}  # version 0: CREATE TABLE

    def run_and_kill(name: str, should_kill) -> dict:
        """Start the job (small micro-batches: ~12 for transactions alone), SIGKILL its process group as soon
        as ``should_kill(progress)``; return what the dead job left behind."""
        argv = _argv(lake, tmp_path, "--lake-root", str(lake), "--bootstrap-servers", bootstrap,
                     "--max-offsets-per-trigger", "4000", "--summary-path", str(tmp_path / f"{name}.json"))
        with open(tmp_path / f"{name}.log", "wb") as log:
            # its own process group: the spark-submit JVM and the Python driver die together
            process = subprocess.Popen(argv, env=_spark_env(lake, bootstrap), stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            killed = False
            try:
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline and process.poll() is None:
                    if should_kill(progress()):
                        os.killpg(process.pid, signal.SIGKILL)
                        killed = True
                        break
                    time.sleep(0.003)
            finally:
                if process.poll() is None and not killed:
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=60)
        assert killed, f"{name}: the job ended first: " + (tmp_path / f"{name}.log").read_text()[-3000:]
        assert process.returncode == -signal.SIGKILL
        assert not (tmp_path / f"{name}.json").exists()  # it never got to its summary
        state = progress()  # read after its death: the last files it wrote count
        state["window"] = ("Delta ahead of the checkpoint" if state["delta_batches"] > state["commits"] else
                           "batch in flight" if state["offsets"] > state["commits"] else "between batches")
        keys = _keys(_read_bronze(lake / "bronze" / "transactions"))
        assert len(keys) == len(set(keys)), f"{name}: duplicates in bronze"
        state["rows"] = len(keys)
        print(f"\n[kill] {name}: SIGKILL ({state['window']}): checkpoint {state['commits']} committed / "
              f"{state['offsets']} planned batch(es), Delta {state['delta_batches']} batch commit(s); "
              f"transactions rows in bronze: {len(keys)} of {expected_rows[TRANSACTIONS]}")
        return state

    # 1: Delta has batch N, the checkpoint not (falls back to "in flight" if that window is never seen)
    first = run_and_kill("kill-1", lambda p: p["commits"] >= 1 and (
        p["delta_batches"] > p["commits"] or (p["commits"] >= 3 and p["offsets"] > p["commits"])))
    assert 0 < first["rows"] < expected_rows[TRANSACTIONS]
    # 2: the restarted job has written at least one new batch (after skipping the replayed one) and planned
    # the next, not yet in Delta
    second = run_and_kill("kill-2", lambda p: p["delta_batches"] > first["delta_batches"] and
                          p["offsets"] > p["commits"] == p["delta_batches"])
    assert second["window"] == "batch in flight", second
    assert first["rows"] < second["rows"] < expected_rows[TRANSACTIONS]

    rerun = subprocess.run(_argv(lake, tmp_path, "--lake-root", str(lake), "--bootstrap-servers", bootstrap,
                                 "--max-offsets-per-trigger", "20000"),
                           env=_spark_env(lake, bootstrap), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = _summary_line(rerun.stdout)
    assert summary["ok"] is True, summary
    assert summary["tables"]["transactions"]["start"] == "checkpoint"
    assert summary["tables"]["transactions"]["rows_added"] == expected_rows[TRANSACTIONS] - second["rows"]
    tables = _reconcile(lake, bootstrap, truth, baseline)  # no loss, no duplicates, same bytes
    assert {t: len(rows) for t, rows in tables.items()} == expected_rows
    print(f"[kill] final run added {summary['rows_added']} rows in {summary['total_s']:.0f}s; bronze now holds "
          f"exactly the produced set: {expected_rows}")


def test_missing_topic_fails_with_the_remedy(kafka_broker, tmp_path):
    bootstrap = kafka_broker.bootstrap_servers
    lake = tmp_path / "lake"
    ensure_topics(bootstrap, SOURCE_TOPICS)  # "transactions" exists: only the other one is missing
    result = subprocess.run(
        _argv(lake, tmp_path, "--lake-root", str(lake), "--bootstrap-servers", bootstrap,
              "--topics", "transactions", "decisionflow.no-such-topic=no_such_topic"),
        env=_spark_env(lake, bootstrap), capture_output=True, text=True, timeout=600)
    # A missing topic is for someone to fix, not to retry: the job exits EXIT_NON_RETRYABLE and says so.
    assert result.returncode == EXIT_NON_RETRYABLE, result.stderr[-3000:]
    assert NON_RETRYABLE_MARKER in result.stdout + result.stderr
    summary = _summary_line(result.stdout)
    assert summary["ok"] is False
    assert "'decisionflow.no-such-topic'" in summary["error"]
    assert "--create-topics" in summary["error"]
    assert "ingest_bronze FAILED: Kafka topic(s) 'decisionflow.no-such-topic'" in result.stdout  # the task log
    assert not (lake / "bronze").exists()  # checked before anything was created
