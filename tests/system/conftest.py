"""One private local stack for all system tests: own data dir, the standard ports, brought down at the end.

Test files run in name order; ``test_zz_stack_down.py`` goes last and checks that ``down`` leaves nothing.

Developing one test without the whole chain: ``DF_SYSTEM_DATA=<dir>`` runs on the stack of that data dir (started
if it is not running) and leaves it up and its data in place, e.g. ``DF_SYSTEM_DATA=/tmp/dfsys pytest
tests/system/test_lakehouse_pipeline.py tests/system/test_model_pipeline.py``, then the test at hand against it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from decisionflow.airflow_client import AirflowClient
from decisionflow.stack import Stack, StackContext


@pytest.fixture(scope="session")
def stack():
    kept = os.environ.get("DF_SYSTEM_DATA")
    if kept:
        data = Path(kept)
        data.mkdir(parents=True, exist_ok=True)
        data.chmod(0o755)
        stack = Stack(StackContext(data=data))
        stack.up(timeout=300)  # starts only what is not running
        yield stack
        return
    data = Path(tempfile.mkdtemp(prefix="df-system-"))
    data.chmod(0o755)  # PostgreSQL runs as the 'postgres' user when we are root: it must enter the dir
    stack = Stack(StackContext(data=data))
    busy = stack.listeners_left()
    if busy:
        pytest.fail(f"ports already in use by another process (a running `make up`? run `make down`): {busy}")
    try:
        stack.up(timeout=300)
        yield stack
    finally:
        stack.down()
        if os.environ.get("DF_KEEP_TEST_DATA") != "1":
            shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def client(stack) -> AirflowClient:
    return AirflowClient.for_local_stack(stack.ctx)


@pytest.fixture(scope="module")
def lake(stack) -> Path:
    """The stack's lake root, once ``test_lakehouse_pipeline.py`` has built gold from generated events."""
    from deltalake import DeltaTable

    root = stack.ctx.data / "lake"
    try:
        rows = DeltaTable(str(root / "gold/transactions_enriched")).to_pyarrow_table(columns=["event_id"]).num_rows
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"no gold tables under {root}: test_lakehouse_pipeline.py builds them first ({exc})")
    assert rows > 1000, f"gold/transactions_enriched has only {rows} rows"
    return root
