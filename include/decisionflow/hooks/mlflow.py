"""MLflow tracking server hook: where experiments, runs, metrics and model artifacts are recorded.

The connection (``mlflow_default``) names the tracking server:

* ``conn_type``: ``mlflow``
* ``host`` / ``port`` / ``schema``: ``127.0.0.1`` / ``5000`` / ``http`` -> ``http://127.0.0.1:5000``.
  A ``host`` that already carries a scheme (``https://mlflow.example.com``) is used as is.
* ``login`` / ``password`` (optional): basic-auth credentials for a server started with
  ``--app-name basic-auth``; handed to the MLflow client as ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``.
* ``extra.tracking_uri`` (optional): a full tracking URI that overrides host/port/schema.

``mlflow`` is imported inside the methods only: DAG files that import this module must parse fast.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from functools import cached_property
from typing import TYPE_CHECKING, Any

from decisionflow import config
from decisionflow.hooks.base import CheckableHook, LayerCheckError

if TYPE_CHECKING:
    from airflow.sdk import Connection
    from mlflow import MlflowClient

#: The experiment the platform check writes to; runs accumulate there, one per check.
PLATFORM_CHECK_EXPERIMENT = "decisionflow-platform-check"


class MlflowHook(CheckableHook):
    """Talk to the MLflow tracking server named by an Airflow connection.

    :param mlflow_conn_id: the Airflow connection id (``conn_type`` ``mlflow``); ``mlflow_default`` if omitted.
    """

    conn_name_attr = "mlflow_conn_id"
    default_conn_name = "mlflow_default"
    conn_type = "mlflow"
    hook_name = "MLflow"

    layer = "mlflow"

    def __init__(self, mlflow_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mlflow_conn_id = mlflow_conn_id

    # -- connection ---------------------------------------------------------------------------------------
    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """How the Airflow UI connection form shows an ``mlflow`` connection."""
        return {
            "hidden_fields": [],
            "relabeling": {"schema": "Scheme (http/https)", "login": "Username (basic auth)", "password": "Password"},
            "placeholders": {
                "host": "127.0.0.1",
                "port": "5000",
                "schema": "http",
                "extra": json.dumps({"tracking_uri": "http://127.0.0.1:5000 (optional, overrides host/port)"}),
            },
        }

    @property
    def remedy(self) -> str:  # type: ignore[override]
        log = config.data_dir() / "logs" / "mlflow.log"
        return (
            f"start the local stack with `make up` (then `make status`) and read {log}; "
            f"or fix connection {self.mlflow_conn_id!r} (currently {self._describe_uri()})"
        )

    @cached_property
    def connection(self) -> Connection:
        """The Airflow connection, fetched once per hook instance."""
        return self.get_connection(self.mlflow_conn_id)

    @cached_property
    def tracking_uri(self) -> str:
        """``extra.tracking_uri`` if set, else ``<schema>://<host>:<port>``.

        Defaults: ``http``, ``127.0.0.1`` and the configured MLflow port (5000, ``DECISIONFLOW_MLFLOW_PORT``).
        """
        conn = self.connection
        extra = conn.extra_dejson
        if extra.get("tracking_uri"):
            return str(extra["tracking_uri"]).rstrip("/")
        host = (conn.host or config.HOST).rstrip("/")
        if "://" in host:  # a full URL in the host field
            return host if conn.port is None else f"{host}:{conn.port}"
        scheme = conn.schema or "http"
        port = conn.port or config.port("mlflow")
        return f"{scheme}://{host}:{port}"

    def _describe_uri(self) -> str:
        try:
            return self.tracking_uri
        except Exception:  # noqa: BLE001 - only used inside an error message
            return "undefined"

    def _apply_credentials(self) -> None:
        """MLflow reads basic-auth credentials from the environment; export them when the connection has some."""
        conn = self.connection
        if conn.login:
            os.environ["MLFLOW_TRACKING_USERNAME"] = conn.login
        if conn.password:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = conn.password

    def get_client(self) -> MlflowClient:
        """An ``mlflow.MlflowClient`` bound to this connection's tracking URI (and registry: the same server)."""
        from mlflow import MlflowClient

        self._apply_credentials()
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def get_or_create_experiment(self, name: str, client: MlflowClient | None = None) -> str:
        """Id of the experiment ``name``; created if missing, restored if it was deleted (idempotent)."""
        client = client or self.get_client()
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            return client.create_experiment(name, tags={"decisionflow.purpose": "platform-check"})
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def health(self, timeout: float = 5.0) -> dict[str, Any]:
        """A cheap ``GET <tracking_uri>/health`` (no retries), so a stopped server fails in seconds, not minutes."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=timeout) as response:  # noqa: S310
                return {"ok": 200 <= response.status < 300, "detail": f"HTTP {response.status}"}
        except urllib.error.HTTPError as exc:
            return {"ok": False, "detail": f"HTTP {exc.code}"}
        except (urllib.error.URLError, OSError) as exc:
            return {"ok": False, "detail": str(getattr(exc, "reason", exc))}

    # -- read-only probe ------------------------------------------------------------------------------------
    def probe(self) -> dict[str, Any]:
        """``GET <tracking_uri>/health``: the server answers (no run, no experiment created)."""
        health = self.health()
        if not health["ok"]:
            raise LayerCheckError(self.layer, f"MLflow at {self._describe_uri()} is not healthy: {health['detail']}",
                                  self.remedy)
        return {"tracking_uri": self._describe_uri(), "health": health["detail"]}

    # -- self-check -----------------------------------------------------------------------------------------
    def platform_check(self) -> dict[str, Any]:
        """Log a run with a param, a metric and a small artifact, then read all three back from the server.

        Each call adds one finished run to experiment ``decisionflow-platform-check``; rerunning is safe.

        :return: ``tracking_uri``, ``experiment_id``, ``run_id``, the metric read back, the artifact listing.
        :raises LayerCheckError: the server cannot be reached, or something read back differs from what was written.
        """
        started = time.monotonic()
        try:
            uri = self.tracking_uri
        except Exception as exc:  # noqa: BLE001 - a missing connection is a layer failure with a remedy
            raise LayerCheckError(self.layer, f"connection {self.mlflow_conn_id!r}: {exc}", self.remedy) from exc
        health = self.health()
        if not health["ok"]:
            raise LayerCheckError(
                self.layer, f"MLflow at {uri} does not answer /health: {health['detail']}", self.remedy
            )
        try:
            from mlflow.exceptions import MlflowException
        except ImportError as exc:
            raise LayerCheckError(self.layer, f"mlflow is not installed: {exc}", "run `make install`") from exc

        probe_value = 42.0
        payload = {"check": "decisionflow platform_check", "value": probe_value}
        try:
            client = self.get_client()
            experiment_id = self.get_or_create_experiment(PLATFORM_CHECK_EXPERIMENT, client)
            run = client.create_run(experiment_id, run_name="platform-check", tags={"decisionflow.check": "true"})
            run_id = run.info.run_id
            try:
                client.log_param(run_id, "probe", "platform_check")
                client.log_metric(run_id, "probe_value", probe_value)
                with tempfile.TemporaryDirectory() as tmp:
                    path = os.path.join(tmp, "probe.json")
                    with open(path, "w") as handle:
                        json.dump(payload, handle)
                    client.log_artifact(run_id, path, artifact_path="check")
            finally:
                client.set_terminated(run_id)

            fetched = client.get_run(run_id)
            artifacts = [info.path for info in client.list_artifacts(run_id, "check")]
            with tempfile.TemporaryDirectory() as tmp:
                local = client.download_artifacts(run_id, "check/probe.json", tmp)
                with open(local) as handle:
                    artifact_back = json.load(handle)
        except MlflowException as exc:
            raise LayerCheckError(self.layer, f"MLflow at {uri} refused the round trip: {exc}", self.remedy) from exc
        except OSError as exc:  # connection refused, timeouts (requests' errors subclass OSError)
            raise LayerCheckError(self.layer, f"MLflow at {uri} is unreachable: {exc}", self.remedy) from exc

        metric = fetched.data.metrics.get("probe_value")
        param = fetched.data.params.get("probe")
        if metric != probe_value or param != "platform_check":
            raise LayerCheckError(
                self.layer,
                f"run {run_id} read back metric={metric!r} param={param!r}, wrote {probe_value!r}/'platform_check'",
                self.remedy,
            )
        if "check/probe.json" not in artifacts or artifact_back != payload:
            raise LayerCheckError(
                self.layer,
                f"artifact round trip failed for run {run_id}: listing={artifacts}, content={artifact_back!r}",
                "check the server's --artifacts-destination is writable (see .data/mlflow/artifacts) and "
                + self.remedy,
            )
        return {
            "tracking_uri": uri,
            "experiment": PLATFORM_CHECK_EXPERIMENT,
            "experiment_id": experiment_id,
            "run_id": run_id,
            "status": fetched.info.status,
            "metric_probe_value": metric,
            "artifacts": artifacts,
            "seconds": round(time.monotonic() - started, 2),
        }
