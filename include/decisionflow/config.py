"""Where things live and which ports they use, in one place.

Everything is derived from two roots that an operator can move with environment variables:

* ``DECISIONFLOW_HOME`` - the project (dags/, include/, airflow_settings.yaml). Defaults to the checkout
  that holds this package.
* ``DECISIONFLOW_DATA`` - state: databases, logs, jars, the lake. Defaults to ``$DECISIONFLOW_HOME/.data``.

Ports default to the well-known ones and can each be overridden (``DECISIONFLOW_<NAME>_PORT``) so two
checkouts, or a port already taken, never need a code edit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"

_DEFAULT_PORTS = {
    "postgres": 5432,
    "kafka": 9092,
    "kafka_controller": 9093,
    "airflow": 8080,
    "mlflow": 5000,
    "milvus": 19530,  # Milvus Lite served by the stack (milvus-lite server)
    "ray": 6380,  # not 6379: that one belongs to Redis, an optional Feast online store
    "ray_dashboard": 8265,
    "ray_client": 10001,
    # Ray's agent defaults to a fixed port: two Ray clusters on one machine collide unless it is set.
    "ray_dashboard_agent": 52365,
    "ray_dashboard_agent_grpc": 52366,
    "ray_runtime_env_agent": 52367,
    "ray_metrics_export": 52368,
    "serve": 8000,  # Ray Serve's HTTP proxy: the decisionflow gateway application
    "webhook": 8090,  # the local actions-webhook receiver (tests, the demo)
}


def project_home() -> Path:
    env = os.environ.get("DECISIONFLOW_HOME")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    env = os.environ.get("DECISIONFLOW_DATA")
    return Path(env).resolve() if env else project_home() / ".data"


def port(name: str) -> int:
    """Port for a component; ``DECISIONFLOW_<NAME>_PORT`` overrides the default."""
    env = os.environ.get(f"DECISIONFLOW_{name.upper()}_PORT")
    if env:
        try:
            return int(env)
        except ValueError:
            raise ValueError(f"DECISIONFLOW_{name.upper()}_PORT must be an integer, got {env!r}") from None
    return _DEFAULT_PORTS[name]


def resolve_path(value: str | os.PathLike) -> Path:
    """Resolve a configured path: absolute stays, relative is taken from the project home.

    ``${DECISIONFLOW_DATA}`` and ``${DECISIONFLOW_HOME}`` expand to their effective values even when the
    variables are unset, so a settings file can say ``${DECISIONFLOW_DATA}/lake`` and follow the data dir.
    """
    text = os.fspath(value)
    for name, default in (("DECISIONFLOW_DATA", data_dir), ("DECISIONFLOW_HOME", project_home)):
        for token in (f"${{{name}}}", f"${name}"):
            if token in text:
                text = text.replace(token, str(default()))
    path = Path(os.path.expandvars(text)).expanduser()
    return path if path.is_absolute() else (project_home() / path).resolve()


@dataclass(frozen=True)
class JarPaths:
    """The two classpaths fetched by ``make jars`` (see jars/pom.xml): they must never be mixed."""

    kafka_broker: Path
    spark_connectors: Path

    def spark_jars(self) -> list[Path]:
        return sorted(self.spark_connectors.glob("*.jar"))


def jars_dir() -> Path:
    env = os.environ.get("DECISIONFLOW_JARS")
    return Path(env).resolve() if env else data_dir() / "jars"


def jar_paths() -> JarPaths:
    root = jars_dir()
    return JarPaths(kafka_broker=root / "kafka", spark_connectors=root / "spark")
