"""Spark jobs on the decisionflow lakehouse: the provider's ``SparkSubmitOperator`` with Delta + Kafka wired in."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from decisionflow.exceptions import NonRetryableError
from decisionflow.operators.base import DecisionflowOperatorMixin

if TYPE_CHECKING:
    from airflow.sdk import Context

DEFAULT_DRIVER_MEMORY = "1g"  # kept equal to decisionflow.spark.conf.DEFAULT_DRIVER_MEMORY (not imported: parse speed)


class SparkJobError(RuntimeError):
    """A decisionflow Spark application failed; ``cause`` is the application's own error line."""

    def __init__(self, application: str, layer: str, cause: str, remedy: str = "") -> None:
        self.application, self.layer, self.cause, self.remedy = application, layer, cause, remedy
        super().__init__(f"[{layer}] Spark job {application}: {cause}" + (f" -- remedy: {remedy}" if remedy else ""))


class NonRetryableSparkJobError(NonRetryableError, SparkJobError):
    """A decisionflow Spark application ended on a :class:`~decisionflow.exceptions.NonRetryableError`."""


class DeltaSparkSubmitOperator(DecisionflowOperatorMixin, SparkSubmitOperator):
    """
    Run a Spark application against the decisionflow lake and Kafka with ``spark-submit``.

    It is the provider's :class:`~airflow.providers.apache.spark.operators.spark_submit.SparkSubmitOperator`
    (same connection ``spark_default``, same logging, kill and retry behaviour) plus, at execute time:

    * ``--jars``: the Spark connector jars fetched by ``make jars`` (Delta, Kafka source/sink), then ``jars``;
      a missing jar folder fails the task with "run `make jars`";
    * ``--conf``: Delta's SQL extension and catalog and local-friendly defaults (loopback driver, no UI,
      few shuffle partitions, this environment's Python) from :func:`decisionflow.spark.conf.spark_conf`,
      then ``conf``;
    * environment: ``SPARK_HOME`` and ``PATH`` pointing at the pip-installed pyspark of this environment
      (its ``spark-submit``), plus ``DECISIONFLOW_LAKE_ROOT`` from the lake connection and
      ``DECISIONFLOW_KAFKA_BOOTSTRAP_SERVERS`` from the Kafka connection, which the application reads.

    Connections are only looked up in ``execute``, never while the DAG file is parsed.

    :param application: Path of the ``.py`` (or jar) to run. (templated)
    :param conf: Extra Spark properties, applied over the decisionflow defaults; a ``spark.sql.extensions``
        value is extended with Delta's rather than replacing it. (templated)
    :param jars: Extra comma-separated jars, added after the connector jars. (templated)
    :param driver_memory: Driver JVM heap (``--driver-memory``); with ``local[*]`` the driver is the whole
        job. Defaults to ``1g``.
    :param lake_conn_id: ``delta_lake`` connection whose root is passed as ``DECISIONFLOW_LAKE_ROOT``;
        ``None`` to pass none. Defaults to ``lake_default``.
    :param kafka_config_id: ``kafka`` connection whose ``bootstrap.servers`` is passed as
        ``DECISIONFLOW_KAFKA_BOOTSTRAP_SERVERS``; ``None`` for jobs that do not touch Kafka.
        Defaults to ``kafka_default``.
    :param shuffle_partitions: ``spark.sql.shuffle.partitions`` (also Delta's snapshot partitions).
        Defaults to 4: local data is small and every partition is a task.
    :param spark_ui: Start the Spark UI (bound to 127.0.0.1). Defaults to ``False``.
    :param fast_start: Run the driver JVM with C1-only JIT and the serial GC, which starts short local jobs
        markedly quicker and smaller on a busy 2-core machine; set ``False`` for long CPU-heavy jobs.
        Defaults to ``True``.
    :param pool: Airflow pool; ``spark`` by default so that local jobs do not compete for the cores.
    :param name: Spark application name. (templated)
    :param kwargs: Everything else :class:`SparkSubmitOperator` accepts (``application_args``, ``env_vars``,
        ``conn_id``, ``py_files``, ``verbose``...) and the usual ``BaseOperator`` arguments.
    """

    layer = "spark"

    template_fields: Sequence[str] = (*SparkSubmitOperator.template_fields, "lake_conn_id", "kafka_config_id")
    ui_color = "#fdf1e3"

    def __init__(
        self,
        *,
        application: str,
        conf: dict[str, Any] | None = None,
        jars: str | None = None,
        driver_memory: str = DEFAULT_DRIVER_MEMORY,
        lake_conn_id: str | None = "lake_default",
        kafka_config_id: str | None = "kafka_default",
        shuffle_partitions: int = 4,
        spark_ui: bool = False,
        fast_start: bool = True,
        pool: str = "spark",
        name: str = "decisionflow-spark",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            application=application, conf=conf, jars=jars, driver_memory=driver_memory, pool=pool, name=name, **kwargs
        )
        self.lake_conn_id = lake_conn_id
        self.kafka_config_id = kafka_config_id
        self.shuffle_partitions = shuffle_partitions
        self.spark_ui = spark_ui
        self.fast_start = fast_start
        self._submit_prepared = False

    def endpoints(self) -> tuple[str | None, str | None]:
        """(lake root, Kafka bootstrap servers) from the connections, for the application's environment."""
        lake_root = kafka_bootstrap = None
        if self.lake_conn_id:
            from decisionflow.hooks.lake import LakeHook

            lake_root = LakeHook(lake_conn_id=self.lake_conn_id).root
        if self.kafka_config_id:
            from decisionflow.hooks.kafka import KafkaHook

            kafka_bootstrap = KafkaHook(kafka_config_id=self.kafka_config_id).bootstrap_servers
        return lake_root, kafka_bootstrap

    def prepare_submit(self) -> None:
        """Fill ``jars``, ``conf`` and ``env_vars`` with the decisionflow setup (idempotent; run by ``execute``)."""
        if self._submit_prepared:
            return
        from decisionflow.spark.conf import connector_jars, spark_conf, spark_env

        jar_list = [str(path) for path in connector_jars()]
        extra = [j.strip() for j in (self.jars or "").split(",") if j.strip()]
        self.jars = ",".join([*jar_list, *(j for j in extra if j not in jar_list)])
        self.conf = spark_conf(
            self.conf, shuffle_partitions=self.shuffle_partitions, ui=self.spark_ui, fast_start=self.fast_start
        )
        lake_root, kafka_bootstrap = self.endpoints()
        self.env_vars = {**spark_env(lake_root, kafka_bootstrap), **(self.env_vars or {})}
        self._submit_prepared = True
        self.log.info("Lake root: %s; Kafka bootstrap: %s; %d connector jar(s)", lake_root, kafka_bootstrap, len(jar_list))

    def _get_hook(self):
        """The provider's hook, its spark-submit output also read for the application's verdict lines."""
        hook = super()._get_hook()
        process = hook._process_spark_submit_log
        seen: dict[str, Any] = {}

        def watch(lines):
            from decisionflow.exceptions import NON_RETRYABLE_MARKER, parse_non_retryable_marker

            for line in lines:
                if NON_RETRYABLE_MARKER in line:
                    seen["non_retryable"] = parse_non_retryable_marker(line)
                elif " FAILED: " in line:
                    seen["failed"] = line.strip().split(" FAILED: ", 1)[1]
                yield line

        hook._process_spark_submit_log = lambda itr: process(watch(itr))
        hook._decisionflow_verdict = seen
        return hook

    def execute(self, context: Context) -> None:
        """Prepare the Delta + Kafka setup, then spark-submit exactly as the provider's operator does.

        When the application failed, the task fails with its own error line rather than spark-submit's command
        line: :class:`SparkJobError` (retried), or :class:`NonRetryableSparkJobError` (not retried) when the job
        ended on a :class:`~decisionflow.exceptions.NonRetryableError` (its marker line, or exit code
        :data:`~decisionflow.exceptions.EXIT_NON_RETRYABLE`).
        """
        from airflow.exceptions import AirflowException

        self.prepare_submit()
        try:
            return super().execute(context)
        except AirflowException as exc:
            from decisionflow.exceptions import EXIT_NON_RETRYABLE, REMEDY_NON_RETRYABLE, Failure

            seen = getattr(self._hook, "_decisionflow_verdict", None) or {}
            process = getattr(self._hook, "_submit_sp", None)
            failure = seen.get("non_retryable")
            if failure is None and getattr(process, "returncode", None) == EXIT_NON_RETRYABLE:
                failure = Failure("spark", seen.get("failed") or str(exc), REMEDY_NON_RETRYABLE, True)
            if failure is not None:
                raise NonRetryableSparkJobError(self.name, failure.layer, failure.cause, failure.remedy) from exc
            if seen.get("failed"):
                raise SparkJobError(self.name, "spark", seen["failed"], "") from exc
            raise


class DeltaMigrateOperator(DeltaSparkSubmitOperator):
    """
    Create and migrate the declared lakehouse tables with Spark, only when a Delta log says a table needs it.

    Before submitting, it reads each declared table's Delta log with delta-rs
    (:func:`decisionflow.lakehouse.maintenance.tables_needing_migration`, well under a second): when every
    table exists at its declared schema version, properties and partitioning, the task logs that and ends
    without starting a JVM (the Spark job costs 30-60 s on a small machine, on every ``build_lakehouse`` run).
    Otherwise it logs which tables and why, and runs the migrate job like :class:`DeltaSparkSubmitOperator`.

    :param application: The migrate job. Defaults to the packaged ``decisionflow/jobs/migrate_lakehouse.py``.
    :param always_submit: Run the Spark job even when nothing is pending. Defaults to ``False``.
    :param kwargs: Everything :class:`DeltaSparkSubmitOperator` accepts.
    """

    def __init__(self, *, application: str | None = None, always_submit: bool = False, **kwargs: Any) -> None:
        if application is None:
            from pathlib import Path

            import decisionflow.jobs

            application = str(Path(decisionflow.jobs.__file__).parent / "migrate_lakehouse.py")
        kwargs.setdefault("name", "migrate_lakehouse")
        super().__init__(application=application, **kwargs)
        self.always_submit = always_submit

    def execute(self, context: Context) -> None:
        if not self.always_submit and self.lake_conn_id:
            from decisionflow.hooks.lake import LakeHook
            from decisionflow.lakehouse.maintenance import tables_needing_migration

            lake = LakeHook(lake_conn_id=self.lake_conn_id)
            needed = tables_needing_migration(lake.root, lake.storage_options)
            if not needed:
                self.log.info("every declared table is at its declared schema version: nothing to migrate, "
                              "Spark job not started")
                return None
            self.log.info("tables to create or migrate: %s", needed)
        return super().execute(context)
