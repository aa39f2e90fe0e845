"""One Apache Kafka node in KRaft mode (broker + controller) from the Maven jars fetched by ``make jars``."""

from __future__ import annotations

import base64
import shutil
import uuid
from pathlib import Path

from decisionflow.stack.base import Health, Service, ServiceError, port_open

_LOG4J2 = """\
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
logger.controller.name = org.apache.kafka.controller
logger.controller.level = INFO
"""


class KafkaService(Service):
    name = "kafka"
    start_timeout = 90

    @property
    def home(self) -> Path:
        return self.ctx.data / "kafka"

    @property
    def jars(self) -> Path:
        return self.ctx.jars / "kafka"

    def bootstrap_servers(self) -> str:
        return f"{self.ctx.host}:{self.ctx.port('kafka')}"

    def url(self) -> str:
        return f"kafka://{self.bootstrap_servers()}"

    def ports(self) -> list[int]:
        return [self.ctx.port("kafka"), self.ctx.port("kafka_controller")]

    def _java(self) -> str:
        java = shutil.which("java")
        if not java:
            raise ServiceError(self.name, "java not found on PATH (Kafka needs Java 17+)")
        return java

    def _classpath(self) -> str:
        if not list(self.jars.glob("kafka_2.13-*.jar")):
            raise ServiceError(self.name, f"Kafka broker jars missing in {self.jars}: run `make jars`")
        return f"{self.jars}/*"

    def _properties(self) -> str:
        host, broker, controller = self.ctx.host, self.ctx.port("kafka"), self.ctx.port("kafka_controller")
        return "\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@{host}:{controller}",
            f"listeners=PLAINTEXT://{host}:{broker},CONTROLLER://{host}:{controller}",
            f"advertised.listeners=PLAINTEXT://{host}:{broker}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            f"log.dirs={self.home / 'data'}",
            "num.partitions=3",
            "offsets.topic.replication.factor=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            # Topics are created on purpose (with partitions and retention from config), not by a typo.
            "auto.create.topics.enable=false",
            "message.max.bytes=1048588",
            "",
        ])

    def prepare(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "server.properties").write_text(self._properties())
        (self.home / "log4j2.properties").write_text(_LOG4J2)
        if (self.home / "data" / "meta.properties").exists():
            return
        # `--cluster-id=<id>` in one word: a base64 id may start with '-' and would read as an option.
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        self.run_once(
            [self._java(), "-cp", self._classpath(), f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
             "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "-c", str(self.home / "server.properties")],
            "kafka storage format",
        )

    def command(self) -> list[str]:
        return [
            self._java(), "-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.ctx.log_dir}",
            "-cp", self._classpath(), "kafka.Kafka", str(self.home / "server.properties"),
        ]

    def health(self) -> Health:
        if not port_open(self.ctx.host, self.ctx.port("kafka")):
            return Health(False, f"port {self.ctx.port('kafka')} not open yet")
        try:
            from confluent_kafka.admin import AdminClient

            metadata = AdminClient({"bootstrap.servers": self.bootstrap_servers()}).list_topics(timeout=3)
            return Health(bool(metadata.brokers), f"{len(metadata.brokers)} broker(s), {len(metadata.topics)} topic(s)")
        except Exception as exc:  # noqa: BLE001 - any client error means "not healthy yet"
            return Health(False, str(exc)[:200])
