"""Online decisions from a real private broker into gold/decisions, exactly once: imported once, a rerun imports
nothing, a batch decision of the same id stays one row, a malformed record is quarantined (not dropped), a crash
before the commit (exception, and a SIGKILLed process) loses and duplicates nothing, and the batch's anti-join
then skips the transactions decided online.

The session's broker is shared with other tests: each test writes its own topic and reads only its records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

try:  # tests/integration is a package (has __init__.py)
    from .fixtures_kafka import ensure_topic, kafka_broker  # noqa: F401 - pytest fixture
except ImportError:
    from fixtures_kafka import ensure_topic, kafka_broker  # noqa: F401

from decisionflow import constants
from decisionflow.decisions import audit, review_queue
from decisionflow.decisions.graph import PinnedModel, decide_frame, retrieve_similar
from decisionflow.decisions.online_import import (
    QUARANTINE,
    app_id,
    import_online_decisions,
    stored_offsets,
)
from decisionflow.decisions.outbox import kafka_payloads
from decisionflow.decisions.policy import Policy
from decisionflow.models.config import GOLD_FEATURE_COLUMNS

pytestmark = pytest.mark.integration

PINNED = PinnedModel("decisionflow-risk", "7", "run-7", tuple(GOLD_FEATURE_COLUMNS), review=0.3, decline=0.8)


def transactions(n: int) -> pd.DataFrame:
    """``n`` gold-like transactions (unique event ids) with every feature the policy reads."""
    events = [f"ev-{uuid.uuid4()}" for _ in range(n)]
    frame = pd.DataFrame({
        "event_id": events,
        "event_time": pd.Timestamp("2026-11-30T12:00:00Z") + pd.to_timedelta(np.arange(n), unit="s"),
        "account_id": [f"acc-{i % 5}" for i in range(n)], "merchant_id": "m-1",
        "amount": np.linspace(5, 900, n), "currency": "EUR", "mcc": "5999", "channel": "ecommerce",
        "country": "DE", "device_id": None, "ip": None, "memo": None,
    })
    for column in GOLD_FEATURE_COLUMNS:
        if column not in frame.columns:
            frame[column] = 1.0
    return frame


def online_decisions(frame: pd.DataFrame, policy: Policy) -> pd.DataFrame:
    """Decisions as the gateway makes them: the shared retrieve/decide code, run_id "online"."""
    scores = np.linspace(0.05, 0.95, len(frame))
    similar_cases, searched, _ = retrieve_similar(None, policy, frame, scores, PINNED.thresholds(), 5)
    return decide_frame(policy, frame, scores, PINNED, similar_cases, searched, "online",
                        pd.Timestamp.now(tz="UTC"))


def publish(bootstrap: str, topic: str, decisions: pd.DataFrame, *, origin: str | None = "online",
            extra: list[tuple[str, bytes | None]] = ()) -> None:
    """The gateway's wire format: value = the outbox payload, key = decision id, header origin."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    headers = [("origin", origin.encode())] if origin else []
    for key, value in zip(decisions["decision_id"], kafka_payloads(decisions)):
        producer.produce(topic, key=key.encode(), value=value.encode(), headers=headers)
    for key, value in extra:
        producer.produce(topic, key=key.encode(), value=value, headers=[("origin", b"online")])
    assert producer.flush(30) == 0


@pytest.fixture
def setup(kafka_broker, tmp_path):
    topic = f"decisions-online-{uuid.uuid4().hex[:10]}"
    ensure_topic(kafka_broker.bootstrap_servers, topic, 3)
    return {"bootstrap": kafka_broker.bootstrap_servers, "topic": topic, "lake": str(tmp_path / "lake"),
            "config": {"bootstrap.servers": kafka_broker.bootstrap_servers}, "policy": Policy.load()}


def _rows(lake: str) -> pd.DataFrame:
    return audit.read_decisions(lake, columns=["decision_id", "event_id", "run_id", "decision", "brain"])


def test_imported_once_rerun_imports_nothing_and_batch_ids_stay_single(setup):
    lake, topic, policy = setup["lake"], setup["topic"], setup["policy"]
    frame = transactions(40)
    online = online_decisions(frame, policy)
    # the first five were decided by a batch run already (same decision ids: the same events and policy)
    batch = online.iloc[:5].drop(columns=["band"]).assign(run_id="run-batch", brain="policy")
    audit.write_decisions(lake, batch)
    # batch outbox records on the same topic (no origin header, a batch run id): never imported
    batch_other = online_decisions(transactions(10), policy).assign(run_id="run-batch", brain="policy")
    publish(setup["bootstrap"], topic, batch_other, origin=None)
    publish(setup["bootstrap"], topic, online)
    publish(setup["bootstrap"], topic, online.iloc[10:13])  # re-sent by a retrying client

    first = import_online_decisions(lake, setup["config"], topic)
    assert first.read == 10 + 40 + 3 and first.online == 43 and first.skipped == 10
    assert first.imported == 35 and first.already_recorded == 5 + 3 and first.quarantined == 0
    assert first.commits == 1 and first.complete
    rows = _rows(lake)
    assert len(rows) == 40 and rows["decision_id"].is_unique
    assert set(rows.loc[rows["run_id"] == "online", "event_id"]) == set(frame["event_id"].iloc[5:])
    assert (rows.loc[rows["run_id"] == "run-batch", "event_id"] == frame["event_id"].iloc[:5].tolist()).all()
    assert set(rows["brain"]) == {"policy"}
    # what was recorded is what the gateway decided (the payload round-trips to the same audit row)
    got = audit.read_decisions(lake, run_id="online").set_index("decision_id")
    want = online.set_index("decision_id").loc[got.index]
    assert (got["decision"] == want["decision"]).all() and np.allclose(got["score"], want["score"])
    assert [list(c) for c in got["reason_codes"]] == [list(c) for c in want["reason_codes"]]
    assert [json.loads(f) for f in got["features"]] == [json.loads(f) for f in want["features"]]
    # reviews of the imported decisions are queued once, under run "online"
    queued = review_queue.read_queue(lake)
    expected_reviews = set(online.iloc[5:].loc[online["decision"].iloc[5:] == "review", "decision_id"])
    assert expected_reviews and set(queued["decision_id"]) == expected_reviews
    assert first.review_queued == len(expected_reviews) and set(queued["run_id"]) == {"online"}
    # the offsets are in the Delta log, next to the rows
    offsets = stored_offsets(lake, topic, range(3))
    assert sum(offsets.values()) == 53

    again = import_online_decisions(lake, setup["config"], topic)
    assert again.read == 0 and again.imported == 0 and again.commits == 0
    version = again.gold_version
    assert len(_rows(lake)) == 40 and len(review_queue.read_queue(lake)) == len(expected_reviews)

    # new online decisions after that: only they are read
    later = online_decisions(transactions(4), policy)
    publish(setup["bootstrap"], topic, later)
    third = import_online_decisions(lake, setup["config"], topic)
    assert third.read == 4 and third.imported == 4 and third.gold_version != version
    assert len(_rows(lake)) == 44


def test_malformed_records_are_quarantined_with_their_coordinates(setup):
    lake, topic = setup["lake"], setup["topic"]
    good = online_decisions(transactions(6), setup["policy"])
    broken = good.iloc[:1].copy()
    broken["decision_id"] = audit.decision_id("some-other-event", setup["policy"].version)  # id != uuid5(event)
    bad_id = broken["decision_id"].iloc[0]
    publish(setup["bootstrap"], topic, good.iloc[1:], extra=[
        ("k-json", b"{not json"), ("k-none", None), ("k-list", b"[1, 2]")])
    publish(setup["bootstrap"], topic, broken)

    report = import_online_decisions(lake, setup["config"], topic)
    assert report.imported == 5 and report.quarantined == 4
    from deltalake import DeltaTable

    quarantined = DeltaTable(QUARANTINE.path(lake)).to_pandas()
    assert len(quarantined) == 4 and set(quarantined["source_topic"]) == {topic}
    kinds = dict(zip(quarantined["key"], quarantined["reason_kind"]))
    assert kinds == {"k-json": "malformed_json", "k-none": "tombstone", "k-list": "malformed_json",
                     bad_id: "schema_violation"}
    reason = quarantined.loc[quarantined["key"] == bad_id, "reason"].iloc[0]
    assert "decision_id" in reason
    assert all(isinstance(o, (int, np.integer)) for o in quarantined["source_offset"])
    assert any(topic in e and "@" in e for e in report.errors)  # the report names topic/partition@offset
    again = import_online_decisions(lake, setup["config"], topic)
    assert again.read == 0 and len(DeltaTable(QUARANTINE.path(lake)).to_pandas()) == 4


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("stage", ["read", "quarantined", "queued"])
def test_failure_before_the_commit_loses_and_duplicates_nothing(setup, stage):
    lake, topic = setup["lake"], setup["topic"]
    online = online_decisions(transactions(30), setup["policy"])
    publish(setup["bootstrap"], topic, online, extra=[("k-json", b"{oops")])

    def fail(at):
        if at == stage:
            raise Boom(at)

    with pytest.raises(Boom):
        import_online_decisions(lake, setup["config"], topic, on_stage=fail)
    assert len(_rows(lake)) == 0
    assert all(v is None for v in stored_offsets(lake, topic, range(3)).values())
    report = import_online_decisions(lake, setup["config"], topic)
    assert report.imported == 30 and report.read == 31
    rows = _rows(lake)
    assert len(rows) == 30 and rows["decision_id"].is_unique
    reviews = set(online.loc[online["decision"] == "review", "decision_id"])
    queue = review_queue.read_queue(lake)
    assert set(queue["decision_id"]) == reviews and queue["decision_id"].is_unique


_KILLED_IMPORT = r"""
import os, signal, sys
from decisionflow.decisions.online_import import import_online_decisions

lake, topic, bootstrap, stage = sys.argv[1:5]

def kill(at):
    if at == stage:
        os.kill(os.getpid(), signal.SIGKILL)

import_online_decisions(lake, {"bootstrap.servers": bootstrap}, topic, max_records=int(sys.argv[5]), on_stage=kill)
"""


@pytest.mark.parametrize("stage,max_records", [("queued", 100000), ("committed", 7)])
def test_sigkill_mid_import_loses_and_duplicates_nothing(setup, tmp_path, stage, max_records):
    """SIGKILL just before the commit (everything before it is re-done), or right after the first of several
    chunk commits (the rerun goes on from the committed offsets)."""
    lake, topic = setup["lake"], setup["topic"]
    online = online_decisions(transactions(25), setup["policy"])
    publish(setup["bootstrap"], topic, online)
    script = tmp_path / "killed_import.py"
    script.write_text(_KILLED_IMPORT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "include")}
    proc = subprocess.run([sys.executable, str(script), lake, topic, setup["bootstrap"], stage, str(max_records)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    before = _rows(lake)
    if stage == "queued":
        assert len(before) == 0
    else:
        assert 0 < len(before) < 25
    report = import_online_decisions(lake, setup["config"], topic)
    assert report.imported == 25 - len(before)
    rows = _rows(lake)
    assert len(rows) == 25 and rows["decision_id"].is_unique
    assert set(rows["decision_id"]) == set(online["decision_id"])
    queue = review_queue.read_queue(lake)
    assert set(queue["decision_id"]) == set(online.loc[online["decision"] == "review", "decision_id"])
    assert queue["decision_id"].is_unique


def test_load_undecided_skips_transactions_decided_online(setup, tmp_path):
    import pyarrow as pa
    from deltalake import write_deltalake

    from decisionflow.decisions.graph import TRANSACTION_COLUMNS, DecisionContext, load_undecided
    from decisionflow.lakehouse.tables import join_path

    lake, topic, policy = setup["lake"], setup["topic"], setup["policy"]
    frame = transactions(12)
    columns = list(dict.fromkeys([*TRANSACTION_COLUMNS, *GOLD_FEATURE_COLUMNS]))
    gold = frame[columns].copy()
    for name in ("device_id", "ip", "memo"):
        gold[name] = gold[name].astype("string")
    write_deltalake(join_path(lake, constants.GOLD_ENRICHED_TABLE),
                    pa.Table.from_pandas(gold, preserve_index=False))
    publish(setup["bootstrap"], topic, online_decisions(frame.iloc[:8], policy))
    import_online_decisions(lake, setup["config"], topic)
    ctx = DecisionContext(run_id="run-next", lake_root=lake, work_dir=tmp_path / "run", policy=policy,
                          models=None)  # type: ignore[arg-type] - load_undecided reads only the lake
    undecided, _ = load_undecided(ctx)
    assert sorted(undecided["event_id"]) == sorted(frame["event_id"].iloc[8:])


def test_offsets_fence_a_concurrent_import(setup):
    """Another import committing offsets between this one's read and its commit: this one writes nothing."""
    from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

    lake, topic = setup["lake"], setup["topic"]
    online = online_decisions(transactions(5), setup["policy"])
    publish(setup["bootstrap"], topic, online)
    from decisionflow.decisions.online_import import OnlineImportError

    def sneak_in(at):
        if at == "queued":  # a rival import commits (its own offsets) just before this one's commit
            dt = audit.SPEC.path(lake)
            txns = [Transaction(app_id(topic, p), 10_000) for p in range(3)]
            write_deltalake(DeltaTable(dt), audit.audit_schema().empty_table(), mode="append",
                            commit_properties=CommitProperties(app_transactions=txns))

    audit.write_decisions(lake, [])  # nothing: the table is created on the first MERGE below
    from decisionflow.decisions import _delta

    _delta.open_table(audit.SPEC, lake, create=True)
    with pytest.raises(OnlineImportError, match="another import committed first"):
        import_online_decisions(lake, setup["config"], topic, on_stage=sneak_in)
    assert len(_rows(lake)) == 0


def test_read_committed_an_open_transaction_waits_and_an_aborted_one_never_counts(setup):
    """A publisher's open transaction at the tail: the import stops before it (complete) and takes its record once
    it commits; a record of an aborted transaction is never imported."""
    from confluent_kafka import Producer

    lake, topic, policy = setup["lake"], setup["topic"], setup["policy"]
    online = online_decisions(transactions(9), policy)
    payloads = kafka_payloads(online)
    ids = online["decision_id"].tolist()
    producer = Producer({"bootstrap.servers": setup["bootstrap"], "transactional.id": f"t-{uuid.uuid4().hex}"})
    producer.init_transactions(30)

    def send(rows: range) -> None:
        for i in rows:
            producer.produce(topic, key=ids[i].encode(), value=payloads[i].encode(), headers=[("origin", b"online")],
                             partition=0)

    producer.begin_transaction()
    send(range(0, 3))
    producer.commit_transaction(30)
    producer.begin_transaction()
    send(range(3, 5))
    producer.abort_transaction(30)
    producer.begin_transaction()
    send(range(5, 7))
    producer.flush(30)  # open: not committed yet

    first = import_online_decisions(lake, setup["config"], topic, timeout=20)
    assert first.complete and first.imported == 3
    assert set(_rows(lake)["decision_id"]) == set(ids[:3])
    producer.commit_transaction(30)
    producer.begin_transaction()
    send(range(7, 9))
    producer.commit_transaction(30)
    second = import_online_decisions(lake, setup["config"], topic, timeout=20)
    assert second.imported == 4
    assert set(_rows(lake)["decision_id"]) == set(ids[:3] + ids[5:])
    assert import_online_decisions(lake, setup["config"], topic, timeout=20).read == 0


def test_operator_imports_through_the_airflow_connections(setup, monkeypatch):
    """ImportOnlineDecisionsOperator with real connections (the KafkaHook's resolved config, the lake hook's root)."""
    try:
        from .fixtures_kafka import kafka_connection_uri
    except ImportError:
        from fixtures_kafka import kafka_connection_uri

    from decisionflow.operators.decisions import ImportOnlineDecisionsOperator

    lake, topic = setup["lake"], setup["topic"]
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_DEFAULT", kafka_connection_uri(setup["bootstrap"]))
    monkeypatch.setenv("AIRFLOW_CONN_LAKE_DEFAULT", json.dumps({"conn_type": "delta_lake", "extra": {"root": lake}}))
    online = online_decisions(transactions(6), setup["policy"])
    publish(setup["bootstrap"], topic, online)
    op = ImportOnlineDecisionsOperator(task_id="import_online", topic=topic, read_timeout=30)
    out = op.execute({})
    assert out["imported"] == 6 and out["complete"] and out["topic"] == topic
    assert op.execute({})["read"] == 0
    assert set(_rows(lake)["decision_id"]) == set(online["decision_id"])
