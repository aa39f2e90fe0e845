"""FeastHook without applying: RepoConfig built from the connection (sqlite and redis), paths, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from airflow.sdk import Connection

from decisionflow.hooks.base import LayerCheckError
from decisionflow.hooks.feast import FeastConfigError, FeastHook, FeastRepoError

EXTRA = {
    "repo_path": "include/feature_repo",
    "project": "decisionflow",
    "registry": ".data/feast/registry.db",
    "online_store": {"type": "sqlite", "path": ".data/feast/online.db"},
}
REDIS_MODULES = ("redis", "redis.asyncio", "redis.cluster", "redis.sentinel", "feast.infra.online_stores.redis")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DECISIONFLOW_HOME", str(tmp_path))
    return tmp_path


def make_hook(monkeypatch, extra) -> FeastHook:
    conn = Connection(conn_id="feast_default", conn_type="feast", extra=json.dumps(extra))
    monkeypatch.setattr(FeastHook, "get_connection", classmethod(lambda cls, conn_id: conn))
    return FeastHook()


def test_provider_style_attributes():
    assert (FeastHook.conn_name_attr, FeastHook.default_conn_name, FeastHook.conn_type, FeastHook.hook_name) == (
        "feast_conn_id",
        "feast_default",
        "feast",
        "Feast",
    )
    behaviour = FeastHook.get_ui_field_behaviour()
    assert {"host", "port", "login", "password"} <= set(behaviour["hidden_fields"])
    assert json.loads(behaviour["placeholders"]["extra"])["project"] == "decisionflow"


def test_repo_config_dict_resolves_local_paths(monkeypatch, home):
    settings = make_hook(monkeypatch, EXTRA).repo_config_dict()
    assert settings == {
        "project": "decisionflow",
        "provider": "local",
        "entity_key_serialization_version": 3,
        "registry": str(home / ".data" / "feast" / "registry.db"),
        "online_store": {"type": "sqlite", "path": str(home / ".data" / "feast" / "online.db")},
        "offline_store": {"type": "decisionflow.features.offline_store.DeltaLakeOfflineStore"},
        "repo_path": str(home / "include" / "feature_repo"),
    }


def test_sqlite_repo_config(monkeypatch, home):
    config = make_hook(monkeypatch, EXTRA).get_repo_config()
    assert config.project == "decisionflow"
    assert config.provider == "local"
    assert config.online_store.type == "sqlite"
    assert config.online_store.path == str(home / ".data" / "feast" / "online.db")
    assert config.registry.path == str(home / ".data" / "feast" / "registry.db")
    assert str(config.repo_path) == str(home / "include" / "feature_repo")


def test_defaults_when_extra_is_minimal(monkeypatch, home):
    hook = make_hook(monkeypatch, {})
    settings = hook.repo_config_dict()
    assert settings["project"] == "decisionflow"
    assert settings["registry"] == str(home / ".data" / "feast" / "registry.db")
    assert settings["online_store"] == {"type": "sqlite", "path": str(home / ".data" / "feast" / "online.db")}
    # Delta sources read at their current snapshot unless the connection says otherwise.
    assert settings["offline_store"] == {"type": "decisionflow.features.offline_store.DeltaLakeOfflineStore"}
    assert type(hook.get_repo_config().offline_store).__name__ == "DeltaLakeOfflineStoreConfig"
    assert hook.repo_path == home / "include" / "feature_repo"


def test_absolute_paths_are_kept(monkeypatch, home, tmp_path):
    extra = {
        **EXTRA,
        "registry": str(tmp_path / "r.db"),
        "online_store": {"type": "sqlite", "path": str(tmp_path / "o.db")},
    }
    settings = make_hook(monkeypatch, extra).repo_config_dict()
    assert settings["registry"] == str(tmp_path / "r.db")
    assert settings["online_store"]["path"] == str(tmp_path / "o.db")


def test_redis_online_store_is_a_connection_edit(monkeypatch, home):
    extra = {**EXTRA, "online_store": {"type": "redis", "connection_string": "127.0.0.1:6379,db=2"}}
    hook = make_hook(monkeypatch, extra)
    assert hook.repo_config_dict()["online_store"] == {"type": "redis", "connection_string": "127.0.0.1:6379,db=2"}
    config = hook.get_repo_config()
    assert type(config.online_store).__name__ == "RedisOnlineStoreConfig"
    assert config.online_store.connection_string == "127.0.0.1:6379,db=2"
    assert config.registry.path == str(home / ".data" / "feast" / "registry.db")


def test_redis_without_its_package_names_the_extra(monkeypatch, home):
    for name in REDIS_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis -> ImportError, whether installed or not
    hook = make_hook(monkeypatch, {**EXTRA, "online_store": {"type": "redis", "connection_string": "x:6379"}})
    with pytest.raises(FeastConfigError, match=r"feast_default.*online_store 'redis'.*feast\[redis\]"):
        hook.get_repo_config()
    sys.modules.pop("feast.infra.online_stores.redis", None)


def test_sql_registry_url_untouched(monkeypatch, home):
    registry = {
        "registry_type": "sql",
        "path": "postgresql+psycopg://postgres@127.0.0.1:5432/feast",
        "cache_ttl_seconds": 60,
    }
    settings = make_hook(monkeypatch, {**EXTRA, "registry": registry}).repo_config_dict()
    assert settings["registry"] == registry


def test_file_registry_mapping_path_resolved(monkeypatch, home):
    hook = make_hook(monkeypatch, {**EXTRA, "registry": {"path": "reg/r.db", "cache_ttl_seconds": 5}})
    settings = hook.repo_config_dict()
    assert settings["registry"] == {"path": str(home / "reg" / "r.db"), "cache_ttl_seconds": 5}


def test_passthrough_keys_reach_repo_config(monkeypatch, home):
    extra = {**EXTRA, "offline_store": {"type": "file"}, "entity_key_serialization_version": 3}
    config = make_hook(monkeypatch, extra).get_repo_config()
    assert type(config.offline_store).__name__ == "DaskOfflineStoreConfig"


def test_unknown_extra_key_is_named(monkeypatch, home):
    hook = make_hook(monkeypatch, {**EXTRA, "online_stor": {"type": "sqlite"}})
    with pytest.raises(FeastConfigError, match=r"unknown extra key\(s\) \['online_stor'\]"):
        hook.repo_config_dict()


def test_online_store_without_type_is_named(monkeypatch, home):
    with pytest.raises(FeastConfigError, match="online_store must be a mapping with a 'type'"):
        make_hook(monkeypatch, {**EXTRA, "online_store": {"path": "x.db"}}).repo_config_dict()


def test_unknown_online_store_type_is_named(monkeypatch, home):
    with pytest.raises(FeastConfigError, match="feast_default"):
        make_hook(monkeypatch, {**EXTRA, "online_store": {"type": "nosuchstore"}}).get_repo_config()


def test_apply_missing_repo_is_named(monkeypatch, home):
    hook = make_hook(monkeypatch, {**EXTRA, "repo_path": "nowhere"})
    with pytest.raises(FeastRepoError, match=r"feature repo .*nowhere .*does not exist"):
        hook.apply()


def test_platform_check_turns_config_errors_into_layer_errors(monkeypatch, home):
    with pytest.raises(LayerCheckError) as info:
        make_hook(monkeypatch, {**EXTRA, "bogus": 1}).platform_check()
    assert info.value.layer == "feast"
    assert "bogus" in info.value.cause
    assert "feast_default" in info.value.remedy


def test_importing_the_hook_does_not_import_feast():
    code = "import sys, decisionflow.hooks.feast; print('feast' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
