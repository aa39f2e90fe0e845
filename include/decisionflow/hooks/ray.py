"""Ray hook: the compute cluster behind batch scoring and Ray Serve, protected by Ray's token authentication.

The connection (``ray_default``):

* ``conn_type``: ``ray``
* ``host`` / ``port``: the head node's GCS, ``127.0.0.1`` / ``6380`` -> address ``127.0.0.1:6380``.
* ``password`` (optional): the auth token itself. When empty, the token is read from ``extra.auth_token_path``.
* ``extra``:

  - ``dashboard_url``: ``http://127.0.0.1:8265`` (the dashboard / Jobs / Serve REST API)
  - ``auth_token_path``: ``.data/ray/auth_token`` (relative paths resolve against the project home)
  - ``namespace``: ``decisionflow`` (named actors and Serve apps live there)
  - ``auth_mode`` (optional): ``token`` (default) or ``disabled`` for a cluster started without auth.

Ray 2.60 token authentication is configured through the environment, for the head *and* for every client:
``RAY_AUTH_MODE=token`` plus either ``RAY_AUTH_TOKEN_PATH=<file>`` or ``RAY_AUTH_TOKEN=<token>``. Ray reads
those into its C++ config when ``ray._raylet`` is first imported, so :meth:`RayHook.connect` sets them *and*
refreshes that config before ``ray.init``. HTTP calls to the dashboard carry ``Authorization: Bearer <token>``.

``ray`` is imported inside the methods only: DAG files that import this module must parse fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from decisionflow import config
from decisionflow.hooks.base import CheckableHook, LayerCheckError

if TYPE_CHECKING:
    from airflow.sdk import Connection

DEFAULT_NAMESPACE = "decisionflow"
DEFAULT_TOKEN_PATH = ".data/ray/auth_token"
#: Environment variables through which Ray clients find the auth mode and token.
AUTH_ENV_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")


class RayAuthError(ValueError):
    """The connection's auth token cannot be found or read."""


class RayHook(CheckableHook):
    """Connect to the Ray cluster named by an Airflow connection, with token authentication.

    :param ray_conn_id: the Airflow connection id (``conn_type`` ``ray``); ``ray_default`` if omitted.
    """

    conn_name_attr = "ray_conn_id"
    default_conn_name = "ray_default"
    conn_type = "ray"
    hook_name = "Ray"

    layer = "ray"

    def __init__(self, ray_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ray_conn_id = ray_conn_id

    # -- connection ---------------------------------------------------------------------------------------
    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """How the Airflow UI connection form shows a ``ray`` connection."""
        return {
            "hidden_fields": ["schema", "login"],
            "relabeling": {"host": "GCS host", "port": "GCS port", "password": "Auth token (optional)"},
            "placeholders": {
                "host": "127.0.0.1",
                "port": "6380",
                "password": "leave empty to read extra.auth_token_path",
                "extra": json.dumps(
                    {
                        "dashboard_url": "http://127.0.0.1:8265",
                        "auth_token_path": DEFAULT_TOKEN_PATH,
                        "namespace": DEFAULT_NAMESPACE,
                    }
                ),
            },
        }

    @property
    def remedy(self) -> str:  # type: ignore[override]
        log = config.data_dir() / "logs" / "ray.log"
        return (
            f"start the local stack with `make up` (then `make status`) and read {log}; "
            f"or fix connection {self.ray_conn_id!r}"
        )

    @cached_property
    def connection(self) -> Connection:
        """The Airflow connection, fetched once per hook instance."""
        return self.get_connection(self.ray_conn_id)

    @cached_property
    def extra(self) -> dict[str, Any]:
        return self.connection.extra_dejson

    @property
    def host(self) -> str:
        return self.connection.host or config.HOST

    @property
    def port(self) -> int:
        return int(self.connection.port or config.port("ray"))

    @property
    def address(self) -> str:
        """The GCS address handed to ``ray.init``, e.g. ``127.0.0.1:6380``."""
        return f"{self.host}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """Base URL of the dashboard REST API (``extra.dashboard_url``; default: same host, dashboard port)."""
        url = self.extra.get("dashboard_url") or f"http://{self.host}:{config.port('ray_dashboard')}"
        return str(url).rstrip("/")

    @property
    def namespace(self) -> str:
        return str(self.extra.get("namespace") or DEFAULT_NAMESPACE)

    @property
    def auth_mode(self) -> str:
        mode = str(self.extra.get("auth_mode") or "token").lower()
        if mode not in ("token", "disabled"):
            raise ValueError(
                f"connection {self.ray_conn_id!r}: extra.auth_mode must be 'token' or 'disabled', got {mode!r}"
            )
        return mode

    @property
    def token_path(self) -> Path | None:
        """Absolute path of the token file (``extra.auth_token_path``), or None when the token is inline."""
        if self.connection.password:
            return None
        return config.resolve_path(self.extra.get("auth_token_path") or DEFAULT_TOKEN_PATH)

    def token(self) -> str:
        """The auth token: the connection's password, else the content of the token file.

        :raises RayAuthError: token auth is on and the token file is missing or empty.
        """
        if self.connection.password:
            return self.connection.password
        path = self.token_path
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise RayAuthError(
                f"Ray auth token file {path} (connection {self.ray_conn_id!r}, extra.auth_token_path) "
                f"cannot be read: {exc.strerror or exc}"
            ) from exc
        if not token:
            raise RayAuthError(f"Ray auth token file {path} (connection {self.ray_conn_id!r}) is empty")
        return token

    def auth_env(self) -> dict[str, str]:
        """The environment a Ray client (driver, ``ray`` CLI, job submission) needs to reach this cluster.

        ``{"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "<abs path>"}`` with a token file, or
        ``{"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "<token>"}`` when the token is in the password field;
        ``{"RAY_AUTH_MODE": "disabled"}`` for a cluster without auth.
        """
        if self.auth_mode == "disabled":
            return {"RAY_AUTH_MODE": "disabled"}
        if self.connection.password:
            return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.connection.password}
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def auth_headers(self) -> dict[str, str]:
        """HTTP headers for the dashboard: ``Authorization: Bearer <token>`` (none when auth is disabled)."""
        if self.auth_mode == "disabled":
            return {}
        return {"Authorization": f"Bearer {self.token()}"}

    # -- dashboard ----------------------------------------------------------------------------------------
    def dashboard_get(self, path: str, timeout: float = 10.0) -> Any:
        """``GET <dashboard_url><path>`` with the auth header; JSON bodies are decoded, others returned as text.

        :raises urllib.error.HTTPError: non-2xx answer (401: no token sent, 403: wrong token).
        :raises urllib.error.URLError: the dashboard is unreachable.
        """
        import urllib.request

        url = f"{self.dashboard_url}/{path.lstrip('/')}"
        request = urllib.request.Request(url, headers={"Accept": "application/json", **self.auth_headers()})
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - URL from the connection
            body = response.read().decode()
            if "json" in (response.headers.get("Content-Type") or "") or body[:1] in "{[":
                try:
                    return json.loads(body)
                except ValueError:
                    pass
            return body

    # -- driver connection --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def connect(self, **init_kwargs: Any) -> Iterator[Any]:
        """``ray.init(address=..., namespace=...)`` with the auth environment; ``ray.shutdown()`` on exit.

        Yields the ``RayContext``. Raises ``ConnectionError`` at once when nothing listens on the GCS port (rather
        than letting ``ray.init`` retry for a minute). Extra keyword arguments go to ``ray.init`` (e.g. ``runtime_env``,
        ``log_to_driver``). If this process is already connected to Ray, that connection is reused and left
        open (it belongs to someone else).

        The auth variables are exported to ``os.environ`` for the duration (Ray's C++ core reads them there)
        and restored afterwards. For a loopback host, Ray's "cluster mode" is switched off in this process
        (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, left set), as for the local head in ``stack/ray.py``.
        """
        import ray

        if ray.is_initialized():
            self.log.info("Ray is already initialized in this process; reusing that connection")
            yield ray.get_runtime_context()
            return

        if not _port_open(self.host, self.port):
            raise ConnectionError(
                f"nothing listens on the Ray GCS address {self.address} (connection {self.ray_conn_id!r})"
            )
        overrides: dict[str, str | None] = dict.fromkeys(AUTH_ENV_VARS)
        overrides.update(self.auth_env())
        if self.auth_mode == "token" and not self.connection.password:
            self.token()  # fail now, with the path in the message, instead of deep inside ray.init
        if _is_loopback(self.host):
            _keep_ray_on_loopback()
        saved = {name: os.environ.get(name) for name in AUTH_ENV_VARS}
        _set_env(overrides)
        _refresh_ray_auth_config()
        try:
            context = ray.init(address=self.address, namespace=self.namespace, **init_kwargs)
            try:
                yield context
            finally:
                ray.shutdown()
        finally:
            _set_env(saved)

    # -- self-check -----------------------------------------------------------------------------------------
    def probe(self) -> dict[str, Any]:
        """``GET /api/version`` on the dashboard with the connection's token (no driver, no task)."""
        try:
            version = self.dashboard_get("/api/version", timeout=10.0)
        except Exception as exc:  # noqa: BLE001 - HTTPError 401/403 (token), URLError (unreachable)
            hint = {401: " (no token sent)", 403: " (wrong token)"}.get(getattr(exc, "code", None), "")
            raise LayerCheckError(self.layer, f"Ray dashboard {self.dashboard_url}: {exc}{hint}", self.remedy) from exc
        ray_version = version.get("ray_version") if isinstance(version, dict) else None
        return {"dashboard_url": self.dashboard_url, "address": self.address, "ray_version": ray_version}

    def platform_check(self) -> dict[str, Any]:
        """Prove the cluster works: authenticated dashboard call, then a remote task through an authenticated driver.

        1. ``GET /api/version`` on the dashboard with the bearer token (a wrong token fails here, in milliseconds);
        2. ``ray.init`` against the GCS, run a tiny remote task (7 squared) and read the cluster resources;
        3. disconnect.

        :return: address, namespace, Ray version, the task result and the cluster's CPU/memory resources.
        :raises LayerCheckError: unreachable cluster, missing or wrong token, or a task that does not come back.
        """
        import urllib.error

        started = time.monotonic()
        try:
            address, dashboard = self.address, self.dashboard_url
            mode = self.auth_mode
            if mode == "token":
                self.token()
        except RayAuthError as exc:
            raise LayerCheckError(
                self.layer,
                str(exc),
                f"the head node writes its token to {self.token_path} when it starts: run `make up`, or point "
                f"extra.auth_token_path of {self.ray_conn_id!r} at the file the cluster was started with",
            ) from exc
        except Exception as exc:  # noqa: BLE001 - e.g. the connection is not defined
            raise LayerCheckError(self.layer, f"connection {self.ray_conn_id!r}: {exc}", self.remedy) from exc

        try:
            version = self.dashboard_get("/api/version")
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise LayerCheckError(
                    self.layer,
                    f"dashboard {dashboard} rejected the token (HTTP {exc.code})",
                    f"the token at {self.token_path or 'the connection password'} is not the one the cluster was "
                    f"started with: restart Ray (`make down && make up`) or fix {self.ray_conn_id!r}",
                ) from exc
            raise LayerCheckError(self.layer, f"dashboard {dashboard} answered HTTP {exc.code}", self.remedy) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise LayerCheckError(
                self.layer, f"dashboard {dashboard} is unreachable: {getattr(exc, 'reason', exc)}", self.remedy
            ) from exc

        if not _port_open(self.host, self.port):
            raise LayerCheckError(self.layer, f"nothing listens on the GCS address {address}", self.remedy)

        try:
            import ray
        except ImportError as exc:
            raise LayerCheckError(self.layer, f"ray is not installed: {exc}", "run `make install`") from exc

        def square(value: int) -> int:
            return value * value

        try:
            with self.connect(log_to_driver=False) as context:
                result = ray.get(ray.remote(num_cpus=0)(square).remote(7), timeout=120)
                resources = ray.cluster_resources()
                nodes = [node for node in ray.nodes() if node.get("Alive")]
                namespace = ray.get_runtime_context().namespace
                ray_version = getattr(context, "ray_version", ray.__version__)
        except LayerCheckError:
            raise
        except Exception as exc:  # noqa: BLE001 - ray raises ConnectionError, GetTimeoutError, RayError...
            raise LayerCheckError(self.layer, f"driver round trip to {address} failed: {type(exc).__name__}: {exc}",
                                  self.remedy) from exc
        if result != 49:
            raise LayerCheckError(self.layer, f"remote square(7) returned {result!r}, expected 49", self.remedy)
        return {
            "address": address,
            "dashboard_url": dashboard,
            "namespace": namespace,
            "auth_mode": mode,
            "ray_version": ray_version,
            "dashboard_version": version.get("ray_version") if isinstance(version, dict) else version,
            "square_of_7": result,
            "alive_nodes": len(nodes),
            "cluster_resources": {
                key: resources[key] for key in ("CPU", "GPU", "memory", "object_store_memory") if key in resources
            },
            "seconds": round(time.monotonic() - started, 2),
        }


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _keep_ray_on_loopback() -> None:
    """Stop Ray from rewriting a loopback GCS address (and this driver's node IP) to the machine's routable IP.

    Ray does that unless "cluster mode" is off; the local head runs with it off (see stack/ray.py), so a
    driver must agree or it dials 192.x/10.x where nothing listens and hangs. The flag is read into a module
    constant at import time, hence both the variable (for child processes) and the constant.
    """
    os.environ[LOOPBACK_ENV] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _set_env(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _refresh_ray_auth_config() -> None:
    """Make an already-imported Ray core re-read ``RAY_AUTH_*`` (its config and token are cached at import)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # pragma: no cover - a Ray without token auth
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _port_open(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
