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
