"""KafkaHook without a broker: client configs, ensure_topic decisions, failure reporting, import cost."""

from __future__ import annotations

import json
from types import SimpleNamespace

import confluent_kafka
import confluent_kafka.admin
import pytest

from decisionflow.hooks.base import LayerCheckError
from decisionflow.hooks.kafka import KafkaHook, TopicMismatchError

CONN_EXTRA = {"bootstrap.servers": "127.0.0.1:9092", "group.id": "decisionflow", "security.protocol": "PLAINTEXT"}


@pytest.fixture
def kafka_conn(monkeypatch):
    def set_extra(extra=CONN_EXTRA, conn_id="kafka_default"):
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "kafka", "extra": extra}))

    set_extra()
    return set_extra


@pytest.fixture
def captured(monkeypatch):
    """Replace the confluent-kafka client classes with recorders of the config they get."""
    seen: dict[str, dict] = {}

    def recorder(kind):
        def build(conf):
            seen[kind] = dict(conf)
            return SimpleNamespace(kind=kind, conf=conf)

        return build

    monkeypatch.setattr(confluent_kafka, "Producer", recorder("producer"))
    monkeypatch.setattr(confluent_kafka, "Consumer", recorder("consumer"))
    monkeypatch.setattr(confluent_kafka.admin, "AdminClient", recorder("admin"))
    return seen


def test_connection_identity():
    assert KafkaHook.conn_type == "kafka"
    assert KafkaHook.default_conn_name == "kafka_default"
    assert KafkaHook.conn_name_attr == "kafka_config_id"
    assert KafkaHook.layer == "kafka" and KafkaHook.remedy


def test_config_and_bootstrap_from_connection(kafka_conn):
    kafka_conn({**CONN_EXTRA, "bootstrap.servers": "127.0.0.1:19092"}, conn_id="kafka_other")
    hook = KafkaHook(kafka_config_id="kafka_other")
    assert hook.bootstrap_servers == "127.0.0.1:19092"
    assert hook.config["client.id"] == "decisionflow"
    assert hook.config["security.protocol"] == "PLAINTEXT"


def test_missing_bootstrap_servers_is_an_error(kafka_conn):
    kafka_conn({"group.id": "x"})
    with pytest.raises(ValueError, match="bootstrap.servers"):
        KafkaHook().bootstrap_servers


def test_string_callbacks_need_the_allowlist(kafka_conn):
    """The provider's KafkaBaseHook builds the config, so its callback allow-list protects us too."""
    kafka_conn({**CONN_EXTRA, "error_cb": "os.system"})
    with pytest.raises(ValueError, match="callback"):
        KafkaHook().config


def test_producer_is_idempotent_acks_all_by_default(kafka_conn, captured):
    KafkaHook().producer()
    conf = captured["producer"]
    assert conf["enable.idempotence"] is True
    assert conf["acks"] == "all"
    assert conf["bootstrap.servers"] == "127.0.0.1:9092"
    assert "group.id" not in conf  # consumer-only property dropped: no librdkafka warning
    assert callable(conf["error_cb"])


def test_producer_overrides_win(kafka_conn, captured):
    KafkaHook().producer(acks=1, **{"linger.ms": 50})
    assert captured["producer"]["acks"] == 1
    assert captured["producer"]["linger.ms"] == 50


def test_consumer_config(kafka_conn, captured):
    kafka_conn({**CONN_EXTRA, "acks": "all"})
    KafkaHook().consumer("features", **{"auto.offset.reset": "latest"})
    conf = captured["consumer"]
    assert conf["group.id"] == "features"  # the argument wins over the connection's group.id
    assert conf["enable.auto.commit"] is False
    assert conf["auto.offset.reset"] == "latest"
    assert "acks" not in conf


def test_admin_client_drops_client_specific_properties(kafka_conn, captured):
    kafka_conn({**CONN_EXTRA, "acks": "all", "auto.offset.reset": "earliest"})
    KafkaHook().admin_client()
    conf = captured["admin"]
    assert conf["bootstrap.servers"] == "127.0.0.1:9092"
    assert not {"group.id", "acks", "auto.offset.reset"} & set(conf)


# -- ensure_topic against a fake admin client ------------------------------------------------------------
class _Future:
    def __init__(self, value=None, error=None):
        self._value, self._error = value, error

    def result(self, timeout=None):
        if self._error is not None:
            raise self._error
        return self._value


class FakeAdmin:
    def __init__(self, topics=None, configs=None, create_error=None):
        self.topics = dict(topics or {})  # name -> partitions
        self.configs = configs or {}
        self.create_error = create_error
        self.created = []

    def list_topics(self, topic=None, timeout=None):
        def meta(n):
            parts = {i: SimpleNamespace(id=i, leader=1) for i in range(n)}
            return SimpleNamespace(error=None, partitions=parts)

        return SimpleNamespace(topics={name: meta(n) for name, n in self.topics.items()})

    def create_topics(self, new_topics, request_timeout=None):
        futures = {}
        for topic in new_topics:
            self.created.append(topic)
            if self.create_error is None:
                self.topics[topic.topic] = topic.num_partitions
            futures[topic.topic] = _Future(error=self.create_error)
        return futures

    def describe_configs(self, resources, request_timeout=None):
        entries = {k: SimpleNamespace(value=v) for k, v in self.configs.items()}
        return {resources[0]: _Future(entries)}


@pytest.fixture
def hook_with(kafka_conn, monkeypatch):
    def make(admin):
        hook = KafkaHook()
        monkeypatch.setattr(hook, "admin_client", lambda **_: admin)
        return hook

    return make


def test_ensure_topic_creates_a_missing_topic(hook_with):
    admin = FakeAdmin()
    result = hook_with(admin).ensure_topic("events", 3, retention_ms=86_400_000, config={"cleanup.policy": "delete"})
    assert result == {"topic": "events", "created": True, "partitions": 3, "config_drift": {}}
    (new,) = admin.created
    assert (new.topic, new.num_partitions, new.replication_factor) == ("events", 3, -1)
    assert new.config == {"cleanup.policy": "delete", "retention.ms": "86400000"}


def test_ensure_topic_accepts_an_existing_topic(hook_with):
    admin = FakeAdmin(topics={"events": 6}, configs={"retention.ms": "86400000"})
    result = hook_with(admin).ensure_topic("events", 3, retention_ms=86_400_000)
    assert result == {"topic": "events", "created": False, "partitions": 6, "config_drift": {}}
    assert admin.created == []


def test_ensure_topic_reports_fewer_partitions(hook_with):
    admin = FakeAdmin(topics={"events": 1})
    with pytest.raises(TopicMismatchError, match="1 partition\\(s\\) but 3 are required"):
        hook_with(admin).ensure_topic("events", 3)
    assert admin.created == []  # neither recreated nor grown


def test_ensure_topic_reports_config_drift_without_altering(hook_with):
    admin = FakeAdmin(topics={"events": 3}, configs={"retention.ms": "604800000"})
    result = hook_with(admin).ensure_topic("events", 3, retention_ms=3_600_000)
    assert result["config_drift"] == {"retention.ms": {"wanted": "3600000", "actual": "604800000"}}


def test_ensure_topic_tolerates_a_concurrent_create(hook_with):
    from confluent_kafka import KafkaError, KafkaException

    class Racing(FakeAdmin):
        def create_topics(self, new_topics, request_timeout=None):
            futures = super().create_topics(new_topics, request_timeout)
            self.topics["events"] = 3  # another process won the race
            return futures

    admin = Racing(create_error=KafkaException(KafkaError(KafkaError.TOPIC_ALREADY_EXISTS)))
    result = hook_with(admin).ensure_topic("events", 3)
    assert result["created"] is False and result["partitions"] == 3


def test_ensure_topic_rejects_zero_partitions(hook_with):
    with pytest.raises(ValueError):
        hook_with(FakeAdmin()).ensure_topic("events", 0)


# -- platform_check failure path (real librdkafka, nothing listening) ------------------------------------
def test_platform_check_unreachable_broker_is_a_layer_error(kafka_conn):
    import socket

    with socket.socket() as sock:  # a port that is certainly closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kafka_conn({"bootstrap.servers": f"127.0.0.1:{port}"})
    with pytest.raises(LayerCheckError) as info:
        KafkaHook().platform_check(timeout=2)
    assert info.value.layer == "kafka"
    assert "decisionflow.platform-check" in info.value.cause
    assert "bootstrap.servers" in info.value.remedy


def _top_level_imports(module) -> set[str]:
    """Modules imported when ``module`` is imported (``if TYPE_CHECKING:`` blocks excluded)."""
    import ast
    import inspect

    names = set()
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    return names


def test_module_import_stays_light():
    """DAG files parse fast: confluent-kafka and the provider are only imported when a client is built."""
    import decisionflow.hooks.kafka as module

    heavy = {n for n in _top_level_imports(module) if n.startswith(("confluent_kafka", "airflow.providers"))}
    assert heavy == set()
