"""gold/decision_actions and the webhook channel against the in-process receiver (Kafka: tests/integration)."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest
from deltalake import DeltaTable

from decisionflow.decisions import audit
from decisionflow.decisions.outbox import KAFKA, WEBHOOK, DeliveryError, Outbox, deliver_kafka, deliver_webhook
from decisionflow.decisions.webhook import WebhookReceiver
from decisionflow.lakehouse import tables as T
from decisionflow.lakehouse.maintenance import tables_needing_migration

try:
    from .decision_rows import make_decisions
except ImportError:
    from decision_rows import make_decisions

# make_decisions: approve (no actions), review, decline in turn -> 2 of 3 decisions have a webhook row


@pytest.fixture
def receiver(tmp_path):
    with WebhookReceiver(tmp_path / "effects.sqlite") as rx:
        yield rx


def _outbox(tmp_path, n=30, **kwargs) -> tuple[Outbox, object]:
    rows = make_decisions(n, **kwargs)
    outbox = Outbox(str(tmp_path / "lake"))
    outbox.enqueue(rows)
    return outbox, rows


def test_enqueue_is_idempotent_and_builds_payloads(tmp_path):
    rows = make_decisions(30)
    outbox = Outbox(str(tmp_path / "lake"))
    assert outbox.enqueue(rows) == 30 + 20
    assert outbox.enqueue(rows) == 0
    assert outbox.enqueue(make_decisions(40)) == 10 + 6  # only the 10 new decisions (4 of them approvals)
    assert outbox.counts() == {KAFKA: {"pending": 40}, WEBHOOK: {"pending": 26}}
    kafka = outbox.pending(channel=KAFKA).set_index("decision_id")
    first = rows.iloc[1]
    body = json.loads(kafka.loc[first["decision_id"], "payload"])
    later = {"escalation", "review_decision", "reviewed_by", "reviewed_at", "review_note", "review_source"}
    assert {name for name, _ in audit.AUDIT_COLUMNS} - later <= set(body) and "band" not in body
    assert body["features"] == {"amount": 10.0, "txn_count_1h": 1}  # nested JSON, not a string
    assert body["similar_cases"][0]["case_id"] == "c1" and body["actions"] == ["notify_customer"]
    assert body["event_time"].startswith("2026-11-30T12:00:01") and body["idempotency_key"].endswith(":kafka")
    hook = outbox.pending(channel=WEBHOOK).set_index("decision_id").loc[first["decision_id"]]
    assert hook["idempotency_key"] == f"{first['decision_id']}:webhook"
    assert json.loads(hook["payload"])["actions"] == ["notify_customer"]
    assert (kafka["attempts"] == 0).all() and kafka["sent_at"].isna().all()
    assert tables_needing_migration(str(tmp_path / "lake"), specs=[T.table("gold/decision_actions")]) == {}


def test_mark_sent_is_one_commit_and_never_reset(tmp_path):
    outbox, rows = _outbox(tmp_path, 12)
    keys = rows["decision_id"].tolist()
    before = DeltaTable(outbox.path).version()
    assert outbox.mark_sent(keys[:5], KAFKA, kafka_topic="decisions", kafka_partition=[0] * 5,
                            kafka_offset=list(range(5))) == 5
    assert DeltaTable(outbox.path).version() == before + 1
    assert outbox.mark_sent(keys[:5], KAFKA, kafka_topic="decisions", kafka_partition=1, kafka_offset=99) == 0
    assert outbox.enqueue(rows) == 0  # a re-enqueue does not reset a sent row
    sent = outbox.rows(channel=KAFKA, status="sent").sort_values("kafka_offset")
    assert sent["kafka_offset"].tolist() == [0, 1, 2, 3, 4] and sent["sent_at"].notna().all()
    assert len(outbox.pending(channel=KAFKA)) == 7
    with pytest.raises(ValueError, match="unknown delivery info"):
        outbox.mark_sent(keys[:1], KAFKA, offset=3)


def test_webhook_delivers_each_key_once_across_lost_answers_and_retries(tmp_path, receiver):
    outbox, rows = _outbox(tmp_path, 30)
    receiver.drop_next(2)  # applied, answer lost (twice for the same key): the retry must not apply it again
    receiver.fail_next(2, 503, after=5)  # 5xx: retried
    before = DeltaTable(outbox.path).version()
    report = deliver_webhook(outbox, receiver.url, backoff=0.001, batch_size=8)
    assert (report.sent, report.failed, report.pending) == (20, 0, 20)
    assert report.retries == 4 and report.duplicates_at_receiver == 1
    assert DeltaTable(outbox.path).version() - before == 3  # 20 rows in batches of 8: three commits
    effects = receiver.effects()
    assert effects["keys"] == 20 and effects["duplicates"] == 2
    wanted = {f"{d}:webhook" for d, a in zip(rows["decision_id"], rows["actions"]) if len(a)}
    assert {e["key"] for e in effects["effects"]} == wanted
    assert outbox.counts()[WEBHOOK] == {"sent": 20}
    sent = outbox.rows(channel=WEBHOOK)
    assert (sent["http_status"] == 200).all() and sent["attempts"].sum() == 20 + 4

    # a sender that died after posting but before marking: the same rows again -> applied once at the receiver
    again = Outbox(str(tmp_path / "lake2"))
    again.enqueue(rows)
    replay = deliver_webhook(again, receiver.url)
    assert replay.sent == 20 and replay.duplicates_at_receiver == 20
    assert receiver.effects()["keys"] == 20
    assert deliver_webhook(outbox, receiver.url).pending == 0  # nothing left to send


def test_webhook_4xx_marks_failed_with_the_answer(tmp_path, receiver):
    outbox, _ = _outbox(tmp_path, 6)
    receiver.fail_next(1, 422)
    report = deliver_webhook(outbox, receiver.url)
    assert (report.sent, report.failed, report.retries) == (3, 1, 0)
    failed = outbox.rows(channel=WEBHOOK, status="failed")
    assert len(failed) == 1 and failed["http_status"].item() == 422
    assert "HTTP 422" in failed["last_error"].item() and "injected failure" in failed["last_error"].item()
    assert deliver_webhook(outbox, receiver.url).pending == 0  # failed rows are not retried blindly


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_webhook_fails_clearly_and_loses_nothing(tmp_path):
    outbox, rows = _outbox(tmp_path, 30)
    store = tmp_path / "effects.sqlite"
    port = _closed_port()
    rx = WebhookReceiver(store, port=port).start()
    rx.fail_next(3, 503, after=7)  # 7 delivered, then errors until the retries run out
    with pytest.raises(DeliveryError) as info:
        deliver_webhook(outbox, rx.url, retries=2, backoff=0.001)
    text = str(info.value)
    assert "connection actions_webhook" in text and rx.url in text and "7 action(s) delivered" in text
    assert info.value.report.sent == 7
    assert outbox.counts()[WEBHOOK] == {"sent": 7, "pending": 13}
    rx.close()

    with pytest.raises(DeliveryError) as info:  # nothing listening at all
        deliver_webhook(outbox, f"http://127.0.0.1:{port}/actions", retries=1, backoff=0.001)
    assert "unreachable" in str(info.value) and f"127.0.0.1:{port}" in str(info.value)
    assert "ConnectionRefusedError" in str(info.value)
    assert outbox.counts()[WEBHOOK] == {"sent": 7, "pending": 13}

    with WebhookReceiver(store, port=port) as rx:  # back up: the rest, each key applied once
        report = deliver_webhook(outbox, rx.url)
        assert report.sent == 13
        assert rx.effects()["keys"] == 20 and rx.effects()["duplicates"] == 0
    assert outbox.counts()[WEBHOOK] == {"sent": 20}


def test_receiver_routes(receiver):
    def call(path, body=None, headers=None):
        request = urllib.request.Request(receiver.base_url + path, data=body, headers=headers or {},
                                         method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    assert call("/health") == (200, {"ok": True, "keys": 0})
    assert call("/actions", b"{}")[0] == 400  # no Idempotency-Key
    assert call("/actions", b"not json", {"Idempotency-Key": "k"})[0] == 400
    body = json.dumps({"decision_id": "d1", "actions": ["block_card"]}).encode()
    assert call("/actions", body, {"Idempotency-Key": "d1:webhook"}) == (200, {"ok": True, "duplicate": False,
                                                                                "key": "d1:webhook"})
    assert call("/actions", body, {"Idempotency-Key": "d1:webhook"})[1]["duplicate"] is True
    status, effects = call("/effects")
    assert status == 200 and effects["keys"] == 1 and effects["deliveries"] == 2
    assert effects["effects"][0]["actions"] == ["block_card"]
    assert call("/nope")[0] == 404


def test_kafka_needs_the_topic_and_says_so(tmp_path):
    outbox, _ = _outbox(tmp_path, 3)
    assert deliver_kafka(Outbox(str(tmp_path / "empty")), {"bootstrap.servers": "127.0.0.1:1"}).pending == 0
    ensured = []
    with pytest.raises(DeliveryError) as info:  # no broker: the error names the layer, topic and broker
        deliver_kafka(outbox, {"bootstrap.servers": f"127.0.0.1:{_closed_port()}", "socket.timeout.ms": 1000},
                      ensure_topic=ensured.append, timeout=2)
    assert ensured == ["decisions"]
    assert str(info.value).startswith("[kafka] topic decisions at 127.0.0.1:") and "remedy" in str(info.value)
    assert outbox.counts()[KAFKA] == {"pending": 3}


def test_receiver_cli_serves_and_keeps_effects_across_restarts(tmp_path):
    """``python -m decisionflow.decisions.webhook``: a separate process; its SQLite store outlives it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    port, store = _closed_port(), tmp_path / "cli.sqlite"
    outbox, _ = _outbox(tmp_path, 9)
    url = f"http://127.0.0.1:{port}"

    def start():
        proc = subprocess.Popen([sys.executable, "-m", "decisionflow.decisions.webhook", "--port", str(port),
                                 "--store", str(store)], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as response:
                    return proc, json.loads(response.read())
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "receiver did not start"
                time.sleep(0.1)

    proc, health = start()
    try:
        assert health == {"ok": True, "keys": 0}
        assert deliver_webhook(outbox, url + "/actions").sent == 6
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # by PID: the store must survive a kill
        proc.wait(10)
    replay = Outbox(str(tmp_path / "lake2"))
    replay.enqueue(make_decisions(9))
    proc, health = start()
    try:
        assert health["keys"] == 6
        assert deliver_webhook(replay, url + "/actions").duplicates_at_receiver == 6
        with urllib.request.urlopen(url + "/effects", timeout=5) as response:
            effects = json.loads(response.read())
        assert effects["keys"] == 6 and effects["duplicates"] == 6
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(10)
