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


def record_failure(summary: dict[str, Any], exc: BaseException, error: str | None = None) -> None:
    """Put a failure into the summary: ``error`` (default: :func:`describe_error`), and for a
    :class:`~decisionflow.exceptions.NonRetryableError` also ``non_retryable`` (layer, cause, remedy), which makes
    :func:`emit_summary` exit with :data:`~decisionflow.exceptions.EXIT_NON_RETRYABLE` and print the marker line
    the Spark operator turns into a failure without retries."""
    from decisionflow.exceptions import describe_failure, is_non_retryable

    summary["error"] = error if error is not None else describe_error(exc)
    if is_non_retryable(exc):
        failure = describe_failure(exc, layer="spark")
        summary["non_retryable"] = {"layer": failure.layer, "cause": failure.cause, "remedy": failure.remedy}


def exit_code(name: str, summary: dict[str, Any]) -> int:
    """Report a failed summary on stderr; the exit code: 0 ok, :data:`~decisionflow.exceptions.EXIT_NON_RETRYABLE`
    (after the marker line) when it failed on a NonRetryableError, else 1."""
    if summary.get("ok"):
        return 0
    print(f"{name} FAILED: {summary.get('error')}", file=sys.stderr, flush=True)
    verdict = summary.get("non_retryable")
    if verdict:
        from decisionflow.exceptions import EXIT_NON_RETRYABLE, Failure, non_retryable_marker

        print(non_retryable_marker(Failure(str(verdict.get("layer") or "spark"), str(verdict.get("cause") or ""),
                                           str(verdict.get("remedy") or ""), True)), file=sys.stderr, flush=True)
        return EXIT_NON_RETRYABLE
    return 1


def emit_summary(name: str, summary: dict[str, Any], summary_path: str | None) -> int:
    """Print the summary as one JSON line (and write it to ``summary_path``); the exit code: 0 ok, 3 failed on a
    NonRetryableError (see :func:`exit_code`), else 1."""
    line = json.dumps(summary, sort_keys=True, default=str)
    print(line, flush=True)
    if summary_path:
        with open(summary_path, "w") as handle:
            handle.write(line + "\n")
    return exit_code(name, summary)
