"""The failure notifier against real services on private ports: the session's private Kafka broker
(``fixtures_kafka``) and the real webhook receiver (``python -m decisionflow.decisions.webhook``, the stack's
``webhook`` component) on a free loopback port. A real operator of ours fails on purpose (bad params: not retried);
its alert -- layer, cause, remedy, log URL -- arrives once on ``platform-alerts`` and once at ``/alerts``. With
the receiver gone, the notifier still returns and Kafka still gets the alert. Seconds, not minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

try:  # tests/integration is a package (has __init__.py)
    from .fixtures_kafka import free_port, kafka_broker, kafka_connection  # noqa: F401 - pytest fixtures
except ImportError:  # collected as a plain directory (rootdir-relative import mode)
    from fixtures_kafka import free_port, kafka_broker, kafka_connection  # noqa: F401

from decisionflow import constants

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def receiver(tmp_path, monkeypatch):
    """The real receiver process on a private port; ``alerts_webhook`` points at it. Yields its base URL."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "include"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "decisionflow.decisions.webhook", "--host", "127.0.0.1",
                             "--port", str(port), "--store", str(tmp_path / "effects.sqlite")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"webhook receiver did not start on {url} (exit {proc.poll()})")
            time.sleep(0.1)
        monkeypatch.setenv("AIRFLOW_CONN_ALERTS_WEBHOOK", json.dumps({
            "conn_type": "http", "host": "127.0.0.1", "port": port, "schema": "http", "extra": {"endpoint": "alerts"}}))
        yield SimpleNamespace(url=url, proc=proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _failed_task_context():
    """Run a real operator of ours into a real failure; the context its on_failure_callback gets."""
    from airflow.sdk.exceptions import AirflowFailException

    from decisionflow.operators.kafka import KafkaEnsureTopicsOperator

    op = KafkaEnsureTopicsOperator(task_id="ensure_topics", topics=["no-such-topic"], retries=2)
    with pytest.raises(AirflowFailException) as failed:  # bad params: fails at once, no retries
        op.execute({})
    run_id = f"manual__{uuid.uuid4().hex}"
    ti = SimpleNamespace(dag_id="ingest_transactions", task_id=op.task_id, run_id=run_id, map_index=-1,
                         try_number=1, max_tries=2,
                         log_url=f"http://127.0.0.1:8080/dags/ingest_transactions/runs/{run_id}/tasks/ensure_topics"
                                 "?try_number=1")
    return {"ti": ti, "task": op, "exception": failed.value, "run_id": run_id}


def _alerts_on_kafka(bootstrap: str, alert_id: str, timeout: float = 20.0) -> list[dict]:
    """Every record of ``alert_id`` on the alerts topic, read to its end by assignment (no consumer group: a
    fresh broker's group coordinator costs seconds)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    found: list[dict] = []
    try:
        partitions = consumer.list_topics(constants.ALERTS_TOPIC, timeout=10).topics[constants.ALERTS_TOPIC].partitions
        consumer.assign([TopicPartition(constants.ALERTS_TOPIC, p, OFFSET_BEGINNING) for p in partitions])
        done: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(done) < len(partitions) and time.monotonic() < deadline:
            for msg in consumer.consume(100, timeout=0.5):
                if msg.error() is not None:
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        done.add(msg.partition())
                    continue
                body = json.loads(msg.value())
                if body.get("alert_id") == alert_id:
                    found.append(body)
        assert len(done) == len(partitions), f"{constants.ALERTS_TOPIC} not read to its end within {timeout:.0f}s"
    finally:
        consumer.close()
    return found


def test_a_failed_task_alerts_kafka_and_the_webhook(kafka_connection, receiver):
    from decisionflow.notifications.failure import FailureNotifier

    context = _failed_task_context()
    started = time.monotonic()
    FailureNotifier(timeout=10)(context)
    took = time.monotonic() - started

    alerts = httpx.get(f"{receiver.url}/alerts", timeout=5).json()["items"]
    mine = [a for a in alerts if a["run_id"] == context["run_id"]]
    assert len(mine) == 1, alerts
    alert = mine[0]
    assert alert["dag_id"] == "ingest_transactions" and alert["task_id"] == "ensure_topics"
    assert alert["layer"] == "params" and alert["retryable"] is False
    assert "topics ['no-such-topic'] are not declared" in alert["cause"]
    assert "Trigger DAG w/ config" in alert["remedy"]
    assert alert["log_url"] == context["ti"].log_url
    assert f"-- log: {context['ti'].log_url}" in alert["line"] and "(try 1/3," in alert["line"]

    on_kafka = _alerts_on_kafka(kafka_connection, alert["alert_id"])
    assert len(on_kafka) == 1
    assert {k: v for k, v in on_kafka[0].items() if k != "failed_at"} == \
        {k: v for k, v in alert.items() if k != "failed_at"}
    assert took < 15, f"notifying took {took:.1f}s"


def test_receiver_down_still_alerts_kafka_and_never_raises(kafka_connection, receiver):
    from decisionflow.notifications.failure import FailureNotifier

    receiver.proc.terminate()
    receiver.proc.wait(timeout=10)
    context = _failed_task_context()
    FailureNotifier(timeout=5)(context)  # the webhook channel fails: logged, not raised
    alert_id = f"ingest_transactions/ensure_topics/{context['run_id']}/-1/1"
    assert len(_alerts_on_kafka(kafka_connection, alert_id)) == 1
