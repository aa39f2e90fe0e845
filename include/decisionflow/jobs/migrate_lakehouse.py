"""Spark application: create the declared lakehouse tables and apply pending schema migrations.

Idempotent: missing tables are created at their latest schema version, existing ones get the migrations
above the version recorded in their ``decisionflow.schema_version`` property, in order; a second run
changes nothing. An existing table that does not match its declaration is refused with a message naming the
table and the column (exit 1), before anything is changed on it. See ``decisionflow.lakehouse.tables``.

    spark-submit <decisionflow conf and jars> migrate_lakehouse.py --lake-root /tmp/lake [--dry-run]

Prints one JSON line: per table the action (created / migrated / adopted / properties-updated /
up-to-date), the versions and the statements run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

JOB_NAME = "migrate_lakehouse"
ENV_LAKE_ROOT = "DECISIONFLOW_LAKE_ROOT"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=JOB_NAME, description=__doc__.split("\n", 1)[0])
    parser.add_argument("--lake-root", default=os.environ.get(ENV_LAKE_ROOT),
                        help=f"lake root (path or object-store URI); default ${ENV_LAKE_ROOT}")
    parser.add_argument("--dry-run", action="store_true", help="only say what would be done")
    parser.add_argument("--tables", nargs="+", help="only these declared tables (default: all)")
    parser.add_argument("--summary-path", help="also write the JSON summary to this file")
    args = parser.parse_args(argv)
    if not args.lake_root:
        parser.error(f"no lake root: pass --lake-root or set {ENV_LAKE_ROOT}")
    return args


def get_session():
    """``(session, owned)``: the session spark-submit configured, an already active one (in-process callers
    such as tests; not ours to stop), or (plain ``python``) a new local one with the decisionflow setup."""
    from pyspark.sql import SparkSession

    if "PYSPARK_GATEWAY_PORT" in os.environ and SparkSession.getActiveSession() is None:
        return SparkSession.builder.appName(JOB_NAME).getOrCreate(), True
    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    from decisionflow.spark.conf import local_spark_session

    return local_spark_session(JOB_NAME), True


def run(args: argparse.Namespace) -> dict[str, Any]:
    from decisionflow.jobs.platform_check_lakehouse import describe_error
    from decisionflow.lakehouse import maintenance
    from decisionflow.lakehouse.tables import IncompatibleTableError, table

    started = time.monotonic()
    summary: dict[str, Any] = {"job": JOB_NAME, "ok": False, "lake_root": args.lake_root, "dry_run": args.dry_run}
    spark, owned = None, False
    try:
        specs = [table(name) for name in args.tables] if args.tables else None
        spark, owned = get_session()
        summary["tables"] = maintenance.migrate(spark, args.lake_root, specs, dry_run=args.dry_run)
        summary["ok"] = True
    except IncompatibleTableError as exc:
        summary["error"] = str(exc)
        summary["incompatible"] = {"table": exc.table, "column": exc.column}
    except Exception as exc:  # noqa: BLE001
        summary["error"] = describe_error(exc)
    finally:
        summary["total_s"] = round(time.monotonic() - started, 2)
        if spark is not None and owned:
            spark.stop()
    return summary


def setup_logging() -> None:
    """decisionflow's INFO lines (per-batch accounting, statements run) to stderr; the root logger, which
    PySpark may already have configured, is left alone."""
    logger = logging.getLogger("decisionflow")
    if not any(getattr(h, "_decisionflow", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._decisionflow = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    summary = run(args)
    line = json.dumps(summary, sort_keys=True, default=str)
    print(line, flush=True)
    if args.summary_path:
        with open(args.summary_path, "w") as handle:
            handle.write(line + "\n")
    if not summary["ok"]:
        print(f"{JOB_NAME} FAILED: {summary['error']}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
