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
import os
import sys
import time
from typing import Any

from decisionflow.jobs._app import emit_summary, get_session, record_failure, setup_logging

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


def run(args: argparse.Namespace) -> dict[str, Any]:
    from decisionflow.lakehouse import maintenance
    from decisionflow.lakehouse.tables import IncompatibleTableError, table

    started = time.monotonic()
    summary: dict[str, Any] = {"job": JOB_NAME, "ok": False, "lake_root": args.lake_root, "dry_run": args.dry_run}
    spark, owned = None, False
    try:
        specs = [table(name) for name in args.tables] if args.tables else None
        spark, owned = get_session(JOB_NAME)
        summary["tables"] = maintenance.migrate(spark, args.lake_root, specs, dry_run=args.dry_run)
        summary["ok"] = True
    except IncompatibleTableError as exc:
        record_failure(summary, exc, str(exc))
        summary["incompatible"] = {"table": exc.table, "column": exc.column}
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
