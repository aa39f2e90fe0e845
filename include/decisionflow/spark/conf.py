"""How decisionflow runs Spark: one function builds the conf, the env and the jar list for every entry point.

The ``DeltaSparkSubmitOperator`` (through the provider's ``SparkSubmitHook``), ``local_spark_session`` (tests,
notebooks) and ``spark_submit_argv`` (manual runs) all start from :func:`spark_conf`, :func:`spark_env` and
:func:`connector_jars`, so a job behaves the same whichever way it is launched.

Spark is the pip-installed ``pyspark`` of the environment this package runs in (its ``spark-submit`` and
``SPARK_HOME``), never a system Spark: the connector jars in ``.data/jars/spark`` (``make jars``) are built
for exactly that Spark / Scala version. Nothing here imports pyspark at module level.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from decisionflow import config
from decisionflow.exceptions import NonRetryableError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

#: Environment variables through which a Spark application receives the platform's endpoints.
ENV_LAKE_ROOT = "DECISIONFLOW_LAKE_ROOT"
ENV_KAFKA_BOOTSTRAP = "DECISIONFLOW_KAFKA_BOOTSTRAP_SERVERS"

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"

#: Jars the Delta + Kafka conf cannot work without (glob patterns inside the connector folder).
REQUIRED_JARS = {
    "delta-spark": "delta-spark_*.jar",
    "delta-storage": "delta-storage-*.jar",
    "spark-sql-kafka": "spark-sql-kafka-0-10_*.jar",
    "kafka-clients": "kafka-clients-*.jar",
}

DEFAULT_DRIVER_MEMORY = "1g"
DEFAULT_SHUFFLE_PARTITIONS = 4
#: JVM flags for short local jobs: C1-only JIT and the serial GC. On a small, busy machine this made the
#: platform check's spark-submit about 1.5-2x quicker and ~280 MiB smaller (C2 compilation competes with
#: the job for the cores); long CPU-heavy jobs should turn it off (``fast_start=False``).
FAST_START_JAVA_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
#: Spark SQL settings for the lakehouse build's small local batches: expressions are evaluated interpreted
#: instead of generating and compiling Java for every plan (and every task's projection). The silver
#: classification is one huge generated expression per contract; on ~3,000 events this cut the silver job's
#: CPU time by ~23% and gold's by ~22%, with identical tables. Applied around the stage by
#: :func:`sql_conf` (silver and gold only; ingest and the other jobs keep code generation). A session that
#: sets one of them explicitly (``--conf spark.sql.codegen.wholeStage=true``) keeps its own value.
SMALL_BATCH_SQL_CONF: dict[str, str] = {
    "spark.sql.codegen.wholeStage": "false",
    "spark.sql.codegen.factoryMode": "NO_CODEGEN",
}


class MissingJarsError(NonRetryableError, FileNotFoundError):
    """The Spark connector jars (Delta, Kafka) are not where ``make jars`` puts them."""

    def __init__(self, folder: Path, missing: Iterable[str]):
        self.folder = folder
        self.missing = sorted(missing)
        super().__init__(
            f"Spark connector jars missing in {folder} ({', '.join(self.missing)}): run `make jars` "
            "(Maven fetches them from jars/pom.xml), or point DECISIONFLOW_JARS at a folder that has them"
        )


def connector_jars(folder: str | os.PathLike | None = None) -> list[Path]:
    """The Spark connector jars, sorted; raises :class:`MissingJarsError` when the folder or a key jar is absent.

    :param folder: Folder holding the jars. Defaults to ``config.jar_paths().spark_connectors``
        (``$DECISIONFLOW_DATA/jars/spark``, or ``$DECISIONFLOW_JARS/spark``).
    """
    path = Path(folder) if folder is not None else config.jar_paths().spark_connectors
    if not path.is_dir():
        raise MissingJarsError(path, REQUIRED_JARS)
    missing = [name for name, pattern in REQUIRED_JARS.items() if not any(path.glob(pattern))]
    if missing:
        raise MissingJarsError(path, missing)
    return sorted(path.glob("*.jar"))


def spark_home() -> Path:
    """``SPARK_HOME`` of the pip-installed pyspark (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("pyspark")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("pyspark is not installed in this environment (pip install pyspark==4.2.0)")
    home = Path(next(iter(spec.submodule_search_locations)))
    if not (home / "jars").is_dir():
        raise FileNotFoundError(
            f"{home} has no jars/: it looks like the Spark Connect-only 'pyspark-client'; install the full 'pyspark'"
        )
    return home


def spark_submit_binary() -> Path:
    """The ``spark-submit`` of the environment: the venv's ``bin/spark-submit`` or ``$SPARK_HOME/bin``'s."""
    venv_bin = Path(sys.executable).parent / "spark-submit"
    if venv_bin.exists():
        return venv_bin
    candidate = spark_home() / "bin" / "spark-submit"
    if candidate.exists():
        return candidate
    raise FileNotFoundError(f"spark-submit not found next to {sys.executable} nor in {spark_home() / 'bin'}")


def python_executable() -> str:
    """Python used by the Spark driver and workers: the interpreter of this environment."""
    return sys.executable


def _merge_extensions(current: str | None) -> str:
    names = [name.strip() for name in (current or "").split(",") if name.strip()]
    if DELTA_EXTENSION not in names:
        names.append(DELTA_EXTENSION)
    return ",".join(names)


def spark_conf(
    overrides: Mapping[str, Any] | None = None,
    *,
    shuffle_partitions: int = DEFAULT_SHUFFLE_PARTITIONS,
    ui: bool = False,
    log_level: str = "WARN",
    warehouse_dir: str | os.PathLike | None = None,
    fast_start: bool = True,
) -> dict[str, str]:
    """Spark properties for a local Delta + Kafka job, with ``overrides`` applied last (values made ``str``).

    Delta's SQL extension is always kept: an ``spark.sql.extensions`` override is extended, not replaced.

    :param overrides: Extra or replacement Spark properties.
    :param shuffle_partitions: ``spark.sql.shuffle.partitions`` (and Delta's snapshot partitions); small,
        because the local data is small and each partition is a task.
    :param ui: Start the Spark UI (bound to 127.0.0.1 through ``SPARK_LOCAL_IP``); off by default.
    :param log_level: Driver log level once the context is up (``spark.log.level``).
    :param warehouse_dir: ``spark.sql.warehouse.dir``; defaults to ``$DECISIONFLOW_DATA/spark/warehouse``
        so no ``spark-warehouse/`` appears in whatever directory the job was launched from.
    :param fast_start: Add :data:`FAST_START_JAVA_OPTIONS` to the driver JVM (with ``local[*]`` the driver
        is the whole job); an ``spark.driver.extraJavaOptions`` override replaces them.
    """
    python = python_executable()
    conf: dict[str, str] = {
        "spark.sql.extensions": DELTA_EXTENSION,
        "spark.sql.catalog.spark_catalog": DELTA_CATALOG,
        "spark.driver.host": config.HOST,
        "spark.driver.bindAddress": config.HOST,
        "spark.ui.enabled": "true" if ui else "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.shuffle.partitions": str(shuffle_partitions),
        "spark.default.parallelism": str(shuffle_partitions),
        "spark.databricks.delta.snapshotPartitions": str(shuffle_partitions),
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.warehouse.dir": str(warehouse_dir or config.data_dir() / "spark" / "warehouse"),
        "spark.pyspark.python": python,
        "spark.pyspark.driver.python": python,
        "spark.log.level": log_level.upper(),
    }
    if fast_start:
        conf["spark.driver.extraJavaOptions"] = FAST_START_JAVA_OPTIONS
    for key, value in (overrides or {}).items():
        conf[str(key)] = str(value).lower() if isinstance(value, bool) else str(value)
    conf["spark.sql.extensions"] = _merge_extensions(conf.get("spark.sql.extensions"))
    return conf


@contextmanager
def sql_conf(spark: SparkSession, defaults: Mapping[str, str] | None) -> Iterator[None]:
    """Runtime SQL properties for the block: each of ``defaults`` the session has not set explicitly (a
    ``--conf`` of the submitter wins) is set, then unset again when the block ends."""
    added = [key for key in (defaults or {}) if spark.conf.get(key, None) is None]
    try:
        for key in added:
            spark.conf.set(key, defaults[key])
        yield
    finally:
        for key in added:
            spark.conf.unset(key)


def spark_env(
    lake_root: str | os.PathLike | None = None,
    kafka_bootstrap: str | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment for ``spark-submit``: this venv's Spark and Python first on PATH, loopback only, endpoints.

    :param lake_root: Passed to the application as ``DECISIONFLOW_LAKE_ROOT``.
    :param kafka_bootstrap: Passed to the application as ``DECISIONFLOW_KAFKA_BOOTSTRAP_SERVERS``.
    :param base: Environment whose ``PATH`` is extended (defaults to ``os.environ``); only the variables
        decisionflow sets are returned, the caller merges them over its own environment.
    """
    base = os.environ if base is None else base
    bin_dir = str(spark_submit_binary().parent)
    path = base.get("PATH", "")
    env = {
        # Pin Spark to pyspark's: a stray SPARK_HOME would silently switch the Spark (and Scala) version.
        "SPARK_HOME": str(spark_home()),
        "PATH": bin_dir if not path else f"{bin_dir}{os.pathsep}{path}",
        "PYSPARK_PYTHON": python_executable(),
        "PYSPARK_DRIVER_PYTHON": python_executable(),
        # Binds the driver, block manager and (when enabled) the UI to loopback, and silences the
        # "hostname resolves to a loopback address" warning.
        "SPARK_LOCAL_IP": config.HOST,
    }
    if lake_root is not None:
        env[ENV_LAKE_ROOT] = os.fspath(lake_root)
    if kafka_bootstrap is not None:
        env[ENV_KAFKA_BOOTSTRAP] = kafka_bootstrap
    return env


def spark_submit_argv(
    application: str | os.PathLike,
    application_args: Iterable[str] = (),
    *,
    master: str = "local[*]",
    conf: Mapping[str, Any] | None = None,
    driver_memory: str = DEFAULT_DRIVER_MEMORY,
    name: str = "decisionflow-spark",
    jars: Iterable[str | os.PathLike] | None = None,
) -> list[str]:
    """A complete ``spark-submit`` argv for running ``application`` locally outside Airflow.

    Same properties and jars as the operator; run it with ``env={**os.environ, **spark_env(...)}``.
    """
    jar_list = [os.fspath(j) for j in (jars if jars is not None else connector_jars())]
    argv = [str(spark_submit_binary()), "--master", master]
    for key, value in spark_conf(conf).items():
        argv += ["--conf", f"{key}={value}"]
    argv += ["--jars", ",".join(jar_list), "--driver-memory", driver_memory, "--name", name]
    return [*argv, os.fspath(application), *application_args]


def local_spark_session(
    app_name: str = "decisionflow",
    *,
    master: str = "local[2]",
    conf: Mapping[str, Any] | None = None,
    driver_memory: str = DEFAULT_DRIVER_MEMORY,
) -> SparkSession:
    """An in-process SparkSession with the same Delta + Kafka setup as the operator (tests, notebooks).

    The caller owns it: ``spark.stop()`` when done. A session already active in this process is returned
    as is (Spark allows one SparkContext per JVM), so call this once per test session.
    """
    jars = connector_jars()
    for key, value in spark_env().items():
        if key in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "SPARK_LOCAL_IP"):
            os.environ.setdefault(key, value)

    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name).master(master)
    for key, value in spark_conf(conf).items():
        builder = builder.config(key, value)
    builder = builder.config("spark.jars", ",".join(str(j) for j in jars)).config(
        "spark.driver.memory", driver_memory
    )
    return builder.getOrCreate()
