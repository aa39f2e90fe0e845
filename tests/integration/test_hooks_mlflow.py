"""MlflowHook against a real `mlflow server` (SQLite backend, proxied artifacts) started for this module."""

from __future__ import annotations

import pytest
from airflow.sdk import Connection

try:
    from .fixtures_ml import mlflow_server  # noqa: F401 - pytest fixture
except ImportError:  # collected as a plain directory (rootdir-relative import mode)
    from fixtures_ml import mlflow_server  # noqa: F401

from decisionflow.hooks.base import LayerCheckError
from decisionflow.hooks.mlflow import PLATFORM_CHECK_EXPERIMENT, MlflowHook

pytestmark = pytest.mark.integration


@pytest.fixture
def hook(mlflow_server, monkeypatch):  # noqa: F811 - fixture injection
    conn = Connection(
        conn_id="mlflow_default", conn_type="mlflow", host="127.0.0.1", port=mlflow_server.port, schema="http"
    )
    monkeypatch.setattr(MlflowHook, "get_connection", classmethod(lambda cls, conn_id: conn))
    return MlflowHook()


def test_platform_check_round_trip(hook, mlflow_server):  # noqa: F811
    result = hook.platform_check()
    assert result["tracking_uri"] == mlflow_server.url
    assert result["experiment"] == PLATFORM_CHECK_EXPERIMENT
    assert result["metric_probe_value"] == 42.0
    assert result["artifacts"] == ["check/probe.json"]
    assert result["status"] == "FINISHED"
    # The artifact really went through the server's proxy into --artifacts-destination.
    stored = list((mlflow_server.root / "artifacts").rglob("probe.json"))
    assert any(result["run_id"] in str(path) for path in stored), stored


def test_platform_check_is_rerunnable(hook):
    first, second = hook.platform_check(), hook.platform_check()
    assert first["experiment_id"] == second["experiment_id"]
    assert first["run_id"] != second["run_id"]
    client = hook.get_client()
    runs = client.search_runs([first["experiment_id"]], filter_string="tags.`decisionflow.check` = 'true'")
    assert {first["run_id"], second["run_id"]} <= {run.info.run_id for run in runs}
    assert all(run.data.params["probe"] == "platform_check" for run in runs)


def test_platform_check_restores_a_deleted_experiment(hook):
    experiment_id = hook.platform_check()["experiment_id"]
    client = hook.get_client()
    client.delete_experiment(experiment_id)
    assert client.get_experiment(experiment_id).lifecycle_stage == "deleted"
    result = hook.platform_check()
    assert result["experiment_id"] == experiment_id
    assert client.get_experiment(experiment_id).lifecycle_stage == "active"


def test_wrong_port_is_a_layer_error(monkeypatch, mlflow_server):  # noqa: F811
    conn = Connection(conn_id="mlflow_default", conn_type="mlflow", host="127.0.0.1", port=1, schema="http")
    monkeypatch.setattr(MlflowHook, "get_connection", classmethod(lambda cls, conn_id: conn))
    with pytest.raises(LayerCheckError) as info:
        MlflowHook().platform_check()
    assert info.value.layer == "mlflow"
    assert "http://127.0.0.1:1" in info.value.cause
