"""The decision code shared by the batch run and the gateway (retrieve_similar, decide_frame), the Kafka payload
builder (kafka_payloads) and its inverse (parse_online_record), and the import operator's wiring. Kafka: see
tests/integration/test_online_import.py."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest

from decisionflow.decisions import audit
from decisionflow.decisions.graph import PinnedModel, decide_frame, retrieve_similar
from decisionflow.decisions.online_import import _is_online, _Malformed, _validate, app_id, parse_online_record
from decisionflow.decisions.outbox import KAFKA, Outbox, OutboxError, kafka_payloads
from decisionflow.decisions.policy import Policy
from decisionflow.models.config import GOLD_FEATURE_COLUMNS

try:
    from .decision_rows import make_decisions
except ImportError:
    from decision_rows import make_decisions

PINNED = PinnedModel("decisionflow-risk", "3", "0123abcd", tuple(GOLD_FEATURE_COLUMNS), review=0.3, decline=0.8)
DECIDED_AT = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.load()


def batch(n: int) -> pd.DataFrame:
    """Gold-like transactions (the columns make_decisions' rows come from)."""
    rows = make_decisions(n)
    frame = pd.DataFrame({
        "event_id": rows["event_id"], "event_time": rows["event_time"], "account_id": rows["account_id"],
        "merchant_id": rows["merchant_id"], "amount": np.linspace(5, 2500, n), "currency": "EUR", "mcc": "5999",
        "channel": np.where(np.arange(n) % 2, "ecommerce", "card_present"), "country": "DE", "device_id": None,
        "ip": None, "memo": None,
    })
    for i, column in enumerate(GOLD_FEATURE_COLUMNS):
        if column not in frame.columns:
            frame[column] = (np.arange(n) + i) % 7 * 1.0
    return frame


class FakeSimilar:
    """Three cases per searched row; fraud-heavy for even rows (so the similar-case rule can fire)."""

    last_mode = "dense"

    def __init__(self, fail: bool = False):
        self.fail, self.calls = fail, []

    def search(self, rows: pd.DataFrame, k: int):
        self.calls.append((list(rows["event_id"]), k))
        if self.fail:
            raise ConnectionError("milvus down")
        return [[{"case_id": f"c{j}", "note_id": f"n{j}", "event_id": f"old-{j}",
                  "outcome": "fraud" if int(e[-1]) % 2 == 0 else "legit", "score": 0.9 - j / 10,
                  "created_at": "2026-11-01T00:00:00+00:00"} for j in range(3)] for e in rows["event_id"]]


def test_retrieve_similar_searches_only_where_the_policy_wants_it(policy):
    frame = batch(60)
    scores = np.linspace(0, 1, 60)
    wanted = policy.needs_similar_cases(frame, scores, PINNED.thresholds())
    assert wanted.any() and not wanted.all()
    source = FakeSimilar()
    cases, searched, summary = retrieve_similar(source, policy, frame, scores, PINNED.thresholds(), 4)
    assert source.calls == [(list(frame.loc[wanted, "event_id"]), 4)]
    assert (searched == wanted).all() and summary == {"wanted": int(wanted.sum()), "searched": int(wanted.sum()),
                                                      "status": "ok", "mode": "dense"}
    for text, want in zip(cases, wanted):
        value = json.loads(text)
        if want:
            assert isinstance(value, list) and len(value) == 3
        else:
            assert value == {"searched": False, "reason": audit.NOT_SEARCHED}
            assert text == audit.not_searched()


@pytest.mark.parametrize("source,reason", [(None, "no vector store configured"),
                                           (FakeSimilar(fail=True), "ConnectionError: milvus down")])
def test_retrieve_similar_degrades_visibly(policy, source, reason):
    frame = batch(30)
    scores = np.linspace(0, 1, 30)
    wanted = policy.needs_similar_cases(frame, scores, PINNED.thresholds())
    cases, searched, summary = retrieve_similar(source, policy, frame, scores, PINNED.thresholds(), 5)
    assert summary["status"] == "unavailable" and reason in summary["reason"] and not searched.any()
    for text, want in zip(cases, wanted):
        value = json.loads(text)
        assert value["searched"] is False
        assert value["reason"] == (f"unavailable: {summary['reason']}" if want else audit.NOT_SEARCHED)


def test_retrieve_similar_on_an_empty_batch(policy):
    cases, searched, summary = retrieve_similar(FakeSimilar(), policy, batch(0), np.zeros(0), PINNED.thresholds(), 5)
    assert cases == [] and len(searched) == 0 and summary["wanted"] == 0


def test_decide_frame_is_the_policy_decision_as_audit_rows(policy):
    frame = batch(60)
    scores = np.linspace(0, 1, 60)
    cases, searched, _ = retrieve_similar(FakeSimilar(), policy, frame, scores, PINNED.thresholds(), 5)
    out = decide_frame(policy, frame, scores, PINNED, cases, searched, "run-1", DECIDED_AT)

    # the columns of an audit row as the graph writes it (decision_rows), less what the escalation step adds
    assert set(out.columns) == set(make_decisions(1).columns) - {"brain"}
    expected = policy.decide(frame, scores, PINNED.thresholds(),
                             similar=[json.loads(c) if s else None for c, s in zip(cases, searched)])
    assert out["decision_id"].tolist() == audit.decision_ids(frame["event_id"], policy.version)
    assert (out["decision"].to_numpy() == expected.decision).all()
    assert (out["band"].to_numpy() == expected.band).all()
    assert [list(r) for r in out["reason_codes"]] == [list(r) for r in expected.reason_codes]
    assert [list(a) for a in out["actions"]] == [list(a) for a in expected.actions]
    assert (out["escalated"].to_numpy() == np.asarray(expected.escalated, dtype=bool)).all()
    assert out["rationale"].tolist() == list(expected.rationale)
    assert out["similar_cases"].tolist() == cases and np.allclose(out["score"], scores)
    assert set(out["decided_at"]) == {pd.Timestamp(DECIDED_AT)} and set(out["run_id"]) == {"run-1"}
    assert (out["model_version"] == "3").all() and (out["policy_version"] == policy.version).all()
    features = json.loads(out["features"].iloc[1])
    assert set(features) == {*GOLD_FEATURE_COLUMNS, "amount"}
    # the similar-case rule applied where a search answered (some even rows carry its code), never elsewhere
    code = policy.similar_cases.reason_code
    hits = np.array([code in r for r in out["reason_codes"]])
    assert hits.any() and not (hits & ~searched).any()
    # the audit accepts it once the escalation step's brain is set
    assert audit.validate_decisions(out.assign(brain="policy")).num_rows == 60


def test_decide_frame_checks_lengths_and_takes_naive_times_as_utc(policy):
    frame = batch(3)
    with pytest.raises(ValueError, match="3 transactions but 2 scores"):
        decide_frame(policy, frame, np.zeros(2), PINNED, ["{}"] * 3, [False] * 3, "r", DECIDED_AT)
    out = decide_frame(policy, frame, np.zeros(3), PINNED, [audit.not_searched()] * 3, [False] * 3, "r",
                       datetime(2026, 12, 1, 9, 0))
    assert out["decided_at"].iloc[0] == pd.Timestamp(DECIDED_AT)


def test_graph_nodes_match_the_shared_functions(policy, tmp_path):
    """The batch graph's retrieve and decide nodes write what the shared functions return."""
    from decisionflow.decisions.graph import DecisionContext, _write, build_graph

    frame = batch(20)
    scores = np.linspace(0, 1, 20)
    ctx = DecisionContext(run_id="run-g", lake_root=str(tmp_path / "lake"), work_dir=tmp_path / "w", policy=policy,
                          models=None, similar=FakeSimilar())  # type: ignore[arg-type]
    graph = build_graph(ctx)
    nodes = {name: spec.runnable for name, spec in graph.nodes.items()}
    state = {"model": {**PINNED.__dict__, "feature_columns": list(PINNED.feature_columns)}, "timings": {},
             "batch_path": _write(frame, tmp_path / "w" / "batch.parquet"),
             "scores_path": _write(pd.DataFrame({"event_id": frame["event_id"], "score": scores}),
                                   tmp_path / "w" / "scores.parquet")}
    state.update(nodes["retrieve"].invoke(state))
    state.update(nodes["decide"].invoke(state))
    written = pd.read_parquet(state["decisions_path"])
    cases, searched, summary = retrieve_similar(FakeSimilar(), policy, frame, scores, PINNED.thresholds(), 5)
    assert state["similar_summary"] == summary
    direct = decide_frame(policy, frame, scores, PINNED, cases, searched, "run-g", written["decided_at"].iloc[0])
    pd.testing.assert_frame_equal(written.drop(columns=["reason_codes", "actions"]),
                                  direct.drop(columns=["reason_codes", "actions"]), check_dtype=False)
    assert [list(r) for r in written["reason_codes"]] == [list(r) for r in direct["reason_codes"]]


# -- payloads ------------------------------------------------------------------------------------------------
def test_kafka_payloads_are_the_outbox_payloads(tmp_path):
    rows = make_decisions(9)
    outbox = Outbox(str(tmp_path / "lake"))
    outbox.enqueue(rows)
    stored = outbox.rows(channel=KAFKA).set_index("decision_id")["payload"]
    built = dict(zip(rows["decision_id"], kafka_payloads(rows)))
    assert {k: stored[k] for k in built} == built
    value = json.loads(built[rows["decision_id"].iloc[1]])
    assert "band" not in value and isinstance(value["similar_cases"], list) and isinstance(value["features"], dict)
    assert value["idempotency_key"] == f"{rows['decision_id'].iloc[1]}:kafka"
    assert json.loads(kafka_payloads(rows.drop(columns=["run_id"]), run_id="online")[0])["run_id"] == "online"
    with pytest.raises(OutboxError, match="run_id"):
        kafka_payloads(rows.drop(columns=["run_id"]))


def test_parse_online_record_inverts_the_payload():
    rows = make_decisions(12, run_id="online")
    rows["escalation"] = [None if i % 2 else json.dumps({"brain": "policy", "n": i}) for i in range(12)]
    parsed = [parse_online_record(key.encode(), value.encode())
              for key, value in zip(rows["decision_id"], kafka_payloads(rows))]
    got, want = audit.validate_decisions(parsed), audit.validate_decisions(rows)
    for name in got.column_names:
        if name in ("features", "similar_cases", "escalation"):
            assert [json.loads(v) if v else v for v in got[name].to_pylist()] == \
                   [json.loads(v) if v else v for v in want[name].to_pylist()], name
        elif name == "score":  # the payload carries 15 significant digits (pandas to_json's maximum)
            assert np.allclose(got[name].to_pylist(), want[name].to_pylist(), rtol=1e-14, atol=0)
        else:
            assert got[name].to_pylist() == want[name].to_pylist(), name


def test_parse_online_record_defaults_brain_and_refuses_what_is_not_a_decision():
    rows = make_decisions(1, run_id="online").drop(columns=["brain"])
    payload = kafka_payloads(rows)[0].encode()
    assert parse_online_record(None, payload)["brain"] == "policy"
    for value, kind in ((None, "tombstone"), (b"{nope", "malformed_json"), (b"[1]", "malformed_json")):
        with pytest.raises(_Malformed) as info:
            parse_online_record(b"k", value)
        assert info.value.kind == kind
    with pytest.raises(_Malformed, match="record key"):
        parse_online_record(b"another-id", payload)
    bad_time = json.loads(payload)
    bad_time["event_time"] = "yesterday-ish"
    with pytest.raises(_Malformed, match="event_time"):
        parse_online_record(None, json.dumps(bad_time).encode())


def test_validate_splits_bad_rows_from_good_ones():
    rows = make_decisions(6, run_id="online")
    parsed = [parse_online_record(None, v.encode()) for v in kafka_payloads(rows)]
    parsed[2]["decision"] = "maybe"
    parsed[4]["score"] = float("nan")
    good, bad = _validate([(i, row) for i, row in enumerate(parsed)])
    assert [i for i, _ in good] == [0, 1, 3, 5]
    assert [i for i, _ in bad] == [2, 4] and "decision" in bad[0][1] and "score" in bad[1][1]


class Msg:
    def __init__(self, value: bytes | None, headers=None):
        self._value, self._headers = value, headers

    def value(self):
        return self._value

    def headers(self):
        return self._headers


def test_is_online_by_header_or_run_id():
    online = kafka_payloads(make_decisions(1, run_id="online"))[0].encode()
    batch_payload = kafka_payloads(make_decisions(1, run_id="run-7"))[0].encode()
    assert _is_online(Msg(batch_payload, [("origin", b"online")]))
    assert not _is_online(Msg(online, [("origin", b"batch")]))  # the header wins
    assert _is_online(Msg(online, [("idempotency-key", b"x:kafka")]))
    assert not _is_online(Msg(batch_payload, [("idempotency-key", b"x:kafka")]))
    assert not _is_online(Msg(None)) and not _is_online(Msg(b"{garbage \"run_id\""))


def test_app_ids_are_per_topic_and_partition():
    assert app_id("decisions", 0) != app_id("decisions", 1) != app_id("other", 1)
    assert app_id("decisions", 2) == "decisionflow.online_import/decisions/2"


# -- the operator ----------------------------------------------------------------------------------------------
def test_operator_wires_the_connections(monkeypatch, tmp_path):
    from decisionflow.decisions import online_import
    from decisionflow.decisions.online_import import OnlineImportReport
    from decisionflow.hooks.kafka import KafkaHook
    from decisionflow.operators.decisions import DECISIONS_TOPIC_PARTITIONS, ImportOnlineDecisionsOperator

    monkeypatch.setenv("AIRFLOW_CONN_LAKE_TEST", json.dumps({"conn_type": "delta_lake", "extra": {"root": str(tmp_path)}}))
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_TEST", json.dumps({
        "conn_type": "kafka", "extra": {"bootstrap.servers": "127.0.0.1:1", "group.id": "g"}}))
    calls, ensured = {}, []

    def fake_import(lake_root, consumer_config, topic, storage_options=None, **kwargs):
        calls.update(lake_root=lake_root, config=consumer_config, topic=topic, **kwargs)
        kwargs["ensure_topic"](topic)
        return OnlineImportReport(topic=topic, read=3, online=2, imported=2, quarantined=1, errors=["t/0@1: x"])

    monkeypatch.setattr(online_import, "import_online_decisions", fake_import)
    monkeypatch.setattr(KafkaHook, "ensure_topic", lambda self, name, partitions: ensured.append((name, partitions)))
    op = ImportOnlineDecisionsOperator(task_id="import_online", lake_conn_id="lake_test", kafka_conn_id="kafka_test",
                                       topic="decisions-x", max_records=50, read_timeout=5)
    out = op.execute({"run_id": f"r-{uuid.uuid4()}"})
    assert out["imported"] == 2 and out["quarantined"] == 1
    assert calls["topic"] == "decisions-x" and calls["config"]["bootstrap.servers"] == "127.0.0.1:1"
    assert calls["max_records"] == 50 and calls["timeout"] == 5 and str(tmp_path) in calls["lake_root"]
    assert ensured == [("decisions-x", DECISIONS_TOPIC_PARTITIONS)]


def test_operator_fails_when_the_topic_was_not_read_to_its_end(monkeypatch, tmp_path):
    from decisionflow.decisions import online_import
    from decisionflow.decisions.online_import import OnlineImportError, OnlineImportReport
    from decisionflow.hooks.kafka import KafkaHook
    from decisionflow.operators.decisions import ImportOnlineDecisionsOperator

    monkeypatch.setenv("AIRFLOW_CONN_LAKE_DEFAULT", json.dumps({"conn_type": "delta_lake",
                                                                "extra": {"root": str(tmp_path)}}))
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_DEFAULT", json.dumps({
        "conn_type": "kafka", "extra": {"bootstrap.servers": "127.0.0.1:1"}}))
    monkeypatch.setattr(KafkaHook, "ensure_topic", lambda self, name, partitions: None)
    monkeypatch.setattr(online_import, "import_online_decisions", lambda *a, **k: OnlineImportReport(
        topic="decisions", read=10, imported=4, complete=False, errors=["no progress for 120s"]))
    with pytest.raises(OnlineImportError, match="must not decide yet"):
        ImportOnlineDecisionsOperator(task_id="import_online").execute({})
