"""Point the ``feast_default`` and ``lake_default`` connections at a test's own folders, without an Airflow DB."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import Connection

from decisionflow.config import project_home
from decisionflow.hooks.feast import FeastHook
from decisionflow.hooks.lake import LakeHook


@contextmanager
def applied_feast_hook(lake_root: str, folder: Path, online_store: dict[str, Any] | None = None,
                       **extra: Any) -> Iterator[FeastHook]:
    """A ``FeastHook`` on the project's feature repo, applied; registry (and SQLite online store) under ``folder``.

    While the block runs, ``FeastHook`` and ``LakeHook`` resolve ``feast_default`` / ``lake_default`` to these
    settings (as if the connections were in Airflow); ``extra`` goes into the Feast connection's extra.
    """
    settings = {
        "repo_path": str(project_home() / "include" / "feature_repo"),
        "project": "decisionflow",
        "registry": str(folder / "registry.db"),
        "online_store": online_store or {"type": "sqlite", "path": str(folder / "online.db")},
        **extra,
    }
    connections = {
        "feast_default": Connection(conn_id="feast_default", conn_type="feast", extra=json.dumps(settings)),
        "lake_default": Connection(conn_id="lake_default", conn_type="delta_lake",
                                   extra=json.dumps({"root": str(lake_root)})),
    }
    with pytest.MonkeyPatch.context() as patch:
        for hook_class in (FeastHook, LakeHook):
            patch.setattr(hook_class, "get_connection", classmethod(lambda cls, conn_id: connections[conn_id]))
        hook = FeastHook()
        hook.apply()
        yield hook
