"""MilvusHook without a store: URI parsing (Lite path vs server), tokens, lock detection."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from airflow.sdk import Connection

from decisionflow.hooks.base import LayerCheckError
from decisionflow.hooks.milvus import MilvusHook, MilvusLiteLockedError, lite_lock_holder


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DECISIONFLOW_HOME", str(tmp_path))
    return tmp_path


def make_hook(monkeypatch, extra=None, **fields) -> MilvusHook:
    conn = Connection(conn_id="milvus_default", conn_type="milvus", extra=json.dumps(extra or {}), **fields)
    monkeypatch.setattr(MilvusHook, "get_connection", classmethod(lambda cls, conn_id: conn))
    return MilvusHook()


def test_provider_style_attributes():
    assert (MilvusHook.conn_name_attr, MilvusHook.default_conn_name, MilvusHook.conn_type, MilvusHook.hook_name) == (
        "milvus_conn_id",
        "milvus_default",
        "milvus",
        "Milvus",
    )
    assert json.loads(MilvusHook.get_ui_field_behaviour()["placeholders"]["extra"]) == {
        "uri": ".data/milvus/decisionflow.db"
    }


def test_relative_lite_path_resolves_against_project_home(monkeypatch, home):
    hook = make_hook(monkeypatch, {"uri": ".data/milvus/decisionflow.db"})
    assert hook.uri == str(home / ".data" / "milvus" / "decisionflow.db")
    assert hook.is_lite


def test_default_is_lite_under_data(monkeypatch, home):
    hook = make_hook(monkeypatch)
    assert hook.uri == str(home / ".data" / "milvus" / "decisionflow.db")
    assert hook.is_lite


def test_absolute_and_file_url_paths(monkeypatch, home, tmp_path):
    assert make_hook(monkeypatch, {"uri": str(tmp_path / "a.db")}).uri == str(tmp_path / "a.db")
    assert make_hook(monkeypatch, {"uri": f"file://{tmp_path}/b.db"}).uri == str(tmp_path / "b.db")


def test_lite_ignores_token_and_database(monkeypatch, home):
    hook = make_hook(monkeypatch, {"uri": "x.db"}, password="secret", schema="db1")
    assert hook.token == ""
    assert hook.db_name == ""


def test_server_uri_with_token(monkeypatch, home):
    hook = make_hook(monkeypatch, {"uri": "http://milvus.internal:19530"}, password="api-key", schema="features")
    assert hook.uri == "http://milvus.internal:19530"
    assert not hook.is_lite
    assert hook.token == "api-key"
    assert hook.db_name == "features"


def test_server_user_password_token_and_extra_db(monkeypatch, home):
    hook = make_hook(monkeypatch, {"uri": "https://m:443", "db_name": "ops"}, login="root", password="Milvus")
    assert hook.token == "root:Milvus"
    assert hook.db_name == "ops"


def test_host_only_connection_means_a_server(monkeypatch, home):
    assert make_hook(monkeypatch, host="10.0.0.7").uri == "http://10.0.0.7:19530"
    assert make_hook(monkeypatch, host="10.0.0.7", port=29530).uri == "http://10.0.0.7:29530"


def test_local_path_without_db_suffix_is_named(monkeypatch, home):
    hook = make_hook(monkeypatch, {"uri": ".data/milvus/store"})
    with pytest.raises(ValueError, match=r"milvus_default.*'\.data/milvus/store'.*'\.db'"):
        hook.uri  # noqa: B018


def test_platform_check_turns_bad_uri_into_layer_error(monkeypatch, home):
    with pytest.raises(LayerCheckError) as info:
        make_hook(monkeypatch, {"uri": "not-a-db"}).platform_check()
    assert info.value.layer == "milvus"
    assert "milvus_default" in info.value.cause


def test_lock_holder_detection(tmp_path):
    data_dir = tmp_path / "x.db"
    data_dir.mkdir()
    (data_dir / "LOCK").touch()
    assert lite_lock_holder(str(data_dir)) == (False, None)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
            str(data_dir / "LOCK"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        locked, who = lite_lock_holder(str(data_dir))
        assert locked is True
        assert who is not None and who.startswith(f"{holder.pid} (")
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert lite_lock_holder(str(data_dir)) == (False, None)


def test_locked_error_is_a_layer_error_with_the_remedy():
    err = MilvusLiteLockedError("/x/decisionflow.db", "4242 (python serve.py)")
    assert isinstance(err, LayerCheckError)
    assert err.layer == "milvus"
    assert "4242" in err.cause
    assert "another process holds /x/decisionflow.db/LOCK" in err.remedy


def test_importing_the_hook_does_not_import_pymilvus():
    code = "import sys, decisionflow.hooks.milvus; print(any(m in sys.modules for m in ('pymilvus', 'milvus_lite')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
