"""Events in, lakehouse out, on the real stack, driven only by Kafka and Airflow.

1. Produce seeded events with a known share of bad input; the Kafka watcher triggers ``ingest_transactions``;
   bronze then holds exactly the produced messages and ``build_lakehouse`` (asset-triggered) accounts for every
   one of them in silver or quarantine, without a duplicate event_id.
2. Kill test: the Spark ingest job is SIGKILLed in the middle of a micro-batch; after the retry and an explicit
   clear-and-rerun, bronze still holds every message exactly once.
3. Rerunning ``build_lakehouse`` (clearing its run) over the same data changes no gold row.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest

pytestmark = [pytest.mark.system, pytest.mark.timeout(3600)]

INGEST, BUILD = "ingest_transactions", "build_lakehouse"
#: Generator kinds that reach silver/transactions (a re-send is the same event again).
SILVER_KINDS = ("valid", "unknown_fields", "late", "out_of_order")
BRONZE_FOR_TOPIC = {"transactions": "bronze/transactions", "transaction-labels": "bronze/labels",
                    "case-notes": "bronze/case_notes"}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def read_delta(path: Path, columns: list[str] | None = None):
    from deltalake import DeltaTable

    return DeltaTable(str(path)).to_pyarrow_table(columns=columns)


def produce(stack, events: int, seed: int, truth: Path) -> list[dict]:
    from decisionflow.risk.generator import GeneratorConfig, generate
    from decisionflow.risk.producer import ensure_topics, produce as send, read_truth

    servers = stack.kafka.bootstrap_servers()
    ensure_topics(servers, list(BRONZE_FOR_TOPIC))
    report = send(generate(GeneratorConfig(events=events, seed=seed, bad_share=0.1)),
                  bootstrap_servers=servers, truth_path=truth, progress=False)
    rows = read_truth(truth)
    assert rows and not [r for r in rows if r.get("error")], f"undelivered messages: {report}"
    return rows


def assert_bronze_exact(lake: Path, truth: list[dict]) -> None:
    """Every produced message is in bronze once, byte for byte; nothing else is."""
    for topic, table in BRONZE_FOR_TOPIC.items():
        expected = {(r["partition"], r["offset"]): r["value_sha256"] for r in truth if r["topic"] == topic}
        data = read_delta(lake / table, ["topic", "partition", "offset", "value"]).to_pylist()
        keys = Counter((row["partition"], row["offset"]) for row in data)
        dupes = [k for k, n in keys.items() if n > 1]
        assert not dupes, f"{table}: duplicated offsets {dupes[:5]}"
        assert set(keys) == set(expected), (
            f"{table}: missing {sorted(set(expected) - set(keys))[:5]}, unexpected {sorted(set(keys) - set(expected))[:5]}")
        for row in data:
            value = row["value"]
            digest = hashlib.sha256(value).hexdigest() if value is not None else None
            assert digest == expected[(row["partition"], row["offset"])], f"{table}: payload differs at {row}"
        assert all(row["topic"] == topic for row in data)


def spark_ingest_processes(data_dir: Path) -> list[int]:
    """PIDs of the spark-submit JVM (and its Python driver) running ingest_bronze for this stack."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if "ingest_bronze.py" in cmdline and f"DECISIONFLOW_DATA={data_dir}".encode() in environ:
            pids.append(int(entry))
    return pids


def batch_in_flight(checkpoint: Path) -> bool:
    """Spark wrote the offsets of a micro-batch that it has not committed yet."""
    def numbers(folder: str) -> set[int]:
        path = checkpoint / folder
        return {int(p.name) for p in path.iterdir() if p.name.isdigit()} if path.exists() else set()

    offsets, commits = numbers("offsets"), numbers("commits")
    return bool(offsets) and max(offsets) > max(commits, default=-1)


#: Every message produced in this module, for exact reconciliation with bronze.
PRODUCED: list[dict] = []


@pytest.fixture(scope="module")
def lake(stack) -> Path:
    return stack.ctx.data / "lake"


def settle(client, dag_id: str, appear_within: float = 0, timeout: float = 900) -> None:
    """Wait for every unfinished run of ``dag_id`` to finish; first up to ``appear_within`` s for one to exist."""
    deadline = time.monotonic() + appear_within
    while not client.runs(dag_id) and time.monotonic() < deadline:
        time.sleep(1)
    for run in client.runs(dag_id):
        if run["state"] not in ("success", "failed"):
            client.wait_for_run(dag_id, run["dag_run_id"], timeout=timeout, log=print)


def test_watcher_ingests_everything_and_silver_accounts_for_it(stack, client, lake, tmp_path_factory):
    for dag_id in (INGEST, BUILD):
        client.wait_for_dag(dag_id)
    client.unpause(BUILD)
    client.unpause(INGEST)
    # Unpausing starts the latest 30-minute tick at once. Before anything is produced it finds no backlog and
    # skips (check_backlog: no Spark job); let it end first, so that one watcher-triggered run ingests all
    # the events below (a tick racing the producer ingested part of them: a second ingest and a second build).
    settle(client, INGEST, appear_within=30)
    started = now_iso()
    truth = produce(stack, events=3000, seed=11, truth=stack.ctx.data / "generator" / "truth-seed11.jsonl")
    PRODUCED.extend(truth)
    kinds = Counter(r["kind"] for r in truth)
    assert kinds["valid"] and sum(n for k, n in kinds.items() if k != "valid") > 100, kinds

    # No manual trigger: the watcher (or, at worst, the 30-minute fallback) starts the ingestion.
    client.wait_for_run_after(INGEST, started, timeout=900, log=print)
    assert_bronze_exact(lake, truth)
    client.wait_for_run_after(BUILD, started, timeout=1200, log=print)

    bronze = read_delta(lake / "bronze/transactions", ["offset", "partition"]).num_rows
    silver = read_delta(lake / "silver/transactions", ["event_id", "source_partition", "source_offset"]).to_pylist()
    quarantine = read_delta(lake / "quarantine/transactions",
                            ["source_partition", "source_offset", "reason_kind", "reason"]).to_pylist()
    duplicates = sum(1 for r in truth if r["topic"] == "transactions" and r["kind"] == "duplicate")
    ids = Counter(row["event_id"] for row in silver)
    assert [i for i, n in ids.items() if n > 1] == [], "duplicate event_id in silver"
    assert len(silver) + len(quarantine) + duplicates == bronze, (len(silver), len(quarantine), duplicates, bronze)
    silver_at = {(r["source_partition"], r["source_offset"]) for r in silver}
    quarantined_at = {(r["source_partition"], r["source_offset"]) for r in quarantine}
    assert not silver_at & quarantined_at
    assert all(r["reason"] and r["reason_kind"] for r in quarantine)
    # Each quarantined row is a message the generator made bad, and each bad message is quarantined.
    bad = {(r["partition"], r["offset"]): r["kind"] for r in truth if r["topic"] == "transactions"
           and r["kind"] in ("malformed_json", "tombstone", "oversized", "schema_violation")}
    assert quarantined_at == set(bad)
    for row in quarantine:
        kind = bad[(row["source_partition"], row["source_offset"])]
        if kind in ("malformed_json", "tombstone"):
            assert row["reason_kind"] == kind, row


def test_killed_ingest_loses_and_duplicates_nothing(stack, client, lake, tmp_path_factory):
    # Let the watcher's runs settle, then hold the DAG while a backlog builds up.
    settle(client, INGEST)
    client.pause(INGEST)
    # build_lakehouse waits until the last test: its Spark jobs would hold the one-slot spark pool meanwhile.
    settle(client, BUILD, timeout=1200)
    client.pause(BUILD)
    # The same seed again (exact re-sends of every event) and a larger batch: ~9,000 transaction messages in
    # micro-batches of 1,000 per topic, so the job is certainly caught between two commits. (Every row more is
    # work for each later build, training and decision run of the chain: the batch only has to span several
    # micro-batches.)
    PRODUCED.extend(produce(stack, events=3000, seed=11, truth=stack.ctx.data / "generator" / "truth-seed11-again.jsonl"))
    PRODUCED.extend(produce(stack, events=6000, seed=12, truth=stack.ctx.data / "generator" / "truth-seed12.jsonl"))
    run_id = client.trigger(INGEST, conf={"max_offsets_per_trigger": 1000})
    client.unpause(INGEST)
    checkpoint = lake / "_checkpoints/bronze/transactions"

    deadline = time.monotonic() + 900
    killed = []
    while time.monotonic() < deadline and not killed:
        pids = spark_ingest_processes(stack.ctx.data)
        if pids and batch_in_flight(checkpoint) and (checkpoint / "commits").exists():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
        time.sleep(0.2)
    assert killed, "never caught the ingest job mid-batch"
    print(f"SIGKILLed {killed} mid-batch")

    # The task fails and Airflow retries it; then on-call clears it once more for good measure.
    state = client.wait_for_run(INGEST, run_id, timeout=1200, log=print)
    assert state == "success", client.task_states(INGEST, run_id)
    assert client.try_number(INGEST, run_id, "ingest_bronze") >= 2
    assert client.clear_tasks(INGEST, run_id, ["ingest_bronze"]) == ["ingest_bronze"]
    assert client.wait_for_run(INGEST, run_id, timeout=900, log=print) == "success"

    everything = PRODUCED
    # A later watcher-triggered run may still be draining; wait until bronze has caught up.
    deadline = time.monotonic() + 900
    produced = sum(1 for r in everything if r["topic"] == "transactions")
    while read_delta(lake / "bronze/transactions", ["offset"]).num_rows < produced and time.monotonic() < deadline:
        time.sleep(10)
    assert_bronze_exact(lake, everything)


def test_rerunning_build_lakehouse_changes_no_gold_row(stack, client, lake):
    from decisionflow.lakehouse.tables import TABLES

    # Build over everything ingested so far (the previous test held the DAG), then clear the run: on-call's rerun.
    client.unpause(BUILD)
    run_id = client.trigger(BUILD)
    assert client.wait_for_run(BUILD, run_id, timeout=1800, log=print) == "success"
    for run in client.runs(BUILD):  # an asset-triggered run may have queued up meanwhile
        if run["state"] not in ("success", "failed"):
            client.wait_for_run(BUILD, run["dag_run_id"], timeout=1800, log=print)
    tables = ["gold/account_features", "gold/merchant_features", "gold/transactions_enriched"]

    def snapshot():
        result = {}
        for table in tables:
            data = read_delta(lake / table).to_pandas()
            result[table] = data.sort_values(list(TABLES[table].keys)).reset_index(drop=True)
        return result

    before = snapshot()
    assert all(len(df) for df in before.values())
    # Silver holds every distinct valid event produced in this module, gold one row per silver transaction.
    produced_ids = {r["event_id"] for r in PRODUCED if r["topic"] == "transactions" and r["kind"] in SILVER_KINDS}
    silver_ids = set(read_delta(lake / "silver/transactions", ["event_id"]).column("event_id").to_pylist())
    assert silver_ids == produced_ids, (len(silver_ids), len(produced_ids))
    assert set(before["gold/transactions_enriched"]["event_id"]) == silver_ids

    steps = ["migrate", "silver", "gold"]
    tries = {task: client.try_number(BUILD, run_id, task) for task in steps}
    assert sorted(client.clear_tasks(BUILD, run_id, steps)) == sorted(steps)
    assert client.wait_for_run(BUILD, run_id, timeout=1800, log=print) == "success"
    assert {task: client.try_number(BUILD, run_id, task) for task in steps} == {t: n + 1 for t, n in tries.items()}
    after = snapshot()
    for table in tables:
        assert before[table].equals(after[table]), f"{table} changed on rerun"
