"""The local stack: real services on loopback, supervised by PID files under ``$DECISIONFLOW_DATA/run``."""

from __future__ import annotations

import concurrent.futures
import sys
import time
from dataclasses import dataclass

from decisionflow.stack.airflow import (
    AirflowApiServer,
    AirflowDagProcessor,
    AirflowScheduler,
    AirflowTriggerer,
    airflow_environment,
)
from decisionflow.stack.base import Health, Service, ServiceError, StackContext, port_open
from decisionflow.stack.kafka import KafkaService
from decisionflow.stack.milvus import MilvusService
from decisionflow.stack.mlflow import MlflowService
from decisionflow.stack.postgres import PostgresService
from decisionflow.stack.ray import RayService
from decisionflow.stack.webhook import WebhookService

__all__ = ["Stack", "StackContext", "ServiceError", "ComponentStatus"]


@dataclass
class ComponentStatus:
    name: str
    running: bool
    health: Health
    url: str
    pid: int | None
    memory_bytes: int


class Stack:
    """Brings the local stack up (idempotently, in dependency order) and down (only what it started)."""

    def __init__(self, ctx: StackContext | None = None, log=print):
        self.ctx = ctx or StackContext()
        self.log = log
        self.postgres = PostgresService(self.ctx)
        self.kafka = KafkaService(self.ctx)
        self.mlflow = MlflowService(self.ctx)
        self.ray = RayService(self.ctx)
        self.milvus = MilvusService(self.ctx)
        self.webhook = WebhookService(self.ctx)
        self.api_server = AirflowApiServer(self.ctx)
        self.scheduler = AirflowScheduler(self.ctx)
        self.dag_processor = AirflowDagProcessor(self.ctx)
        self.triggerer = AirflowTriggerer(self.ctx)

    @property
    def services(self) -> list[Service]:
        return [self.postgres, self.kafka, self.mlflow, self.ray, self.milvus, self.webhook, self.api_server,
                self.scheduler, self.dag_processor, self.triggerer]

    def select(self, names: list[str] | None) -> list[Service]:
        if not names:
            return self.services
        known = {s.name: s for s in self.services}
        unknown = [n for n in names if n not in known and n != "airflow"]
        if unknown:
            raise ServiceError("stack", f"unknown component(s) {unknown}; known: {sorted(known)} or 'airflow'")
        chosen = [s for s in self.services if s.name in names or (s.name.startswith("airflow-") and "airflow" in names)]
        return chosen

    # -- up -----------------------------------------------------------------------------------------------
    def _bring_up(self, service: Service, timeout: float | None) -> None:
        started = service.start_and_wait(timeout)
        service.after_start()
        self.log(f"  {service.name:<22} {'started' if started else 'already running'}, healthy  {service.url()}")

    def _airflow_chain(self, timeout: float | None) -> None:
        self._bring_up(self.api_server, timeout)
        self.load_settings()
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda s: self._bring_up(s, timeout),
                          [self.scheduler, self.dag_processor, self.triggerer]))

    def up(self, names: list[str] | None = None, timeout: float | None = None) -> float:
        """Start what is not running and wait for health. Raises ServiceError naming every failed component."""
        t0 = time.monotonic()
        wanted = self.select(names)
        needs_pg = any(s in wanted for s in (self.postgres, self.mlflow, self.api_server, self.scheduler,
                                             self.dag_processor, self.triggerer))
        if needs_pg:
            self._bring_up(self.postgres, timeout)
        jobs = [s for s in (self.kafka, self.ray, self.mlflow, self.milvus, self.webhook) if s in wanted]
        airflow_wanted = [s for s in wanted if s.name.startswith("airflow-")]
        errors: list[ServiceError] = []
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(self._bring_up, s, timeout) for s in jobs]
            if airflow_wanted:
                futures.append(pool.submit(self._airflow_chain, timeout))
            for future in futures:
                try:
                    future.result()
                except ServiceError as exc:
                    errors.append(exc)
                except Exception as exc:  # noqa: BLE001 - report, never hide, an unexpected failure
                    errors.append(ServiceError("stack", f"{type(exc).__name__}: {exc}"))
        if errors:
            raise ServiceError(
                ", ".join(e.component for e in errors),
                "failed to start:\n" + "\n".join(f"  - {e}" for e in errors),
            )
        return time.monotonic() - t0

    def load_settings(self) -> None:
        """(Re)load airflow_settings.yaml into the metadata DB; safe while everything runs."""
        self.api_server.run_once(
            [self.ctx.bin("python"), "-m", "decisionflow.cli", "settings", "load"], "load airflow_settings.yaml"
        )

    # -- down ---------------------------------------------------------------------------------------------
    def stop_tiers(self) -> list[list[Service]]:
        """The order ``down`` stops in: each tier after the one before, the services within a tier at once.

        Airflow's scheduler, dag-processor and triggerer first (they talk to the api-server and PostgreSQL),
        then the api-server, then the independent services, PostgreSQL last (MLflow and Airflow use it).
        """
        airflow_workers = [self.triggerer, self.dag_processor, self.scheduler]
        independent = [self.webhook, self.milvus, self.ray, self.mlflow, self.kafka]
        return [airflow_workers, [self.api_server], independent, [self.postgres]]

    def down(self, names: list[str] | None = None) -> list[str]:
        """Stop what this stack started, tier by tier (:meth:`stop_tiers`); returns the names stopped.

        Within a tier the services stop concurrently: each waits up to its ``stop_timeout`` for a graceful
        exit, and those waits no longer add up.
        """
        wanted = self.select(names)
        stopped = []
        for tier in self.stop_tiers():
            chosen = [s for s in tier if s in wanted]
            if not chosen:
                continue
            def stop(service: Service) -> tuple[bool, float]:
                t0 = time.monotonic()
                return service.stop(), time.monotonic() - t0

            with concurrent.futures.ThreadPoolExecutor(len(chosen)) as pool:
                results = list(pool.map(stop, chosen))
            for service, (did_stop, seconds) in zip(chosen, results):
                if did_stop:
                    stopped.append(service.name)
                    self.log(f"  {service.name:<22} stopped ({seconds:.1f}s)")
        return stopped

    def listeners_left(self, names: list[str] | None = None) -> list[tuple[str, int]]:
        return [(s.name, p) for s in self.select(names) for p in s.ports() if port_open(self.ctx.host, p)]

    # -- status -------------------------------------------------------------------------------------------
    def status(self) -> list[ComponentStatus]:
        result = []
        for service in self.services:
            pid = service.pid()
            health = service.health() if pid else Health(False, "not running")
            result.append(ComponentStatus(service.name, pid is not None, health, service.url(), pid,
                                          service.memory_bytes() if pid else 0))
        return result

    def environment(self) -> dict[str, str]:
        """Environment a shell needs to talk to this stack with the airflow CLI, Ray and Spark."""
        return {**airflow_environment(self.ctx), **self.ray.environment()}


def format_status(rows: list[ComponentStatus]) -> str:
    lines = [f"{'COMPONENT':<22} {'STATE':<8} {'HEALTH':<9} {'PID':>7} {'MEM':>8}  URL / DETAIL"]
    for row in rows:
        state = "running" if row.running else "stopped"
        health = "healthy" if row.health.ok else ("-" if not row.running else "UNHEALTHY")
        mem = f"{row.memory_bytes / 2**20:.0f}MiB" if row.running else "-"
        detail = row.url if row.health.ok or not row.running else f"{row.url}  ({row.health.detail})"
        lines.append(f"{row.name:<22} {state:<8} {health:<9} {row.pid or '-':>7} {mem:>8}  {detail}")
    total = sum(r.memory_bytes for r in rows)
    lines.append(f"{'total':<22} {'':<8} {'':<9} {'':>7} {total / 2**20:>5.0f}MiB")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `decisionflow up|down|status|logs`")
