"""DeltaSparkSubmitOperator, the shared Spark conf and the LakeHook, without starting Spark."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from decisionflow import config
from decisionflow.spark import conf as spark_conf_module
from decisionflow.spark.conf import (
    DELTA_CATALOG,
    DELTA_EXTENSION,
    ENV_KAFKA_BOOTSTRAP,
    ENV_LAKE_ROOT,
    MissingJarsError,
    connector_jars,
    spark_conf,
    spark_env,
    spark_home,
    spark_submit_argv,
    spark_submit_binary,
)

JOB = Path(spark_conf_module.__file__).parents[1] / "jobs" / "platform_check_lakehouse.py"
REAL_JARS = config.jar_paths().spark_connectors
needs_jars = pytest.mark.skipif(not any(REAL_JARS.glob("delta-spark_*.jar")), reason="no connector jars: make jars")


def _fake_jar_dir(root: Path, names=("delta-spark_4.2_2.13-4.4.0.jar", "delta-storage-4.4.0.jar",
                                     "spark-sql-kafka-0-10_2.13-4.2.0.jar", "kafka-clients-3.9.2.jar")) -> Path:
    folder = root / "spark"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


@pytest.fixture
def connections(monkeypatch, tmp_path):
    """lake_default -> tmp lake, kafka_default -> 127.0.0.1:19092, spark_default -> local[*] client mode."""
    monkeypatch.setenv("AIRFLOW_CONN_LAKE_DEFAULT", json.dumps({"conn_type": "delta_lake", "extra": {"root": str(tmp_path / "lake")}}))
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_DEFAULT", json.dumps({
        "conn_type": "kafka", "extra": {"bootstrap.servers": "127.0.0.1:19092", "group.id": "decisionflow"},
    }))
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", json.dumps({
        "conn_type": "spark", "host": "local[*]", "extra": {"deploy-mode": "client", "spark-binary": "spark-submit"},
    }))
    return tmp_path


@pytest.fixture
def fake_jars(monkeypatch, tmp_path):
    """DECISIONFLOW_JARS pointing at a folder with (empty) stand-ins for the connector jars."""
    folder = _fake_jar_dir(tmp_path / "jars")
    monkeypatch.setenv("DECISIONFLOW_JARS", str(folder.parent))
    return folder


# -- conf ---------------------------------------------------------------------------------------------------
def test_spark_conf_defaults():
    conf = spark_conf()
    assert conf["spark.sql.extensions"] == DELTA_EXTENSION == "io.delta.sql.DeltaSparkSessionExtension"
    assert conf["spark.sql.catalog.spark_catalog"] == DELTA_CATALOG
    assert conf["spark.driver.host"] == conf["spark.driver.bindAddress"] == "127.0.0.1"
    assert conf["spark.ui.enabled"] == "false"
    assert conf["spark.sql.shuffle.partitions"] == "4"
    assert conf["spark.pyspark.python"] == conf["spark.pyspark.driver.python"] == sys.executable
    assert conf["spark.sql.warehouse.dir"] == str(config.data_dir() / "spark" / "warehouse")
    assert "-XX:TieredStopAtLevel=1" in conf["spark.driver.extraJavaOptions"]
    assert all(isinstance(v, str) for v in conf.values())


def test_spark_conf_overrides_and_extension_merge():
    conf = spark_conf(
        {"spark.sql.shuffle.partitions": 16, "spark.sql.extensions": "com.example.Ext", "spark.x.flag": True},
        ui=True, fast_start=False,
    )
    assert conf["spark.sql.shuffle.partitions"] == "16"
    assert conf["spark.sql.extensions"] == f"com.example.Ext,{DELTA_EXTENSION}"  # extended, not replaced
    assert conf["spark.x.flag"] == "true"
    assert conf["spark.ui.enabled"] == "true"
    assert "spark.driver.extraJavaOptions" not in conf
    # an extension list that already has Delta is left alone
    assert spark_conf({"spark.sql.extensions": DELTA_EXTENSION})["spark.sql.extensions"] == DELTA_EXTENSION


def test_spark_env_points_at_this_environment_spark():
    env = spark_env("/lake", "127.0.0.1:9092", base={"PATH": "/usr/bin"})
    home = spark_home()
    assert env["SPARK_HOME"] == str(home) and (home / "jars").is_dir()
    assert env["PATH"].split(os.pathsep)[1:] == ["/usr/bin"]
    assert shutil.which("spark-submit", path=env["PATH"]) == str(spark_submit_binary())
    assert env["PYSPARK_PYTHON"] == sys.executable
    assert env["SPARK_LOCAL_IP"] == "127.0.0.1"
    assert env[ENV_LAKE_ROOT] == "/lake" and env[ENV_KAFKA_BOOTSTRAP] == "127.0.0.1:9092"
    assert ENV_LAKE_ROOT not in spark_env()


# -- jars ---------------------------------------------------------------------------------------------------
@needs_jars
def test_connector_jars_from_make_jars():
    jars = connector_jars()
    names = [j.name for j in jars]
    assert jars == sorted(jars)
    assert any(n.startswith("delta-spark_4.2_2.13-4.4.0") for n in names)
    assert any(n.startswith("spark-sql-kafka-0-10_2.13-4.2.0") for n in names)
    assert any(n.startswith("kafka-clients-") for n in names)


def test_missing_jar_folder_says_run_make_jars(tmp_path):
    with pytest.raises(MissingJarsError, match="run `make jars`"):
        connector_jars(tmp_path / "nope")


def test_incomplete_jar_folder_names_what_is_missing(tmp_path):
    folder = _fake_jar_dir(tmp_path, names=("delta-spark_4.2_2.13-4.4.0.jar",))
    with pytest.raises(MissingJarsError) as info:
        connector_jars(folder)
    assert info.value.missing == ["delta-storage", "kafka-clients", "spark-sql-kafka"]
    assert "run `make jars`" in str(info.value)


def test_spark_submit_argv(fake_jars):
    argv = spark_submit_argv("job.py", ["--x", "1"], conf={"spark.sql.shuffle.partitions": 2})
    assert argv[0] == str(spark_submit_binary())
    assert argv[1:3] == ["--master", "local[*]"]
    assert "spark.sql.shuffle.partitions=2" in argv
    assert argv[argv.index("--jars") + 1].split(",") == [str(p) for p in sorted(fake_jars.glob("*.jar"))]
    assert argv[argv.index("--driver-memory") + 1] == "1g"
    assert argv[-3:] == ["job.py", "--x", "1"]


# -- operator -----------------------------------------------------------------------------------------------
def _operator(**kwargs):
    from decisionflow.operators.spark import DeltaSparkSubmitOperator

    return DeltaSparkSubmitOperator(task_id="t", application=str(JOB), **kwargs)


def test_operator_defaults_at_parse_time():
    op = _operator()
    assert op.pool == "spark"
    assert op._driver_memory == "1g"
    assert op._conn_id == "spark_default"
    assert (op.lake_conn_id, op.kafka_config_id) == ("lake_default", "kafka_default")
    assert op.jars is None and op.conf is None  # nothing resolved until execute
    assert {"lake_conn_id", "kafka_config_id", "conf", "jars", "application_args"} <= set(op.template_fields)


def test_operator_prepare_submit(connections, fake_jars):
    op = _operator(jars="/opt/extra.jar", conf={"spark.sql.shuffle.partitions": 8}, env_vars={"MY_VAR": "1"})
    op.prepare_submit()
    op.prepare_submit()  # idempotent
    connector = [str(p) for p in sorted(fake_jars.glob("*.jar"))]
    assert op.jars.split(",") == [*connector, "/opt/extra.jar"]
    assert op.conf["spark.sql.extensions"] == DELTA_EXTENSION
    assert op.conf["spark.sql.shuffle.partitions"] == "8"
    assert op.env_vars[ENV_LAKE_ROOT] == str(connections / "lake")
    assert op.env_vars[ENV_KAFKA_BOOTSTRAP] == "127.0.0.1:19092"
    assert op.env_vars["MY_VAR"] == "1"
    assert op.env_vars["SPARK_HOME"] == str(spark_home())


def test_operator_builds_the_provider_command(connections, fake_jars):
    op = _operator(application_args=["--skip-kafka"])
    op.prepare_submit()
    hook = op._get_hook()
    argv = hook._build_spark_submit_command(op.application)
    assert argv[0] == "spark-submit"  # the provider only allows this name; PATH in env_vars finds ours
    assert argv[argv.index("--master") + 1] == "local[*]"
    assert argv[argv.index("--deploy-mode") + 1] == "client"
    assert argv[argv.index("--driver-memory") + 1] == "1g"
    assert f"spark.sql.catalog.spark_catalog={DELTA_CATALOG}" in argv
    assert argv[argv.index("--jars") + 1] == op.jars
    assert argv[-2:] == [str(JOB), "--skip-kafka"]
    assert hook._env[ENV_LAKE_ROOT] == str(connections / "lake")  # handed to Popen in client mode


def test_operator_without_endpoints(connections, fake_jars, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_KAFKA_DEFAULT")
    op = _operator(kafka_config_id=None, lake_conn_id=None)
    op.prepare_submit()
    assert ENV_LAKE_ROOT not in op.env_vars and ENV_KAFKA_BOOTSTRAP not in op.env_vars


def test_operator_missing_jars_fails_with_make_jars(connections, monkeypatch, tmp_path):
    monkeypatch.setenv("DECISIONFLOW_JARS", str(tmp_path / "no-jars"))
    op = _operator()
    from airflow.sdk.exceptions import AirflowFailException

    # a NonRetryableError: the task fails at once (no retries), the message and the cause kept
    with pytest.raises(AirflowFailException, match="run `make jars`") as failed:
        op.execute(context={})
    assert isinstance(failed.value.__cause__, MissingJarsError)


# -- lake hook ----------------------------------------------------------------------------------------------
def _lake(monkeypatch, extra, conn_id="lake_default"):
    from decisionflow.hooks.lake import LakeHook

    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "delta_lake", "extra": extra}))
    return LakeHook(lake_conn_id=conn_id)


def test_lake_relative_root_resolves_from_project_home(monkeypatch):
    hook = _lake(monkeypatch, {"root": ".data/lake"})
    assert hook.root == str(config.resolve_path(".data/lake"))
    assert hook.is_local and hook.storage_options == {}
    assert hook.table_uri("bronze/transactions") == str(Path(hook.root) / "bronze" / "transactions")


def test_lake_object_store_root_passes_through(monkeypatch):
    hook = _lake(monkeypatch, {"root": "s3://bucket/lake/", "storage_options": {"AWS_REGION": "eu-west-1"}})
    assert hook.root == "s3://bucket/lake" and not hook.is_local
    assert hook.table_uri("silver/features") == "s3://bucket/lake/silver/features"
    assert hook.storage_options == {"AWS_REGION": "eu-west-1"}
    assert hook.platform_check()["probed"] is False


def test_lake_file_uri_root(monkeypatch, tmp_path):
    assert _lake(monkeypatch, {"root": f"file://{tmp_path}/lake"}).root == str(tmp_path / "lake")


@pytest.mark.parametrize("name", ["../etc", "/abs/table", "bronze/../../x", "", "."])
def test_lake_table_uri_stays_inside_the_lake(monkeypatch, tmp_path, name):
    with pytest.raises(ValueError):
        _lake(monkeypatch, {"root": str(tmp_path)}).table_uri(name)


def test_lake_platform_check_writes_and_cleans_up(monkeypatch, tmp_path):
    hook = _lake(monkeypatch, {"root": str(tmp_path / "lake")})
    first = hook.platform_check()
    second = hook.platform_check()
    assert first["probed"] and first["writable"] and second["root"] == str(tmp_path / "lake")
    assert list((tmp_path / "lake" / "_platform_check").iterdir()) == []


def test_lake_platform_check_unwritable_root(monkeypatch, tmp_path):
    from decisionflow.hooks.base import LayerCheckError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(LayerCheckError) as info:
        _lake(monkeypatch, {"root": str(blocker / "lake")}).platform_check()
    assert info.value.layer == "lake"


# -- the Spark job's own argument handling (no Spark started) -----------------------------------------------
def _job_module():
    import importlib

    return importlib.import_module("decisionflow.jobs.platform_check_lakehouse")


def test_job_reads_endpoints_from_env(monkeypatch):
    monkeypatch.setenv(ENV_LAKE_ROOT, "/lake")
    monkeypatch.setenv(ENV_KAFKA_BOOTSTRAP, "127.0.0.1:9092")
    job = _job_module()
    assert (job.ENV_LAKE_ROOT, job.ENV_KAFKA_BOOTSTRAP) == (ENV_LAKE_ROOT, ENV_KAFKA_BOOTSTRAP)
    args = job.parse_args([])
    assert (args.lake_root, args.kafka_bootstrap, args.topic) == ("/lake", "127.0.0.1:9092", "decisionflow.platform-check")


def test_job_refuses_to_run_without_endpoints(monkeypatch, capsys):
    monkeypatch.delenv(ENV_LAKE_ROOT, raising=False)
    monkeypatch.delenv(ENV_KAFKA_BOOTSTRAP, raising=False)
    job = _job_module()
    with pytest.raises(SystemExit) as info:
        job.parse_args([])
    assert info.value.code == 2 and "no lake root" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        job.parse_args(["--lake-root", "/lake"])
    assert job.parse_args(["--lake-root", "/lake", "--skip-kafka"]).skip_kafka


def test_operator_module_does_not_import_pyspark():
    import ast
    import inspect

    import decisionflow.operators.spark as operator_module

    for module in (operator_module, spark_conf_module, _job_module()):
        top = {
            (n.module if isinstance(n, ast.ImportFrom) else a.name)
            for n in ast.parse(inspect.getsource(module)).body
            if isinstance(n, ast.Import | ast.ImportFrom)
            for a in (n.names if isinstance(n, ast.Import) else [n])
        }
        assert not {t for t in top if t and t.startswith(("pyspark", "delta", "confluent_kafka"))}, module.__name__


# -- DeltaMigrateOperator: Spark only when a Delta log says a table needs it ---------------------------------
@pytest.fixture
def submitted(monkeypatch):
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    calls = []
    monkeypatch.setattr(SparkSubmitOperator, "execute", lambda self, context: calls.append(self.application))
    return calls


def test_migrate_operator_skips_spark_when_every_table_is_current(connections, fake_jars, submitted, monkeypatch):
    from decisionflow.lakehouse import maintenance
    from decisionflow.operators.spark import DeltaMigrateOperator

    seen = []
    monkeypatch.setattr(maintenance, "tables_needing_migration",
                        lambda root, options=None: seen.append(root) or {})
    assert DeltaMigrateOperator(task_id="migrate").execute({}) is None
    assert submitted == [] and seen == [str(connections / "lake")]


def test_migrate_operator_submits_the_packaged_job_when_a_table_needs_it(connections, fake_jars, submitted,
                                                                         monkeypatch):
    from decisionflow.lakehouse import maintenance
    from decisionflow.operators.spark import DeltaMigrateOperator

    monkeypatch.setattr(maintenance, "tables_needing_migration", lambda root, options=None: {"silver/labels": "missing"})
    DeltaMigrateOperator(task_id="migrate").execute({})
    assert [Path(a).name for a in submitted] == ["migrate_lakehouse.py"] and Path(submitted[0]).exists()


def test_migrate_operator_always_submit_does_not_look(connections, fake_jars, submitted, monkeypatch):
    from decisionflow.lakehouse import maintenance
    from decisionflow.operators.spark import DeltaMigrateOperator

    monkeypatch.setattr(maintenance, "tables_needing_migration", lambda *a, **k: pytest.fail("looked"))
    DeltaMigrateOperator(task_id="migrate", always_submit=True).execute({})
    assert len(submitted) == 1


def test_tables_needing_migration_reads_the_delta_log(tmp_path):
    """Missing and unversioned tables are reported (a current table is checked in the integration tests:
    delta-rs refuses to write our custom properties, Spark's migrate job sets them)."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from decisionflow.lakehouse.maintenance import tables_needing_migration
    from decisionflow.lakehouse.tables import Column, TableSpec

    spec = TableSpec("gold/items", (Column("id", "STRING", nullable=False),), keys=("id",), description="items")
    other = TableSpec("gold/other", (Column("id", "STRING", nullable=False),), keys=("id",), description="other",
                      partition_by=("id",))
    lake = str(tmp_path)
    assert tables_needing_migration(lake, specs=[spec]) == {"gold/items": "missing"}
    write_deltalake(spec.path(lake), pa.table({"id": ["a"]}))
    write_deltalake(other.path(lake), pa.table({"id": ["a"]}))
    assert tables_needing_migration(lake, specs=[spec, other]) == {
        "gold/items": "schema version None, declared 1", "gold/other": "partitioned by []"}
