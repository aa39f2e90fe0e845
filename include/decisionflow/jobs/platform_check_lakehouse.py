"""Spark application: prove the lakehouse works end to end (Delta write/append/time travel + Kafka batch read).

Run by the ``platform_check`` DAG through ``DeltaSparkSubmitOperator``, which passes the lake root and the
Kafka bootstrap servers in the environment. By hand::

    spark-submit <decisionflow conf and jars> platform_check_lakehouse.py --lake-root /tmp/lake \\
        --kafka-bootstrap 127.0.0.1:9092

(``decisionflow.spark.conf.spark_submit_argv`` builds that command line.) Run with plain ``python`` it builds
its own local session with the same setup.

Checks, in order -- the first failure prints a JSON line with ``"ok": false`` and exits 1:

1. overwrite a 10-row Delta table at ``<lake root>/_platform_check/delta`` -> version N;
2. append 5 rows -> version N+1 (read from the Delta log, ``DESCRIBE HISTORY``);
3. read the latest version back: 15 rows, all of this run;
4. time travel (``versionAsOf`` N): 10 rows;
5. read the scratch topic ``decisionflow.platform-check`` with the batch Kafka source from the earliest
   offset: at least one record (the Kafka platform check writes one).

Idempotent: every run overwrites the table first, so reruns only add two commits to its history.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from typing import Any

from decisionflow.jobs._app import describe_error, emit_summary

ENV_LAKE_ROOT = "DECISIONFLOW_LAKE_ROOT"  # the same names as decisionflow.spark.conf; this file imports only pyspark
ENV_KAFKA_BOOTSTRAP = "DECISIONFLOW_KAFKA_BOOTSTRAP_SERVERS"
CHECK_NAME = "platform_check_lakehouse"
DEFAULT_TOPIC = "decisionflow.platform-check"
TABLE_SUBPATH = "_platform_check/delta"
FIRST_ROWS, APPENDED_ROWS = 10, 5


class CheckFailed(RuntimeError):
    """One of the checks did not hold; the message says which and what was seen."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=CHECK_NAME, description=__doc__.split("\n", 1)[0])
    parser.add_argument("--lake-root", default=os.environ.get(ENV_LAKE_ROOT),
                        help=f"lake root (path or object-store URI); default ${ENV_LAKE_ROOT}")
    parser.add_argument("--kafka-bootstrap", default=os.environ.get(ENV_KAFKA_BOOTSTRAP),
                        help=f"Kafka bootstrap servers; default ${ENV_KAFKA_BOOTSTRAP}")
    parser.add_argument("--topic", default=DEFAULT_TOPIC, help="scratch topic to read (default %(default)s)")
    parser.add_argument("--skip-kafka", action="store_true", help="only check Delta")
    parser.add_argument("--summary-path", help="also write the JSON summary to this file")
    args = parser.parse_args(argv)
    if not args.lake_root:
        parser.error(f"no lake root: pass --lake-root or set {ENV_LAKE_ROOT}")
    if not args.skip_kafka and not args.kafka_bootstrap:
        parser.error(f"no Kafka bootstrap servers: pass --kafka-bootstrap, set {ENV_KAFKA_BOOTSTRAP} or --skip-kafka")
    return args


def get_session():
    """The session spark-submit configured, or (plain ``python``) a local one with the decisionflow setup."""
    if "PYSPARK_GATEWAY_PORT" in os.environ:  # launched by spark-submit: the conf is already in place
        from pyspark.sql import SparkSession

        return SparkSession.builder.appName(CHECK_NAME).getOrCreate()
    from decisionflow.spark.conf import local_spark_session

    return local_spark_session(CHECK_NAME)


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def _latest_version(spark, path: str) -> int:
    row = spark.sql(f"DESCRIBE HISTORY delta.`{path}` LIMIT 1").select("version").first()
    return int(row["version"])


def check_delta(spark, lake_root: str, run_id: str) -> dict[str, Any]:
    from pyspark.sql import functions as F

    path = f"{lake_root.rstrip('/')}/{TABLE_SUBPATH}"

    def batch(start: int, count: int, kind: str):
        return (spark.range(start, start + count)
                .withColumn("run_id", F.lit(run_id))
                .withColumn("kind", F.lit(kind))
                .withColumn("written_at", F.current_timestamp()))

    batch(0, FIRST_ROWS, "overwrite").write.format("delta").mode("overwrite") \
        .option("overwriteSchema", "true").save(path)
    base_version = _latest_version(spark, path)

    batch(FIRST_ROWS, APPENDED_ROWS, "append").write.format("delta").mode("append").save(path)
    latest_version = _latest_version(spark, path)
    _expect(latest_version == base_version + 1,
            f"append should create version {base_version + 1}, the Delta log says {latest_version} "
            "(is another writer using this table?)")

    counts = spark.read.format("delta").load(path).agg(
        F.count(F.lit(1)).alias("rows"), F.sum(F.when(F.col("run_id") == run_id, 1).otherwise(0)).alias("ours")
    ).first()
    latest_rows, ours = int(counts["rows"]), int(counts["ours"] or 0)
    _expect(latest_rows == FIRST_ROWS + APPENDED_ROWS,
            f"latest version {latest_version} has {latest_rows} rows, expected {FIRST_ROWS + APPENDED_ROWS}")
    _expect(ours == latest_rows, f"only {ours}/{latest_rows} rows of version {latest_version} are from this run")

    previous_rows = spark.read.format("delta").option("versionAsOf", base_version).load(path).count()
    _expect(previous_rows == FIRST_ROWS,
            f"time travel to version {base_version} found {previous_rows} rows, expected {FIRST_ROWS}")
    return {"table": path, "base_version": base_version, "latest_version": latest_version,
            "latest_rows": latest_rows, "time_travel_rows": previous_rows}


def check_kafka(spark, bootstrap: str, topic: str) -> dict[str, Any]:
    from pyspark.sql import functions as F

    try:
        frame = (spark.read.format("kafka")
                 .option("kafka.bootstrap.servers", bootstrap)
                 .option("subscribe", topic)
                 .option("startingOffsets", "earliest")
                 .option("endingOffsets", "latest")
                 .load())
        stats = frame.agg(F.count(F.lit(1)).alias("rows"), F.max("offset").alias("max_offset")).first()
    except Exception as exc:  # noqa: BLE001 - Py4J/analysis errors; the root cause is what matters
        raise CheckFailed(
            f"batch read of Kafka topic {topic!r} at {bootstrap} failed: {describe_error(exc)} "
            "(the Kafka platform check creates and writes this topic: run it first)"
        ) from exc
    rows = int(stats["rows"])
    _expect(rows >= 1, f"Kafka topic {topic!r} at {bootstrap} is empty: run the Kafka platform check first")
    return {"bootstrap_servers": bootstrap, "topic": topic, "rows": rows, "max_offset": stats["max_offset"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    summary: dict[str, Any] = {"check": CHECK_NAME, "ok": False, "lake_root": args.lake_root,
                               "run_id": uuid.uuid4().hex}
    spark = None
    try:
        spark = get_session()
        summary["spark_version"] = spark.version
        summary["session_s"] = round(time.monotonic() - started, 2)
        mark = time.monotonic()
        summary["delta"] = check_delta(spark, args.lake_root, summary["run_id"])
        summary["delta_s"] = round(time.monotonic() - mark, 2)
        if not args.skip_kafka:
            mark = time.monotonic()
            summary["kafka"] = check_kafka(spark, args.kafka_bootstrap, args.topic)
            summary["kafka_s"] = round(time.monotonic() - mark, 2)
        summary["ok"] = True
    except CheckFailed as exc:
        summary["error"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - report anything else as a failed check too, then exit 1
        summary["error"] = describe_error(exc)
    finally:
        summary["total_s"] = round(time.monotonic() - started, 2)
        if spark is not None:
            spark.stop()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return emit_summary(CHECK_NAME, run(args), args.summary_path)


if __name__ == "__main__":
    sys.exit(main())
