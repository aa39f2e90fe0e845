"""A review answer against a real private broker: its resolution record, label and note are committed exactly once,
after an apply that died between the Kafka commit and its mark, and after a zombie attempt that left a transaction
open (fenced and aborted by the retry). Read back with isolation.level=read_committed."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from datetime import datetime, timezone

import numpy as np
import pytest

try:  # tests/integration is a package (has __init__.py)
    from .fixtures_kafka import committed_records, ensure_topic, kafka_broker  # noqa: F401 - pytest fixture
except ImportError:
    from fixtures_kafka import committed_records, ensure_topic, kafka_broker  # noqa: F401

from decisionflow import constants, contracts
from decisionflow.decisions import audit, review_queue
from decisionflow.decisions.outbox import deliver_kafka
from decisionflow.decisions.policy import Policy
from decisionflow.decisions.review import (
    KafkaReviewEvents,
    ReviewAnswer,
    ReviewPorts,
    apply_review,
    resolution_id,
)

pytestmark = pytest.mark.integration

TOPICS = (constants.DECISIONS_TOPIC, contracts.LABELS, contracts.CASE_NOTES)


def _committed(bootstrap: str, topic: str, ours: set[str]) -> list:
    """(key, idempotency-key header, value) of the committed records of ``topic`` that belong to this test: keyed
    by one of ``ours`` or with an idempotency key of one of them (the session's broker is shared: other tests
    write the same source topics, tombstones included)."""
    out = []
    for msg in committed_records(bootstrap, topic):
        headers = dict(msg.headers() or [])
        key = msg.key().decode() if msg.key() else ""
        header = (headers.get("idempotency-key") or b"").decode()
        if key in ours or header.partition(":")[0] in ours:
            out.append((key, header, json.loads(msg.value()) if msg.value() is not None else None))
    return out


@pytest.fixture
def case(tmp_path):
    import pandas as pd

    events = [str(uuid.uuid4()) for _ in range(3)]
    frame = pd.DataFrame({
        "decision_id": audit.decision_ids(events, "2026.12.2"), "event_id": events,
        "account_id": ["acc-1", "acc-2", "acc-3"], "merchant_id": "m-1",
        "event_time": pd.Timestamp("2026-11-30T12:00:00Z"), "decided_at": pd.Timestamp.now(tz="UTC"),
        "run_id": "run-1", "decision": "review", "reason_codes": [np.array(["SCORE_REVIEW"], dtype=object)] * 3,
        "score": [0.5, 0.6, 0.7], "model_name": "decisionflow-risk", "model_version": "7", "model_run_id": "r7",
        "features": json.dumps({"amount": 12.5}), "similar_cases": audit.not_searched(),
        "policy_name": "transaction_risk", "policy_version": "2026.12.2", "escalated": True, "brain": "policy",
        "rationale": "score band review", "actions": [np.array(["hold_transaction"], dtype=object)] * 3,
    })
    audit.write_decisions(str(tmp_path), frame)
    review_queue.enqueue_reviews(str(tmp_path), frame, "run-1")
    return str(tmp_path), frame


class DiesAfterCommit(KafkaReviewEvents):
    def publish(self, transactional_id, events, scan_from):
        result = super().publish(transactional_id, events, scan_from)
        raise RuntimeError(f"killed after the commit ({result})")


def test_label_note_and_action_once_through_a_crash_and_a_zombie(kafka_broker, case):
    from confluent_kafka import Producer

    bootstrap = kafka_broker.bootstrap_servers
    for topic in TOPICS:
        ensure_topic(bootstrap, topic, 2)
    root, frame = case
    policy = Policy.load()
    config = {"bootstrap.servers": bootstrap}
    deliverers = [("kafka", lambda box: deliver_kafka(box, config, topic=constants.DECISIONS_TOPIC))]
    when = datetime.now(timezone.utc)

    # 1. the first apply dies after Kafka committed the label and note, before marking them sent
    first, second = frame["decision_id"].iloc[0], frame["decision_id"].iloc[1]
    answer = ReviewAnswer(first, "decline", "ann", when, note="stolen card", source="cli")
    with pytest.raises(RuntimeError, match="killed after the commit"):
        apply_review(root, answer, policy, ReviewPorts(deliverers, DiesAfterCommit(config)))
    result = apply_review(root, answer, policy, ReviewPorts(deliverers, KafkaReviewEvents(config)))
    assert result.retry and result.events_sent == {"sent": 0, "already_delivered": 2}

    # 2. a zombie attempt of the second case left a transaction open with its label; the retry fences it
    answer2 = ReviewAnswer(second, "approve", "bob", when, source="cli")
    events = KafkaReviewEvents(config)
    review_queue.claim_events(root, second, events.end_offsets([contracts.LABELS]))
    zombie = Producer({**config, "transactional.id": f"decisionflow-review-{resolution_id(second)}",
                       "enable.idempotence": True})
    zombie.init_transactions(30)
    zombie.begin_transaction()
    zombie.produce(contracts.LABELS, key=b"acc-2", value=b'{"zombie": true}',
                   headers=[("idempotency-key", f"{second}:label".encode())])
    zombie.flush(10)
    result2 = apply_review(root, answer2, policy, ReviewPorts(deliverers, events))
    assert result2.events_sent == {"sent": 1, "already_delivered": 0}

    ours = {first, second, resolution_id(first), resolution_id(second)}
    labels = _committed(bootstrap, contracts.LABELS, ours)
    by_key = Counter(header for _, header, _ in labels)
    assert by_key[f"{first}:label"] == 1 and by_key[f"{second}:label"] == 1
    values = {header: value for _, header, value in labels}
    assert values[f"{first}:label"]["label"] == "fraud" and values[f"{second}:label"]["label"] == "legit"
    assert not [v for v in values.values() if v.get("zombie")]
    for _, header, value in labels:
        assert contracts.validate(contracts.LABELS, value) == []
    notes = _committed(bootstrap, contracts.CASE_NOTES, ours)
    assert [h for _, h, _ in notes] == [f"{first}:note"] and notes[0][0] == "acc-1"
    decisions = Counter(key for key, _, _ in _committed(bootstrap, constants.DECISIONS_TOPIC, ours))
    assert decisions == {resolution_id(first): 1, resolution_id(second): 1}
