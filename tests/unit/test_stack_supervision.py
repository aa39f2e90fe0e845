"""The supervisor starts, probes and stops a real (tiny) service by PID, and explains failures."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from decisionflow.stack.base import Health, Service, ServiceError, StackContext, http_ok, port_open


def free_port() -> int:
    """A free port below the ephemeral range (32768+), so no other process's bind(0) takes it meanwhile, and above
    the integration tests' Ray worker ports (20002-29999, tests/integration/fixtures_ml.py)."""
    import random

    for _ in range(200):
        port = random.randint(30000, 32700)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 30000-32700")


class HttpServer(Service):
    name = "tiny-http"
    start_timeout = 20

    def __init__(self, ctx, port, argv=None):
        super().__init__(ctx)
        self._port = port
        self._argv = argv

    def command(self):
        return self._argv or [sys.executable, "-m", "http.server", str(self._port), "--bind", "127.0.0.1"]

    def ports(self):
        return [self._port]

    def health(self) -> Health:
        return http_ok(f"http://127.0.0.1:{self._port}/")


@pytest.fixture
def ctx(tmp_path: Path) -> StackContext:
    return StackContext(home=tmp_path, data=tmp_path / "data")


def test_start_is_idempotent_and_stop_frees_the_port(ctx):
    port = free_port()
    service = HttpServer(ctx, port)
    try:
        assert service.start() is True
        service.wait_healthy()
        pid = service.pid()
        assert pid and port_open("127.0.0.1", port)
        assert service.start() is False, "a second start must not launch a second process"
        assert service.pid() == pid
        assert service.memory_bytes() > 1_000_000
    finally:
        assert service.stop() is True
    assert service.pid() is None
    assert not port_open("127.0.0.1", port)
    assert not service.pid_path.exists()
    assert service.stop() is False


def test_busy_port_is_reported_with_component_and_remedy(ctx):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(ServiceError) as err:
            HttpServer(ctx, port).start()
    assert "tiny-http" in str(err.value) and str(port) in str(err.value)
    assert "DECISIONFLOW_<NAME>_PORT" in str(err.value)


def test_crash_during_startup_names_component_and_log(ctx):
    service = HttpServer(ctx, free_port(), argv=[sys.executable, "-c", "import sys; print('boom: bad config'); sys.exit(3)"])
    service.start()
    with pytest.raises(ServiceError) as err:
        service.wait_healthy(timeout=10)
    message = str(err.value)
    assert message.startswith("tiny-http:")
    assert "boom: bad config" in message
    assert str(service.log_path) in message


def test_stale_pid_file_is_not_trusted(ctx):
    service = HttpServer(ctx, free_port())
    ctx.run_dir.mkdir(parents=True)
    # A PID that exists (a process of ours, not a group leader) but with another start time: a reused PID
    # must not be taken for the service, nor stopped.
    import json
    import subprocess

    other = subprocess.Popen(["sleep", "30"])
    try:
        service.pid_path.write_text(json.dumps({"pid": other.pid, "start_time": "1"}))
        assert service.pid() is None
        assert service.stop() is False
        assert other.poll() is None, "an unrelated process was signalled"
    finally:
        other.kill()
        other.wait()


def test_down_stops_every_service_once_in_dependency_tiers(ctx):
    """Every service is in exactly one stop tier; PostgreSQL (used by MLflow and Airflow) stops last, the
    api-server after the Airflow components that talk to it."""
    from decisionflow.stack import Stack

    stack = Stack(ctx, log=lambda *_: None)
    tiers = stack.stop_tiers()
    flat = [s for tier in tiers for s in tier]
    assert sorted(s.name for s in flat) == sorted(s.name for s in stack.services)
    assert tiers[-1] == [stack.postgres]
    position = {s.name: i for i, tier in enumerate(tiers) for s in tier}
    assert position["airflow-api-server"] > max(position[n] for n in
                                                ("airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"))
    assert all(position[s.name] < position["postgres"] for s in flat if s is not stack.postgres)
    assert stack.down() == []  # nothing started: nothing stopped


def test_task_processes_fork_from_a_preloaded_forkserver(tmp_path):
    """The scheduler's LocalExecutor workers come from a forkserver that imported the heavy libraries once; the
    list holds installed libraries only (never our own code, which must reach the next task without a restart)."""
    import importlib.util

    from decisionflow.stack.airflow import TASK_PRELOAD_MODULES, airflow_environment
    from decisionflow.stack.base import StackContext

    env = airflow_environment(StackContext(data=tmp_path))
    assert env["AIRFLOW__SCHEDULER__MP_START_METHOD"] == "forkserver"
    assert env["AIRFLOW__SCHEDULER__MP_FORKSERVER_PRELOAD"].split(",") == list(TASK_PRELOAD_MODULES)
    assert not [m for m in TASK_PRELOAD_MODULES if m.split(".")[0] == "decisionflow"]
    # multiprocessing skips a preload that raises ImportError, so a misspelt name would silently not be
    # preloaded: each one must be an installed module (found on disk, without importing the heavy library)
    def installed(name: str) -> bool:
        top, *rest = name.split(".")
        spec = importlib.util.find_spec(top)
        if spec is None or not rest:
            return spec is not None
        base = Path(spec.submodule_search_locations[0]).joinpath(*rest)
        return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()

    assert [m for m in TASK_PRELOAD_MODULES if not installed(m)] == []
