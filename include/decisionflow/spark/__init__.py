"""Spark + Delta Lake plumbing shared by the ``DeltaSparkSubmitOperator``, the Spark jobs and the tests.

Import-light on purpose: nothing here imports pyspark until a session is actually requested.
"""

from __future__ import annotations

from decisionflow.spark.conf import (
    ENV_KAFKA_BOOTSTRAP,
    ENV_LAKE_ROOT,
    MissingJarsError,
    connector_jars,
    local_spark_session,
    python_executable,
    spark_conf,
    spark_env,
    spark_home,
    spark_submit_argv,
    spark_submit_binary,
)

__all__ = [
    "ENV_KAFKA_BOOTSTRAP",
    "ENV_LAKE_ROOT",
    "MissingJarsError",
    "connector_jars",
    "local_spark_session",
    "python_executable",
    "spark_conf",
    "spark_env",
    "spark_home",
    "spark_submit_argv",
    "spark_submit_binary",
]
