"""The Ray Serve application ``decisionflow``: a FastAPI gateway in front of a ``stable`` and a ``canary`` model.

Deployments (one application, route prefix ``/``):

* ``Gateway`` - the ingress: the gateway's FastAPI app (``decisionflow_serving.app.create_app``) over a
  :class:`~decisionflow_serving.routing.RoutedBackend`. Its ``user_config`` is the routing config (canary weight,
  shadow, versions; :class:`~decisionflow_serving.routing.RoutingConfig`): a weight change calls
  ``reconfigure()`` and restarts nothing.
* ``stable`` and ``canary`` - two :class:`ModelDeployment` s, each serving the MLflow model version named in its
  ``user_config`` (``{"model_version": "3"}``). A new version is loaded in a thread by ``reconfigure()`` and
  swapped in atomically once loaded: no replica restart, and a batch in flight finishes with the version it
  started with. ``{"model_version": null}`` holds nothing (an idle canary). Scoring batches concurrent requests
  with ``@serve.batch`` (one ``predict`` per batch); every answer names the version that scored it.

Every replica reserves a fraction of a CPU (``ray_actor_options.num_cpus`` 0.25) so the application fits a
2-CPU node. Replicas, autoscaling and ``user_config`` are set per deployment by the Serve config
(``decisionflow.rollout.serve_config``), deployed through the dashboard's REST API.

Builder: ``decisionflow_serving.deployments:build_app`` with ``args`` = the gateway settings (paths and URIs, no
secrets) plus, optionally:

* ``app_factory`` - ``"module:function"`` called as ``function(args, backend)`` to build the FastAPI app
  (default :func:`gateway_app`: ``create_app(GatewaySettings.from_dict(...), backend)``);
* ``model_loader`` - ``"module:function"`` called as ``function(tracking_uri, model_name, version)`` returning
  an object with ``pinned`` (name, version, run_id, feature_columns, review, decline) and ``predict(frame)``
  (default ``decisionflow_serving.models:load_model_version``).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from ray import serve

from decisionflow_serving.backends import Scored

log = logging.getLogger("ray.serve")

APP_NAME = "decisionflow"
GATEWAY = "Gateway"
STABLE = "stable"
CANARY = "canary"
DEFAULT_LOADER = "decisionflow_serving.models:load_model_version"
DEFAULT_APP_FACTORY = "decisionflow_serving.deployments:gateway_app"
#: Keys of ``args`` that are this module's own; the rest are gateway settings.
OWN_ARGS = ("app_factory", "model_loader")
#: ``@serve.batch`` limits of the model deployments.
MAX_BATCH_SIZE = 32
BATCH_WAIT_S = 0.005


class ModelNotLoadedError(RuntimeError):
    """This model deployment holds no model version (``user_config.model_version`` is null or still loading)."""


def import_object(path: str) -> Any:
    """``"package.module:attribute"`` -> the attribute (a clear error naming the path otherwise)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"import path {path!r} must look like 'package.module:attribute'")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import {path!r}: {exc} -- remedy: the module must be installed in the Ray "
                         "workers' environment (Serve configs take no local working_dir)") from exc


class _Failed:
    """A per-request failure inside a batch (``@serve.batch`` has no per-item exceptions)."""

    def __init__(self, error: str) -> None:
        self.error = error


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64, health_check_period_s=5)
class ModelDeployment:
    """One served model version, loaded from MLflow, swapped by ``user_config`` without a restart.

    :param tracking_uri: the MLflow tracking server.
    :param model_name: the registered model.
    :param role: ``stable`` or ``canary`` (logs only).
    :param model_loader: ``"module:function"`` that loads one version (see the module docstring).
    """

    def __init__(self, tracking_uri: str, model_name: str, role: str, model_loader: str = DEFAULT_LOADER) -> None:
        self.tracking_uri, self.model_name, self.role = tracking_uri, model_name, role
        self._loader = import_object(model_loader)
        self._loaded: Any = None
        self._wanted: str | None = None
        self._lock = asyncio.Lock()
        self.load_seconds: float | None = None

    async def reconfigure(self, config: Mapping[str, Any] | None) -> None:
        """``{"model_version": "<v>" | null}``: load that version in a thread, then swap it in (or drop the model)."""
        config = dict(config or {})
        unknown = sorted(set(config) - {"model_version"})
        if unknown:
            raise ValueError(f"{self.role} user_config has unknown field(s) {unknown}; only 'model_version'")
        version = config.get("model_version")
        version = None if version is None else str(version)
        async with self._lock:
            self._wanted = version
            if version is None:
                self._loaded = None
                log.info("%s: holds no model version", self.role)
                return
            if self._loaded is not None and str(self._loaded.pinned.version) == version:
                return
            started = time.monotonic()
            loaded = await asyncio.to_thread(self._loader, self.tracking_uri, self.model_name, version)
            if str(loaded.pinned.version) != version:
                raise RuntimeError(f"{self.role}: loader returned version {loaded.pinned.version}, asked for {version}")
            self._loaded = loaded  # the swap: one assignment, batches take a reference at their start
            self.load_seconds = round(time.monotonic() - started, 3)
            log.info("%s: now serving %s version %s (loaded in %.2fs)", self.role, self.model_name, version,
                     self.load_seconds)

    def info(self) -> dict[str, Any]:
        """What this replica serves: ``{"role", "model_name", "model_version" (None when empty), "load_seconds"}``."""
        loaded = self._loaded
        return {"role": self.role, "model_name": self.model_name,
                "model_version": None if loaded is None else str(loaded.pinned.version),
                "wanted_version": self._wanted, "load_seconds": self.load_seconds}

    async def score(self, rows: list[dict[str, Any]]) -> Scored:
        """Score ``rows`` (full feature dicts) with the loaded version; batched with concurrent calls."""
        result = await self._score_batch(rows)
        if isinstance(result, _Failed):
            raise RuntimeError(result.error)
        return result

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _score_batch(self, requests: list[list[dict[str, Any]]]) -> list[Scored | _Failed]:
        loaded = self._loaded  # one version for the whole batch, whatever reconfigure does meanwhile
        if loaded is None:
            why = (f"{self.role} holds no model version"
                   + (f" (version {self._wanted} is loading)" if self._wanted else ""))
            return [_Failed(why)] * len(requests)
        try:
            return [self._scored(loaded, scores) for scores in _predict_split(loaded, requests)]
        except Exception:  # noqa: BLE001 - one bad request must not fail the others: score them one by one
            results: list[Scored | _Failed] = []
            for rows in requests:
                try:
                    results.append(self._scored(loaded, _predict(loaded, rows)))
                except Exception as exc:  # noqa: BLE001
                    results.append(_Failed(f"{self.role} version {loaded.pinned.version}: "
                                           f"{type(exc).__name__}: {str(exc)[:300]}"))
            return results

    @staticmethod
    def _scored(loaded: Any, scores: list[float]) -> Scored:
        pinned = loaded.pinned
        return Scored(scores=scores, model_name=str(pinned.name), model_version=str(pinned.version),
                      review=float(pinned.review), decline=float(pinned.decline), run_id=str(pinned.run_id),
                      feature_columns=tuple(pinned.feature_columns))


def _predict(loaded: Any, rows: list[dict[str, Any]]) -> list[float]:
    """Scores of ``rows`` by ``loaded`` (``decisionflow_serving.models.score_rows``: the model's own columns)."""
    from decisionflow_serving.models import score_rows

    if not rows:
        return []
    scores = score_rows(loaded, rows).scores
    if len(scores) != len(rows):
        raise RuntimeError(f"model returned {len(scores)} scores for {len(rows)} rows")
    return list(scores)


def _predict_split(loaded: Any, requests: list[list[dict[str, Any]]]) -> list[list[float]]:
    """One ``predict`` over every request's rows, split back per request."""
    flat = [row for rows in requests for row in rows]
    scores = _predict(loaded, flat)
    out, start = [], 0
    for rows in requests:
        out.append(scores[start:start + len(rows)])
        start += len(rows)
    return out


def gateway_app(args: Mapping[str, Any], backend: Any) -> Any:
    """The production FastAPI app: ``create_app(GatewaySettings.from_dict(settings), backend)``."""
    from decisionflow_serving.app import create_app
    from decisionflow_serving.settings import GatewaySettings

    settings = {k: v for k, v in args.items() if k not in OWN_ARGS}
    return create_app(GatewaySettings.from_dict(settings), backend)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64, health_check_period_s=5)
@serve.ingress()
class Gateway:
    """The ingress: the FastAPI gateway over a :class:`RoutedBackend`; routing in ``user_config``.

    :param stable: handle of the ``stable`` model deployment.
    :param canary: handle of the ``canary`` model deployment.
    :param args: the application's builder args (gateway settings + ``app_factory``).
    """

    async def __init__(self, stable: Any, canary: Any, args: Mapping[str, Any]) -> None:
        from decisionflow_serving.routing import RoutedBackend

        self._args = dict(args)
        self.backend = RoutedBackend(stable, canary)
        self._probe = asyncio.get_running_loop().create_task(self._probe_ready())

    async def _probe_ready(self) -> None:
        while True:
            await self.backend.refresh_ready()
            await asyncio.sleep(2.0 if not self.backend.ready() else 15.0)

    def __serve_build_asgi_app__(self) -> Any:
        factory = import_object(self._args.get("app_factory") or DEFAULT_APP_FACTORY)
        return factory(self._args, self.backend)

    def reconfigure(self, config: Mapping[str, Any] | None) -> None:
        """The routing config (see :class:`~decisionflow_serving.routing.RoutingConfig`)."""
        self.backend.configure(dict(config or {}))


def build_app(args: Mapping[str, Any]) -> Any:
    """The application for ``import_path: decisionflow_serving.deployments:build_app``.

    :param args: gateway settings plus ``app_factory`` / ``model_loader`` (see the module docstring). The model
        deployments need ``mlflow_uri`` and take ``model_name`` (default ``decisionflow-risk``).
    """
    args = dict(args or {})
    tracking_uri = args.get("mlflow_uri")
    if not tracking_uri:
        raise ValueError("serve application args: 'mlflow_uri' is required (the MLflow server the "
                         "model deployments load their versions from)")
    model_name = str(args.get("model_name") or "decisionflow-risk")
    loader = str(args.get("model_loader") or DEFAULT_LOADER)
    stable = ModelDeployment.options(name=STABLE).bind(tracking_uri, model_name, STABLE, loader)
    canary = ModelDeployment.options(name=CANARY).bind(tracking_uri, model_name, CANARY, loader)
    return Gateway.options(name=GATEWAY).bind(stable, canary, args)
