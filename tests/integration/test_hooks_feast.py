"""FeastHook applying a real feature repo (the project's include/feature_repo) into a temporary registry."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import textwrap

import pytest
from airflow.sdk import Connection

from decisionflow.config import project_home
from decisionflow.hooks.base import LayerCheckError
from decisionflow.hooks.feast import FeastHook, FeastRepoError

pytestmark = pytest.mark.integration

REPO = project_home() / "include" / "feature_repo"


def hook_for(monkeypatch, tmp_path, repo_path=REPO, **overrides) -> FeastHook:
    extra = {
        "repo_path": str(repo_path),
        "project": "decisionflow",
        "registry": str(tmp_path / "feast" / "registry.db"),
        "online_store": {"type": "sqlite", "path": str(tmp_path / "feast" / "online.db")},
        **overrides,
    }
    conn = Connection(conn_id="feast_default", conn_type="feast", extra=json.dumps(extra))
    monkeypatch.setattr(FeastHook, "get_connection", classmethod(lambda cls, conn_id: conn))
    return FeastHook()


def test_apply_the_project_repo(monkeypatch, tmp_path):
    cwd = os.getcwd()
    hook = hook_for(monkeypatch, tmp_path)
    applied = hook.apply()
    assert applied["project"] == "decisionflow"
    assert applied["entities"] == ["account", "merchant"]
    assert applied["feature_views"] == ["account_features", "merchant_features"]
    assert applied["on_demand_feature_views"] == ["transaction_context"]
    assert applied["feature_services"] == ["risk_v1"]
    assert (tmp_path / "feast" / "registry.db").is_file()
    assert os.getcwd() == cwd, "apply must restore the working directory"
    store = hook.get_store()
    assert sorted(e.name for e in store.list_entities()) == ["account", "merchant"]
    views = {view.name: view for view in store.list_feature_views()}
    assert views["account_features"].entities == ["account"]
    assert views["merchant_features"].entities == ["merchant"]
    assert len(views["account_features"].features) == 12
    assert {"merchant_fraud_rate", "merchant_labels_known"} <= {f.name for f in views["merchant_features"].features}
    # The sqlite online store got a table for the view.
    with sqlite3.connect(tmp_path / "feast" / "online.db") as db:
        tables = [row[0] for row in db.execute("select name from sqlite_master where type='table'")]
    assert {"decisionflow_account_features", "decisionflow_merchant_features"} <= set(tables)
    # Idempotent.
    assert hook.apply() == applied


def test_platform_check(monkeypatch, tmp_path):
    result = hook_for(monkeypatch, tmp_path).platform_check()
    assert result["project"] == "decisionflow"
    assert result["online_store"] == "sqlite"
    assert result["entities"] == ["account", "merchant"]
    assert result["feature_views"] == ["account_features", "merchant_features"]
    assert result["online_read"] == "ok (account_features:txn_count_1h)"
    assert result["registry"] == str(tmp_path / "feast" / "registry.db")


def test_apply_follows_repo_edits(monkeypatch, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns("__pycache__"))
    extra_file = repo / "decisionflow_test_device.py"
    extra_file.write_text(
        textwrap.dedent(
            """
            from feast import Entity, ValueType

            device = Entity(name="device", join_keys=["device_id"], value_type=ValueType.STRING)
            """
        )
    )
    hook = hook_for(monkeypatch, tmp_path, repo_path=repo)
    assert hook.apply()["entities"] == ["account", "device", "merchant"]
    assert "device" in {e.name for e in hook.get_store().list_entities()}
    extra_file.unlink()
    assert hook.apply()["entities"] == ["account", "merchant"]
    assert "device" not in {e.name for e in hook.get_store().list_entities()}, "removed definitions are removed"


def test_project_mismatch_is_named(monkeypatch, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "decisionflow_test_project.py").write_text(
        'from feast import Project\nproject = Project(name="someone_else", description="x")\n'
    )
    hook = hook_for(monkeypatch, tmp_path, repo_path=repo)
    with pytest.raises(FeastRepoError, match="do not match project 'decisionflow'"):
        hook.apply()
    with pytest.raises(LayerCheckError) as info:
        hook.platform_check()
    assert info.value.layer == "feast"


def test_broken_definition_is_named(monkeypatch, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "decisionflow_test_broken.py").write_text("import definitely_not_a_module\n")
    with pytest.raises(FeastRepoError, match="importing the definitions .* ModuleNotFoundError"):
        hook_for(monkeypatch, tmp_path, repo_path=repo).apply()
