"""The declarative Ray Serve config of the ``decisionflow`` application, built from a :class:`ServingState`.

Ray Serve's REST API (``PUT /api/serve/applications/``) takes the *whole* config: an application left out is
deleted. So the config is always built as "every application now deployed, ours replaced"
(:func:`merge_applications`), and ours is a pure function of:

* :class:`AppSpec` - what does not change during a rollout: import path, builder args (gateway settings: paths
  and URIs only, never secrets), runtime env, replicas / autoscaling per deployment (changing those restarts
  replicas, or, for replicas/autoscaling, scales them);
* :class:`ServingState` - what a rollout moves: the ``stable`` and ``canary`` versions (model deployments'
  ``user_config``) and the routing (the gateway's ``user_config``: canary weight, shadow). Changing only these
  restarts no replica.

The same inputs give the same dict (keys sorted where order does not matter), so "is this already deployed?"
is a comparison (:func:`same_application`), which makes a deploy idempotent.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from decisionflow.exceptions import NonRetryableError

__all__ = [
    "APP_NAME",
    "AppSpec",
    "CANARY",
    "DEFAULT_IMPORT_PATH",
    "GATEWAY",
    "STABLE",
    "Scale",
    "ServingState",
    "application_config",
    "merge_applications",
    "same_application",
    "serve_config",
    "state_from_application",
]

APP_NAME = "decisionflow"
GATEWAY, STABLE, CANARY = "Gateway", "stable", "canary"
DEFAULT_IMPORT_PATH = "decisionflow_serving.deployments:build_app"
DEFAULT_NUM_CPUS = 0.25


class ServeConfigError(NonRetryableError, ValueError):
    """A Serve config input is invalid; the message names the field."""


@dataclass(frozen=True)
class Scale:
    """Replicas of one deployment: a fixed ``num_replicas``, or ``autoscaling`` (Ray Serve's autoscaling_config:
    ``min_replicas``, ``max_replicas``, ``target_ongoing_requests``...), and the CPU share of each replica."""

    num_replicas: int = 1
    autoscaling: Mapping[str, Any] | None = None
    num_cpus: float = DEFAULT_NUM_CPUS

    @classmethod
    def from_value(cls, value: Scale | Mapping[str, Any] | None, what: str) -> Scale:
        if value is None:
            return cls()
        if isinstance(value, Scale):
            return value
        unknown = sorted(set(value) - {"num_replicas", "autoscaling", "num_cpus"})
        if unknown:
            raise ServeConfigError(f"{what}: unknown field(s) {unknown}; use num_replicas, autoscaling, num_cpus")
        scale = cls(num_replicas=int(value.get("num_replicas", 1)), autoscaling=value.get("autoscaling") or None,
                    num_cpus=float(value.get("num_cpus", DEFAULT_NUM_CPUS)))
        if scale.num_replicas < 1:
            raise ServeConfigError(f"{what}.num_replicas must be >= 1, got {scale.num_replicas}")
        if not 0 < scale.num_cpus <= 64:
            raise ServeConfigError(f"{what}.num_cpus must be > 0, got {scale.num_cpus}")
        return scale

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ray_actor_options": {"num_cpus": self.num_cpus}}
        if self.autoscaling:
            out["autoscaling_config"] = dict(sorted(dict(self.autoscaling).items()))
        else:
            out["num_replicas"] = self.num_replicas
        return out


@dataclass(frozen=True)
class AppSpec:
    """The parts of our application a rollout does not change.

    :param args: builder args (``mlflow_uri``, ``model_name`` and the gateway settings).
    :param import_path: the application builder.
    :param route_prefix: HTTP prefix of the application.
    :param runtime_env: Ray runtime env (``env_vars`` only in practice: Serve takes no local ``working_dir``).
    :param scale: per deployment (``Gateway``, ``stable``, ``canary``) a :class:`Scale` or its dict.
    :param name: the application name.
    """

    args: Mapping[str, Any]
    import_path: str = DEFAULT_IMPORT_PATH
    route_prefix: str = "/"
    runtime_env: Mapping[str, Any] | None = None
    scale: Mapping[str, Any] = field(default_factory=dict)
    name: str = APP_NAME

    def __post_init__(self) -> None:
        unknown = sorted(set(self.scale) - {GATEWAY, STABLE, CANARY})
        if unknown:
            raise ServeConfigError(f"scale: unknown deployment(s) {unknown}; the deployments are "
                                   f"{[GATEWAY, STABLE, CANARY]}")
        if "mlflow_uri" not in self.args:
            raise ServeConfigError("args.mlflow_uri is required (where the model deployments load from)")
        for key, value in self.args.items():
            if any(word in key.lower() for word in ("password", "secret", "token_value", "api_key")):
                raise ServeConfigError(f"args.{key}: Serve configs are readable on the dashboard; pass a path "
                                       "to the secret, not the secret")
            del value

    def scale_of(self, deployment: str) -> Scale:
        return Scale.from_value(self.scale.get(deployment), f"scale.{deployment}")


@dataclass(frozen=True)
class ServingState:
    """What serves: the versions of ``stable`` / ``canary`` and the gateway's routing.

    :param stable_version: the version ``stable`` loads (``None``: nothing deployed yet - not deployable).
    :param canary_version: the version ``canary`` loads, ``None`` for an empty canary.
    :param canary_weight: percent of requests the canary answers.
    :param shadow: mirror stable-served requests to the canary.
    :param shadow_share: share of stable-served requests mirrored.
    :param canary_timeout_s: a canary call slower than this is answered by stable.
    """

    stable_version: str | None
    canary_version: str | None = None
    canary_weight: float = 0.0
    shadow: bool = False
    shadow_share: float = 1.0
    canary_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if self.stable_version is None:
            raise ServeConfigError("stable_version is required: the application always serves a stable version")
        if not 0 <= self.canary_weight <= 100:
            raise ServeConfigError(f"canary_weight must be within 0..100, got {self.canary_weight}")
        if self.canary_version is None and (self.canary_weight or self.shadow):
            raise ServeConfigError("canary_weight > 0 or shadow needs a canary_version")

    def routing(self) -> dict[str, Any]:
        """The gateway's user_config (``decisionflow_serving.routing.RoutingConfig`` fields)."""
        return {
            "canary_weight": float(self.canary_weight),
            "shadow": bool(self.shadow),
            "shadow_share": float(self.shadow_share),
            "canary_timeout_s": float(self.canary_timeout_s),
            "stable_version": str(self.stable_version),
            "canary_version": None if self.canary_version is None else str(self.canary_version),
        }

    def with_(self, **changes: Any) -> ServingState:
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def application_config(spec: AppSpec, state: ServingState) -> dict[str, Any]:
    """Our application's entry of the Serve config's ``applications`` list."""
    deployments = [
        {"name": GATEWAY, **spec.scale_of(GATEWAY).options(), "user_config": state.routing()},
        {"name": STABLE, **spec.scale_of(STABLE).options(), "user_config": {"model_version": str(state.stable_version)}},
        {"name": CANARY, **spec.scale_of(CANARY).options(),
         "user_config": {"model_version": None if state.canary_version is None else str(state.canary_version)}},
    ]
    app: dict[str, Any] = {
        "name": spec.name,
        "route_prefix": spec.route_prefix,
        "import_path": spec.import_path,
        "args": dict(sorted(dict(spec.args).items())),
        "deployments": deployments,
    }
    if spec.runtime_env:
        app["runtime_env"] = copy.deepcopy(dict(spec.runtime_env))
    return app


def state_from_application(app: Mapping[str, Any] | None) -> ServingState | None:
    """The :class:`ServingState` an application config (as built here, or read back from Serve) encodes."""
    if not app:
        return None
    by_name = {d.get("name"): d for d in app.get("deployments") or []}
    stable = (by_name.get(STABLE, {}).get("user_config") or {}).get("model_version")
    if stable is None:
        return None
    canary = (by_name.get(CANARY, {}).get("user_config") or {}).get("model_version")
    routing = by_name.get(GATEWAY, {}).get("user_config") or {}
    return ServingState(
        stable_version=str(stable),
        canary_version=None if canary is None else str(canary),
        canary_weight=float(routing.get("canary_weight", 0.0)),
        shadow=bool(routing.get("shadow", False)),
        shadow_share=float(routing.get("shadow_share", 1.0)),
        canary_timeout_s=float(routing.get("canary_timeout_s", 2.0)),
    )


def merge_applications(current: Iterable[Mapping[str, Any]], app: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every application of ``current`` (the deployed ones), with ours (same name) replaced or appended."""
    out = [copy.deepcopy(dict(a)) for a in current if a.get("name") != app["name"]]
    out.append(copy.deepcopy(dict(app)))
    return out


def serve_config(applications: Iterable[Mapping[str, Any]], *, host: str = "127.0.0.1", port: int = 8000) -> dict:
    """The full ``PUT /api/serve/applications/`` body: ``http_options`` (loopback by default) + every application."""
    return {"http_options": {"host": host, "port": int(port)},
            "applications": [copy.deepcopy(dict(a)) for a in applications]}


def _canonical(value: Any) -> Any:
    """Comparable form: dicts without None values / defaults that Serve fills in differently, floats normalised."""
    if isinstance(value, Mapping):
        return {k: _canonical(v) for k, v in sorted(value.items()) if v is not None}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return value


def _projection(wanted: Any, actual: Any) -> Any:
    """``actual`` restricted to the keys ``wanted`` has (Serve echoes defaults we did not set)."""
    if isinstance(wanted, Mapping) and isinstance(actual, Mapping):
        return {k: _projection(v, actual.get(k)) for k, v in wanted.items()}
    if isinstance(wanted, list) and isinstance(actual, list):
        if all(isinstance(w, Mapping) and "name" in w for w in wanted):
            by_name = {a.get("name"): a for a in actual if isinstance(a, Mapping)}
            if set(by_name) != {w["name"] for w in wanted}:
                return actual
            return [_projection(w, by_name[w["name"]]) for w in wanted]
        return actual
    return actual


def same_application(wanted: Mapping[str, Any], deployed: Mapping[str, Any] | None) -> bool:
    """True when ``deployed`` (Serve's ``deployed_app_config``) already is ``wanted`` in every field we set.

    A deployment with a ``user_config`` value of ``None`` in ``wanted`` (an empty canary's model_version) must
    be ``None`` (or absent) in ``deployed`` too; user configs are compared whole.
    """
    if not deployed:
        return False
    wanted_c = _canonical(wanted)
    deployed_c = _canonical(_projection(wanted, deployed))
    if wanted_c != deployed_c:
        return False
    by_name = {d.get("name"): d for d in deployed.get("deployments") or []}
    for dep in wanted.get("deployments") or []:
        if _canonical(dep.get("user_config")) != _canonical((by_name.get(dep["name"]) or {}).get("user_config")):
            return False
    return True


def digest(app: Mapping[str, Any]) -> str:
    """A short stable hash of an application config (logs, history rows)."""
    import hashlib

    return hashlib.sha256(json.dumps(_canonical(app), sort_keys=True).encode()).hexdigest()[:12]
