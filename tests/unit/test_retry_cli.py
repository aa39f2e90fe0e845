"""`decisionflow retry DAG [RUN]` against a small fake of Airflow's REST API (loopback, a free port): the plan is
a dry run, --yes clears the failed task instances and their downstream (upstream_failed included) of that run."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from decisionflow.cli import main

#: build_lakehouse-like graph: migrate >> silver >> gold >> report, plus a mapped `apply` after silver.
DOWNSTREAM = {"migrate": ["silver"], "silver": ["gold", "apply"], "gold": ["report"], "apply": [], "report": []}


def _closure(tasks: set[str]) -> set[str]:
    out, todo = set(tasks), list(tasks)
    while todo:
        for child in DOWNSTREAM.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


class FakeAirflow:
    def __init__(self):
        self.runs = {
            "scheduled__old": {"dag_run_id": "scheduled__old", "state": "failed", "run_after": "2026-12-01T10:00:00Z"},
            "manual__2026-12-01T20:00:00+00:00": {"dag_run_id": "manual__2026-12-01T20:00:00+00:00",
                                                  "state": "failed", "run_after": "2026-12-01T20:00:00Z"},
            "ok_run": {"dag_run_id": "ok_run", "state": "success", "run_after": "2026-12-01T21:00:00Z"},
        }
        self.tis = {run: self._tis(run) for run in self.runs}
        self.clears: list[dict] = []

    def _tis(self, run: str) -> list[dict]:
        if run == "ok_run":
            states = {"migrate": "success", "silver": "success", "gold": "success", "report": "success"}
            return [{"task_id": t, "map_index": -1, "state": s} for t, s in states.items()]
        return [{"task_id": "migrate", "map_index": -1, "state": "success"},
                {"task_id": "silver", "map_index": -1, "state": "success"},
                {"task_id": "gold", "map_index": -1, "state": "failed"},
                {"task_id": "report", "map_index": -1, "state": "upstream_failed"},
                {"task_id": "apply", "map_index": 0, "state": "success"},
                {"task_id": "apply", "map_index": 1, "state": "failed"}]

    def clear(self, body: dict) -> list[dict]:
        run = body["dag_run_id"]
        plain = {m for m in body["task_ids"] if isinstance(m, str)}
        mapped = {(m[0], m[1]) for m in body["task_ids"] if isinstance(m, list)}
        seeds = plain | {t for t, _ in mapped}
        wanted = _closure(seeds) if body.get("include_downstream") else seeds
        hits = []
        for ti in self.tis[run]:
            if ti["task_id"] not in wanted:
                continue
            if ti["task_id"] in {t for t, _ in mapped} and ti["task_id"] not in plain and \
                    (ti["task_id"], ti["map_index"]) not in mapped:
                continue  # one map index asked for: the others stay
            if body.get("only_failed") and ti["state"] not in ("failed", "upstream_failed"):
                continue
            hits.append(dict(ti))
        if not body["dry_run"]:
            for ti in self.tis[run]:
                if any(h["task_id"] == ti["task_id"] and h["map_index"] == ti["map_index"] for h in hits):
                    ti["state"] = None
            self.runs[run]["state"] = "queued"
        return hits


@pytest.fixture
def airflow(monkeypatch):
    fake = FakeAirflow()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            path = unquote(urlsplit(self.path).path)
            if path == "/auth/token":
                ok = body == {"username": "oncall", "password": "secret"}
                return self._send(201 if ok else 401, {"access_token": "tok"} if ok else {"detail": "bad"})
            if self.headers.get("Authorization") != "Bearer tok":
                return self._send(401, {"detail": "no token"})
            match = re.fullmatch(r"/api/v2/dags/([^/]+)/clearTaskInstances", path)
            if match and match[1] == "build_lakehouse":
                fake.clears.append(body)
                return self._send(200, {"task_instances": fake.clear(body), "total_entries": 0})
            return self._send(404, {"detail": f"no route {path}"})

        def do_GET(self):  # noqa: N802
            if self.headers.get("Authorization") != "Bearer tok":
                return self._send(401, {"detail": "no token"})
            parts = urlsplit(self.path)
            path, query = unquote(parts.path), parse_qs(parts.query)
            if not path.startswith("/api/v2/dags/build_lakehouse/"):
                return self._send(404, {"detail": f"DAG not found: {path}"})
            rest = path[len("/api/v2/dags/build_lakehouse/"):]
            if rest == "dagRuns":
                runs = sorted(fake.runs.values(), key=lambda r: r["run_after"], reverse=True)
                if "state" in query:
                    runs = [r for r in runs if r["state"] in query["state"]]
                return self._send(200, {"dag_runs": runs[: int(query.get("limit", ["50"])[0])],
                                        "total_entries": len(runs)})
            match = re.fullmatch(r"dagRuns/(.+?)(/taskInstances)?", rest)
            if not match or match[1] not in fake.runs:
                return self._send(404, {"detail": f"DagRun not found: {rest}"})
            if not match[2]:
                return self._send(200, fake.runs[match[1]])
            tis = fake.tis[match[1]]
            offset, limit = int(query.get("offset", ["0"])[0]), int(query.get("limit", ["100"])[0])
            limit = min(limit, 2)  # page small: the client must page through
            return self._send(200, {"task_instances": tis[offset:offset + limit], "total_entries": len(tis)})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("DECISIONFLOW_AIRFLOW_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("DECISIONFLOW_AIRFLOW_USER", "oncall")
    monkeypatch.setenv("DECISIONFLOW_AIRFLOW_PASSWORD", "secret")
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


def test_default_is_a_dry_run_of_the_latest_failed_run(airflow, capsys):
    assert main(["retry", "build_lakehouse"]) == 0
    out = capsys.readouterr().out
    run = "manual__2026-12-01T20:00:00+00:00"  # the latest failed one, not the older failed nor the newer success
    assert f"build_lakehouse run {run} (failed): 2 failed, 1 upstream_failed" in out
    for label in ("gold", "report", "apply[1]"):
        assert re.search(rf"^\s+{re.escape(label)}\s", out, re.M), (label, out)
    assert "apply[0]" not in out and "migrate" not in out.split("would clear", 1)[1]
    assert f"decisionflow retry build_lakehouse {run} --yes" in out
    assert [c["dry_run"] for c in airflow.clears] == [True]  # nothing cleared
    body = airflow.clears[0]
    assert body["include_downstream"] is True and body["only_failed"] is False and body["dag_run_id"] == run
    assert sorted(map(str, body["task_ids"])) == sorted(map(str, ["gold", "report", ["apply", 1]]))
    assert {ti["state"] for ti in airflow.tis[run] if ti["task_id"] == "gold"} == {"failed"}


def test_yes_clears_the_failed_tasks_and_their_downstream(airflow, capsys):
    assert main(["retry", "build_lakehouse", "scheduled__old", "--yes"]) == 0
    out = capsys.readouterr().out
    assert "cleared 3 task instance(s): apply[1], gold, report" in out
    assert [c["dry_run"] for c in airflow.clears] == [True, False]
    assert airflow.clears[0]["task_ids"] == airflow.clears[1]["task_ids"]
    states = {(t["task_id"], t["map_index"]): t["state"] for t in airflow.tis["scheduled__old"]}
    assert states[("gold", -1)] is None and states[("report", -1)] is None and states[("apply", 1)] is None
    assert states[("apply", 0)] == "success" and states[("silver", -1)] == "success"
    assert airflow.runs["scheduled__old"]["state"] == "queued"


def test_nothing_to_retry_is_a_clear_error(airflow, capsys):
    assert main(["retry", "build_lakehouse", "ok_run", "--yes"]) == 1
    err = capsys.readouterr().err
    assert "DAG build_lakehouse run ok_run (success): no failed or upstream_failed task instance" in err
    assert airflow.clears == []
    assert main(["retry", "build_lakehouse", "no_such_run"]) == 1
    assert "404" in capsys.readouterr().err


def test_unknown_dag_and_bad_password_name_the_problem(airflow, capsys, monkeypatch):
    assert main(["retry", "nope"]) == 1
    assert "nope" in capsys.readouterr().err
    monkeypatch.setenv("DECISIONFLOW_AIRFLOW_PASSWORD", "wrong")
    assert main(["retry", "build_lakehouse"]) == 1
    assert "/auth/token -> 401" in capsys.readouterr().err
