"""rollout_model on the real stack: a new champion rolled out on Ray Serve under steady load; a faulty one rolled back.

Runs after ``test_model_pipeline.py`` (file order), which leaves three versions in the registry: 1 (weak, the first
champion), 2 (shuffled labels, never promoted) and 3 (champion). Driven through Airflow's REST API; the load goes
through the real gateway (``decisionflow_serving.app`` on Ray Serve, Feast online features) on Serve's port with
the API token ``make up`` created (``<data>/serving/api_token``).

1. On-call deploys version 1 by hand (``model_version``): nothing serves yet, so it becomes ``stable``.
2. Steady load from concurrent clients starts. ``train_risk_model``'s ``announce_champion`` (cleared, i.e. run
   again) emits ``model_risk_champion``: the asset triggers ``rollout_model``, which rolls version 3 out through
   shadow, 10, 50 and 100 % and promotes it. 0 failed requests, each response names its version, each step's
   canary share within 5 points of its weight, alias ``live`` = 3.
3. A faulty challenger (version 3's model raising on ~30 % of rows) becomes champion and is announced through
   the REST API: rolled back within its first analysis window, 0 failed requests, the reason in
   ``serving/rollouts``; ``live`` stays 3. The champion alias is put back to 3 for the tests after this one.

The analysis windows are short through the ``decisionflow_rollout`` Variable (an environment's defaults), which
is what the asset-triggered runs use.
"""

from __future__ import annotations

import collections
import json
import threading
import time
import urllib.request
from datetime import datetime

import pytest

pytestmark = [pytest.mark.system, pytest.mark.timeout(3600)]

DAG, TRAIN = "rollout_model", "train_risk_model"
MODEL_NAME = "decisionflow-risk"
WINDOW = 15
#: This environment's rollout defaults (Variable ``decisionflow_rollout``): short windows; latency limits wide
#: enough for a 2-core box running the whole stack (the canary is judged against stable too).
FAST = {"window_seconds": WINDOW, "weights": [10, 50, 100], "shadow": True, "canary_timeout_s": 10,
        "limits": {"max_error_rate": 0.01, "max_p99_seconds": 3.0, "max_p99_ratio": 4.0, "min_requests": 30,
                   "max_mean_score_shift": 0.2}}


@pytest.fixture(scope="module")
def mlflow_client(stack):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=stack.mlflow.url())


def sample_transactions(lake, n=300) -> list[dict]:
    from deltalake import DeltaTable

    frame = DeltaTable(str(lake / "silver/transactions")).to_pandas(
        columns=["event_id", "event_time", "account_id", "merchant_id", "amount", "currency", "mcc", "channel",
                 "country", "device_id", "ip", "memo", "schema_version"]).tail(n)
    frame["event_time"] = frame["event_time"].map(lambda t: t.isoformat().replace("+00:00", "Z"))
    return json.loads(frame.to_json(orient="records"))


class Load:
    """``clients`` threads posting one transaction per ``/v1/score`` request, ``pause`` seconds apart, until
    stopped; every answer is kept as (wall time, version that scored it), every failure as text. Paced, so that
    on a 2-core box the load leaves CPU to the Airflow tasks driving the rollout."""

    def __init__(self, url, token, transactions, clients=4, pause=0.1):
        self.pause = pause
        self.url, self.token, self.transactions = url, token, transactions
        self.answers: list[tuple[float, str]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i):
        n = i
        while not self._stop.is_set():
            body = json.dumps({"transactions": [self.transactions[n % len(self.transactions)]]}).encode()
            n += len(self._threads)
            request = urllib.request.Request(f"{self.url}/v1/score", data=body, headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {self.token}"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
                    answer = json.loads(response.read())
                self.answers.append((time.time(), str(answer["model"]["version"])))
                assert len(answer["scores"]) == 1 and answer["scores"][0]["score"] is not None, answer
            except Exception as exc:  # noqa: BLE001
                self.failures.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            self._stop.wait(self.pause)

    def between(self, start: float, end: float) -> collections.Counter:
        return collections.Counter(v for t, v in list(self.answers) if start <= t <= end)

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)


def wait_for_new_run(client, dag_id: str, known: set[str], timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = [r for r in client.runs(dag_id) if r["dag_run_id"] not in known]
        if fresh:
            return fresh[0]["dag_run_id"]
        time.sleep(2)
    raise AssertionError(f"no new {dag_id} run within {timeout}s")


def announce_through_rest(client, extra: dict) -> None:
    """A ``model_risk_champion`` event from outside Airflow (e.g. a promotion made in MLflow by hand)."""
    assets = client.request("GET", "/assets", params={"name_pattern": "model_risk_champion"})["assets"]
    asset_id = next(a["id"] for a in assets if a["name"] == "model_risk_champion")
    client.request("POST", "/assets/events", json={"asset_id": asset_id, "extra": extra})


def set_variable(client, key: str, value: str) -> None:
    from decisionflow.airflow_client import AirflowApiError

    try:
        client.request("POST", "/variables", json={"key": key, "value": value})
    except AirflowApiError:  # there already (a rerun on a kept stack)
        client.request("PATCH", f"/variables/{key}", json={"key": key, "value": value})


def rollout_rows(lake, run_id: str):
    from decisionflow.rollout import history

    rows = history.read_history(str(lake))
    return rows[rows["rollout_id"] == f"{DAG}/{run_id}/rollout"].sort_values("step")


def test_rollout_under_load_then_faulty_rollback(stack, client, mlflow_client, lake):
    from decisionflow import config
    from decisionflow.rollout import history
    try:
        from ._faulty_model import register_faulty_version
    except ImportError:  # rootdir-relative import mode
        from _faulty_model import register_faulty_version

    champion = mlflow_client.get_model_version_by_alias(MODEL_NAME, "champion").version
    first = "1"  # the weak first champion of test_model_pipeline.py
    assert champion != first, champion
    client.wait_for_dag(DAG)
    set_variable(client, "decisionflow_rollout", json.dumps(FAST))
    client.unpause(DAG)

    # 1. on-call deploys version 1: nothing serves yet, so it goes straight to stable
    run = client.trigger(DAG, conf={"model_version": first})
    assert client.wait_for_run(DAG, run, timeout=900, log=print) == "success", client.task_states(DAG, run)
    assert client.xcom(DAG, run, "rollout")["outcome"] == "first_deploy"
    assert history.live_version(mlflow_client, MODEL_NAME) == first

    token = (stack.ctx.data / "serving" / "api_token").read_text().strip()
    url = f"http://{config.HOST}:{config.port('serve')}"
    train_run = next(r["dag_run_id"] for r in client.runs(TRAIN)
                     if client.task_states(TRAIN, r["dag_run_id"]).get("announce_champion") == "success")
    faulty = None
    try:
        with Load(url, token, sample_transactions(lake)) as load:
            time.sleep(5)
            # 2. the champion announced again by train_risk_model: the asset triggers the rollout
            known = {r["dag_run_id"] for r in client.runs(DAG)}
            assert client.clear_tasks(TRAIN, train_run, ["announce_champion"]) == ["announce_champion"]
            good = wait_for_new_run(client, DAG, known)
            assert client.run_state(DAG, good) != "failed"
            assert client.wait_for_run(DAG, good, timeout=1200, log=print) == "success", client.task_states(DAG, good)
            time.sleep(3)
            after_promotion = time.time()
            time.sleep(5)

            # 3. a faulty challenger becomes champion, announced through the REST API
            faulty = register_faulty_version(stack.mlflow.url(), MODEL_NAME, champion)
            mlflow_client.set_registered_model_alias(MODEL_NAME, "champion", faulty)
            known = {r["dag_run_id"] for r in client.runs(DAG)}
            announce_through_rest(client, {"version": faulty, "announced_by": "system test"})
            bad = wait_for_new_run(client, DAG, known)
            assert client.wait_for_run(DAG, bad, timeout=900, log=print) == "failed"
            time.sleep(5)
    finally:
        if faulty is not None:
            mlflow_client.set_registered_model_alias(MODEL_NAME, "champion", champion)

    print(f"\n{len(load.answers)} answers: {dict(collections.Counter(v for _, v in load.answers))}; "
          f"{len(load.failures)} failures {load.failures[:3]}")
    assert not load.failures, f"{len(load.failures)} failed request(s): {load.failures[:5]}"
    assert {v for _, v in load.answers} <= {first, champion}  # every answer names a version; never the faulty one

    # the good rollout: shadow, 10, 50, 100 % passed, promoted; each step's canary share within 5 points
    rows = rollout_rows(lake, good)
    assert list(rows["action"]) == ["canary_deployed"] + ["analysis"] * 4 + ["promoted"], rows
    for _, row in rows[rows["action"] == "analysis"].iterrows():
        end = datetime.fromisoformat(str(row["recorded_at"])).timestamp() - 0.5
        counts = load.between(end - row["window_seconds"] + 1, end)
        total = sum(counts.values())
        share = 100 * counts.get(champion, 0) / total if total else float("nan")
        measured = json.loads(row["measurements"])
        print(f"step weight {row['canary_weight']:g}%: {dict(counts)} -> canary share {share:.1f}%; analysis "
              f"{row['status']} ({row['reason']}); canary p99 {measured.get('canary_p99_seconds')}, stable p99 "
              f"{measured.get('stable_p99_seconds')}, shadow rows {measured.get('shadow_rows')}")
        assert row["status"] == "pass", row["reason"]
        assert total >= 20, f"step {row['canary_weight']}%: only {total} answers"
        assert abs(share - row["canary_weight"]) <= 5, (row["canary_weight"], counts)
    assert history.live_version(mlflow_client, MODEL_NAME) == champion
    assert set(load.between(after_promotion, after_promotion + 5)) == {champion}

    # the faulty one: rolled back within its first (shadow) window, the reason recorded, live unchanged
    rows = rollout_rows(lake, bad)
    print("faulty rollout:", rows[["action", "status", "canary_weight", "window_seconds", "reason"]].to_dict("records"))
    assert list(rows["action"]) == ["canary_deployed", "analysis", "rolled_back"], rows
    analysis = rows[rows["action"] == "analysis"].iloc[0]
    assert analysis["status"] == "fail" and analysis["window_seconds"] <= WINDOW + 2, analysis
    assert "error rate" in rows.iloc[-1]["reason"], rows.iloc[-1]["reason"]
    tags = mlflow_client.get_model_version(MODEL_NAME, faulty).tags
    assert tags[history.STATUS_TAG] == "rolled_back" and "error rate" in tags[history.REASON_TAG]
    assert history.live_version(mlflow_client, MODEL_NAME) == champion
    assert mlflow_client.get_model_version_by_alias(MODEL_NAME, "champion").version == champion
