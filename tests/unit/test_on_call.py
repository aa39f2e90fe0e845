"""On-call: NonRetryableError and its one mapping, the failure line, the failure notifier, the Spark job verdict,
the read-only connection Test. No services: the boundaries are faked (an in-process webhook receiver)."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import pkgutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from decisionflow.exceptions import (
    EXIT_NON_RETRYABLE,
    NON_RETRYABLE_MARKER,
    NonRetryableError,
    NotReadyError,
    ParamsError,
    describe_failure,
    is_non_retryable,
    non_retryable_marker,
    parse_non_retryable_marker,
)
from decisionflow.operators.base import DecisionflowOperatorMixin


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the base and its subclasses ------------------------------------------------------------------------------
@pytest.mark.parametrize("module, name", [
    ("decisionflow.decisions.costs", "ConfigError"),              # a bad training config (TrainingConfig)
    ("decisionflow.lakehouse.quality", "QualityGateError"),       # a failed quality gate
    ("decisionflow.lakehouse.tables", "IncompatibleTableError"),  # an incompatible table migration
    ("decisionflow.contracts", "IncompatibleSchemaError"),        # an incompatible event schema
    ("decisionflow.decisions.policy", "PolicyError"),             # a malformed policy
    ("decisionflow.decisions.graph", "DecisionRunError"),
    ("decisionflow.decisions.review", "ReviewError"),
    ("decisionflow.models.dataset", "TrainingDataError"),
    ("decisionflow.features.training_set", "TrainingSetError"),
    ("decisionflow.features.materialization", "MaterializationError"),
    ("decisionflow.lakehouse.maintenance", "RetentionError"),
    ("decisionflow.spark.conf", "MissingJarsError"),
    ("decisionflow.hooks.feast", "FeastConfigError"),
    ("decisionflow.settings.airflow_settings", "SettingsError"),
])
def test_errors_that_fail_the_same_way_are_non_retryable(module, name):
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, NonRetryableError)


def test_transient_errors_stay_retryable():
    from decisionflow.decisions.online_import import OnlineImportError
    from decisionflow.decisions.outbox import DeliveryError
    from decisionflow.hooks.base import LayerCheckError

    for cls in (OnlineImportError, DeliveryError, LayerCheckError):
        assert not issubclass(cls, NonRetryableError), cls


def test_not_ready_subclasses_stay_not_ready():
    from decisionflow.features.training_set import TrainingSourceMissingError
    from decisionflow.vectors.sync import SilverMissingError

    assert issubclass(TrainingSourceMissingError, NotReadyError)
    assert issubclass(SilverMissingError, NotReadyError)


# -- describe_failure: layer, cause, remedy -------------------------------------------------------------------
def test_describe_failure_uses_the_error_attributes():
    from decisionflow.decisions.graph import DecisionRunError

    failure = describe_failure(DecisionRunError("models", "no champion at http://x", "train first"))
    assert (failure.layer, failure.cause, failure.remedy, failure.non_retryable) == \
        ("models", "no champion at http://x", "train first", True)
    assert failure.line() == "[models] no champion at http://x -- remedy: train first"


def test_describe_failure_reads_the_message_convention_and_the_package():
    from decisionflow.lakehouse.quality import QualityGateError

    convention = describe_failure(RuntimeError("[kafka] topic decisions at b:1: down -- remedy: check the broker"))
    assert (convention.layer, convention.cause, convention.remedy) == \
        ("kafka", "topic decisions at b:1: down", "check the broker")
    assert not convention.non_retryable

    gate = describe_failure(QualityGateError("silver/transactions", "rows_accounted", {"in": 3, "out": 2}))
    assert gate.layer == "lakehouse" and gate.non_retryable
    assert "table silver/transactions, rule rows_accounted" in gate.cause
    assert "not retried" in gate.remedy


def test_describe_failure_looks_through_airflow_wrappers_and_falls_back():
    try:
        try:
            raise ParamsError("window must be one of ('auto',), got 'bogus'")
        except ParamsError as exc:
            raise AirflowFailException("wrapped") from exc
    except AirflowFailException as wrapped:
        failure = describe_failure(wrapped)
    assert failure.layer == "params" and "window must be one of" in failure.cause and failure.non_retryable
    assert "Trigger DAG w/ config" in failure.remedy

    plain = describe_failure(ZeroDivisionError("division by zero"), layer="feast", remedy="look at it")
    assert plain.line() == "[feast] ZeroDivisionError: division by zero -- remedy: look at it"
    assert describe_failure(None).layer == "airflow"  # a killed task: no exception
    assert is_non_retryable(ParamsError("x")) and not is_non_retryable(ValueError("x"))


def test_marker_round_trip():
    failure = describe_failure(ParamsError("bad --stage"))
    line = non_retryable_marker(failure)
    assert line.startswith(NON_RETRYABLE_MARKER)
    back = parse_non_retryable_marker(f"2026-12-01 INFO stderr: {line}")
    assert (back.layer, back.cause, back.remedy, back.non_retryable) == \
        (failure.layer, failure.cause, failure.remedy, True)
    assert parse_non_retryable_marker("an ordinary log line") is None


# -- the one mapping --------------------------------------------------------------------------------------------
class _Raising(DecisionflowOperatorMixin, BaseOperator):
    layer = "test"

    def __init__(self, *, error: BaseException | None = None, **kwargs):
        super().__init__(**kwargs)
        self.error = error

    def execute(self, context):
        if self.error is not None:
            raise self.error
        return "ok"


def test_not_ready_becomes_a_skip():
    from decisionflow.decisions.graph import DecisionRunError

    with pytest.raises(AirflowSkipException, match="run build_lakehouse"):
        _Raising(error=NotReadyError("no gold yet: run build_lakehouse"), task_id="t").execute({})
    with pytest.raises(AirflowSkipException, match="no champion"):
        _Raising(error=DecisionRunError("models", "no champion", "train", not_ready=True), task_id="t2").execute({})


def test_non_retryable_fails_without_retry_with_the_line(caplog):
    from decisionflow.lakehouse.quality import QualityGateError

    error = QualityGateError("gold/x", "unique", {"dupes": 2})
    with caplog.at_level(logging.ERROR), pytest.raises(AirflowFailException) as failed:
        _Raising(error=error, task_id="t").execute({})
    assert failed.value.__cause__ is error
    assert str(failed.value).startswith("[lakehouse] quality gate failed: table gold/x, rule unique")
    assert "-- remedy:" in str(failed.value)


def test_retryable_is_reraised_as_is():
    error = ConnectionError("[kafka] broker down -- remedy: start it")
    with pytest.raises(ConnectionError) as raised:
        _Raising(error=error, task_id="t").execute({})
    assert raised.value is error
    assert _Raising(error=None, task_id="ok").execute({}) == "ok"


def _operator_classes():
    import decisionflow.operators as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name == "base" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"decisionflow.operators.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and cls.__name__.endswith("Operator"):
                yield cls


def test_every_operator_of_ours_goes_through_the_mapping():
    classes = list(_operator_classes())
    assert len(classes) >= 15
    for cls in classes:
        assert issubclass(cls, DecisionflowOperatorMixin), cls
        if "execute" in cls.__dict__:
            assert getattr(cls.__dict__["execute"], "_decisionflow_mapped", False), cls


# -- Spark jobs: the verdict crosses the spark-submit boundary ---------------------------------------------------
def test_job_on_a_non_retryable_error_prints_the_marker_and_exits_3(capsys):
    from decisionflow.jobs._app import emit_summary, record_failure
    from decisionflow.lakehouse.quality import QualityGateError

    summary = {"job": "build_lakehouse", "ok": False}
    record_failure(summary, QualityGateError("silver/labels", "accounted", {"in": 1}))
    assert emit_summary("build_lakehouse", summary, None) == EXIT_NON_RETRYABLE
    err = capsys.readouterr().err
    marker = next(line for line in err.splitlines() if NON_RETRYABLE_MARKER in line)
    assert parse_non_retryable_marker(marker).layer == "lakehouse"

    transient = {"job": "build_lakehouse", "ok": False}
    record_failure(transient, OSError("disk full"))
    assert emit_summary("build_lakehouse", transient, None) == 1
    assert NON_RETRYABLE_MARKER not in capsys.readouterr().err


@pytest.fixture
def spark_connections(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", json.dumps({
        "conn_type": "spark", "host": "local[*]", "extra": {"deploy-mode": "client", "spark-binary": "spark-submit"}}))
    return tmp_path


def _spark_operator_seeing(monkeypatch, lines, returncode):
    """A DeltaSparkSubmitOperator whose spark-submit 'prints' ``lines`` and exits ``returncode``."""
    from airflow.exceptions import AirflowException
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    from decisionflow.operators.spark import DeltaSparkSubmitOperator

    def fake_execute(self, context):
        self._hook = self._get_hook()
        self._hook._process_spark_submit_log(iter(lines))
        self._hook._submit_sp = SimpleNamespace(returncode=returncode)
        if returncode:
            raise AirflowException(f"Cannot execute: spark-submit ... Error code is: {returncode}.")

    monkeypatch.setattr(SparkSubmitOperator, "execute", fake_execute)
    op = DeltaSparkSubmitOperator(task_id="gold", application="job.py", name="build_gold", lake_conn_id=None,
                                  kafka_config_id=None)
    monkeypatch.setattr(op, "prepare_submit", lambda: None)
    return op


def test_spark_operator_fails_without_retry_on_the_marker(spark_connections, monkeypatch):
    failure = describe_failure(ParamsError("--stage bogus"))
    op = _spark_operator_seeing(monkeypatch, ["some spark log", "build_gold FAILED: --stage bogus",
                                              non_retryable_marker(failure)], EXIT_NON_RETRYABLE)
    with pytest.raises(AirflowFailException, match=r"^\[params\] .*--stage bogus -- remedy: "):
        op.execute({})


def test_spark_operator_names_the_job_error_and_keeps_retries(spark_connections, monkeypatch):
    from decisionflow.operators.spark import SparkJobError

    op = _spark_operator_seeing(monkeypatch, ["build_gold FAILED: Py4JError: connection reset"], 1)
    with pytest.raises(SparkJobError, match="connection reset") as raised:
        op.execute({})
    assert not isinstance(raised.value, NonRetryableError)
    assert describe_failure(raised.value).layer == "spark"


def test_spark_operator_trusts_exit_code_3_without_a_marker(spark_connections, monkeypatch):
    op = _spark_operator_seeing(monkeypatch, ["build_gold FAILED: table x: incompatible"], EXIT_NON_RETRYABLE)
    with pytest.raises(AirflowFailException, match="incompatible"):
        op.execute({})


# -- the failure notifier -----------------------------------------------------------------------------------------
def _context(exception, task, try_number=3, map_index=-1):
    ti = SimpleNamespace(dag_id="build_lakehouse", task_id=task.task_id, run_id="manual__2026-12-01T20:00:00+00:00",
                         map_index=map_index, try_number=try_number, max_tries=2,
                         log_url="http://127.0.0.1:8080/dags/build_lakehouse/runs/r/tasks/gold?try_number=3")
    return {"ti": ti, "task": task, "exception": exception, "run_id": ti.run_id}


def test_alert_names_everything_in_one_line():
    from decisionflow.lakehouse.quality import QualityGateError
    from decisionflow.notifications.failure import build_alert

    task = _Raising(error=None, task_id="gold")
    alert = build_alert(_context(QualityGateError("gold/x", "unique", {"dupes": 2}), task))
    assert alert["layer"] == "lakehouse" and alert["retryable"] is False
    assert alert["alert_id"] == "build_lakehouse/gold/manual__2026-12-01T20:00:00+00:00/-1/3"
    assert alert["retry_command"] == "decisionflow retry build_lakehouse manual__2026-12-01T20:00:00+00:00"
    line = alert["line"]
    assert "\n" not in line
    for part in ("build_lakehouse.gold failed (try 3/3, run manual__", "[lakehouse] quality gate failed",
                 "-- remedy: ", "-- log: http://127.0.0.1:8080/dags/build_lakehouse"):
        assert part in line, (part, line)

    retryable = build_alert(_context(TimeoutError("read timed out"), task, try_number=1))
    assert retryable["retryable"] is True and retryable["layer"] == "test"  # the operator's layer
    assert retryable["cause"] == "TimeoutError: read timed out"


def test_notifier_posts_to_the_webhook_once_per_alert(monkeypatch, tmp_path):
    from decisionflow.decisions.webhook import WebhookReceiver
    from decisionflow.notifications.failure import FailureNotifier

    with WebhookReceiver(tmp_path / "effects.sqlite") as receiver:
        monkeypatch.setenv("AIRFLOW_CONN_ALERTS_WEBHOOK", json.dumps({
            "conn_type": "http", "host": receiver.host, "port": receiver.port, "schema": "http",
            "extra": {"endpoint": "alerts"}}))
        notifier = FailureNotifier(kafka_conn_id=None, timeout=5)
        context = _context(ParamsError("window must be one of ('auto',), got 'x'"), _Raising(error=None, task_id="gold"))
        notifier(context)
        notifier(context)  # a repeated callback: the same alert id, kept once
        alerts = receiver.alerts()
    assert alerts["alerts"] == 1
    alert = alerts["items"][0]
    assert alert["layer"] == "params" and alert["task_id"] == "gold" and alert["try_number"] == 3
    assert alert["log_url"].startswith("http://127.0.0.1:8080/")


def test_notifier_never_masks_the_task_failure(monkeypatch, capsys):
    from decisionflow.notifications.failure import FailureNotifier


    monkeypatch.setenv("AIRFLOW_CONN_ALERTS_WEBHOOK", json.dumps({
        "conn_type": "http", "host": f"http://127.0.0.1:{free_port()}", "extra": {"endpoint": "alerts"}}))
    monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_KAFKA", raising=False)
    notifier = FailureNotifier(kafka_conn_id="no_such_kafka", timeout=1)
    notifier(_context(RuntimeError("boom"), _Raising(error=None, task_id="gold")))  # must not raise
    notifier({"not": "a task context"})  # nor on a context it cannot read
    captured = capsys.readouterr()
    text = captured.out + captured.err  # Airflow's structlog writes the notifier's log lines to stdout
    assert "webhook channel failed" in text and "kafka channel failed" in text and "boom" in text


def test_failure_alerts_adds_one_notifier_and_keeps_callbacks():
    from decisionflow.notifications.failure import FailureNotifier, failure_alerts

    def mine(context):
        return None

    args = failure_alerts({"retries": 2, "on_failure_callback": mine})
    assert args["retries"] == 2 and args["on_failure_callback"][0] is mine
    assert isinstance(args["on_failure_callback"][1], FailureNotifier)
    assert len(failure_alerts(args)["on_failure_callback"]) == 2  # idempotent
    with pytest.raises(ValueError, match="timeout"):
        FailureNotifier(timeout=0)


def test_every_dag_alerts_on_failure():
    from airflow.dag_processing.dagbag import DagBag

    from decisionflow.notifications.failure import FailureNotifier

    dagbag = DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "dags"))
    assert not dagbag.import_errors
    missing = []
    for dag_id, dag in dagbag.dags.items():
        for task in dag.tasks:
            callbacks = task.on_failure_callback or []
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            if not any(isinstance(cb, FailureNotifier) for cb in callbacks):
                missing.append(f"{dag_id}.{task.task_id}")
    assert not missing, missing


# -- connection Test: read-only probes ------------------------------------------------------------------------
def test_kafka_test_button_only_lists_metadata(monkeypatch):
    from decisionflow.hooks.kafka import KafkaHook

    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_DEFAULT", json.dumps({
        "conn_type": "kafka", "extra": {"bootstrap.servers": "127.0.0.1:1"}}))
    hook = KafkaHook()
    metadata = SimpleNamespace(topics={"decisions": None, "__consumer_offsets": None}, brokers={1: None})
    monkeypatch.setattr(hook, "admin_client", lambda **_: SimpleNamespace(list_topics=lambda timeout: metadata))
    monkeypatch.setattr(hook, "platform_check", lambda *a, **k: pytest.fail("Test must not run the platform check"))
    monkeypatch.setattr(hook, "ensure_topic", lambda *a, **k: pytest.fail("Test must not create topics"))
    ok, message = hook.test_connection()
    assert ok and "read-only probe" in message and "'topics': 1" in message


def test_lake_test_button_writes_nothing(monkeypatch, tmp_path):
    from decisionflow.hooks.lake import LakeHook

    root = tmp_path / "lake"
    monkeypatch.setenv("AIRFLOW_CONN_LAKE_DEFAULT", json.dumps({"conn_type": "delta_lake", "extra": {"root": str(root)}}))
    ok, message = LakeHook().test_connection()
    assert ok and "'exists': False" in message and not root.exists()
    (root / "gold").mkdir(parents=True)
    ok, message = LakeHook().test_connection()
    assert ok and "'folders': ['gold']" in message
    assert sorted(p.name for p in root.iterdir()) == ["gold"]  # no _platform_check probe file


def test_mlflow_test_button_fails_with_layer_cause_remedy(monkeypatch):
    from decisionflow.hooks.mlflow import MlflowHook


    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_DEFAULT", json.dumps({
        "conn_type": "mlflow", "host": f"http://127.0.0.1:{free_port()}"}))
    ok, message = MlflowHook().test_connection()
    assert not ok and message.startswith("[mlflow] ") and "-- remedy: " in message


def test_milvus_lite_test_button_does_not_create_the_store(monkeypatch, tmp_path):
    from decisionflow.hooks.milvus import MilvusHook

    path = tmp_path / "milvus" / "cases.db"
    monkeypatch.setenv("AIRFLOW_CONN_MILVUS_DEFAULT", json.dumps({"conn_type": "milvus", "extra": {"uri": str(path)}}))
    ok, message = MilvusHook().test_connection()
    assert ok and "'exists': False" in message and not path.parent.exists()


def test_every_checkable_hook_has_a_probe():
    import decisionflow.hooks as package
    from decisionflow.hooks.base import CheckableHook

    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"decisionflow.hooks.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, CheckableHook) and cls is not CheckableHook:
                assert cls.probe is not CheckableHook.probe, f"{cls.__name__} has no read-only probe"


def test_the_drill_fails_on_purpose_until_its_variable_says_false(monkeypatch):
    from decisionflow.operators.platform import OnCallDrillOperator

    context = {"dag": SimpleNamespace(dag_id="oncall_drill"), "run_id": "manual__1"}
    monkeypatch.setenv("AIRFLOW_VAR_ONCALL_DRILL_FAIL", "true")
    with pytest.raises(AirflowFailException, match=r"^\[drill\] failed on purpose.*decisionflow retry oncall_drill "
                                                    r"manual__1 --yes"):
        OnCallDrillOperator(task_id="fail_on_purpose").execute(context)
    monkeypatch.setenv("AIRFLOW_VAR_ONCALL_DRILL_FAIL", "false")
    assert OnCallDrillOperator(task_id="fail_on_purpose").execute(context)["value"] == "false"
