"""Decision runs on the real stack, driven through Airflow's REST API only.

Runs after ``test_model_pipeline.py`` (file order): gold from generated events, case notes in silver, a champion.

1. ``sync_case_embeddings`` puts every silver case note into Milvus (served Milvus Lite); a second run re-embeds
   and re-upserts nothing.
2. ``run_decisions``: its first run is SIGKILLed while it delivers actions (the local webhook receiver is made
   slow so the kill lands mid-send); Airflow's retry resumes the graph at ``act``. Then a second run and a
   clear of the first: every enriched transaction has exactly one decision, every audit field is filled, the
   ``decisions`` topic holds exactly one record per decision (read_committed), and the webhook receiver applied
   each key's effect once.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections import Counter

import pytest

pytestmark = [pytest.mark.system, pytest.mark.timeout(3600)]

SYNC, DECIDE = "sync_case_embeddings", "run_decisions"


def webhook(stack, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(f"{stack.webhook.url()}{path}", method="POST" if body is not None else "GET",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def settle(client, dag_id: str, timeout: float = 1800) -> None:
    """Wait for every run of ``dag_id`` to finish (unpausing may have started some)."""
    for run in client.runs(dag_id):
        if run["state"] not in ("success", "failed"):
            client.wait_for_run(dag_id, run["dag_run_id"], timeout=timeout, log=print)


def test_case_notes_reach_milvus_once(stack, client, lake):
    from deltalake import DeltaTable

    client.wait_for_dag(SYNC)
    client.unpause(SYNC)
    time.sleep(5)
    settle(client, SYNC)
    run_id = client.trigger(SYNC)
    assert client.wait_for_run(SYNC, run_id, timeout=1200, log=print) == "success"
    first = client.xcom(SYNC, run_id, "sync")
    notes = DeltaTable(str(lake / "silver/case_notes")).to_pyarrow_table(columns=["case_id"]).num_rows
    assert notes > 0
    from pymilvus import MilvusClient

    milvus = MilvusClient(uri=stack.milvus.url())
    try:
        stored = milvus.query("case_notes", filter="", output_fields=["count(*)"])[0]["count(*)"]
    finally:
        milvus.close()
    assert stored == notes, f"{stored} notes in Milvus, {notes} in silver ({first})"
    print(f"\ncase notes in Milvus: {stored}; last sync {first}")

    run_id = client.trigger(SYNC)
    assert client.wait_for_run(SYNC, run_id, timeout=600) == "success"
    again = client.xcom(SYNC, run_id, "sync")
    assert again["upserted"] == 0 and again["encoded"] == 0, again


def decide_task(client, run_id: str) -> dict:
    return client.request("GET", f"/dags/{DECIDE}/dagRuns/{run_id}/taskInstances/decide")


def test_decisions_exactly_once_through_a_kill_a_rerun_and_a_clear(stack, client, lake):
    from deltalake import DeltaTable

    before = webhook(stack, "/effects?limit=0")["keys"]
    webhook(stack, "/control", {"delay_ms": 40})  # a slow receiver: the kill lands mid-send
    client.wait_for_dag(DECIDE)
    client.unpause(DECIDE)  # starts the latest hourly tick and/or the run queued by the champion's promotion
    deadline = time.monotonic() + 120
    while not client.runs(DECIDE) and time.monotonic() < deadline:
        time.sleep(2)
    if not client.runs(DECIDE):
        client.trigger(DECIDE)

    # Kill the decide task once the webhook receiver has seen part of the run's actions.
    killed, run_id = None, None
    deadline = time.monotonic() + 1500
    while time.monotonic() < deadline and killed is None:
        active = [r for r in client.runs(DECIDE) if r["state"] == "running"]
        for run in active:
            task = decide_task(client, run["dag_run_id"])
            seen = webhook(stack, "/effects?limit=0")["keys"] - before
            if task["state"] == "running" and task.get("pid") and seen > 5:
                os.kill(task["pid"], signal.SIGKILL)
                killed, run_id = task["pid"], run["dag_run_id"]
                print(f"\nSIGKILLed decide (pid {killed}) of {run_id} after {seen} webhook effects")
                break
        if not active and any(r["state"] == "success" for r in client.runs(DECIDE)):
            break
        time.sleep(0.5)
    webhook(stack, "/control", {"delay_ms": 0})
    assert killed, "never caught the decide task while it delivered actions"
    assert client.wait_for_run(DECIDE, run_id, timeout=1800, log=print) == "success"
    assert client.try_number(DECIDE, run_id, "decide") >= 2
    first = client.xcom(DECIDE, run_id, "decide")
    settle(client, DECIDE)

    # A second run decides nothing new; clearing the first repeats nothing.
    second_id = client.trigger(DECIDE)
    assert client.wait_for_run(DECIDE, second_id, timeout=900) == "success"
    assert client.xcom(DECIDE, second_id, "decide")["transactions"] == 0
    assert client.clear_tasks(DECIDE, run_id, ["decide"]) == ["decide"]
    assert client.wait_for_run(DECIDE, run_id, timeout=900) == "success"

    gold = DeltaTable(str(lake / "gold/transactions_enriched")).to_pandas(columns=["event_id"])
    audit = DeltaTable(str(lake / "gold/decisions")).to_pandas()
    assert audit["event_id"].is_unique and audit["decision_id"].is_unique
    assert set(audit["event_id"]) == set(gold["event_id"]), "every enriched transaction decided exactly once"
    later = {"escalation", "review_decision", "reviewed_by", "reviewed_at", "review_note", "review_source"}
    for column in set(audit.columns) - later:
        assert audit[column].notna().all(), f"audit column {column} has empty values"
    # No llm_default on the local stack: the policy decided every case, and each escalated row says so.
    assert (audit["brain"] == "policy").all(), audit["brain"].value_counts().to_dict()
    escalated = audit[audit["escalated"]]
    assert len(escalated) and escalated["escalation"].notna().all()
    notes = escalated["escalation"].map(json.loads)
    assert all(n["brain"] == "policy" and not n.get("chat_model") for n in notes), notes.iloc[0]
    assert audit.loc[~audit["escalated"], "escalation"].isna().all()
    assert (audit["model_version"] != "").all() and (audit["policy_version"] != "").all()
    searched = audit["similar_cases"].map(lambda s: isinstance(json.loads(s), list))
    assert searched.any(), "no decision drew on similar cases"
    mix = audit["decision"].value_counts().to_dict()
    print(f"decisions: {len(audit)} {mix}; similar cases searched for {int(searched.sum())}; "
          f"first run: {first['timings']}")

    # The topic: exactly one committed record per decision.
    keys = read_topic_keys(stack)
    counts = Counter(keys)
    assert not [k for k, n in counts.items() if n > 1], "a decision was published twice"
    assert set(counts) == set(audit["decision_id"])

    # The webhook: each key's effect applied once, for every decision with actions.
    effects = webhook(stack, "/effects?limit=100000")
    with_actions = int((audit["actions"].map(len) > 0).sum())
    assert effects["keys"] - before == with_actions
    assert all(e["deliveries"] >= 1 for e in effects["effects"])
    print(f"webhook: {effects['keys']} keys, {effects['deliveries']} deliveries, {effects['duplicates']} duplicates "
          "(re-sent after the kill, applied once)")

    evaluation = client.xcom(DECIDE, run_id, "evaluate")
    for block in ("labels", "truth"):
        if block in evaluation:
            rows = {r["name"]: r for r in evaluation[block]["rows"]}
            print(f"against {block} ({evaluation[block]['n']}): " + "; ".join(
                f"{n} cost {r['expected_cost']:.3f} review {r['review_rate']:.2%} decline {r['decline_rate']:.2%}"
                for n, r in rows.items()))
    assert "truth" in evaluation and evaluation["mlflow_run_id"], evaluation


def read_topic_keys(stack, topic: str = "decisions") -> list[str]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": f"127.0.0.1:{stack.ctx.port('kafka')}", "group.id": "df-test-readback",
                         "enable.auto.commit": False, "isolation.level": "read_committed"})
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = list(metadata.topics[topic].partitions)
        keys = []
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, p, low)])
            while True:
                message = consumer.poll(5)
                if message is None:
                    break
                if message.error():
                    continue
                keys.append(message.key().decode())
                if message.offset() >= high - 1:
                    break
        return keys
    finally:
        consumer.close()
