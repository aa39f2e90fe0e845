"""On-call retry of a DAG run: clear its failed tasks *and* their downstream through Airflow's REST API.

Clearing only the failed task leaves its downstream ``upstream_failed`` for good, so the run never finishes
(apache/airflow#52640). :func:`plan_retry` picks the run (default: the latest failed one), its ``failed`` and
``upstream_failed`` task instances (a mapped task by map index), and asks ``clearTaskInstances`` with
``dry_run: true`` what clearing them with ``include_downstream`` would reset -- the plan; :func:`apply_retry`
sends the same request with ``dry_run: false``. ``decisionflow retry DAG [RUN]`` prints the plan and clears only
with ``--yes``.

Plain Python over :class:`~decisionflow.airflow_client.AirflowClient` (no Airflow import).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Task-instance states that make a run need a retry.
FAILED_STATES = ("failed", "upstream_failed")


class RetryError(RuntimeError):
    """The run cannot be retried as asked (no such DAG or run, nothing failed); the message names DAG and run."""


@dataclass
class RetryPlan:
    """What a retry clears: the run, its failed task instances and everything the API would reset."""

    dag_id: str
    run_id: str
    run_state: str | None
    failed: list[dict[str, Any]]
    upstream_failed: list[dict[str, Any]]
    to_clear: list[dict[str, Any]] = field(default_factory=list)

    def body(self, dry_run: bool) -> dict[str, Any]:
        """The ``clearTaskInstances`` request: these task instances plus their downstream, whatever its state."""
        return {"dry_run": dry_run, "dag_run_id": self.run_id, "task_ids": markers(self.failed + self.upstream_failed),
                "include_downstream": True, "include_upstream": False, "only_failed": False,
                "reset_dag_runs": True, "include_future": False, "include_past": False}

    def format(self) -> str:
        lines = [f"{self.dag_id} run {self.run_id} ({self.run_state}): {len(self.failed)} failed, "
                 f"{len(self.upstream_failed)} upstream_failed task instance(s)"]
        lines.append(f"would clear {len(self.to_clear)} task instance(s) (the failed ones and their downstream):")
        for ti in sorted(self.to_clear, key=lambda t: (t.get("task_id") or "", t.get("map_index", -1))):
            lines.append(f"  {label(ti):<40} {ti.get('state') or 'none'}")
        return "\n".join(lines)


def label(ti: dict[str, Any]) -> str:
    """``task_id`` or ``task_id[map_index]``."""
    index = ti.get("map_index", -1)
    return f"{ti.get('task_id')}[{index}]" if index is not None and index >= 0 else str(ti.get("task_id"))


def markers(tis: list[dict[str, Any]]) -> list[str | list]:
    """``task_ids`` of the API: a plain id, or ``[task_id, map_index]`` for one map index of a mapped task."""
    out: list[str | list] = []
    for ti in tis:
        index = ti.get("map_index", -1)
        marker: str | list = [ti["task_id"], int(index)] if index is not None and index >= 0 else ti["task_id"]
        if marker not in out:
            out.append(marker)
    return out


def plan_retry(client, dag_id: str, run_id: str | None = None) -> RetryPlan:
    """The retry plan of ``run_id`` (default: the latest failed run of ``dag_id``); clears nothing.

    :raises RetryError: no failed run, or the run has no failed task instance.
    """
    if not dag_id:
        raise RetryError("DAG: give the dag_id of the run to retry")
    if run_id:
        run = client.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
    else:
        run = client.latest_run(dag_id, state="failed")
        if run is None:
            raise RetryError(f"DAG {dag_id}: no failed run to retry (give RUN to retry another one)")
        run_id = run["dag_run_id"]
    tis = client.task_instances(dag_id, run_id)
    failed = [ti for ti in tis if ti.get("state") == "failed"]
    upstream_failed = [ti for ti in tis if ti.get("state") == "upstream_failed"]
    plan = RetryPlan(dag_id, run_id, run.get("state"), failed, upstream_failed)
    if not failed and not upstream_failed:
        states = sorted({str(ti.get("state")) for ti in tis})
        raise RetryError(f"DAG {dag_id} run {run_id} ({run.get('state')}): no failed or upstream_failed task "
                         f"instance (states: {', '.join(states) or 'none'}); nothing to retry")
    plan.to_clear = client.clear_task_instances(dag_id, plan.body(dry_run=True))
    return plan


def apply_retry(client, plan: RetryPlan) -> list[dict[str, Any]]:
    """Clear what ``plan`` names (``dry_run: false``); the task instances cleared."""
    return client.clear_task_instances(plan.dag_id, plan.body(dry_run=False))
