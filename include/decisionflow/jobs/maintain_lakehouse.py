"""Spark application: maintain the lakehouse - OPTIMIZE/Z-ORDER, VACUUM, and the data-quality report.

    spark-submit <decisionflow conf and jars> maintain_lakehouse.py --lake-root /tmp/lake \\
        [--retention-hours 168] [--allow-short-retention] [--vacuum-lite] [--skip-optimize] [--skip-vacuum] \\
        [--skip-report]

1. ``OPTIMIZE`` every declared silver/quarantine/gold table, ``ZORDER BY`` its declared columns
   (``decisionflow.lakehouse.tables``), compaction where none are declared;
2. ``VACUUM`` with ``--retention-hours`` (default 168 = 7 days). Less than 168 h is refused unless
   ``--allow-short-retention`` (exit 2), as Delta does: time travel and running readers need those files;
3. the data-quality report (per-table row counts, null shares per column, quarantine share by reason, Delta
   versions) written to ``<lake root>/_reports/quality/<UTC timestamp>.json``.

Bronze is read for the report only (its maintenance belongs to the bronze job). Prints one JSON line with the
OPTIMIZE/VACUUM results, the report path and the report itself; exits 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

JOB_NAME = "maintain_lakehouse"
ENV_LAKE_ROOT = "DECISIONFLOW_LAKE_ROOT"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from decisionflow.lakehouse.maintenance import DEFAULT_RETENTION_HOURS, RetentionError, check_retention

    parser = argparse.ArgumentParser(prog=JOB_NAME, description=__doc__.split("\n", 1)[0])
    parser.add_argument("--lake-root", default=os.environ.get(ENV_LAKE_ROOT),
                        help=f"lake root (path or object-store URI); default ${ENV_LAKE_ROOT}")
    parser.add_argument("--retention-hours", type=float, default=DEFAULT_RETENTION_HOURS,
                        help="VACUUM retention in hours (default %(default)g)")
    parser.add_argument("--allow-short-retention", action="store_true",
                        help=f"allow a retention below {DEFAULT_RETENTION_HOURS:g} h (breaks time travel)")
    parser.add_argument("--vacuum-lite", action="store_true",
                        help="VACUUM LITE: only files the Delta log removed, no directory listing (faster)")
    parser.add_argument("--skip-optimize", action="store_true")
    parser.add_argument("--skip-vacuum", action="store_true")
    parser.add_argument("--skip-report", action="store_true")
    parser.add_argument("--summary-path", help="also write the JSON summary to this file")
    args = parser.parse_args(argv)
    if not args.lake_root:
        parser.error(f"no lake root: pass --lake-root or set {ENV_LAKE_ROOT}")
    if not args.skip_vacuum:
        try:
            check_retention(args.retention_hours, args.allow_short_retention)
        except RetentionError as exc:
            parser.error(str(exc))
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
    from decisionflow.lakehouse import maintenance, quality

    started = time.monotonic()
    summary: dict[str, Any] = {"job": JOB_NAME, "ok": False, "lake_root": args.lake_root}
    spark, owned = None, False
    try:
        spark, owned = get_session()
        if not args.skip_optimize:
            mark = time.monotonic()
            summary["optimize"] = maintenance.optimize(spark, args.lake_root)
            summary["optimize_s"] = round(time.monotonic() - mark, 2)
        if not args.skip_vacuum:
            mark = time.monotonic()
            summary["vacuum"] = maintenance.vacuum(spark, args.lake_root, args.retention_hours,
                                                   allow_short_retention=args.allow_short_retention,
                                                   lite=args.vacuum_lite)
            summary["vacuum_s"] = round(time.monotonic() - mark, 2)
        if not args.skip_report:
            mark = time.monotonic()
            report = quality.quality_report(spark, args.lake_root)
            summary["report_path"] = quality.write_report(spark, args.lake_root, report)
            summary["report"] = report
            summary["report_s"] = round(time.monotonic() - mark, 2)
        summary["ok"] = True
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
