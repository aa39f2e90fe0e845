"""The Kafka outbox against a real private broker: exactly one committed record per decision id on the topic,
after a sender SIGKILLed between a committed batch and its outbox mark, and after one killed with a transaction
open; then a retry in-process. Read back with isolation.level=read_committed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

try:  # tests/integration is a package (has __init__.py)
    from .fixtures_kafka import committed_records, ensure_topic, kafka_broker  # noqa: F401 - pytest fixture
except ImportError:  # collected as a plain directory (rootdir-relative import mode)
    from fixtures_kafka import committed_records, ensure_topic, kafka_broker  # noqa: F401

from decisionflow.decisions import audit
from decisionflow.decisions.outbox import KAFKA, Outbox, deliver_kafka

pytestmark = pytest.mark.integration

N = 3000
BATCH = 500
SENDER = Path(__file__).with_name("_outbox_sender.py")


def _decisions(n: int, run_id: str):
    import pandas as pd

    events = [f"ev-{uuid.uuid4().hex}" for _ in range(n)]
    return pd.DataFrame({
        "decision_id": audit.decision_ids(events, "2026.12.1"), "event_id": events,
        "account_id": [f"acc-{i % 97}" for i in range(n)], "merchant_id": "m-1",
        "event_time": pd.Timestamp("2026-11-30T12:00:00Z"), "decided_at": pd.Timestamp.now(tz="UTC"),
        "run_id": run_id, "decision": ["review" if i % 5 == 0 else "approve" for i in range(n)],
        "reason_codes": [["score_band"]] * n, "score": [i / n for i in range(n)], "model_name": "decisionflow-risk",
        "model_version": "7", "model_run_id": "r7", "features": json.dumps({"amount": 12.5}),
        "similar_cases": audit.not_searched(), "policy_name": "transaction_risk", "policy_version": "2026.12.1",
        "escalated": False, "brain": "policy", "rationale": "score band",
        "actions": [["notify_customer"] if i % 5 == 0 else [] for i in range(n)],
    })


def _committed(bootstrap: str, topic: str) -> Counter:
    """decision_id -> committed records on the topic, read from the beginning with read_committed."""
    return Counter(msg.key().decode() for msg in committed_records(bootstrap, topic))


def _kill_when_ready(args: list[str], marker: Path, timeout: float = 40.0) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "include"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(SENDER), *args], env=env)
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert proc.poll() is None, f"sender exited early with {proc.returncode}"
            assert time.monotonic() < deadline, "sender never reached the kill point"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # by its PID, never by name
        proc.wait(10)


def test_exactly_one_record_per_decision_after_kills(kafka_broker, tmp_path):
    bootstrap = kafka_broker.bootstrap_servers
    topic = f"decisions.test.{uuid.uuid4().hex[:8]}"
    ensure_topic(bootstrap, topic)
    lake = str(tmp_path / "lake")
    decisions = _decisions(N, "run-1")
    assert audit.write_decisions(lake, decisions) == N
    outbox = Outbox(lake)
    assert outbox.enqueue(decisions) == N + N // 5
    assert outbox.enqueue(decisions) == 0

    # 1. killed after batch 3's transaction committed, before the outbox marked it: 1,500 on the topic, 1,000 marked
    marker = tmp_path / "committed"
    _kill_when_ready(["commit-then-hang", lake, bootstrap, topic, str(marker), str(BATCH), "3"], marker)
    counts = _committed(bootstrap, topic)
    assert sum(counts.values()) == 3 * BATCH and max(counts.values()) == 1
    assert outbox.counts()[KAFKA] == {"sent": 2 * BATCH, "pending": N - 2 * BATCH}

    # 2. killed with a transaction open holding every pending row (invisible to read_committed, must be aborted)
    marker = tmp_path / "open"
    _kill_when_ready(["open-transaction", lake, bootstrap, topic, str(marker)], marker)
    assert sum(_committed(bootstrap, topic).values()) == 3 * BATCH

    # 3. the retry fences the zombie, reads back batch 3, sends only the rest
    report = deliver_kafka(outbox, {"bootstrap.servers": bootstrap}, topic, batch_size=BATCH)
    assert report.already_delivered == BATCH
    assert report.sent == N - 3 * BATCH
    assert report.scanned >= BATCH
    counts = _committed(bootstrap, topic)
    assert set(counts) == set(decisions["decision_id"]) and sum(counts.values()) == N
    assert set(counts.values()) == {1}
    assert outbox.counts()[KAFKA] == {"sent": N}
    sent = outbox.rows(channel=KAFKA)
    assert sent["kafka_offset"].notna().all() and (sent["kafka_topic"] == topic).all()
    assert sent[["kafka_partition", "kafka_offset"]].drop_duplicates().shape[0] == N

    # 4. a further retry and a re-enqueue change nothing
    assert outbox.enqueue(decisions) == 0
    again = deliver_kafka(outbox, {"bootstrap.servers": bootstrap}, topic, batch_size=BATCH)
    assert (again.pending, again.sent, again.already_delivered) == (0, 0, 0)
    assert sum(_committed(bootstrap, topic).values()) == N

    # the record is the audit row: keyed by decision id, nested features and similar cases
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex}",
                         "isolation.level": "read_committed"})
    first = sent.iloc[0]
    consumer.assign([TopicPartition(topic, int(first["kafka_partition"]), int(first["kafka_offset"]))])
    msg = consumer.consume(1, timeout=10)[0]
    consumer.close()
    body = json.loads(msg.value())
    assert msg.key().decode() == first["decision_id"] == body["decision_id"]
    assert body["features"] == {"amount": 12.5} and body["similar_cases"]["searched"] is False
    assert body["model_version"] == "7" and body["policy_version"] == "2026.12.1"
    assert dict(msg.headers())["idempotency-key"].decode() == f"{first['decision_id']}:kafka"


def test_delivery_rate(kafka_broker, tmp_path):
    """Throughput of one delivery (printed): 20k decisions, batches of 5,000."""
    bootstrap = kafka_broker.bootstrap_servers
    topic = f"decisions.rate.{uuid.uuid4().hex[:8]}"
    ensure_topic(bootstrap, topic)
    outbox = Outbox(str(tmp_path / "lake"))
    decisions = _decisions(20_000, "run-rate")
    outbox.enqueue(decisions)
    report = deliver_kafka(outbox, {"bootstrap.servers": bootstrap}, topic, batch_size=5000)
    print(f"\nkafka outbox delivery: {report.as_dict()}")
    assert report.sent == 20_000 and report.batches == 4
    assert sum(_committed(bootstrap, topic).values()) == 20_000


def test_two_concurrent_senders_still_one_record_each(kafka_broker, tmp_path):
    """Two deliveries of the same outbox at once (a retried task while the first still runs): the later
    init_transactions fences the earlier sender, which fails clearly; what it committed is read back, not resent."""
    import threading

    from decisionflow.decisions.outbox import DeliveryError

    bootstrap = kafka_broker.bootstrap_servers
    topic = f"decisions.race.{uuid.uuid4().hex[:8]}"
    ensure_topic(bootstrap, topic)
    lake = str(tmp_path / "lake")
    decisions = _decisions(4000, "run-race")
    Outbox(lake).enqueue(decisions)
    outcomes: list[object] = []

    def send():
        try:
            outcomes.append(deliver_kafka(Outbox(lake), {"bootstrap.servers": bootstrap}, topic, batch_size=250))
        except DeliveryError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=send) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    for t in threads:
        t.join(60)
    final = deliver_kafka(Outbox(lake), {"bootstrap.servers": bootstrap}, topic, batch_size=250)
    print("\nconcurrent senders:", [o.as_dict() if hasattr(o, "as_dict") else repr(o)[:300] for o in outcomes],
          "then", final.as_dict())
    counts = _committed(bootstrap, topic)
    assert sum(counts.values()) == 4000 and set(counts.values()) == {1}, outcomes
    assert Outbox(lake).counts()[KAFKA] == {"sent": 4000}
    assert len(outcomes) == 2  # each sender returned a report or raised DeliveryError (nothing else)
    reports = [o for o in outcomes if not isinstance(o, Exception)] + [final]
    errors = [o for o in outcomes if isinstance(o, Exception)]
    assert all(str(e).startswith("[kafka] delivery to topic") for e in errors)
    assert sum(r.sent for r in reports) + sum(e.report.sent for e in errors if e.report) <= 4000
