"""Test-wide environment: Airflow must never touch a developer's ~/airflow or the running stack's DB."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_PROJECT = Path(__file__).resolve().parents[1]

os.environ.setdefault("DECISIONFLOW_HOME", str(_PROJECT))
if "AIRFLOW_HOME" not in os.environ:
    _home = Path(tempfile.mkdtemp(prefix="df-test-airflow-"))
    os.environ["AIRFLOW_HOME"] = str(_home)
    os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_home / 'airflow.db'}"
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(_PROJECT / "dags"))

import pytest  # noqa: E402

#: Test files written but not yet seen green on a clean clone: marked `pending`, so `make test` leaves them out
#: and `make test-pending` runs them. A file leaves this list once it passes there (see the issue notes).
PENDING_FILES: set[str] = {
    "tests/system/test_model_pipeline.py",  # its gate test met the weekly run started by unpausing; fix unverified
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(item.fspath).resolve().relative_to(_PROJECT).as_posix() in PENDING_FILES:
            item.add_marker(pytest.mark.pending)
