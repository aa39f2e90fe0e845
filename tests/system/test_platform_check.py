"""The whole local stack, end to end through Airflow's REST API.

Brings a private stack up (own data dir, the standard ports), triggers ``platform_check``, waits for success,
clears one task and sees it succeed again, then brings the stack down and checks nothing is left.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from decisionflow.airflow_client import AirflowClient
from decisionflow.stack import Stack, StackContext

pytestmark = [pytest.mark.system, pytest.mark.timeout(1800)]

DAG_ID = "platform_check"


@pytest.fixture(scope="module")
def stack():
    data = Path(tempfile.mkdtemp(prefix="df-system-"))
    ctx = StackContext(data=data)
    stack = Stack(ctx)
    busy = stack.listeners_left()
    if busy:
        pytest.fail(f"ports already in use by another process (a running `make up`? run `make down`): {busy}")
    try:
        stack.up(timeout=240)
        yield stack
    finally:
        stack.down()
        if os.environ.get("DF_KEEP_TEST_DATA") != "1":
            shutil.rmtree(data, ignore_errors=True)


def test_platform_check_end_to_end(stack):
    client = AirflowClient.for_local_stack(stack.ctx)
    client.wait_for_dag(DAG_ID)
    client.unpause(DAG_ID)
    run_id = client.trigger(DAG_ID)
    state = client.wait_for_run(DAG_ID, run_id, timeout=1200, log=print)
    tasks = client.task_states(DAG_ID, run_id)
    assert state == "success", f"platform_check failed: {tasks}"
    assert set(tasks) == {"kafka", "spark_delta", "mlflow", "ray", "milvus", "feast"}
    assert set(tasks.values()) == {"success"}

    # On-call clears a task from the UI: it must run again and succeed (idempotent checks).
    tries_before = client.try_number(DAG_ID, run_id, "mlflow")
    assert client.clear_tasks(DAG_ID, run_id, ["mlflow"]) == ["mlflow"]
    state = client.wait_for_run(DAG_ID, run_id, timeout=600, log=print)
    assert state == "success"
    assert client.task_states(DAG_ID, run_id)["mlflow"] == "success"
    assert client.try_number(DAG_ID, run_id, "mlflow") == tries_before + 1


def test_stack_down_leaves_nothing(stack):
    services = stack.services
    groups = [s.pid() for s in services]
    stack.down()
    assert stack.listeners_left() == []
    for service, pgid in zip(services, groups):
        assert not service.running(), service.name
        if pgid:
            assert service._group_members(pgid) == [], f"{service.name} left processes behind"
