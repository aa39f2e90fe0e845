"""MlflowHook without a server: connection parsing, credentials, fast and clear failures."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from airflow.exceptions import AirflowNotFoundException
from airflow.sdk import Connection

from decisionflow.hooks.base import LayerCheckError
from decisionflow.hooks.mlflow import MlflowHook


def make_hook(monkeypatch, **fields) -> MlflowHook:
    conn = Connection(conn_id="mlflow_default", conn_type="mlflow", **fields)
    monkeypatch.setattr(MlflowHook, "get_connection", classmethod(lambda cls, conn_id: conn))
    return MlflowHook()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_provider_style_attributes():
    assert MlflowHook.conn_name_attr == "mlflow_conn_id"
    assert MlflowHook.default_conn_name == "mlflow_default"
    assert MlflowHook.conn_type == "mlflow"
    assert MlflowHook.hook_name == "MLflow"
    assert MlflowHook().mlflow_conn_id == "mlflow_default"
    assert MlflowHook(mlflow_conn_id="other").mlflow_conn_id == "other"
    behaviour = MlflowHook.get_ui_field_behaviour()
    assert set(behaviour) == {"hidden_fields", "relabeling", "placeholders"}
    assert behaviour["placeholders"]["port"] == "5000"


def test_tracking_uri_from_host_port_schema(monkeypatch):
    hook = make_hook(monkeypatch, host="127.0.0.1", port=5000, schema="http")
    assert hook.tracking_uri == "http://127.0.0.1:5000"


def test_tracking_uri_defaults_follow_config(monkeypatch):
    monkeypatch.setenv("DECISIONFLOW_MLFLOW_PORT", "5999")
    hook = make_hook(monkeypatch)
    assert hook.tracking_uri == "http://127.0.0.1:5999"


def test_tracking_uri_https_and_full_url_host(monkeypatch):
    assert make_hook(monkeypatch, host="mlflow.internal", port=443, schema="https").tracking_uri == (
        "https://mlflow.internal:443"
    )
    assert make_hook(monkeypatch, host="https://mlflow.example.com/").tracking_uri == "https://mlflow.example.com"


def test_extra_tracking_uri_wins(monkeypatch):
    hook = make_hook(
        monkeypatch, host="ignored", port=1, extra=json.dumps({"tracking_uri": "http://10.0.0.5:5000/"})
    )
    assert hook.tracking_uri == "http://10.0.0.5:5000"


def test_credentials_exported_for_mlflow(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    hook = make_hook(monkeypatch, host="127.0.0.1", port=5000, login="ops", password="s3cret")
    hook._apply_credentials()
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "ops"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cret"


def test_get_client_is_bound_to_the_connection(monkeypatch):
    hook = make_hook(monkeypatch, host="127.0.0.1", port=5123, schema="http")
    client = hook.get_client()
    assert type(client).__name__ == "MlflowClient"
    assert client.tracking_uri == "http://127.0.0.1:5123"


def test_platform_check_fails_fast_and_names_the_remedy(monkeypatch):
    port = closed_port()
    hook = make_hook(monkeypatch, host="127.0.0.1", port=port, schema="http")
    started = time.monotonic()
    with pytest.raises(LayerCheckError) as info:
        hook.platform_check()
    assert time.monotonic() - started < 15, "a stopped server must fail in seconds, not after MLflow's retries"
    err = info.value
    assert err.layer == "mlflow"
    assert f"http://127.0.0.1:{port}" in err.cause
    assert "make up" in err.remedy and "mlflow.log" in err.remedy


def test_missing_connection_is_a_layer_error(monkeypatch):
    def missing(cls, conn_id):
        raise AirflowNotFoundException(f"The conn_id `{conn_id}` isn't defined")

    monkeypatch.setattr(MlflowHook, "get_connection", classmethod(missing))
    with pytest.raises(LayerCheckError) as info:
        MlflowHook().platform_check()
    assert info.value.layer == "mlflow"
    assert "mlflow_default" in info.value.cause


def test_importing_the_hook_does_not_import_mlflow():
    code = "import sys, decisionflow.hooks.mlflow; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
