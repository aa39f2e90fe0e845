"""Airflow 3 on PostgreSQL with the LocalExecutor: api-server, scheduler, dag-processor, triggerer.

All four share one environment (``airflow_environment``), including a JWT secret persisted under the data
dir: the api-server signs the tokens tasks use to talk to the Execution API, so every component must agree.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from decisionflow.stack.base import Health, Service, StackContext, http_ok

ADMIN_USER = "admin"


def airflow_home(ctx: StackContext) -> Path:
    return ctx.data / "airflow"


def passwords_file(ctx: StackContext) -> Path:
    """Where SimpleAuthManager writes the generated admin password (documented in the README)."""
    return airflow_home(ctx) / "simple_auth_manager_passwords.json.generated"


def _persistent_secrets(ctx: StackContext) -> dict[str, str]:
    path = airflow_home(ctx) / "secrets.json"
    if path.exists():
        return json.loads(path.read_text())
    from cryptography.fernet import Fernet

    values = {
        "jwt_secret": secrets.token_urlsafe(48),
        "api_secret_key": secrets.token_urlsafe(32),
        "fernet_key": Fernet.generate_key().decode(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))
    path.chmod(0o600)
    return values


#: Imported once by the forkserver the scheduler's LocalExecutor workers come from (``[scheduler]
#: mp_start_method = forkserver``, ``mp_forkserver_preload``): every task process is a fork of a worker, so it
#: starts with these loaded instead of importing them itself. On a busy 2-core box that was a task's time:
#: ``import mlflow`` 14-37 s, ``feast`` 22 s, ``lightgbm`` / ``sklearn`` 18 s each, and MLflow's first request
#: 12-30 s more (its request-header registry loads every ``mlflow.request_header_provider`` entry point, and
#: Feast registers one: the first call imports all of Feast). Installed libraries only, never ``decisionflow``:
#: a preloaded module is the code as it was when the scheduler started, and edits to the provider must reach
#: the next task without a restart. None of these starts a thread or opens a connection at import (they are
#: imported in the process that forks); a module that fails to import is skipped by multiprocessing.
TASK_PRELOAD_MODULES = (
    "airflow.sdk", "airflow.sdk.execution_time.task_runner", "airflow.sdk.execution_time.supervisor",
    "airflow.executors.local_executor",
    "pyarrow", "pandas", "deltalake",
    "feast",
    "mlflow", "mlflow.tracking.request_header.registry", "mlflow.pyfunc", "sklearn", "lightgbm",
    "langgraph.graph", "langchain_core.messages", "pymilvus", "confluent_kafka", "httpx",
)


def base_url(ctx: StackContext) -> str:
    return f"http://{ctx.host}:{ctx.port('airflow')}"


def airflow_environment(ctx: StackContext) -> dict[str, str]:
    home = airflow_home(ctx)
    keys = _persistent_secrets(ctx)
    pg = f"postgresql+psycopg2://postgres@{ctx.host}:{ctx.port('postgres')}/airflow"
    return {
        "AIRFLOW_HOME": str(home),
        "DECISIONFLOW_HOME": str(ctx.home),
        "DECISIONFLOW_DATA": str(ctx.data),
        "DECISIONFLOW_JARS": str(ctx.jars),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ctx.home / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ctx.home / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # 2 cores: a handful of task slots; Spark jobs are further limited by the `spark` pool.
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "4",
        "AIRFLOW__CORE__FERNET_KEY": keys["fernet_key"],
        "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file(ctx)),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base_url(ctx)}/execution/",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg,
        "AIRFLOW__API__BASE_URL": base_url(ctx),
        "AIRFLOW__API__HOST": ctx.host,
        "AIRFLOW__API__PORT": str(ctx.port("airflow")),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__SECRET_KEY": keys["api_secret_key"],
        "AIRFLOW__API__EXPOSE_CONFIG": "False",
        "AIRFLOW__API_AUTH__JWT_SECRET": keys["jwt_secret"],
        # New and edited DAG files show up within seconds, not the default minutes.
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "15",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30",
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH": str(home / "bundles"),
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "600",
        # Task processes start with the heavy libraries already imported (TASK_PRELOAD_MODULES).
        "AIRFLOW__SCHEDULER__MP_START_METHOD": "forkserver",
        "AIRFLOW__SCHEDULER__MP_FORKSERVER_PRELOAD": ",".join(TASK_PRELOAD_MODULES),
        "AIRFLOW__TRIGGERER__CAPACITY": "100",
        # spark-submit from the venv's pyspark, Java on PATH.
        "PYSPARK_PYTHON": ctx.bin("python"),
        "NO_PROXY": "*",
    }


class _AirflowComponent(Service):
    start_timeout = 120

    def environment(self) -> dict[str, str]:
        return airflow_environment(self.ctx)

    def _airflow(self, *args: str) -> list[str]:
        return [self.ctx.bin("airflow"), *args]


class AirflowApiServer(_AirflowComponent):
    name = "airflow-api-server"

    def prepare(self) -> None:
        airflow_home(self.ctx).mkdir(parents=True, exist_ok=True)
        # Idempotent: a no-op when the schema is current.
        self.run_once(self._airflow("db", "migrate"), "airflow db migrate", timeout=600)

    def command(self) -> list[str]:
        return self._airflow("api-server", "--host", self.ctx.host, "--port", str(self.ctx.port("airflow")),
                             "--workers", "1")

    def url(self) -> str:
        return base_url(self.ctx)

    def ports(self) -> list[int]:
        return [self.ctx.port("airflow")]

    def health(self) -> Health:
        return http_ok(f"{base_url(self.ctx)}/api/v2/monitor/health")


class _MonitoredByApi(_AirflowComponent):
    """Scheduler, dag-processor and triggerer report heartbeats through the api-server's health endpoint."""

    health_key = ""

    def url(self) -> str:
        return f"{base_url(self.ctx)}/api/v2/monitor/health ({self.health_key})"

    def health(self) -> Health:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{base_url(self.ctx)}/api/v2/monitor/health", timeout=3) as response:  # noqa: S310
                status = json.load(response).get(self.health_key) or {}
        except Exception as exc:  # noqa: BLE001
            return Health(False, f"api-server health endpoint not answering: {exc}")
        state = status.get("status")
        return Health(state == "healthy", f"{state}, last heartbeat {status.get('latest_' + self.health_key.split('_')[0] + '_heartbeat') or status}")


class AirflowScheduler(_MonitoredByApi):
    name = "airflow-scheduler"
    health_key = "scheduler"

    def command(self) -> list[str]:
        return self._airflow("scheduler", "--skip-serve-logs")


class AirflowDagProcessor(_MonitoredByApi):
    name = "airflow-dag-processor"
    health_key = "dag_processor"

    def command(self) -> list[str]:
        return self._airflow("dag-processor")


class AirflowTriggerer(_MonitoredByApi):
    name = "airflow-triggerer"
    health_key = "triggerer"

    def command(self) -> list[str]:
        return self._airflow("triggerer", "--skip-serve-logs")
