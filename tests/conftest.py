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
PENDING_FILES: set[str] = set()


#: Under pytest-xdist (`make test`: ``-n 2 --dist loadgroup --no-loadscope-reorder``) the system tests share one
#: stack on the standard ports, so they form one group that one worker runs in file order; every other file is
#: its own group, so module-scoped fixtures (a built lake, a Kafka broker) are set up once.
SYSTEM_GROUP = "system-stack"


@pytest.hookimpl(tryfirst=True)  # before -m deselects and before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(item.fspath).resolve().relative_to(_PROJECT).as_posix()
        if path in PENDING_FILES:
            item.add_marker(pytest.mark.pending)
        item.add_marker(pytest.mark.xdist_group(SYSTEM_GROUP if path.startswith("tests/system/") else path))
    # The system tests are the longest chain: first in the queue, so a worker starts on them at once while
    # the other takes the unit and integration files.
    items.sort(key=lambda item: not Path(item.fspath).resolve().relative_to(_PROJECT).as_posix()
               .startswith("tests/system/"))
