"""Spark application: build the lakehouse - silver (bronze -> silver + quarantine) and gold - with quality gates.

Run by Airflow through ``DeltaSparkSubmitOperator`` (lake root in ``DECISIONFLOW_LAKE_ROOT``). By hand::

    spark-submit <decisionflow conf and jars> build_lakehouse.py --lake-root /tmp/lake --stage all

(``decisionflow.spark.conf.spark_submit_argv`` builds that command line.) Run with plain ``python`` it builds
its own local session with the same setup.

Steps: create missing tables / apply pending migrations (``--no-migrate`` skips it), then ``--stage``:

* ``silver`` - each source topic's new bronze records (Delta stream, availableNow) into silver and
  quarantine (``decisionflow.lakehouse.silver``);
* ``gold`` - account/merchant features and enriched transactions, recomputing what changed
  (``decisionflow.lakehouse.gold``; ``--full-refresh`` recomputes everything);
* ``all`` - both, in that order (the default).

Prints one JSON line: per table rows in / out / quarantined and the Delta versions before and after (the
lineage a training run records), per-stage details and timings. A failed quality gate prints
``"ok": false`` with the gate's message (table, rule, counts) and exits 1; a usage error exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from decisionflow.jobs._app import emit_summary, get_session, record_failure, setup_logging

JOB_NAME = "build_lakehouse"
ENV_LAKE_ROOT = "DECISIONFLOW_LAKE_ROOT"
STAGES = ("silver", "gold", "all")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=JOB_NAME, description=__doc__.split("\n", 1)[0])
    parser.add_argument("--lake-root", default=os.environ.get(ENV_LAKE_ROOT),
                        help=f"lake root (path or object-store URI); default ${ENV_LAKE_ROOT}")
    parser.add_argument("--stage", choices=STAGES, default="all", help="what to build (default %(default)s)")
    parser.add_argument("--full-refresh", action="store_true", help="gold: recompute every row (still MERGE-only)")
    parser.add_argument("--no-migrate", action="store_true", help="do not create/migrate tables first")
    parser.add_argument("--max-value-bytes", type=int, default=None,
                        help="silver: quarantine values above this size as oversized (default 65536)")
    parser.add_argument("--max-files-per-trigger", type=int, default=None,
                        help="silver: bronze files per micro-batch (Delta default 1000)")
    parser.add_argument("--summary-path", help="also write the JSON summary to this file")
    args = parser.parse_args(argv)
    if not args.lake_root:
        parser.error(f"no lake root: pass --lake-root or set {ENV_LAKE_ROOT}")
    return args


def table_lines(silver: dict[str, Any], gold: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The flat per-table view: rows in/out/quarantined and Delta versions before/after."""
    out: dict[str, dict[str, Any]] = {}
    for name, flow in silver.items():
        versions = flow["versions"]
        quarantine = name.replace("silver/", "quarantine/", 1)
        bronze = next((k for k in versions if k.startswith("bronze/")), None)
        if bronze:
            out[bronze] = {"version_before": versions[bronze]["before"], "version_after": versions[bronze]["after"]}
        out[name] = {"rows_in": flow["rows_in"], "rows_out": flow["inserted"], "duplicates": flow["duplicates"],
                     "quarantined": flow["quarantined"], "rows": flow["rows"].get(name),
                     "version_before": versions.get(name, {}).get("before"),
                     "version_after": versions.get(name, {}).get("after")}
        out[quarantine] = {"rows_in": flow["quarantined"], "rows_out": flow["quarantine_inserted"],
                           "by_reason": flow["by_reason"], "rows": flow["rows"].get(quarantine),
                           "version_before": versions.get(quarantine, {}).get("before"),
                           "version_after": versions.get(quarantine, {}).get("after")}
    for name, result in gold.items():
        out[name] = {"mode": result["mode"], "rows_in": result["source_rows"],
                     "rows_out": result["inserted"] + result["updated"], "deleted": result["deleted"],
                     "quarantined": 0, "rows": result["rows"], "sources": result["sources"],
                     "version_before": result["versions"]["before"], "version_after": result["versions"]["after"]}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from decisionflow.lakehouse import gold, maintenance, silver
    from decisionflow.lakehouse.quality import QualityGateError

    started = time.monotonic()
    summary: dict[str, Any] = {"job": JOB_NAME, "ok": False, "stage": args.stage, "lake_root": args.lake_root}
    silver_summary: dict[str, Any] = {}
    gold_summary: dict[str, Any] = {}
    spark, owned = None, False
    try:
        spark, owned = get_session(JOB_NAME)
        summary["spark_version"] = spark.version
        summary["session_s"] = round(time.monotonic() - started, 2)
        if not args.no_migrate:
            mark = time.monotonic()
            summary["migrations"] = {m["table"]: m["action"] for m in maintenance.migrate(spark, args.lake_root)}
            summary["migrate_s"] = round(time.monotonic() - mark, 2)
        if args.stage in ("silver", "all"):
            mark = time.monotonic()
            options: dict[str, Any] = {}
            if args.max_value_bytes:
                options["max_value_bytes"] = args.max_value_bytes
            if args.max_files_per_trigger:
                options["max_files_per_trigger"] = args.max_files_per_trigger
            silver_summary = silver.summarize(silver.run_silver(spark, args.lake_root, **options))
            summary["silver"] = silver_summary
            summary["silver_s"] = round(time.monotonic() - mark, 2)
        if args.stage in ("gold", "all"):
            mark = time.monotonic()
            gold_summary = gold.summarize(gold.run_gold(spark, args.lake_root, full_refresh=args.full_refresh))
            summary["gold"] = gold_summary
            summary["gold_s"] = round(time.monotonic() - mark, 2)
        summary["tables"] = table_lines(silver_summary, gold_summary)
        summary["ok"] = True
    except QualityGateError as exc:
        record_failure(summary, exc, str(exc))
        summary["failed_gate"] = {"table": exc.table, "rule": exc.rule, "counts": exc.counts}
    except Exception as exc:  # noqa: BLE001 - any failure is reported in the summary, then exit 1 (3: not retryable)
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
