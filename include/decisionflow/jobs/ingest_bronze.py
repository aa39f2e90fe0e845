"""Spark application: ingest the Kafka source topics into the bronze Delta tables, exactly once, then stop.

One Structured Streaming query per topic (Kafka source -> Delta sink, ``trigger(availableNow=True)``), each
with its own checkpoint under ``<lake root>/_checkpoints/bronze/<table>``; see
:mod:`decisionflow.lakehouse.bronze` for the schema and the exactly-once argument. Run by a DAG through
``DeltaSparkSubmitOperator`` (which passes ``DECISIONFLOW_LAKE_ROOT`` and
``DECISIONFLOW_KAFKA_BOOTSTRAP_SERVERS``), or by hand::

    spark-submit <decisionflow conf and jars> ingest_bronze.py --lake-root /tmp/lake \\
        --bootstrap-servers 127.0.0.1:9092 [--topics transactions] [--max-offsets-per-trigger 50000]

(``decisionflow.spark.conf.spark_submit_argv`` builds that command line.) Run with plain ``python`` it builds
its own local session with the same setup.

Prints one JSON line when done::

    {"job": "ingest_bronze", "ok": true, "rows_added": 3120, "tables": {"transactions": {"rows_added": 2817,
     "batches": 1, "max_offsets": {"0": 951, "1": 930, "2": 933}, "delta_version": 1, ...}, ...}, ...}

Exit code 0 when every query finished, 1 when a topic is missing, the broker unreachable or a query failed
(the summary's ``error``/``errors`` say which and why), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from decisionflow.lakehouse.bronze import (
    AUTO,
    DEFAULT_MAX_OFFSETS_PER_TRIGGER,
    BronzeError,
    IngestOptions,
    bronze_source,
    default_sources,
    ingest,
    root_cause,
)
from decisionflow.jobs._app import exit_code, record_failure

ENV_LAKE_ROOT = "DECISIONFLOW_LAKE_ROOT"  # the same names as decisionflow.spark.conf (not imported: no need)
ENV_KAFKA_BOOTSTRAP = "DECISIONFLOW_KAFKA_BOOTSTRAP_SERVERS"
JOB_NAME = "ingest_bronze"


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _min_partitions(text: str) -> int | str | None:
    lowered = text.strip().lower()
    if lowered == AUTO:
        return AUTO
    if lowered == "none":
        return None
    return _positive(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=JOB_NAME, description=__doc__.split("\n", 1)[0])
    parser.add_argument("--topics", nargs="+", metavar="TOPIC[=TABLE]", default=None,
                        help="topics to ingest (default: transactions transaction-labels case-notes); another "
                             "topic needs =TABLE, its bronze table name")
    parser.add_argument("--lake-root", default=os.environ.get(ENV_LAKE_ROOT),
                        help=f"lake root (path or URI); default ${ENV_LAKE_ROOT}")
    parser.add_argument("--bootstrap-servers", default=os.environ.get(ENV_KAFKA_BOOTSTRAP),
                        help=f"Kafka bootstrap servers; default ${ENV_KAFKA_BOOTSTRAP}")
    parser.add_argument("--max-offsets-per-trigger", type=_positive, default=DEFAULT_MAX_OFFSETS_PER_TRIGGER,
                        help="records per micro-batch and topic (default %(default)s)")
    parser.add_argument("--min-partitions", type=_min_partitions, default=AUTO, metavar="N|auto|none",
                        help="Spark tasks per micro-batch: a number, 'none' (one per Kafka partition) or 'auto' "
                             "(default: a multiple of the cores, so that no wave runs half empty)")
    parser.add_argument("--fail-on-data-loss", action=argparse.BooleanOptionalAction, default=True,
                        help="fail when offsets to read were already deleted by retention (default: fail)")
    parser.add_argument("--kafka-option", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="extra Kafka source option, e.g. kafka.receive.buffer.bytes=4194304 (repeatable)")
    parser.add_argument("--summary-path", help="also write the JSON summary to this file")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the arguments; ``args.sources`` and ``args.options`` are ready to use."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.lake_root:
        parser.error(f"no lake root: pass --lake-root or set {ENV_LAKE_ROOT}")
    if not args.bootstrap_servers:
        parser.error(f"no Kafka bootstrap servers: pass --bootstrap-servers or set {ENV_KAFKA_BOOTSTRAP}")
    try:
        args.sources = [bronze_source(spec) for spec in args.topics] if args.topics else default_sources()
        if len({s.table for s in args.sources}) != len(args.sources):
            raise ValueError(f"each topic must land in its own table, got {[s.table for s in args.sources]}")
        args.options = IngestOptions(
            bootstrap_servers=args.bootstrap_servers,
            max_offsets_per_trigger=args.max_offsets_per_trigger,
            fail_on_data_loss=args.fail_on_data_loss,
            min_partitions=args.min_partitions,
            kafka_options=dict(args.kafka_option),
        )
    except ValueError as exc:
        parser.error(str(exc))
    args.lake_root = args.lake_root.rstrip("/") or args.lake_root
    return args


def get_session():
    """The session spark-submit configured, or (plain ``python``) a local one with the decisionflow setup."""
    if "PYSPARK_GATEWAY_PORT" in os.environ:  # launched by spark-submit: the conf is already in place
        from pyspark.sql import SparkSession

        return SparkSession.builder.appName(JOB_NAME).getOrCreate()
    from decisionflow.spark.conf import local_spark_session

    return local_spark_session(JOB_NAME)


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    summary: dict[str, Any] = {"job": JOB_NAME, "ok": False, "lake_root": args.lake_root,
                               "bootstrap_servers": args.bootstrap_servers,
                               "topics": [s.topic for s in args.sources]}
    spark = None
    try:
        spark = get_session()
        session_s = time.monotonic() - started
        summary = {**summary, **ingest(spark, args.lake_root, args.sources, args.options)}
        summary["session_s"] = round(session_s, 3)
        if summary["errors"]:
            summary["error"] = "; ".join(f"{table}: {message}" for table, message in summary["errors"].items())
    except BronzeError as exc:
        record_failure(summary, exc, str(exc))
    except Exception as exc:  # noqa: BLE001 - report anything else as a failed run too, then exit 1 (3: not retryable)
        record_failure(summary, exc, root_cause(exc))
    finally:
        if spark is not None:
            spark.stop()
        summary["total_s"] = round(time.monotonic() - started, 3)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = run(args)
    line = json.dumps(summary, sort_keys=True, default=str)
    print(line, flush=True)
    if args.summary_path:
        with open(args.summary_path, "w") as handle:
            handle.write(line + "\n")
    return exit_code(JOB_NAME, summary)


if __name__ == "__main__":
    sys.exit(main())
