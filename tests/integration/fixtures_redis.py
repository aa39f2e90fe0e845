"""A private, real Redis server for the Feast online store's integration tests.

``redis-server`` (the Debian package; ``make system-deps`` installs it) runs in its own session
(``start_new_session=True``) on 127.0.0.1 and a free port, without persistence (``--save ''``,
``--appendonly no``) and with its working directory under a temporary directory. It is stopped by signalling
*its* process group only -- never a kill by name, which would hit a developer's Redis or another test run.

Import the fixture into a test module with ``from .fixtures_redis import redis_server``.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    from .fixtures_ml import HOST, free_port, stop_group, wait_until
except ImportError:  # collected as a plain directory (rootdir-relative import mode)
    from fixtures_ml import HOST, free_port, stop_group, wait_until

START_TIMEOUT = 30.0


@dataclass
class RedisServer:
    host: str
    port: int
    root: Path
    argv: list[str]

    @property
    def connection_string(self) -> str:
        """What Feast's ``online_store.connection_string`` takes: ``host:port``."""
        return f"{self.host}:{self.port}"

    def client(self):
        import redis

        return redis.Redis(host=self.host, port=self.port, socket_timeout=5)


def redis_command(executable: str, port: int, root: Path) -> list[str]:
    return [
        executable,
        "--port", str(port),
        "--bind", HOST,
        "--save", "",
        "--appendonly", "no",
        "--dir", str(root),
        "--daemonize", "no",
        "--protected-mode", "yes",
    ]


def _pings(host: str, port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(host=host, port=port, socket_timeout=1, socket_connect_timeout=1).ping())
    except (redis.exceptions.RedisError, OSError):
        return False


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.fail("redis-server is not installed (the Feast Redis online store tests need a real server): "
                    "run `make system-deps`, which installs the Debian package redis-server")
    root = tmp_path_factory.mktemp("redis")
    port = free_port()
    argv = redis_command(executable, port, root)
    log = root / "redis.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        error = wait_until(lambda: _pings(HOST, port), START_TIMEOUT, process, log, "redis-server")
        if error:
            pytest.fail(error)
        yield RedisServer(host=HOST, port=port, root=root, argv=argv)
    finally:
        stop_group(process, grace=10)
