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

# Before any test imports Feast: feast.metrics sets PROMETHEUS_MULTIPROCESS_DIR for the process, and
# prometheus_client chooses its value storage at import; in multiprocess mode two metrics of the same name in one
# process (the canary-analysis tests' private registries) add up. See decisionflow_serving/__init__.py.
import prometheus_client.values  # noqa: E402,F401
import pytest  # noqa: E402

#: Test files written but not yet seen green on a clean clone: marked `pending`, so `make test` leaves them out
#: and `make test-pending` runs them. A file leaves this list once it passes there (see the issue notes).
PENDING_FILES: set[str] = set()


#: Under pytest-xdist (`make test`: ``-n 2``) the system tests share one stack on the standard ports: they are one
#: unit of work that one worker runs in file order; every other file is a unit of its own, so module-scoped
#: fixtures (a built lake, a Kafka broker) are set up once. (xdist's ``loadgroup`` cannot do it with pytest 9.2:
#: it renames node ids through ``item._nodeid``, which pytest no longer reads.)
SYSTEM_TESTS = "tests/system/"


def _is_system(item) -> bool:
    return Path(item.fspath).resolve().relative_to(_PROJECT).as_posix().startswith(SYSTEM_TESTS)


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(item.fspath).resolve().relative_to(_PROJECT).as_posix() in PENDING_FILES:
            item.add_marker(pytest.mark.pending)
    # The system tests are the longest chain: first in the queue, so a worker starts on them at once while
    # the other takes the unit and integration files.
    items.sort(key=lambda item: not _is_system(item))


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """Units of work for xdist: one per test file, all system tests together, in collection order."""
    from xdist.scheduler import LoadScopeScheduling

    class FilesAndTheSystemChain(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return SYSTEM_TESTS if path.startswith(SYSTEM_TESTS) else path

    config.option.loadscopereorder = False  # keep collection order: the system chain first
    return FilesAndTheSystemChain(config, log)
