"""A Ray head node bound to loopback, with token authentication, for Ray Serve."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

from decisionflow.stack.base import Health, Service, http_ok


class RayService(Service):
    name = "ray"
    start_timeout = 180
    # The node drains for up to 30 s after SIGTERM before its processes exit.
    stop_timeout = 60
    # On a busy machine the raylet can give up waiting for its dashboard agent and abort the start.
    start_attempts = 3

    # "serve": Ray Serve's HTTP proxy, opened by this head's Serve once an application is deployed.
    _PORTS = ("ray", "ray_dashboard", "ray_client", "ray_dashboard_agent", "ray_dashboard_agent_grpc",
              "ray_runtime_env_agent", "ray_metrics_export", "serve")

    @property
    def token_path(self) -> Path:
        return self.ctx.data / "ray" / "auth_token"

    @property
    def temp_dir(self) -> Path:
        # Ray puts unix sockets under its temp dir; a path under a deep checkout can exceed the 107-byte limit.
        digest = hashlib.sha1(str(self.ctx.data).encode()).hexdigest()[:10]
        return Path("/tmp") / f"decisionflow-ray-{digest}"

    def address(self) -> str:
        return f"{self.ctx.host}:{self.ctx.port('ray')}"

    def url(self) -> str:
        return f"http://{self.ctx.host}:{self.ctx.port('ray_dashboard')}"

    def ports(self) -> list[int]:
        return [self.ctx.port(name) for name in self._PORTS]

    def environment(self) -> dict[str, str]:
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            # Ray rewrites --node-ip-address 127.0.0.1 to the machine's routable IP (and binds there) unless
            # "cluster mode" is off; off means every Ray socket stays on loopback.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            # Serve replicas (the gateway) resolve their default paths (token store, Feast registry, ...) against
            # this stack's data dir, whatever the environment `make up` ran in.
            "DECISIONFLOW_DATA": str(self.ctx.data),
        }

    def prepare(self) -> None:
        if not self.token_path.exists():
            self.token_path.parent.mkdir(parents=True, exist_ok=True)
            self.token_path.write_text(secrets.token_hex(32))
            self.token_path.chmod(0o600)
        # The gateway served on this head answers /v1/* only with an API token: the first one is created here
        # (once; hashed in <data>/serving/api_tokens.json, plain in <data>/serving/api_token, mode 0600).
        from decisionflow_serving.auth import ensure_first_token

        ensure_first_token(self.ctx.data)

    def command(self) -> list[str]:
        return [
            self.ctx.bin("ray"), "start", "--head", "--block",
            "--node-ip-address", self.ctx.host,
            "--port", str(self.ctx.port("ray")),
            "--dashboard-host", self.ctx.host,
            "--dashboard-port", str(self.ctx.port("ray_dashboard")),
            "--ray-client-server-port", str(self.ctx.port("ray_client")),
            # Pinned: Ray's defaults for these are fixed ports another Ray on the machine may hold.
            "--dashboard-agent-listen-port", str(self.ctx.port("ray_dashboard_agent")),
            "--dashboard-agent-grpc-port", str(self.ctx.port("ray_dashboard_agent_grpc")),
            "--runtime-env-agent-port", str(self.ctx.port("ray_runtime_env_agent")),
            "--metrics-export-port", str(self.ctx.port("ray_metrics_export")),
            "--temp-dir", str(self.temp_dir),
            "--num-cpus", "2",
            "--object-store-memory", str(512 * 1024 * 1024),
            "--disable-usage-stats",
        ]

    def health(self) -> Health:
        # The dashboard answers before the raylet has registered: wait for ray start's own verdict first.
        try:
            log = self.log_path.read_text(errors="replace")
        except OSError:
            log = ""
        if "Ray runtime started" not in log[log.rfind("\n=== "):]:
            return Health(False, "ray start has not reported 'Ray runtime started' yet")
        token = self.token_path.read_text().strip() if self.token_path.exists() else ""
        return http_ok(f"{self.url()}/api/version", headers={"Authorization": f"Bearer {token}"})
