"""Decisions per second of the decision graph, beside a naive per-transaction loop, measured in one run.

    .venv/bin/python bench/decisions.py [--transactions 50000] [--naive 400] [--history-events 20000]

Both paths do the same work per transaction -- its gold features, a score from the same LightGBM model, similar
past cases from the same served Milvus Lite collection (only where the policy wants them), the same policy:

* **graph** - the decision graph's nodes over the whole batch (``load`` reads gold with delta-rs and anti-joins
  the decided ids, ``score`` is one ``predict_proba``, ``retrieve`` batches its hybrid searches, ``decide`` is
  vectorised); ``record`` (the Delta MERGE of the audit rows and the outbox) is timed but reported apart;
* **naive** - one transaction at a time: its row, ``predict_proba`` of one row, one search when wanted, the
  policy on a one-row frame. Run on a sample (``--naive``) and reported as a rate.

Case notes and labels come from the seeded event generator (``--history-events`` transactions of history,
notes of its investigated cases) and are synced into a private ``milvus-lite server`` on a free port, stopped
by PID at the end. Prints the rate of each path, the ratio, and the time per node. Goal: >= 2,000 decisions/s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL = 2000.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_milvus(data_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    binary = Path(sys.executable).with_name("milvus-lite")
    process = subprocess.Popen([str(binary), "server", "--data-dir", str(data_dir), "--host", "127.0.0.1",
                                "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                               start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    from pymilvus import MilvusClient

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"milvus-lite server exited with {process.returncode}")
        try:
            client = MilvusClient(uri=uri, timeout=2)
            client.list_collections()
            client.close()
            return process, uri
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("milvus-lite server did not answer within 90 s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def history_tables(lake: Path, events: int, seed: int) -> int:
    """silver/case_notes and silver/labels from the generator's valid notes and labels; returns the note count."""
    import pandas as pd
    from deltalake import write_deltalake

    from decisionflow.contracts import CASE_NOTES, LABELS
    from decisionflow.risk.generator import generate

    notes, labels = [], []
    for message in generate(events=events, seed=seed, bad_share=0.0):
        if message.value is None or not message.contract_valid or message.duplicate_of is not None:
            continue
        if message.topic == CASE_NOTES:
            notes.append(json.loads(message.value))
        elif message.topic == LABELS:
            labels.append(json.loads(message.value))
    notes_frame = pd.DataFrame(notes)
    notes_frame["created_at"] = pd.to_datetime(notes_frame["created_at"], utc=True)
    labels_frame = pd.DataFrame(labels)
    labels_frame["labelled_at"] = pd.to_datetime(labels_frame["labelled_at"], utc=True)
    write_deltalake(str(lake / "silver/case_notes"), notes_frame.drop(columns=["schema_version"]), mode="overwrite")
    write_deltalake(str(lake / "silver/labels"), labels_frame.drop(columns=["schema_version"]), mode="overwrite")
    return len(notes_frame)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transactions", type=int, default=50_000)
    parser.add_argument("--naive", type=int, default=400, help="transactions decided by the naive loop")
    parser.add_argument("--history-events", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=21)
    args = parser.parse_args(argv)

    import pandas as pd
    from deltalake import write_deltalake
    from pymilvus import MilvusClient

    from decisionflow.decisions.graph import (
        DecisionContext,
        InMemoryModelSource,
        MilvusSimilarCases,
        PinnedModel,
        run_decisions,
        sqlite_checkpointer,
    )
    from decisionflow.decisions.policy import Policy
    from decisionflow.models.config import DEFAULT_FEATURE_COLUMNS, TrainingConfig
    from decisionflow.models.pipeline import train_and_evaluate
    from decisionflow.models.synthetic import make_enriched_transactions, make_transactions
    from decisionflow.models.training import predict_scores
    from decisionflow.vectors.embedders import embedder_from_config
    from decisionflow.vectors.search import CaseQuery, SimilarCaseSearch, query_text
    from decisionflow.vectors.sync import sync_case_notes

    work = Path(tempfile.mkdtemp(prefix="df-bench-decisions-"))
    lake = work / "lake"
    print(f"bench/decisions: {args.transactions} transactions, naive sample {args.naive}, work dir {work}")

    t0 = time.perf_counter()
    outcome = train_and_evaluate(make_transactions(20_000, seed=3), list(DEFAULT_FEATURE_COLUMNS), TrainingConfig())
    thresholds = outcome.thresholds["model"]
    pinned = PinnedModel("decisionflow-risk", "bench", "bench-run", tuple(DEFAULT_FEATURE_COLUMNS),
                         float(thresholds.review), float(thresholds.decline))
    gold = make_enriched_transactions(args.transactions, seed=args.seed, accounts=20_000, merchants=800)
    write_deltalake(str(lake / "gold/transactions_enriched"), gold, mode="overwrite")
    notes = history_tables(lake, args.history_events, args.seed)
    print(f"setup: model trained, gold written, {notes} case notes generated ({time.perf_counter() - t0:.0f}s)")

    milvus, uri = start_milvus(work / "milvus")
    try:
        embedder = embedder_from_config(cache_dir=work / "embeddings")
        client = MilvusClient(uri=uri)
        t0 = time.perf_counter()
        report = sync_case_notes(client, str(lake), embedder)
        client.flush("case_notes")
        print(f"synced {report.upserted} notes into Milvus in {time.perf_counter() - t0:.1f}s")
        policy = Policy.load()

        # -- the graph ----------------------------------------------------------------------------------
        similar = MilvusSimilarCases(lambda: MilvusClient(uri=uri), lambda: embedder)
        ctx = DecisionContext(run_id="bench", lake_root=str(lake), work_dir=work / "run", policy=policy,
                              models=InMemoryModelSource(outcome.model, pinned), similar=similar)
        with sqlite_checkpointer(work / "checkpoints.sqlite") as saver:
            state = run_decisions(ctx, saver)
        timings = state["timings"]
        deciding = sum(timings[n] for n in ("load", "score", "retrieve", "decide"))
        graph_rate = state["transactions"] / deciding
        summary = state["similar_summary"]

        # -- the naive loop -----------------------------------------------------------------------------
        sample = gold.sample(n=min(args.naive, len(gold)), random_state=1).reset_index(drop=True)
        search = SimilarCaseSearch(MilvusClient(uri=uri), embedder)
        model = outcome.model
        columns = list(DEFAULT_FEATURE_COLUMNS)
        thr = pinned.thresholds()
        searched = 0
        t0 = time.perf_counter()
        for i in range(len(sample)):
            row = sample.iloc[[i]].reset_index(drop=True)
            score = predict_scores(model, row, columns)
            cases = None
            if policy.needs_similar_cases(row, score, thr)[0]:
                record = row.iloc[0].to_dict()
                found = search.search([CaseQuery(text=query_text(record), before=pd.Timestamp(
                    record["event_time"]).to_pydatetime(), exclude_event_id=record["event_id"])], k=5)
                cases = [[c.as_dict() for c in found[0]]]
                searched += 1
            policy.decide(row, score, thr, similar=cases)
        naive_rate = len(sample) / (time.perf_counter() - t0)
    finally:
        stop(milvus)

    print()
    print(f"graph : {state['transactions']} decisions in {deciding:.2f}s = {graph_rate:,.0f} decisions/s "
          f"(similar cases searched for {summary['searched']} = {summary['searched'] / state['transactions']:.1%})")
    print(f"naive : {len(sample)} decisions at {naive_rate:,.0f} decisions/s "
          f"(similar cases searched for {searched} = {searched / len(sample):.1%})")
    print(f"ratio : graph / naive = {graph_rate / naive_rate:,.1f}x")
    print("per node (s): " + ", ".join(f"{n} {timings[n]:.2f}" for n in timings))
    print(f"  record (audit MERGE + outbox, not in the rate): {timings.get('record', 0):.2f}s")
    print(f"goal >= {GOAL:,.0f} decisions/s: {'MET' if graph_rate >= GOAL else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
