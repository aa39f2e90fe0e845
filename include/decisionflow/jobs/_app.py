"""What every decisionflow Spark application shares: its session, its logging, its one-line JSON verdict.

Imported by the applications spark-submit runs (the driver uses the project's venv, so the package is there).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any


def get_session(app_name: str):
    """``(session, owned)``: the session spark-submit configured, an already active one (in-process callers
    such as tests; not ours to stop), or (plain ``python``) a new local one with the decisionflow setup."""
    from pyspark.sql import SparkSession

    if "PYSPARK_GATEWAY_PORT" in os.environ and SparkSession.getActiveSession() is None:
        return SparkSession.builder.appName(app_name).getOrCreate(), True
    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    from decisionflow.spark.conf import local_spark_session

    return local_spark_session(app_name), True


def describe_error(exc: BaseException) -> str:
    """One line for a failure: the root cause of a JVM exception (Py4J / captured), else the first line."""
    java = getattr(exc, "java_exception", None) or getattr(exc, "_origin", None)
    if java is not None:
        try:
            while java.getCause() is not None:
                java = java.getCause()
            return str(java.toString())
        except Exception:  # noqa: BLE001 - the gateway may already be gone; fall back to the Python text
            pass
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


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


def emit_summary(name: str, summary: dict[str, Any], summary_path: str | None) -> int:
    """Print the summary as one JSON line (and write it to ``summary_path``); the exit code: 0 ok, else 1."""
    line = json.dumps(summary, sort_keys=True, default=str)
    print(line, flush=True)
    if summary_path:
        with open(summary_path, "w") as handle:
            handle.write(line + "\n")
    if not summary["ok"]:
        print(f"{name} FAILED: {summary['error']}", file=sys.stderr, flush=True)
        return 1
    return 0
