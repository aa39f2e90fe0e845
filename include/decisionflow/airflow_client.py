"""A small client for Airflow 3's REST API (``/api/v2``): what the demo, the CLI and the system tests use.

Notes that cost time to learn: a token comes from ``POST /auth/token``; triggering needs
``"logical_date": null``; ``clearTaskInstances`` defaults to ``dry_run: true``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

TERMINAL_RUN_STATES = {"success", "failed"}


class AirflowApiError(RuntimeError):
    pass


@dataclass
class AirflowClient:
    base_url: str
    username: str
    password: str
    timeout: float = 30.0

    @classmethod
    def for_local_stack(cls, ctx=None) -> AirflowClient:
        from decisionflow.stack.airflow import ADMIN_USER, base_url, passwords_file
        from decisionflow.stack.base import StackContext

        ctx = ctx or StackContext()
        path: Path = passwords_file(ctx)
        try:
            password = json.loads(path.read_text())[ADMIN_USER]
        except (OSError, ValueError, KeyError) as exc:
            raise AirflowApiError(f"admin password not readable from {path} (is the stack up?): {exc}") from exc
        return cls(base_url(ctx), ADMIN_USER, password)

    @classmethod
    def from_env(cls, url: str | None = None, username: str | None = None,
                 password: str | None = None) -> AirflowClient:
        """A client for ``url`` (or ``$DECISIONFLOW_AIRFLOW_URL``) with the given credentials (or
        ``$DECISIONFLOW_AIRFLOW_USER`` / ``$DECISIONFLOW_AIRFLOW_PASSWORD``); without a URL, the local stack's."""
        import os

        url = url or os.environ.get("DECISIONFLOW_AIRFLOW_URL")
        if not url:
            return cls.for_local_stack()
        username = username or os.environ.get("DECISIONFLOW_AIRFLOW_USER") or "admin"
        password = password if password is not None else os.environ.get("DECISIONFLOW_AIRFLOW_PASSWORD")
        if password is None:
            raise AirflowApiError(f"no password for {username} at {url}: pass --password or set "
                                  "DECISIONFLOW_AIRFLOW_PASSWORD")
        return cls(url.rstrip("/"), username, password)

    def __post_init__(self) -> None:
        self._http = httpx.Client(base_url=self.base_url, timeout=self.timeout)
        self._token: str | None = None

    # -- plumbing -----------------------------------------------------------------------------------------
    def _auth(self) -> dict[str, str]:
        if self._token is None:
            response = self._http.post("/auth/token", json={"username": self.username, "password": self.password})
            if response.status_code not in (200, 201):
                raise AirflowApiError(f"POST /auth/token -> {response.status_code}: {response.text[:300]}")
            self._token = response.json()["access_token"]
        return {"Authorization": f"Bearer {self._token}"}

    def request(self, method: str, path: str, **kwargs) -> dict:
        response = self._http.request(method, f"/api/v2{path}", headers=self._auth(), **kwargs)
        if response.status_code == 401:  # token expired: one fresh try
            self._token = None
            response = self._http.request(method, f"/api/v2{path}", headers=self._auth(), **kwargs)
        if response.status_code >= 400:
            raise AirflowApiError(f"{method} /api/v2{path} -> {response.status_code}: {response.text[:500]}")
        return response.json() if response.content else {}

    # -- DAGs and runs ------------------------------------------------------------------------------------
    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> dict:
        """Wait until the dag-processor has parsed ``dag_id``; fail with its import errors if it has some."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.request("GET", f"/dags/{dag_id}")
            except AirflowApiError as exc:
                if "404" not in str(exc):
                    raise
            if time.monotonic() > deadline:
                errors = self.request("GET", "/importErrors").get("import_errors", [])
                raise AirflowApiError(f"DAG {dag_id!r} not parsed after {timeout:.0f}s; import errors: {errors}")
            time.sleep(2)

    def unpause(self, dag_id: str) -> None:
        self.request("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def pause(self, dag_id: str) -> None:
        self.request("PATCH", f"/dags/{dag_id}", json={"is_paused": True})

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        run = self.request("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})
        return run["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        items = self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return {ti["task_id"]: ti["state"] for ti in items}

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 900, poll: float = 3, log=None) -> str:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            state = self.run_state(dag_id, run_id)
            if log:
                tasks = self.task_states(dag_id, run_id)
                summary = ", ".join(f"{k}={v}" for k, v in sorted(tasks.items()))
                if summary != last:
                    log(f"  {dag_id} {run_id}: {state} [{summary}]")
                    last = summary
            if state in TERMINAL_RUN_STATES:
                return state
            time.sleep(poll)
        raise AirflowApiError(f"{dag_id} run {run_id} not finished after {timeout:.0f}s: {self.task_states(dag_id, run_id)}")

    def runs(self, dag_id: str, limit: int = 50) -> list[dict]:
        """Most recent runs first."""
        return self.request("GET", f"/dags/{dag_id}/dagRuns",
                            params={"order_by": "-run_after", "limit": limit})["dag_runs"]

    def wait_for_run_after(self, dag_id: str, after: str, timeout: float = 900, poll: float = 5,
                           log=None) -> dict:
        """Wait for a run of ``dag_id`` queued at or after ``after`` (ISO time) to succeed; fail if one fails."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fresh = [r for r in self.runs(dag_id) if (r.get("run_after") or r.get("queued_at") or "") >= after]
            for run in sorted(fresh, key=lambda r: r.get("run_after") or ""):
                if run["state"] == "success":
                    return run
                if run["state"] == "failed":
                    raise AirflowApiError(f"{dag_id} run {run['dag_run_id']} failed: "
                                          f"{self.task_states(dag_id, run['dag_run_id'])}")
            if log and fresh:
                log(f"  {dag_id}: {[(r['dag_run_id'], r['state']) for r in fresh]}")
            time.sleep(poll)
        raise AirflowApiError(f"no successful {dag_id} run queued after {after} within {timeout:.0f}s")

    def clear_tasks(self, dag_id: str, run_id: str, task_ids: list[str]) -> list[str]:
        """Really clear (``dry_run`` false) the given tasks of a run so the scheduler runs them again."""
        body = {"dry_run": False, "dag_run_id": run_id, "task_ids": task_ids, "only_failed": False,
                "reset_dag_runs": True, "include_downstream": False, "include_upstream": False}
        result = self.request("POST", f"/dags/{dag_id}/clearTaskInstances", json=body)
        return [ti["task_id"] for ti in result.get("task_instances", [])]

    def task_instances(self, dag_id: str, run_id: str, page: int = 100) -> list[dict]:
        """Every task instance of a run (mapped ones one per map index), paged."""
        items: list[dict] = []
        while True:
            data = self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                                params={"limit": page, "offset": len(items)})
            batch = data.get("task_instances", [])
            items.extend(batch)
            if not batch or len(items) >= int(data.get("total_entries", len(items))):
                return items

    def latest_run(self, dag_id: str, state: str | None = None) -> dict | None:
        """The most recent run of ``dag_id`` (in ``state`` when given), or ``None``."""
        params: dict[str, Any] = {"order_by": "-run_after", "limit": 1}
        if state:
            params["state"] = [state]
        runs = self.request("GET", f"/dags/{dag_id}/dagRuns", params=params).get("dag_runs", [])
        return runs[0] if runs else None

    def clear_task_instances(self, dag_id: str, body: dict[str, Any]) -> list[dict]:
        """``POST /dags/{dag_id}/clearTaskInstances`` with ``body`` as given (mind ``dry_run``, which the API
        defaults to true); the task instances it cleared (or would clear)."""
        return self.request("POST", f"/dags/{dag_id}/clearTaskInstances", json=body).get("task_instances", [])

    def try_number(self, dag_id: str, run_id: str, task_id: str) -> int:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")["try_number"]

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        """A task's XCom value (deserialized), e.g. what its ``execute`` returned."""
        entry = self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}",
                             params={"deserialize": True, "stringify": False})
        return entry.get("value")

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int) -> str:
        data = self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
                            params={"full_content": True})
        content = data.get("content")
        if isinstance(content, list):
            return "\n".join(item.get("event", "") if isinstance(item, dict) else str(item) for item in content)
        return str(content)
