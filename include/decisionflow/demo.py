"""``decisionflow demo``: the whole loop on the local stack, from seeded events to decisions and a report.

    produce seeded events -> ingest_transactions (Kafka watcher) -> build_lakehouse -> materialize_features
    -> train_risk_model -> sync_case_embeddings -> run_decisions (on the new champion) -> summary + HTML report

Ingestion and the lakehouse are Airflow reacting to the events (the Kafka watcher, the bronze assets); the
demo waits until gold holds every valid produced transaction, then runs the next steps one after another
(materialize, train -- weekly otherwise --, sync) so each starts on complete data; the decision run is the one
the new champion starts. Progress is printed as each step finishes; the end is a summary of the decisions (mix,
expected cost against the two baselines, top reason codes, an example audit row), the time from the start to
the first decisions, and ``$DECISIONFLOW_DATA/reports/decisions.html``.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from decisionflow import config, constants

#: The DAGs of the loop: `decisionflow up` unpauses them once parsed, so an event flows to a decision unattended.
LOOP_DAGS = ("ingest_transactions", "build_lakehouse", "materialize_features", "train_risk_model",
             "sync_case_embeddings", "run_decisions", "review_decisions", "maintain_lakehouse")


def activate_loop(client, dag_ids=LOOP_DAGS, timeout: float = 300, log=print) -> None:
    """Wait until every loop DAG is parsed (a REST trigger right after ``up`` would get 404), then unpause it."""
    for dag_id in dag_ids:
        client.wait_for_dag(dag_id, timeout=timeout)
        client.unpause(dag_id)
    log(f"  loop DAGs parsed and live: {', '.join(dag_ids)}")


def _log_run(log, dag_id: str, run: dict, t0: float, extra: str = "") -> None:
    log(f"  {dag_id:<22} {run['dag_run_id']} {run['state']}  (+{time.monotonic() - t0:.0f}s){extra}")


def _trigger_and_wait(client, dag_id: str, timeout: float, log, t0: float) -> dict | None:
    run_id = client.trigger(dag_id)
    state = client.wait_for_run(dag_id, run_id, timeout=timeout)
    run = {"dag_run_id": run_id, "state": state}
    _log_run(log, dag_id, run, t0)
    if state != "success":
        log(f"  {dag_id} {run_id} failed: {client.task_states(dag_id, run_id)} -- see the task log in the UI or "
            "`decisionflow logs`")
        return None
    return run


def _decided_run_after(client, after: str, timeout: float) -> dict | None:
    """The first successful run_decisions run queued after ``after`` whose ``decide`` really ran (a run before
    the first champion succeeds with ``decide`` skipped); ``None`` if none finished within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in sorted(client.runs("run_decisions", limit=20), key=lambda r: r.get("run_after") or ""):
            if (run.get("run_after") or "") < after:
                continue
            if run["state"] == "success" and client.task_states("run_decisions", run["dag_run_id"]).get(
                    "decide") == "success":
                return run
            if run["state"] == "failed":
                return run
        time.sleep(5)
    return None


def expected_transactions(truth_path: Path) -> int:
    """Distinct contract-valid transactions in a generator truth file: what gold must hold once ingested."""
    ids = set()
    with open(truth_path, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if row["topic"] == "transactions" and row["contract_valid"] and row.get("event_id"):
                ids.add(row["event_id"])
    return len(ids)


def _gold_rows(lake: Path) -> int:
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(str(lake / constants.GOLD_ENRICHED_TABLE)).to_pyarrow_table(columns=["event_id"]).num_rows
    except TableNotFoundError:
        return 0


def run_demo(events: int = 15000, seed: int = 7, timeout: float = 3600, log=print) -> int:
    from decisionflow.airflow_client import AirflowClient
    from decisionflow.risk.generator import main as produce_main

    t0 = time.monotonic()
    client = AirflowClient.for_local_stack()
    lake = config.data_dir() / "lake"
    log("1/6 the loop's DAGs")
    activate_loop(client, log=log)

    truth = config.data_dir() / "generator" / f"truth-seed{seed}.jsonl"
    log(f"2/6 producing {events} seeded events (seed {seed}) to Kafka; truth in {truth}")
    if produce_main(["produce", "--events", str(events), "--seed", str(seed), "--create-topics", "--no-progress",
                     "--truth", str(truth)]) != 0:
        log("producing failed (see above)")
        return 1
    expected = expected_transactions(truth)

    log(f"3/6 Kafka -> bronze -> silver -> gold: the Kafka watcher starts ingest_transactions, bronze starts "
        f"build_lakehouse; waiting for {expected} transactions in gold")
    deadline, shown = time.monotonic() + timeout, -1
    while (rows := _gold_rows(lake)) < expected:
        if rows != shown:
            log(f"  gold/transactions_enriched: {rows}/{expected}  (+{time.monotonic() - t0:.0f}s)")
            shown = rows
        if time.monotonic() > deadline:
            log(f"gold has {rows} of {expected} transactions after {timeout:.0f}s: see ingest_transactions and "
                "build_lakehouse in the UI")
            return 1
        time.sleep(10)
    log(f"  gold/transactions_enriched: {rows}/{expected}  (+{time.monotonic() - t0:.0f}s)")
    for dag_id in ("build_lakehouse", "ingest_transactions"):  # let the builds the last events started finish
        for run in client.runs(dag_id, limit=10):
            if run["state"] not in ("success", "failed"):
                client.wait_for_run(dag_id, run["dag_run_id"], timeout=timeout)

    log("4/6 gold -> Feast online store -> a model")
    if not _trigger_and_wait(client, "materialize_features", timeout, log, t0):
        return 1
    train_started = datetime.now(timezone.utc).isoformat()[:19]
    train = _trigger_and_wait(client, "train_risk_model", timeout, log, t0)
    if not train:
        return 1
    gate = client.xcom("train_risk_model", train["dag_run_id"], "promotion_gate") or {}
    log(f"  promotion gate: {gate.get('reason', gate)}")

    log("5/6 case notes -> Milvus")
    if not _trigger_and_wait(client, "sync_case_embeddings", timeout, log, t0):
        return 1

    log("6/6 decisions (run_decisions runs on the new champion)")
    run = _decided_run_after(client, train_started, timeout=600)
    if run is None:  # no run of the champion's showed up: start one
        run = _trigger_and_wait(client, "run_decisions", timeout, log, t0)
        if not run:
            return 1
    else:
        _log_run(log, "run_decisions", run, t0)
        if run["state"] != "success":
            log(f"  run_decisions failed: {client.task_states('run_decisions', run['dag_run_id'])} -- the task log "
                "names the layer and the remedy")
            return 1
    to_first = time.monotonic() - t0
    summary = client.xcom("run_decisions", run["dag_run_id"], "decide") or {}
    evaluation = client.xcom("run_decisions", run["dag_run_id"], "evaluate") or {}

    from decisionflow.decisions.report import print_summary, write_report

    path = write_report(str(lake), config.data_dir() / "reports" / "decisions.html", evaluation=evaluation)
    print_summary(str(lake), summary, evaluation, log=log)
    _log_review_tasks(client, log)
    log(f"\ntime from the start of the demo to the first decisions: {to_first:.0f}s")
    log(f"report: {path}")
    log(f"Airflow UI: {client.base_url}  (user admin, password in "
        f"{config.data_dir() / 'airflow' / 'simple_auth_manager_passwords.json.generated'})")
    log(f"MLflow: http://{config.HOST}:{config.port('mlflow')}  (experiment {constants.DECISION_EVALUATION_EXPERIMENT})")
    return 0


def _log_review_tasks(client, log, wait: float = 90) -> None:
    """How many review cases wait as HITL tasks (``review_decisions`` runs on the decisions asset), and how to
    answer one; waits a little for the first ones to be raised, never fails the demo."""
    deadline = time.monotonic() + wait
    waiting = 0
    while time.monotonic() < deadline:
        try:
            waiting = client.request("GET", "/dags/review_decisions/dagRuns/~/hitlDetails",
                                     params={"response_received": "false", "limit": 1}).get("total_entries", 0)
        except Exception as exc:  # noqa: BLE001 - informative only
            log(f"  review tasks: not readable ({exc})")
            return
        if waiting:
            break
        time.sleep(5)
    log(f"  review tasks waiting for a person: {waiting} (Airflow UI: Browse -> Required Actions; or "
        "`decisionflow review list` / `decisionflow review answer <decision_id> --decision approve|decline`)")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="decisionflow demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=15000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for each DAG")
    args = parser.parse_args(argv)
    return run_demo(args.events, args.seed, args.timeout)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
