"""Ray Serve hook: deploy and watch Serve applications through the dashboard's REST API, with token auth.

Uses the ``ray_default`` connection of :class:`~decisionflow.hooks.ray.RayHook` (dashboard URL, token; see there)
plus, in its ``extra``:

* ``serve_url`` - where Serve's HTTP proxy answers (default ``http://<host>:<serve port>``, port 8000 or
  ``DECISIONFLOW_SERVE_PORT``): the gateway's ``/metrics`` is read there;
* ``serve_host`` / ``serve_port`` - ``http_options`` written into every deployed config (default 127.0.0.1 and
  the port of ``serve_url``).

Serve's REST API is declarative (``PUT /api/serve/applications/`` replaces *all* applications), so
:meth:`RayServeHook.deploy_application` always sends every application that is deployed now, with ours replaced,
and sends nothing when ours is already deployed as asked (idempotent). The PUT only accepts: :meth:`wait_running`
polls ``GET`` until the application is ``RUNNING`` with our config, and fails on ``DEPLOY_FAILED`` with Serve's
message.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from functools import cached_property
from typing import Any

from decisionflow import config
from decisionflow.hooks.ray import RayHook

APPLICATIONS_PATH = "/api/serve/applications/"
#: Application statuses Serve reports.
RUNNING, DEPLOYING, DEPLOY_FAILED, UNHEALTHY = "RUNNING", "DEPLOYING", "DEPLOY_FAILED", "UNHEALTHY"


class ServeDeployError(RuntimeError):
    """A Serve deployment failed or did not settle; the message says which application, why, and the remedy."""


class RayServeHook(RayHook):
    """The Serve REST API of the Ray cluster named by ``ray_default`` (token auth from :class:`RayHook`).

    :param ray_conn_id: the Airflow connection id (``conn_type`` ``ray``); ``ray_default`` if omitted.
    """

    hook_name = "Ray Serve"

    # -- HTTP -------------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        url = f"{self.dashboard_url}/{path.lstrip('/')}"
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json", **self.auth_headers()}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - URL from the connection
                text = response.read().decode()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:2000]
            hint = {401: "no token sent", 403: "wrong token for this cluster"}.get(exc.code, "")
            raise ServeDeployError(f"Ray Serve REST {method} {url} answered HTTP {exc.code}"
                                   f"{' (' + hint + ')' if hint else ''}: {detail} -- remedy: check connection "
                                   f"{self.ray_conn_id!r} (dashboard_url, auth token)") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ServeDeployError(f"Ray dashboard {self.dashboard_url} unreachable ({getattr(exc, 'reason', exc)}) "
                                   f"-- remedy: {self.remedy}") from exc
        return json.loads(text) if text.strip() else None

    # -- read -------------------------------------------------------------------------------------------------
    def probe(self) -> dict[str, Any]:
        """Read-only: the dashboard answers (:meth:`RayHook.probe`) and Serve's applications and their status."""
        summary = super().probe()
        details = self.get_details()
        apps = details.get("applications") or {}
        summary["serve_applications"] = {name: app.get("status") for name, app in sorted(apps.items())}
        return summary

    def get_details(self) -> dict[str, Any]:
        """``GET /api/serve/applications/``: Serve's instance details (``applications`` by name, ``http_options``)."""
        return self._request("GET", APPLICATIONS_PATH) or {}

    def application(self, name: str, details: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """One application's details (``status``, ``message``, ``deployed_app_config``, ``deployments``) or None."""
        details = self.get_details() if details is None else details
        return (details.get("applications") or {}).get(name)

    def deployed_configs(self, details: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """The config of every deployed application (what a declarative PUT must repeat to keep them)."""
        details = self.get_details() if details is None else details
        out = []
        for name, app in (details.get("applications") or {}).items():
            cfg = app.get("deployed_app_config")
            if cfg:
                out.append(dict(cfg, name=cfg.get("name") or name))
        return out

    # -- serve endpoint ---------------------------------------------------------------------------------------
    @cached_property
    def serve_url(self) -> str:
        url = self.extra.get("serve_url") or f"http://{self.host}:{config.port('serve')}"
        return str(url).rstrip("/")

    @property
    def serve_http_options(self) -> dict[str, Any]:
        parsed = urllib.parse.urlparse(self.serve_url)
        return {"host": str(self.extra.get("serve_host") or config.HOST),
                "port": int(self.extra.get("serve_port") or parsed.port or config.port("serve"))}

    # -- write ------------------------------------------------------------------------------------------------
    def put_config(self, serve_config: Mapping[str, Any]) -> None:
        """``PUT /api/serve/applications/`` with the whole config (applications left out are deleted)."""
        self._request("PUT", APPLICATIONS_PATH, dict(serve_config))

    def deploy_application(self, app: Mapping[str, Any]) -> bool:
        """Deploy our application, keeping every other one; no PUT when it is already deployed as ``app``.

        :return: True when a PUT was sent, False when nothing had to change.
        """
        from decisionflow.rollout.serve_config import merge_applications, same_application, serve_config

        details = self.get_details()
        current = self.application(app["name"], details)
        if current and current.get("status") == RUNNING and same_application(app, current.get("deployed_app_config")):
            self.log.info("Serve application %r is already RUNNING with this config: nothing to deploy", app["name"])
            return False
        body = serve_config(merge_applications(self.deployed_configs(details), app), **self.serve_http_options)
        self.log.info("PUT Serve config: %d application(s), ours %r", len(body["applications"]), app["name"])
        self.put_config(body)
        return True

    def wait_running(self, app: Mapping[str, Any], timeout: float = 600.0, poll: float = 1.0) -> dict[str, Any]:
        """Wait until application ``app["name"]`` is RUNNING with ``app``'s config; its details.

        :raises ServeDeployError: ``DEPLOY_FAILED`` (with Serve's message and the failing deployments) or not
            RUNNING within ``timeout`` seconds (with its last status).
        """
        from decisionflow.rollout.serve_config import same_application

        name = app["name"]
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while True:
            last = self.application(name)
            if last is not None:
                status = last.get("status")
                same = same_application(app, last.get("deployed_app_config"))
                if same and status == RUNNING and _deployments_running(last, app):
                    return last
                if same and status == DEPLOY_FAILED:
                    raise ServeDeployError(f"Serve application {name!r} is DEPLOY_FAILED: {_failure(last)} -- "
                                           "remedy: fix the config or the code it imports, then deploy again")
            if time.monotonic() > deadline:
                status = last.get("status") if last else "absent"
                why = _failure(last) if last else "the application never appeared"
                raise ServeDeployError(f"Serve application {name!r} not RUNNING with the new config after "
                                       f"{timeout:.0f}s (status {status}): {why} -- remedy: check the cluster's "
                                       "free CPUs (each replica reserves ray_actor_options.num_cpus) and the "
                                       "Serve logs on the dashboard")
            time.sleep(poll)

    def metrics_text(self, timeout: float = 10.0) -> str:
        """The gateway's ``GET /metrics`` through Serve's HTTP proxy (no token: scrapes are on loopback)."""
        with urllib.request.urlopen(f"{self.serve_url}/metrics", timeout=timeout) as response:  # noqa: S310
            return response.read().decode()


def _deployments_running(details: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Every deployment HEALTHY, not mid-update, its replicas RUNNING, with the user_config we asked for."""
    from decisionflow.rollout.serve_config import _canonical

    deployments = details.get("deployments") or {}
    for dep in wanted.get("deployments") or []:
        have = deployments.get(dep["name"]) or {}
        if have.get("status") != "HEALTHY" or have.get("status_trigger") == "CONFIG_UPDATE_STARTED":
            return False
        if "user_config" in dep and _canonical((have.get("deployment_config") or {}).get("user_config")) != \
                _canonical(dep["user_config"]):
            return False
        if any(r.get("state") != "RUNNING" for r in have.get("replicas") or []):
            return False
    return all((d or {}).get("status") == "HEALTHY" for d in deployments.values())


def _failure(app: Mapping[str, Any]) -> str:
    parts = [str(app.get("message") or "").strip()]
    for name, dep in (app.get("deployments") or {}).items():
        if (dep or {}).get("status") not in ("HEALTHY", None):
            parts.append(f"deployment {name} {dep.get('status')}: {str(dep.get('message') or '').strip()[:1500]}")
    return "; ".join(p for p in parts if p) or "no message"
