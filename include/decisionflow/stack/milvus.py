"""Milvus Lite served as one process: the single owner of its data dir, shared by every client by URI.

Milvus Lite allows one process per data dir (a flock on ``LOCK``) and Airflow tasks are separate processes, so
the stack runs the package's own gRPC server (``milvus-lite server``) and every client - tasks, tests, the
gateway - connects to ``http://127.0.0.1:<milvus port>``. A Milvus server elsewhere is the same URI change in
``milvus_default``.
"""

from __future__ import annotations

from decisionflow.stack.base import Health, Service, port_open


class MilvusService(Service):
    name = "milvus"
    start_timeout = 60

    @property
    def data_dir(self):
        return self.ctx.data / "milvus" / "server"

    def url(self) -> str:
        return f"http://{self.ctx.host}:{self.ctx.port('milvus')}"

    def ports(self) -> list[int]:
        return [self.ctx.port("milvus")]

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        return [
            self.ctx.bin("milvus-lite"), "server",
            "--data-dir", str(self.data_dir),
            "--host", self.ctx.host, "--port", str(self.ctx.port("milvus")),
        ]

    def health(self) -> Health:
        """A real client round trip (``list_collections``), not just an open port."""
        if not port_open(self.ctx.host, self.ctx.port("milvus")):
            return Health(False, f"port {self.ctx.port('milvus')} not listening")
        try:
            from pymilvus import MilvusClient

            client = MilvusClient(uri=self.url(), timeout=3)
            try:
                collections = client.list_collections(timeout=3)
            finally:
                client.close()
        except Exception as exc:  # noqa: BLE001 - any failure is "not healthy", with its reason
            return Health(False, f"{type(exc).__name__}: {exc}")
        return Health(True, f"{len(collections)} collection(s)")
