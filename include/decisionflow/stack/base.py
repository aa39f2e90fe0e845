"""One supervised local service: started detached, tracked by a PID file, stopped by that PID only.

Every service runs in its own session (process group), so stopping it stops its children too and never
touches a process this stack did not start (no ``pkill``, no ``ray stop``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from decisionflow import config


class ServiceError(RuntimeError):
    """A component failed: the message names the component, the cause and where its log is."""

    def __init__(self, component: str, cause: str, log_path: Path | None = None):
        self.component = component
        self.cause = cause
        self.log_path = log_path
        where = f" (log: {log_path})" if log_path else ""
        super().__init__(f"{component}: {cause}{where}")


@dataclass
class Health:
    ok: bool
    detail: str = ""


@dataclass
class StackContext:
    """Paths and ports one stack instance uses; tests build their own with a private data dir."""

    home: Path = field(default_factory=config.project_home)
    data: Path = field(default_factory=config.data_dir)
    host: str = config.HOST
    jars: Path = field(default_factory=config.jars_dir)
    ports: dict[str, int] = field(default_factory=dict)
    python_bin: Path | None = None

    def port(self, name: str) -> int:
        return self.ports.get(name) or config.port(name)

    @property
    def run_dir(self) -> Path:
        return self.data / "run"

    @property
    def log_dir(self) -> Path:
        return self.data / "logs"

    def bin(self, name: str) -> str:
        """An executable from the environment this package runs in (the project venv)."""
        import sys

        base = self.python_bin or Path(sys.executable).parent
        candidate = base / name
        return str(candidate) if candidate.exists() else name


#: Seconds ``Service.stop`` waits, after its processes are gone, for their ports to close.
PORT_RELEASE_TIMEOUT = 5.0


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout: float = 2.0, headers: dict | None = None) -> Health:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - loopback URL we built
            return Health(200 <= response.status < 300, f"HTTP {response.status}")
    except urllib.error.HTTPError as exc:
        return Health(False, f"HTTP {exc.code}")
    except (urllib.error.URLError, OSError) as exc:
        return Health(False, str(getattr(exc, "reason", exc)))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _proc_start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class Service(ABC):
    """Base for a supervised service. Subclasses say how to prepare, launch and probe it."""

    #: Short component name used in CLI output, PID and log files.
    name: str = ""
    #: Seconds ``wait_healthy`` waits by default.
    start_timeout: float = 90.0
    #: Seconds between SIGTERM and SIGKILL on stop.
    stop_timeout: float = 20.0
    #: Launches tried when the process dies during start-up (for services with known start-up races).
    start_attempts: int = 1

    def __init__(self, ctx: StackContext):
        self.ctx = ctx

    # -- what a subclass provides -------------------------------------------------------------------------
    @abstractmethod
    def command(self) -> list[str]:
        """argv of the long-running process (foreground, not daemonizing)."""

    @abstractmethod
    def health(self) -> Health:
        """A cheap probe of whether the service answers."""

    def prepare(self) -> None:
        """One-time, idempotent initialization before the first start (init a cluster dir, format storage)."""

    def after_start(self) -> None:
        """Idempotent work once the service is healthy (create databases, load settings)."""

    def environment(self) -> dict[str, str]:
        return {}

    def url(self) -> str:
        return ""

    def ports(self) -> list[int]:
        """Ports the service listens on; ``down`` checks they are free afterwards."""
        return []

    def popen_kwargs(self) -> dict:
        return {}

    # -- supervision --------------------------------------------------------------------------------------
    @property
    def pid_path(self) -> Path:
        return self.ctx.run_dir / f"{self.name}.pid"

    @property
    def log_path(self) -> Path:
        return self.ctx.log_dir / f"{self.name}.log"

    def _read_pid(self) -> tuple[int, str | None] | None:
        try:
            record = json.loads(self.pid_path.read_text())
            return int(record["pid"]), record.get("start_time")
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def pid(self) -> int | None:
        """PID of our running process, or None. Guards against PID reuse with the process start time."""
        record = self._read_pid()
        if not record:
            return None
        pid, start_time = record
        if not pid_alive(pid):
            return None
        if start_time is not None and _proc_start_time(pid) != start_time:
            return None
        return pid

    def running(self) -> bool:
        return self.pid() is not None

    def start(self) -> bool:
        """Start unless already running. Returns True when it launched a new process."""
        if self.running():
            return False
        busy = [p for p in self.ports() if port_open(self.ctx.host, p)]
        if busy:
            raise ServiceError(
                self.name,
                f"port(s) {busy} already in use by another process; stop it or set DECISIONFLOW_<NAME>_PORT",
                self.log_path,
            )
        self.ctx.run_dir.mkdir(parents=True, exist_ok=True)
        self.ctx.log_dir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        env = {**os.environ, **self.environment()}
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name}: {' '.join(self.command())}\n".encode())
            log.flush()
            try:
                process = subprocess.Popen(  # noqa: S603 - argv we built
                    self.command(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    cwd=self.ctx.home,
                    start_new_session=True,
                    **self.popen_kwargs(),
                )
            except OSError as exc:
                raise ServiceError(self.name, f"could not launch {self.command()[0]}: {exc}", self.log_path) from exc
        self.pid_path.write_text(json.dumps({"pid": process.pid, "start_time": _proc_start_time(process.pid)}))
        return True

    def start_and_wait(self, timeout: float | None = None) -> bool:
        """``start`` + ``wait_healthy``, relaunching up to ``start_attempts`` times if start-up crashes."""
        for attempt in range(1, self.start_attempts + 1):
            started = self.start()
            try:
                self.wait_healthy(timeout)
                return started
            except ServiceError:
                if attempt == self.start_attempts or self.running():
                    raise
                self.stop()  # clean up what the failed attempt left, then try again
        return False

    def wait_healthy(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.start_timeout)
        last = Health(False, "not probed yet")
        while time.monotonic() < deadline:
            if not self.running():
                raise ServiceError(self.name, f"process exited during start-up ({self._log_tail()})", self.log_path)
            last = self.health()
            if last.ok:
                return
            time.sleep(0.5)
        raise ServiceError(
            self.name, f"not healthy after {timeout or self.start_timeout:.0f}s: {last.detail}", self.log_path
        )

    def stop(self) -> bool:
        """Stop our process group: SIGTERM, then SIGKILL after ``stop_timeout``. True if something was stopped."""
        pid = self.pid()
        if pid is None:
            # The leader may be gone while children it spawned (same process group) live on: a process
            # group id cannot be reused while any member exists, so they are still ours to stop.
            record = self._read_pid()
            if not record or not self._group_alive(record[0]):
                self.pid_path.unlink(missing_ok=True)
                return False
            pid = record[0]
        self._signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        while time.monotonic() < deadline and self._group_alive(pid):
            time.sleep(0.2)
        if self._group_alive(pid):
            self._signal_group(pid, signal.SIGKILL)
            time.sleep(0.5)
        # The group can look gone (its members exiting) a moment before the kernel has closed their listening
        # sockets: `stop` returns once the ports are free too, so a `down` or a restart right after finds them so.
        # Bounded: a port held by some other process is reported by `down`, not waited for.
        deadline = time.monotonic() + PORT_RELEASE_TIMEOUT
        while time.monotonic() < deadline and any(port_open(self.ctx.host, p, timeout=0.2) for p in self.ports()):
            time.sleep(0.05)
        self.pid_path.unlink(missing_ok=True)
        return True

    def memory_bytes(self) -> int:
        """Resident memory of the whole process group (the service and everything it spawned)."""
        pid = self.pid()
        if pid is None:
            return 0
        total = 0
        for proc_pid in self._group_members(pid):
            try:
                with open(f"/proc/{proc_pid}/statm") as statm:
                    total += int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, IndexError):
                continue
        return total

    # -- helpers ------------------------------------------------------------------------------------------
    @staticmethod
    def _group_members(pgid: int) -> list[int]:
        members = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.getpgid(int(entry)) == pgid and pid_alive(int(entry)):
                    members.append(int(entry))
            except (ProcessLookupError, PermissionError):
                continue
        return members

    def _group_alive(self, pgid: int) -> bool:
        return bool(self._group_members(pgid))

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass

    def _log_tail(self, lines: int = 5) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return "no log"
        return " | ".join(line.strip() for line in tail)

    def run_once(self, argv: list[str], what: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
        """Run a preparation command to completion, logging to this service's log; fail with its output."""
        self.ctx.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.environment(), **kwargs.pop("env", {})}
        result = subprocess.run(  # noqa: S603 - argv we built
            argv, capture_output=True, text=True, env=env, cwd=self.ctx.home, timeout=timeout, check=False, **kwargs
        )
        with open(self.log_path, "a") as log:
            log.write(f"\n=== {what}: {' '.join(argv)} (exit {result.returncode})\n{result.stdout}{result.stderr}")
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise ServiceError(self.name, f"{what} failed (exit {result.returncode}): {' | '.join(detail)}", self.log_path)
        return result
