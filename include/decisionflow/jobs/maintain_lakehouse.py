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
import os
import sys
import time
from typing import Any

from decisionflow.jobs._app import emit_summary, get_session, record_failure, setup_logging

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


def run(args: argparse.Namespace) -> dict[str, Any]:
    from decisionflow.lakehouse import maintenance, quality

    started = time.monotonic()
    summary: dict[str, Any] = {"job": JOB_NAME, "ok": False, "lake_root": args.lake_root}
    spark, owned = None, False
    try:
        spark, owned = get_session(JOB_NAME)
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
    except Exception as exc:  # noqa: BLE001 - reported in the summary, then exit 1 (3: not retryable)
        record_failure(summary, exc)
    finally:
        summary["total_s"] = round(time.monotonic() - started, 2)
        if spark is not None and owned:
            spark.stop()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    return emit_summary(JOB_NAME, run(args), args.summary_path)


if __name__ == "__main__":
    sys.exit(main())
