"""``decisionflow demo``: the whole loop on the local stack, from seeded events to decisions and a report.

    produce seeded events -> ingest_transactions (Kafka watcher) -> build_lakehouse -> materialize_features
    -> train_risk_model -> sync_case_embeddings -> run_decisions (on the new champion) -> summary + HTML report

Everything after ``produce`` is Airflow reacting to assets; the only trigger the demo sends is the training run
(``train_risk_model`` is weekly or on demand). Progress is printed as each DAG finishes; the end is a summary of
the decisions (mix, expected cost against the two baselines, top reason codes, example audit rows), the time
from the start to the first decisions, and ``$DECISIONFLOW_DATA/reports/decisions.html``.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from decisionflow import config, constants

#: The DAGs of the loop: `decisionflow up` unpauses them once parsed, so an event flows to a decision unattended.
LOOP_DAGS = ("ingest_transactions", "build_lakehouse", "materialize_features", "train_risk_model",
             "sync_case_embeddings", "run_decisions", "maintain_lakehouse")


def activate_loop(client, dag_ids=LOOP_DAGS, timeout: float = 300, log=print) -> None:
    """Wait until every loop DAG is parsed (a REST trigger right after ``up`` would get 404), then unpause it."""
    for dag_id in dag_ids:
        client.wait_for_dag(dag_id, timeout=timeout)
        client.unpause(dag_id)
    log(f"  loop DAGs parsed and live: {', '.join(dag_ids)}")


def _wait_success_after(client, dag_id: str, after: str, timeout: float, log) -> dict:
    t0 = time.monotonic()
    run = client.wait_for_run_after(dag_id, after, timeout=timeout, poll=5)
    log(f"  {dag_id:<22} {run['dag_run_id']} success  (+{time.monotonic() - t0:.0f}s)")
    return run


def run_demo(events: int = 15000, seed: int = 7, timeout: float = 3600, log=print) -> int:
    from decisionflow.airflow_client import AirflowClient
    from decisionflow.risk.generator import main as produce_main

    t_start = time.monotonic()
    started = datetime.now(timezone.utc).isoformat()
    client = AirflowClient.for_local_stack()
    log("1/6 loop DAGs")
    activate_loop(client, log=log)

    log(f"2/6 producing {events} seeded events (seed {seed}) to Kafka")
    if produce_main(["produce", "--events", str(events), "--seed", str(seed), "--create-topics",
                     "--no-progress"]) != 0:
        log("producing failed (see above)")
        return 1

    log("3/6 events -> bronze -> silver/gold (the Kafka watcher starts ingestion)")
    _wait_success_after(client, "ingest_transactions", started, timeout, log)
    _wait_success_after(client, "build_lakehouse", started, timeout, log)
    log("4/6 features -> model")
    _wait_success_after(client, "materialize_features", started, timeout, log)
    train_run = client.trigger("train_risk_model")
    state = client.wait_for_run("train_risk_model", train_run, timeout=timeout)
    if state != "success":
        log(f"train_risk_model {train_run}: {state} {client.task_states('train_risk_model', train_run)}")
        return 1
    gate = client.xcom("train_risk_model", train_run, "promotion_gate") or {}
    log(f"  train_risk_model       {train_run} success: {gate.get('reason', '')}")
    log("5/6 case notes -> Milvus")
    _wait_success_after(client, "sync_case_embeddings", started, timeout, log)
    log("6/6 decisions")
    run = _wait_success_after(client, "run_decisions", started, timeout, log)
    to_first = time.monotonic() - t_start
    summary = client.xcom("run_decisions", run["dag_run_id"], "decide") or {}
    evaluation = client.xcom("run_decisions", run["dag_run_id"], "evaluate") or {}

    from decisionflow.decisions.report import print_summary, write_report

    lake = config.data_dir() / "lake"
    path = write_report(str(lake), config.data_dir() / "reports" / "decisions.html", evaluation=evaluation)
    print_summary(str(lake), summary, evaluation, log=log)
    log(f"\ntime from `decisionflow demo` to the first decisions: {to_first:.0f}s")
    log(f"report: {path}")
    log(f"Airflow UI: {client.base_url}  (user admin, password in "
        f"{config.data_dir() / 'airflow' / 'simple_auth_manager_passwords.json.generated'})")
    log(f"MLflow: http://{config.HOST}:{config.port('mlflow')}  (experiment {constants.DECISION_EVALUATION_EXPERIMENT})")
    return 0


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
