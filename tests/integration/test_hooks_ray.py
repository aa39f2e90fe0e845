"""RayHook against a real Ray head with token authentication, started (and stopped) by this module."""

from __future__ import annotations

import urllib.error

import pytest
from airflow.sdk import Connection

try:
    from .fixtures_ml import ray_head  # noqa: F401 - pytest fixture
except ImportError:  # collected as a plain directory (rootdir-relative import mode)
    from fixtures_ml import ray_head  # noqa: F401

from decisionflow.hooks.base import LayerCheckError
from decisionflow.hooks.ray import RayHook

pytestmark = pytest.mark.integration


def hook_for(monkeypatch, head, password=None, **extra) -> RayHook:
    conn = Connection(
        conn_id="ray_default",
        conn_type="ray",
        host="127.0.0.1",
        port=head.gcs_port,
        password=password,
        extra=head.extra(**extra),
    )
    monkeypatch.setattr(RayHook, "get_connection", classmethod(lambda cls, conn_id: conn))
    return RayHook()


def test_platform_check(monkeypatch, ray_head):  # noqa: F811
    import ray

    result = hook_for(monkeypatch, ray_head).platform_check()
    assert result["square_of_7"] == 49
    assert result["address"] == ray_head.address
    assert result["namespace"] == "decisionflow-test"
    assert result["auth_mode"] == "token"
    assert result["ray_version"] == result["dashboard_version"] == ray.__version__
    assert result["alive_nodes"] == 1
    assert result["cluster_resources"]["CPU"] == ray_head.num_cpus
    assert not ray.is_initialized(), "platform_check must disconnect"


def test_platform_check_twice_in_one_process(monkeypatch, ray_head):  # noqa: F811
    hook = hook_for(monkeypatch, ray_head)
    assert hook.platform_check()["square_of_7"] == 49
    assert hook.platform_check()["square_of_7"] == 49


def test_connect_runs_work_in_the_namespace(monkeypatch, ray_head):  # noqa: F811
    import ray

    hook = hook_for(monkeypatch, ray_head)

    @ray.remote(num_cpus=0)
    class Counter:
        def __init__(self):
            self.value = 0

        def incr(self):
            self.value += 1
            return self.value

    with hook.connect(log_to_driver=False):
        counter = Counter.options(name="df-test-counter", lifetime="detached").remote()
        assert ray.get(counter.incr.remote(), timeout=60) == 1
    # A second driver finds the named actor because it joins the same namespace.
    with hook.connect(log_to_driver=False):
        assert ray.get_runtime_context().namespace == "decisionflow-test"
        again = ray.get_actor("df-test-counter")
        assert ray.get(again.incr.remote(), timeout=60) == 2
        ray.kill(again)
    assert not ray.is_initialized()


def test_inline_token_in_password(monkeypatch, ray_head):  # noqa: F811
    token = ray_head.token_path.read_text().strip()
    hook = hook_for(monkeypatch, ray_head, password=token, auth_token_path="/nonexistent/token")
    assert hook.dashboard_get("/api/version")["ray_version"]
    assert hook.platform_check()["square_of_7"] == 49


def test_dashboard_rejects_a_wrong_token(monkeypatch, ray_head, tmp_path):  # noqa: F811
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    hook = hook_for(monkeypatch, ray_head, auth_token_path=str(wrong))
    with pytest.raises(urllib.error.HTTPError) as http:
        hook.dashboard_get("/api/version")
    assert http.value.code == 403
    with pytest.raises(LayerCheckError) as info:
        hook.platform_check()
    assert info.value.layer == "ray"
    assert "rejected the token" in info.value.cause


def test_dashboard_requires_the_header(ray_head):  # noqa: F811
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(f"{ray_head.dashboard_url}/api/version", timeout=10)  # noqa: S310
    assert http.value.code == 401
