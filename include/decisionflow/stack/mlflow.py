"""MLflow tracking server: metadata in Postgres, artifacts served from the data dir."""

from __future__ import annotations

from decisionflow.stack.base import Health, Service, http_ok


class MlflowService(Service):
    name = "mlflow"
    start_timeout = 120

    @property
    def artifacts(self):
        return self.ctx.data / "mlflow" / "artifacts"

    def url(self) -> str:
        return f"http://{self.ctx.host}:{self.ctx.port('mlflow')}"

    def ports(self) -> list[int]:
        return [self.ctx.port("mlflow")]

    def environment(self) -> dict[str, str]:
        # Without this, the server forks ~2 GB of job-execution workers we do not use.
        return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

    def prepare(self) -> None:
        self.artifacts.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        backend = f"postgresql+psycopg2://postgres@{self.ctx.host}:{self.ctx.port('postgres')}/mlflow"
        return [
            self.ctx.bin("mlflow"), "server",
            "--host", self.ctx.host, "--port", str(self.ctx.port("mlflow")),
            "--backend-store-uri", backend,
            "--artifacts-destination", str(self.artifacts),
            "--workers", "1",
        ]

    def health(self) -> Health:
        return http_ok(f"{self.url()}/health")
