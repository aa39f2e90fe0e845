"""Private, real MLflow and Ray instances for the ML hooks' integration tests.

Each service runs in its own session (``start_new_session=True``) on free loopback ports with its own state
under a temporary directory, and is stopped by signalling *its* process group only -- never ``ray stop`` or a
kill by name, which would hit the developer's stack or another test run.

Import the fixtures into a test module with ``from tests.integration.fixtures_ml import mlflow_server``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent
# Ray hands ports 10002-19999 to its workers by default, and so does the system tests' stack Ray, which may run
# at the same time (`make test` runs two pytest workers): the test heads' workers get their own range, below
# Linux's ephemeral ports (32768+) that free_port() draws from.
RAY_WORKER_PORTS = range(20002, 30000)
RAY_PORT_NAMES = ("gcs", "dashboard", "client", "agent", "agent_grpc", "runtime_env_agent", "metrics_export")


def free_port(avoid: range | None = None) -> int:
    """A port nothing listens on right now (and outside ``avoid``)."""
    while True:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if avoid is None or port not in avoid:
            return port


def http_status(url: str, headers: dict | None = None, timeout: float = 3.0) -> int | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def stop_group(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process group the fixture created, SIGKILL it after ``grace`` seconds."""
    try:
        pgid = os.getpgid(process.pid)
    except ProcessLookupError:
        return
    if pgid != process.pid:  # start_new_session made it a group leader; anything else is not ours to signal
        process.kill()
        process.wait()
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        process.poll()
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def wait_until(predicate, timeout: float, process: subprocess.Popen, log: Path, what: str, extra_logs=()) -> str | None:
    """None once ``predicate()`` holds; else why not (the process died or time ran out) with its log tails."""

    def diagnostics() -> str:
        parts = [log.read_text(errors="replace")[-3000:]]
        for path in extra_logs:
            try:
                parts.append(f"--- {path}\n" + Path(path).read_text(errors="replace")[-1500:])
            except OSError:
                pass
        return "\n".join(parts)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"{what} exited with {process.returncode} during start-up:\n{diagnostics()}"
        if predicate():
            return None
        time.sleep(1)
    return f"{what} not ready after {timeout:.0f}s:\n{diagnostics()}"


# -- MLflow -------------------------------------------------------------------------------------------------------
@dataclass
class MlflowServer:
    url: str
    port: int
    root: Path
    argv: list[str]
    env: dict[str, str]


def mlflow_command(port: int, root: Path) -> tuple[list[str], dict[str, str]]:
    argv = [
        str(BIN / "mlflow"), "server",
        "--host", HOST, "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--workers", "1",
    ]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return argv, env


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    argv, env = mlflow_command(port, root)
    log = root / "mlflow.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv, env={**os.environ, **env}, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://{HOST}:{port}"
    try:
        error = wait_until(lambda: http_status(f"{url}/health") == 200, 240, process, log, "mlflow server")
        if error:
            pytest.fail(error)
        yield MlflowServer(url=url, port=port, root=root, argv=argv, env=env)
    finally:
        stop_group(process, grace=20)


# -- Ray ----------------------------------------------------------------------------------------------------------
@dataclass
class RayHead:
    address: str
    gcs_port: int
    dashboard_url: str
    token_path: Path
    temp_dir: Path
    argv: list[str]
    env: dict[str, str]
    num_cpus: int

    def extra(self, **overrides) -> str:
        return json.dumps(
            {
                "dashboard_url": self.dashboard_url,
                "auth_token_path": str(self.token_path),
                "namespace": "decisionflow-test",
                **overrides,
            }
        )


def ray_command(ports: dict[str, int], temp_dir: Path, token_path: Path, num_cpus: int) -> tuple[list[str], dict]:
    argv = [
        str(BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address", HOST,
        "--port", str(ports["gcs"]),
        "--dashboard-host", HOST,
        "--dashboard-port", str(ports["dashboard"]),
        "--ray-client-server-port", str(ports["client"]),
        # Pre-assigned agent ports: with port 0 the raylet waits a hard-coded ~15 s for the Python agents to
        # publish theirs in port files and aborts ("Timed out waiting for file .../metrics_agent_port_<node>")
        # when they import slower than that, as they do on a loaded 2-CPU box. The dashboard agent's listen
        # port file is awaited even when pinned (the raylet is not told it): see ray_head's retries.
        # The listen port must be pinned anyway: its default (52365) collides with any other Ray on the box.
        "--dashboard-agent-listen-port", str(ports["agent"]),
        "--dashboard-agent-grpc-port", str(ports["agent_grpc"]),
        "--runtime-env-agent-port", str(ports["runtime_env_agent"]),
        "--metrics-export-port", str(ports["metrics_export"]),
        "--min-worker-port", str(RAY_WORKER_PORTS.start),
        "--max-worker-port", str(RAY_WORKER_PORTS.stop - 1),
        "--temp-dir", str(temp_dir),
        "--num-cpus", str(num_cpus),
        "--object-store-memory", str(256 * 1024 * 1024),
        "--disable-usage-stats",
    ]
    env = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_USAGE_STATS_ENABLED": "0",
        # As in stack/ray.py: without it Ray rewrites --node-ip-address 127.0.0.1 to the routable IP.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    return argv, env


def _start_ray_head(root: Path, token_path: Path, num_cpus: int) -> tuple[subprocess.Popen, RayHead, str | None]:
    # Ray's unix sockets live under --temp-dir: keep it short (sun_path is limited to 107 bytes).
    temp_dir = Path(tempfile.mkdtemp(prefix="dfr-", dir="/tmp"))
    ports: dict[str, int] = {}
    for name in RAY_PORT_NAMES:
        port = free_port(avoid=RAY_WORKER_PORTS)
        while port in ports.values():
            port = free_port(avoid=RAY_WORKER_PORTS)
        ports[name] = port
    argv, env = ray_command(ports, temp_dir, token_path, num_cpus)
    child_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    log = root / f"ray-{temp_dir.name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv, env={**child_env, **env}, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    dashboard = f"http://{HOST}:{ports['dashboard']}"
    auth = {"Authorization": f"Bearer {token_path.read_text()}"}
    session_logs = temp_dir / "session_latest" / "logs"
    # The dashboard answers before the raylet has registered; `ray start` prints this line once all is up.
    error = wait_until(
        lambda: "Ray runtime started" in log.read_text(errors="replace")
        and port_open(ports["gcs"])
        and http_status(f"{dashboard}/api/version", auth) == 200,
        300, process, log, "ray head",
        extra_logs=[session_logs / name for name in ("raylet.out", "raylet.err", "gcs_server.err")],
    )
    head = RayHead(
        address=f"{HOST}:{ports['gcs']}",
        gcs_port=ports["gcs"],
        dashboard_url=dashboard,
        token_path=token_path,
        temp_dir=temp_dir,
        argv=argv,
        env=env,
        num_cpus=num_cpus,
    )
    return process, head, error


def wait_for_quieter_machine(max_wait: float = 180.0) -> None:
    """Ray's start-up has hard 15 s windows; give it a chance by not starting at a load peak (bounded wait)."""
    limit = 3 * (os.cpu_count() or 1)
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] > limit and time.monotonic() < deadline:
        time.sleep(5)


def _raylet_abort(head: RayHead) -> str:
    """The raylet's own reason when it aborted (it logs a CHECK failure, ``ray start`` only says "timed out")."""
    for name in ("raylet.out", "raylet.err"):
        path = head.temp_dir / "session_latest" / "logs" / name
        try:
            for line in path.read_text(errors="replace").splitlines():
                if "Check failed" in line or "Timed out waiting for file" in line:
                    return f"raylet aborted: {line[line.find('Check failed'):][:300]}\n"
        except OSError:
            continue
    return ""


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory) -> Iterator[RayHead]:
    """A token-authenticated Ray head on free ports.

    Start-up is retried (5 attempts): on a loaded machine the raylet of Ray 2.60 aborts when the dashboard agent
    takes more than ~15 s to publish its listen port ("Timed out waiting for file
    .../dashboard_agent_listen_port_<node>"); neither a flag nor RAY_agent_register_timeout_ms lengthens that wait.
    """
    root = tmp_path_factory.mktemp("ray")
    token_path = root / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    errors = []
    attempts = 5
    for _attempt in range(attempts):
        wait_for_quieter_machine()
        process, head, error = _start_ray_head(root, token_path, num_cpus=1)
        if error is None:
            break
        errors.append(f"[load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs] {_raylet_abort(head)}"
                      f"{error[-2000:]}")
        stop_group(process, grace=30)
        shutil.rmtree(head.temp_dir, ignore_errors=True)
    else:
        pytest.fail(f"ray head did not start in {attempts} attempts:\n" + "\n=====\n".join(errors))
    try:
        yield head
    finally:
        stop_group(process, grace=60)
        shutil.rmtree(head.temp_dir, ignore_errors=True)
