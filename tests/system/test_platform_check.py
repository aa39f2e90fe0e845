"""The whole local stack, end to end through Airflow's REST API.

Triggers ``platform_check`` on the private test stack (see conftest.py), waits for success, clears one task
through the REST API and sees it run again and succeed.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.system, pytest.mark.timeout(1800)]

DAG_ID = "platform_check"


def test_platform_check_end_to_end(client):
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
