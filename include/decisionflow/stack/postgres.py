"""PostgreSQL from the distribution's packages, with its own cluster directory: Airflow's and MLflow's metadata."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
from pathlib import Path

from decisionflow.stack.base import Health, Service, ServiceError

DATABASES = ("airflow", "mlflow")


def _pg_bin(name: str) -> str:
    """A server binary: on PATH, else the newest /usr/lib/postgresql/<major>/bin (Debian keeps them there)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[-3]))
    if not candidates:
        raise ServiceError("postgres", f"{name} not found: install it with `make postgres` (apt package postgresql)")
    return candidates[-1]


class PostgresService(Service):
    name = "postgres"
    start_timeout = 60

    @property
    def cluster_dir(self) -> Path:
        return self.ctx.data / "postgres"

    @property
    def socket_dir(self) -> Path:
        return self.ctx.run_dir / "pg-socket"

    def ports(self) -> list[int]:
        return [self.ctx.port("postgres")]

    def url(self) -> str:
        return f"postgresql://postgres@{self.ctx.host}:{self.ctx.port('postgres')}"

    def sqlalchemy_url(self, database: str) -> str:
        return f"postgresql+psycopg2://postgres@{self.ctx.host}:{self.ctx.port('postgres')}/{database}"

    def _run_as(self) -> dict:
        # PostgreSQL refuses to run as root; CI and this machine run as root, so drop to the postgres user.
        if os.geteuid() != 0:
            return {}
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise ServiceError(self.name, "running as root but there is no 'postgres' user to run the server as") from None
        return {"user": "postgres", "group": "postgres", "extra_groups": []}

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, "postgres", "postgres")

    def popen_kwargs(self) -> dict:
        return self._run_as()

    def _check_reachable(self) -> None:
        """As root the server runs as 'postgres': every parent of the cluster dir must let it through."""
        if os.geteuid() != 0:
            return
        for parent in self.cluster_dir.parents:
            if parent.exists() and not parent.stat().st_mode & 0o001:
                raise ServiceError(
                    self.name,
                    f"the 'postgres' user cannot enter {parent} (mode {oct(parent.stat().st_mode & 0o777)}); "
                    f"allow it with `chmod o+x {parent}` or move the data dir (DECISIONFLOW_DATA)",
                    self.log_path,
                )

    def prepare(self) -> None:
        self._check_reachable()
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self._chown(self.socket_dir)
        if (self.cluster_dir / "PG_VERSION").exists():
            return
        self.cluster_dir.mkdir(parents=True, exist_ok=True)
        self._chown(self.cluster_dir)
        self.cluster_dir.chmod(0o700)
        # Local development cluster: trust on loopback only (listen_addresses below), no password to leak.
        self.run_once(
            [_pg_bin("initdb"), "-D", str(self.cluster_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8",
             "--locale=C"],
            "initdb",
            **self._run_as(),
        )

    def command(self) -> list[str]:
        return [
            _pg_bin("postgres"), "-D", str(self.cluster_dir),
            "-c", f"listen_addresses={self.ctx.host}",
            "-c", f"port={self.ctx.port('postgres')}",
            "-c", f"unix_socket_directories={self.socket_dir}",
            "-c", "max_connections=200",
            "-c", "shared_buffers=128MB",
            "-c", "fsync=off",  # a disposable local dev cluster; durability comes from the real deployment
        ]

    def health(self) -> Health:
        result = self._psql("SELECT 1", database="postgres", check=False)
        return Health(result.returncode == 0, (result.stderr or result.stdout).strip()[:200])

    def after_start(self) -> None:
        for database in DATABASES:
            exists = self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}'").stdout.strip()
            if exists != "1":
                self._psql(f'CREATE DATABASE "{database}"')

    def _psql(self, sql: str, database: str = "postgres", check: bool = True):
        import subprocess

        argv = [shutil.which("psql") or _pg_bin("psql"), "-h", self.ctx.host, "-p", str(self.ctx.port("postgres")),
                "-U", "postgres", "-d", database, "-tA", "-v", "ON_ERROR_STOP=1", "-c", sql]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)  # noqa: S603
        if check and result.returncode != 0:
            raise ServiceError(self.name, f"psql failed: {result.stderr.strip()}", self.log_path)
        return result
