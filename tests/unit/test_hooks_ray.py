"""RayHook without a cluster: connection parsing, token auth environment, dashboard auth against a stub."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from airflow.sdk import Connection

from decisionflow.hooks.base import LayerCheckError
from decisionflow.hooks.ray import RayAuthError, RayHook

EXTRA = {
    "dashboard_url": "http://127.0.0.1:8265",
    "auth_token_path": ".data/ray/auth_token",
    "namespace": "decisionflow",
}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DECISIONFLOW_HOME", str(tmp_path))
    return tmp_path


def make_hook(monkeypatch, extra=EXTRA, **fields) -> RayHook:
    fields.setdefault("host", "127.0.0.1")
    fields.setdefault("port", 6380)
    conn = Connection(conn_id="ray_default", conn_type="ray", extra=json.dumps(extra), **fields)
    monkeypatch.setattr(RayHook, "get_connection", classmethod(lambda cls, conn_id: conn))
    return RayHook()


def write_token(home, token="abc123"):
    path = home / ".data" / "ray" / "auth_token"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token + "\n")
    return path


def test_provider_style_attributes():
    assert (RayHook.conn_name_attr, RayHook.default_conn_name, RayHook.conn_type, RayHook.hook_name) == (
        "ray_conn_id",
        "ray_default",
        "ray",
        "Ray",
    )
    assert RayHook(ray_conn_id="x").ray_conn_id == "x"
    assert "schema" in RayHook.get_ui_field_behaviour()["hidden_fields"]


def test_address_dashboard_namespace(monkeypatch, home):
    hook = make_hook(monkeypatch)
    assert hook.address == "127.0.0.1:6380"
    assert hook.dashboard_url == "http://127.0.0.1:8265"
    assert hook.namespace == "decisionflow"


def test_defaults_without_host_port_or_extra(monkeypatch, home):
    monkeypatch.setenv("DECISIONFLOW_RAY_PORT", "7000")
    monkeypatch.setenv("DECISIONFLOW_RAY_DASHBOARD_PORT", "7001")
    hook = make_hook(monkeypatch, extra={}, host=None, port=None)
    assert hook.address == "127.0.0.1:7000"
    assert hook.dashboard_url == "http://127.0.0.1:7001"
    assert hook.namespace == "decisionflow"
    assert hook.token_path == home / ".data" / "ray" / "auth_token"


def test_auth_env_resolves_token_path_against_project_home(monkeypatch, home):
    hook = make_hook(monkeypatch)
    assert hook.auth_env() == {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(home / ".data" / "ray" / "auth_token"),
    }


def test_auth_env_absolute_path_kept(monkeypatch, home, tmp_path):
    hook = make_hook(monkeypatch, extra={**EXTRA, "auth_token_path": str(tmp_path / "tok")})
    assert hook.auth_env()["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "tok")


def test_inline_token_in_password(monkeypatch, home):
    hook = make_hook(monkeypatch, password="inline-token")
    assert hook.auth_env() == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "inline-token"}
    assert hook.token() == "inline-token"
    assert hook.token_path is None
    assert hook.auth_headers() == {"Authorization": "Bearer inline-token"}


def test_auth_disabled(monkeypatch, home):
    hook = make_hook(monkeypatch, extra={**EXTRA, "auth_mode": "disabled"})
    assert hook.auth_env() == {"RAY_AUTH_MODE": "disabled"}
    assert hook.auth_headers() == {}


def test_bad_auth_mode_is_named(monkeypatch, home):
    hook = make_hook(monkeypatch, extra={**EXTRA, "auth_mode": "kerberos"})
    with pytest.raises(ValueError, match="auth_mode must be 'token' or 'disabled'.*kerberos"):
        hook.auth_env()


def test_token_file_read_and_stripped(monkeypatch, home):
    write_token(home, "  tok-1  ")
    hook = make_hook(monkeypatch)
    assert hook.token() == "tok-1"
    assert hook.auth_headers() == {"Authorization": "Bearer tok-1"}


def test_missing_token_file_is_named(monkeypatch, home):
    hook = make_hook(monkeypatch)
    with pytest.raises(RayAuthError, match=r"auth_token.*ray_default.*cannot be read"):
        hook.token()


def test_empty_token_file_is_named(monkeypatch, home):
    write_token(home, "   ")
    with pytest.raises(RayAuthError, match="is empty"):
        make_hook(monkeypatch).token()


def test_platform_check_without_token_says_where_it_should_be(monkeypatch, home):
    with pytest.raises(LayerCheckError) as info:
        make_hook(monkeypatch).platform_check()
    assert info.value.layer == "ray"
    assert str(home / ".data" / "ray" / "auth_token") in info.value.remedy
    assert "make up" in info.value.remedy


# -- dashboard auth against a stub HTTP server that behaves like Ray's token middleware -------------------------
@pytest.fixture
def dashboard():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            auth = self.headers.get("Authorization")
            if not auth:
                self.send_response(401)
                self.end_headers()
                return
            if auth != "Bearer good-token":
                self.send_response(403)
                self.end_headers()
                return
            body = json.dumps({"version": "4", "ray_version": "2.60.0", "path": self.path}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_dashboard_get_sends_bearer_token(monkeypatch, home, dashboard):
    write_token(home, "good-token")
    hook = make_hook(monkeypatch, extra={**EXTRA, "dashboard_url": dashboard + "/"})
    assert hook.dashboard_get("/api/version") == {"version": "4", "ray_version": "2.60.0", "path": "/api/version"}


def test_dashboard_get_wrong_token_is_403(monkeypatch, home, dashboard):
    write_token(home, "bad-token")
    hook = make_hook(monkeypatch, extra={**EXTRA, "dashboard_url": dashboard})
    with pytest.raises(urllib.error.HTTPError) as info:
        hook.dashboard_get("api/version")
    assert info.value.code == 403


def test_platform_check_wrong_token_is_a_layer_error(monkeypatch, home, dashboard):
    write_token(home, "bad-token")
    hook = make_hook(monkeypatch, extra={**EXTRA, "dashboard_url": dashboard})
    with pytest.raises(LayerCheckError) as info:
        hook.platform_check()
    assert info.value.layer == "ray"
    assert "rejected the token (HTTP 403)" in info.value.cause
    assert "not the one the cluster was started with" in info.value.remedy


def test_platform_check_unreachable_dashboard(monkeypatch, home):
    write_token(home)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    hook = make_hook(monkeypatch, extra={**EXTRA, "dashboard_url": f"http://127.0.0.1:{port}"})
    with pytest.raises(LayerCheckError) as info:
        hook.platform_check()
    assert "unreachable" in info.value.cause
    assert "make up" in info.value.remedy


# -- connect(): the auth environment is set for ray.init and restored after ---------------------------------------
def test_connect_sets_and_restores_auth_env(monkeypatch, home):
    import ray

    token_path = write_token(home)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "stale-token-from-the-shell")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    seen = {}

    def fake_init(**kwargs):
        seen["kwargs"] = kwargs
        seen["env"] = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
        return "ctx"

    from ray._private import ray_constants

    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)  # restored after the test
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr("decisionflow.hooks.ray._port_open", lambda host, port: True)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "shutdown", lambda: seen.setdefault("shutdown", True))
    hook = make_hook(monkeypatch)
    with hook.connect(log_to_driver=False) as ctx:
        assert ctx == "ctx"
    assert seen["kwargs"] == {"address": "127.0.0.1:6380", "namespace": "decisionflow", "log_to_driver": False}
    assert seen["env"] == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path), "RAY_AUTH_TOKEN": None}
    assert seen["shutdown"] is True
    # A loopback head runs with Ray's cluster mode off; the driver must agree (see stack/ray.py).
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert ray_constants.ENABLE_RAY_CLUSTER is False
    assert os.environ["RAY_AUTH_TOKEN"] == "stale-token-from-the-shell"
    assert "RAY_AUTH_TOKEN_PATH" not in os.environ and "RAY_AUTH_MODE" not in os.environ


def test_connect_fails_before_ray_init_without_token(monkeypatch, home):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr("decisionflow.hooks.ray._port_open", lambda host, port: True)
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("ray.init must not be reached"))
    with pytest.raises(RayAuthError):
        with make_hook(monkeypatch).connect():
            pass


def test_connect_fails_fast_when_nothing_listens(monkeypatch, home):
    import ray

    write_token(home)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("ray.init must not be reached"))
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}.*ray_default"):
        with make_hook(monkeypatch, port=port).connect():
            pass


def test_importing_the_hook_does_not_import_ray():
    code = "import sys, decisionflow.hooks.ray; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
