"""Serving operators: deploy the ``decisionflow`` Ray Serve application, and roll a model version out safely.

* :class:`RayServeDeployOperator` - deploy the application in a given :class:`~decisionflow.rollout.serve_config.
  ServingState` through Serve's REST API (``RayServeHook``): idempotent (the same config is a no-op), waits for
  ``RUNNING``, fails on ``DEPLOY_FAILED`` with Serve's reason.
* :class:`RolloutOperator` - deferrable canary rollout: the new version as ``canary`` (stable untouched), a shadow
  window, weighted steps (e.g. 10 -> 50 -> 100 %), each followed by an analysis window judged by
  :class:`~decisionflow.triggers.canary.CanaryAnalysisTrigger` on the gateway's metrics; then promotion (stable
  loads the version, alias ``live``) or automatic rollback (weight 0, canary emptied, reason recorded, task failed).
  Every step is recorded in ``serving/rollouts`` (Delta) and on the MLflow version (tags).

The plain-Python parts live in :mod:`decisionflow.rollout`; heavy imports happen in ``execute`` only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from decisionflow import constants
from decisionflow.operators.base import DecisionflowOperatorMixin

if TYPE_CHECKING:
    from airflow.sdk import Context

    from decisionflow.rollout.serve_config import AppSpec, ServingState


def _mapping(value: Any, name: str) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} must be a mapping or a JSON object, got {value!r}: {exc}") from exc
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a mapping, got {type(value).__name__}")
    return dict(value)


def _weights(value: Any) -> list[float]:
    if isinstance(value, str):
        value = json.loads(value) if value.strip().startswith("[") else [v for v in value.split(",") if v.strip()]
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"weights must be a list of percentages, e.g. [10, 50, 100]; got {value!r}") from exc


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"true", "false", "1", "0", "yes", "no", ""}:
        return value.strip().lower() in {"true", "1", "yes"}
    raise ValueError(f"{name} must be a boolean, got {value!r}")


def _version(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return None if text in ("", "None", "null") else text


class _ServeBase(DecisionflowOperatorMixin, BaseOperator):
    """Shared arguments of the serving operators (documented on each)."""

    layer = "serving"

    def __init__(self, *, app_args: Mapping[str, Any] | str | None = None, scale: Mapping[str, Any] | str | None = None,
                 runtime_env: Mapping[str, Any] | str | None = None, import_path: str | None = None,
                 replicas: Mapping[str, Any] | str | None = None, autoscaling: Mapping[str, Any] | str | None = None,
                 app_name: str | None = None, ray_conn_id: str = "ray_default", mlflow_conn_id: str = "mlflow_default",
                 deploy_timeout: float = 600.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.app_args = app_args
        self.scale = scale
        self.replicas = replicas
        self.autoscaling = autoscaling
        self.runtime_env = runtime_env
        self.import_path = import_path
        self.app_name = app_name
        self.ray_conn_id = ray_conn_id
        self.mlflow_conn_id = mlflow_conn_id
        self.deploy_timeout = deploy_timeout

    # -- pieces -----------------------------------------------------------------------------------------------
    def serve_hook(self):
        from decisionflow.hooks.ray_serve import RayServeHook

        return RayServeHook(ray_conn_id=self.ray_conn_id)

    def mlflow_client(self):
        """A client of the registry. Only where it is needed: between two analysis windows a rollout touches no
        MLflow, and importing it (and its first request) costs a resumed task tens of seconds on a busy box."""
        from decisionflow.hooks.mlflow import MlflowHook

        return MlflowHook(mlflow_conn_id=self.mlflow_conn_id).get_client()

    def tracking_uri(self) -> str:
        from decisionflow.hooks.mlflow import MlflowHook

        return MlflowHook(mlflow_conn_id=self.mlflow_conn_id).tracking_uri

    def app_spec(self) -> AppSpec:
        from decisionflow.rollout.serve_config import APP_NAME, DEFAULT_IMPORT_PATH, AppSpec

        args = _mapping(self.app_args, "app_args")
        if "mlflow_uri" not in args:
            args["mlflow_uri"] = self.tracking_uri()
        model_name = getattr(self, "model_name", None)
        if model_name and "model_name" not in args:
            args["model_name"] = model_name
        return AppSpec(args=args, import_path=self.import_path or DEFAULT_IMPORT_PATH,
                       runtime_env=_mapping(self.runtime_env, "runtime_env") or None,
                       scale=self.scale_spec(), name=self.app_name or APP_NAME)

    def scale_spec(self) -> dict[str, Any]:
        """``scale``, with ``replicas`` ({deployment: n}) and ``autoscaling`` ({deployment: config}) merged in."""
        scale = {name: dict(value) for name, value in _mapping(self.scale, "scale").items()}
        for name, count in _mapping(self.replicas, "replicas").items():
            scale.setdefault(name, {})["num_replicas"] = int(count)
        for name, auto in _mapping(self.autoscaling, "autoscaling").items():
            if auto:
                scale.setdefault(name, {})["autoscaling"] = dict(auto)
        return scale

    def apply(self, hook, spec: AppSpec, state: ServingState) -> dict[str, Any]:
        """Deploy ``state`` (no-op when already so) and wait until RUNNING; a summary."""
        import time

        from decisionflow.rollout.serve_config import application_config, digest

        app = application_config(spec, state)
        started = time.monotonic()
        changed = hook.deploy_application(app)
        details = hook.wait_running(app, timeout=float(self.deploy_timeout))
        seconds = round(time.monotonic() - started, 2)
        self.log.info("Serve %s: %s in %.1fs (%s)", spec.name, "deployed" if changed else "unchanged", seconds,
                      state.as_dict())
        return {"application": spec.name, "changed": changed, "status": details.get("status"),
                "config_digest": digest(app), "seconds": seconds, "state": state.as_dict()}

    def current_state(self, hook, spec: AppSpec) -> ServingState | None:
        from decisionflow.rollout.serve_config import state_from_application

        app = hook.application(spec.name)
        return state_from_application((app or {}).get("deployed_app_config"))


class RayServeDeployOperator(_ServeBase):
    """
    Deploy the ``decisionflow`` Ray Serve application with the given model versions and routing.

    Idempotent: when the application is already RUNNING with exactly this config nothing is sent. Otherwise the
    whole Serve config is PUT (every other deployed application kept, ours replaced) and the task waits until
    our application is ``RUNNING`` with it; ``DEPLOY_FAILED`` fails the task with Serve's message.

    Returns (XCom) ``application``, ``changed``, ``status``, ``config_digest``, ``seconds``, ``state``.

    :param stable_version: the model version ``stable`` serves. (templated)
    :param canary_version: the version ``canary`` serves; ``None`` (default) = an empty canary. (templated)
    :param canary_weight: percent of requests answered by the canary (0-100, default 0). (templated)
    :param shadow: mirror stable-served requests to the canary (default False). (templated)
    :param app_args: builder args of the application (gateway settings: paths and URIs only, no secrets);
        ``mlflow_uri`` defaults to the ``mlflow_default`` connection's URI. (templated)
    :param scale: replicas / autoscaling: per deployment (``Gateway``, ``stable``, ``canary``) ``{"num_replicas": n}`` or
        ``{"autoscaling": {...Ray Serve autoscaling_config...}}`` and ``num_cpus`` (default 0.25). Changing replicas or autoscaling restarts no
        replica; changing ``num_cpus`` restarts them. (templated)
    :param replicas: ``{deployment: num_replicas}``, merged into ``scale``. (templated)
    :param autoscaling: ``{deployment: Ray Serve autoscaling_config}``, merged into ``scale`` (wins over
        ``replicas``). (templated)
    :param runtime_env: Ray runtime env of the application (e.g. ``{"env_vars": {...}}``; Serve takes no local
        ``working_dir``: the code must be installed). (templated)
    :param import_path: the application builder (default ``decisionflow_serving.deployments:build_app``).
    :param app_name: the Serve application name (default ``decisionflow``).
    :param ray_conn_id: Airflow connection of the Ray cluster (type ``ray``; dashboard URL and token).
    :param mlflow_conn_id: Airflow connection of the MLflow server (the model deployments load from it).
    :param deploy_timeout: seconds to wait for RUNNING (default 600).
    """

    template_fields: Sequence[str] = ("stable_version", "canary_version", "canary_weight", "shadow", "app_args",
                                      "scale", "replicas", "autoscaling", "runtime_env")
    ui_color = "#fde8d7"

    def __init__(self, *, stable_version: str, canary_version: str | None = None, canary_weight: float | str = 0,
                 shadow: bool | str = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stable_version = stable_version
        self.canary_version = canary_version
        self.canary_weight = canary_weight
        self.shadow = shadow

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowFailException

        from decisionflow.hooks.ray_serve import ServeDeployError
        from decisionflow.rollout.serve_config import ServeConfigError, ServingState

        try:
            state = ServingState(_version(self.stable_version), _version(self.canary_version),
                                 float(self.canary_weight or 0), shadow=_bool(self.shadow, "shadow"))
            spec = self.app_spec()
        except (ServeConfigError, ValueError) as exc:
            raise AirflowFailException(f"{self.task_id}: {exc}") from exc
        hook = self.serve_hook()
        try:
            return self.apply(hook, spec, state)
        except ServeDeployError as exc:
            if "DEPLOY_FAILED" in str(exc):
                raise AirflowFailException(str(exc)) from exc
            raise


class RolloutOperator(_ServeBase):
    """
    Roll a model version out on Ray Serve: canary, shadow and weighted steps with analysis; promote or roll back.

    1. Resolve the version: ``model_version``, else the version behind alias ``champion``.
    2. Nothing deployed yet: deploy it as ``stable`` directly, set alias ``live``, done. Already stable (and the
       canary empty): nothing to do but make sure ``live`` points at it.
    3. Otherwise deploy it as ``canary`` (stable untouched; the task waits for RUNNING, i.e. the version loaded),
       at weight 0 with shadow mirroring when ``shadow``; then each weight of ``weights``. After each step the
       task **defers** to :class:`~decisionflow.triggers.canary.CanaryAnalysisTrigger` for ``window_seconds``:
       canary error rate, p99 latency (absolute and against stable) and shadow score shift against ``limits``,
       failing fast.
    4. All windows passed: promote - stable loads the version while the canary answers 100 %, then the canary is
       emptied at weight 0; alias ``live`` and tags on the MLflow version.
    5. A failed window (or a canary that does not deploy): roll back at once - weight 0 and canary emptied in one
       config, the version tagged ``rolled_back`` with the reason, the step recorded - then the task **fails**
       (``AirflowFailException``) naming the reason.

    Each step is a row of ``serving/rollouts`` (``rollout_id`` = ``<dag_id>/<run_id>/<task_id>``). Clients never
    see the canary's faults: a failed canary call is answered by stable and counted against the canary.

    Returns (XCom) ``outcome`` (``first_deploy`` | ``promoted`` | ``noop``), ``version``, ``replaced``,
    ``rollout_id``, ``steps`` (the verdicts).

    :param model_name: the registered MLflow model (default ``decisionflow-risk``). (templated)
    :param model_version: the version to roll out; empty / ``None`` = the ``champion`` alias. On-call can name any
        earlier version to roll back to it (it goes through the same analysis). (templated)
    :param weights: canary weights of the steps, increasing, ending at 100 (default ``[10, 50, 100]``). (templated)
    :param shadow: start with a shadow window (weight 0, mirrored requests, scores compared) and keep mirroring
        during the steps below 100 (default True). (templated)
    :param window_seconds: length of each analysis window (default 60). (templated)
    :param limits: analysis limits (:class:`decisionflow.rollout.analysis.Limits`): ``max_error_rate``,
        ``max_p99_seconds``, ``max_p99_ratio``, ``p99_ratio_floor_seconds``, ``max_mean_score_shift``,
        ``min_requests``. (templated)
    :param on_inconclusive: ``fail`` (default: roll back) or ``pass`` when a window saw fewer than
        ``min_requests`` canary calls. (templated)
    :param canary_timeout_s: a canary call slower than this is answered by stable and counted as an error
        (default 2). (templated)
    :param poll_interval: seconds between two metric scrapes of the trigger (fail-fast granularity; default 2).
    :param app_args: builder args of the application (see :class:`RayServeDeployOperator`). (templated)
    :param scale: replicas / autoscaling: per deployment (``Gateway``, ``stable``, ``canary``) ``{"num_replicas": n}`` or
        ``{"autoscaling": {...Ray Serve autoscaling_config...}}`` and ``num_cpus`` (default 0.25). (templated)
    :param replicas: ``{deployment: num_replicas}``, merged into ``scale``. (templated)
    :param autoscaling: ``{deployment: Ray Serve autoscaling_config}``, merged into ``scale``. (templated)
    :param runtime_env: Ray runtime env of the application. (templated)
    :param import_path: the application builder (default ``decisionflow_serving.deployments:build_app``).
    :param app_name: the Serve application name (default ``decisionflow``).
    :param metrics_url: the gateway's metrics endpoint (default ``<serve_url>/metrics`` of the Ray connection).
    :param ray_conn_id: Airflow connection of the Ray cluster (type ``ray``).
    :param mlflow_conn_id: Airflow connection of the MLflow server (type ``mlflow``).
    :param lake_conn_id: Airflow connection of the lake (``serving/rollouts`` is written under its root).
    :param deploy_timeout: seconds to wait for each deploy to be RUNNING (default 600).
    :param defaults_variable: an Airflow Variable (JSON object) with this environment's analysis defaults, e.g. a
        staging Airflow with short windows: any of ``weights``, ``shadow``, ``window_seconds``, ``limits``
        (merged key by key over the ``limits`` argument), ``on_inconclusive``, ``canary_timeout_s``. They replace
        the arguments above, except those the triggering run's conf sets. Missing Variable = no change; an
        unknown key fails the task naming the Variable and the key. Read once per rollout: a rollout keeps the
        values it started with.
    """

    #: keys a ``defaults_variable`` may set (the analysis plan's arguments)
    PLAN_KEYS = ("weights", "shadow", "window_seconds", "limits", "on_inconclusive", "canary_timeout_s")

    template_fields: Sequence[str] = ("model_name", "model_version", "weights", "shadow", "window_seconds", "limits",
                                      "on_inconclusive", "canary_timeout_s", "app_args", "scale", "replicas", "autoscaling",
                                      "runtime_env")
    ui_color = "#fde8d7"

    def __init__(self, *, model_name: str = constants.MODEL_NAME, model_version: str | None = None,
                 weights: Sequence[float] | str = (10, 50, 100), shadow: bool | str = True,
                 window_seconds: float | str = 60.0, limits: Mapping[str, Any] | str | None = None,
                 on_inconclusive: str = "fail", canary_timeout_s: float | str = 2.0, poll_interval: float = 2.0,
                 metrics_url: str | None = None, lake_conn_id: str = "lake_default",
                 defaults_variable: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.defaults_variable = defaults_variable
        self.model_name = model_name
        self.model_version = model_version
        self.weights = weights
        self.shadow = shadow
        self.window_seconds = window_seconds
        self.limits = limits
        self.on_inconclusive = on_inconclusive
        self.canary_timeout_s = canary_timeout_s
        self.poll_interval = poll_interval
        self.metrics_url = metrics_url
        self.lake_conn_id = lake_conn_id

    # -- pieces -----------------------------------------------------------------------------------------------
    def environment_defaults(self, context: Context) -> dict[str, Any]:
        """The ``defaults_variable``'s plan arguments the run's conf does not set (``{}`` without a Variable)."""
        from airflow.sdk import Variable
        from airflow.sdk.exceptions import AirflowFailException

        if not self.defaults_variable:
            return {}
        try:
            values = Variable.get(self.defaults_variable, default=None, deserialize_json=True)
        except ValueError as exc:  # json.JSONDecodeError
            raise AirflowFailException(f"Variable {self.defaults_variable!r} is not a JSON object: {exc}") from exc
        if values is None:
            return {}
        if not isinstance(values, Mapping):
            raise AirflowFailException(f"Variable {self.defaults_variable!r} must be a JSON object of rollout "
                                       f"defaults, got {type(values).__name__}")
        unknown = sorted(set(values) - set(self.PLAN_KEYS))
        if unknown:
            raise AirflowFailException(f"Variable {self.defaults_variable!r}: unknown key(s) {unknown}; allowed: "
                                       f"{list(self.PLAN_KEYS)}")
        dag_run = context.get("dag_run")
        conf = dict(getattr(dag_run, "conf", None) or {})
        chosen = {k: v for k, v in values.items() if k not in conf}
        if chosen:
            self.log.info("rollout defaults from Variable %s: %s (run conf sets %s)", self.defaults_variable,
                          chosen, sorted(set(values) & set(conf)) or "none of them")
        return chosen

    def use_defaults(self, defaults: Mapping[str, Any] | None) -> None:
        """Apply :meth:`environment_defaults` (``limits`` merged key by key)."""
        for key, value in (defaults or {}).items():
            if key == "limits":
                value = {**_mapping(self.limits, "limits"), **_mapping(value, f"{self.defaults_variable}.limits")}
            setattr(self, key, value)

    def plan(self):
        from decisionflow.rollout.plan import RolloutPlan

        return RolloutPlan.from_params(weights=_weights(self.weights), shadow=_bool(self.shadow, "shadow"),
                                       window_seconds=float(self.window_seconds),
                                       limits=_mapping(self.limits, "limits"), on_inconclusive=self.on_inconclusive,
                                       canary_timeout_s=float(self.canary_timeout_s))

    def lake(self) -> tuple[str, dict[str, str] | None]:
        from decisionflow.hooks.lake import LakeHook

        hook = LakeHook(self.lake_conn_id)
        return hook.root, (hook.storage_options or None)

    def record(self, rollout_id: str, **fields: Any) -> int:
        from decisionflow.rollout import history

        root, options = self.lake()
        step = history.next_step(root, rollout_id, options)
        history.record_step(root, history.StepRecord(rollout_id=rollout_id, step=step, model_name=self.model_name,
                                                     **fields), options)
        return step

    @staticmethod
    def rollout_id(context: Context) -> str:
        ti = context.get("ti")
        dag_id = getattr(ti, "dag_id", None) or getattr(context.get("dag"), "dag_id", "adhoc")
        run_id = getattr(ti, "run_id", None) or context.get("run_id") or "manual"
        task_id = getattr(ti, "task_id", None) or "rollout"
        return f"{dag_id}/{run_id}/{task_id}"

    def resolve_version(self, client) -> str:
        from airflow.sdk.exceptions import AirflowFailException

        from decisionflow.models.registry import model_aliases

        version = _version(self.model_version)
        if version is not None:
            try:
                client.get_model_version(self.model_name, version)
            except Exception as exc:  # noqa: BLE001 - MlflowException
                raise AirflowFailException(f"model_version {version!r}: no such version of {self.model_name} in "
                                           f"MLflow ({type(exc).__name__}: {str(exc)[:200]})") from exc
            return version
        champion = model_aliases(client, self.model_name).get(constants.CHAMPION_ALIAS)
        if champion is None:
            raise AirflowFailException(f"model_version is empty and {self.model_name} has no "
                                       f"{constants.CHAMPION_ALIAS!r} alias -- remedy: pass model_version, or promote "
                                       "a model with train_risk_model")
        return str(champion)

    # -- the rollout ------------------------------------------------------------------------------------------
    def execute(self, context: Context) -> dict[str, Any] | None:
        from airflow.sdk.exceptions import AirflowFailException

        from decisionflow.hooks.ray_serve import ServeDeployError
        from decisionflow.rollout import history
        from decisionflow.rollout.serve_config import ServingState

        defaults = self.environment_defaults(context)
        self.use_defaults(defaults)
        plan = self.plan()
        spec = self.app_spec()
        client = self.mlflow_client()
        version = self.resolve_version(client)
        rollout_id = self.rollout_id(context)
        hook = self.serve_hook()
        current = self.current_state(hook, spec)
        self.log.info("rollout %s of %s version %s; serving now: %s", rollout_id, self.model_name, version,
                      current.as_dict() if current else "nothing")

        if current is None:
            summary = self.apply(hook, spec, ServingState(version))
            history.mark_live(client, self.model_name, version, rollout_id=rollout_id,
                              reason="first deploy: nothing was serving")
            self.record(rollout_id, action="first_deploy", to_version=version, status="ok", canary_weight=0.0,
                        shadow=False, reason="nothing was serving: deployed as stable directly",
                        serving_state=summary["state"])
            return {"outcome": "first_deploy", "version": version, "replaced": None, "rollout_id": rollout_id,
                    "steps": [], "deploy_seconds": summary["seconds"]}

        stable = current.stable_version
        if stable == version:
            summary = self.apply(hook, spec, plan.rollback_state(version))
            if history.live_version(client, self.model_name) != version:
                history.mark_live(client, self.model_name, version, rollout_id=rollout_id,
                                  reason="already serving as stable")
            self.record(rollout_id, action="noop", to_version=version, from_version=stable, status="ok",
                        reason=f"version {version} already is stable", serving_state=summary["state"])
            return {"outcome": "noop", "version": version, "replaced": None, "rollout_id": rollout_id, "steps": []}

        first = plan.steps()[0]
        try:
            summary = self.apply(hook, spec, plan.step_state(first, stable, version))
        except ServeDeployError as exc:
            reason = f"canary version {version} did not deploy: {exc}"
            self._rollback(hook, spec, plan, client, rollout_id, stable, version, reason, first.as_dict())
            raise AirflowFailException(f"rolled back to version {stable}: {reason}") from exc
        self.record(rollout_id, action="canary_deployed", to_version=version, from_version=stable, status="ok",
                    canary_weight=first.weight, shadow=first.shadow, serving_state=summary["state"],
                    reason=f"canary loaded and RUNNING in {summary['seconds']}s")
        self._defer_step(first, stable, version, rollout_id, [], defaults)
        return None

    def _defer_step(self, step, stable: str, version: str, rollout_id: str, verdicts: list[dict],
                    defaults: Mapping[str, Any] | None = None) -> None:
        from decisionflow.triggers.canary import CanaryAnalysisTrigger

        plan = self.plan()
        metrics_url = self.metrics_url or f"{self.serve_hook().serve_url}/metrics"
        trigger = CanaryAnalysisTrigger(metrics_url=metrics_url, canary_version=version, stable_version=stable,
                                        window_seconds=plan.window_seconds, limits=plan.limits.as_dict(),
                                        poll_interval=self.poll_interval, step=step.as_dict())
        self.defer(trigger=trigger, method_name="execute_complete",
                   kwargs={"stable": stable, "version": version, "rollout_id": rollout_id, "verdicts": verdicts,
                           "defaults": dict(defaults or {})},
                   timeout=timedelta(seconds=plan.window_seconds * 3 + 600))

    def execute_complete(self, context: Context, event: dict[str, Any], stable: str, version: str, rollout_id: str,
                         verdicts: list[dict] | None = None,
                         defaults: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """Resume after an analysis window: record it, then the next step, promotion or rollback."""
        from airflow.sdk.exceptions import AirflowFailException

        from decisionflow.hooks.ray_serve import ServeDeployError
        from decisionflow.rollout import history
        from decisionflow.rollout.plan import Step

        self.use_defaults(defaults)  # the values the rollout started with, not the Variable's of now
        plan = self.plan()
        spec = self.app_spec()
        hook = self.serve_hook()
        step = Step(**event.get("step", {"index": 0, "weight": 0.0, "shadow": False}))
        status = str(event.get("status"))
        reason = str(event.get("reason") or "")
        verdicts = [*(verdicts or []), {"step": step.as_dict(), "status": status, "reason": reason,
                                        "measurements": event.get("measurements") or {}}]
        self.record(rollout_id, action="analysis", to_version=version, from_version=stable, status=status,
                    canary_weight=step.weight, shadow=step.shadow, reason=reason,
                    measurements=event.get("measurements") or {}, window_seconds=event.get("window_seconds"))
        if not plan.passed(status):
            why = f"step {step.index} (canary weight {step.weight:g}%): {status}: {reason}"
            self._rollback(hook, spec, plan, self.mlflow_client(), rollout_id, stable, version, why, step.as_dict())
            raise AirflowFailException(f"rolled back {self.model_name} version {version} to version {stable}: {why}")

        steps = plan.steps()
        if step.index + 1 < len(steps):
            nxt = steps[step.index + 1]
            try:
                self.apply(hook, spec, plan.step_state(nxt, stable, version))
            except ServeDeployError as exc:
                why = f"step {nxt.index} (weight {nxt.weight:g}%) did not deploy: {exc}"
                self._rollback(hook, spec, plan, self.mlflow_client(), rollout_id, stable, version, why, nxt.as_dict())
                raise AirflowFailException(f"rolled back to version {stable}: {why}") from exc
            self._defer_step(nxt, stable, version, rollout_id, verdicts, defaults)
            return None

        seconds = 0.0
        for state in plan.promote_states(stable, version):
            seconds += self.apply(hook, spec, state)["seconds"]
        reason = f"all {len(steps)} analysis window(s) passed; version {version} replaces {stable}"
        history.mark_live(self.mlflow_client(), self.model_name, version, rollout_id=rollout_id, reason=reason,
                          replaced=stable)
        self.record(rollout_id, action="promoted", to_version=version, from_version=stable, status="ok",
                    canary_weight=0.0, shadow=False, reason=reason,
                    serving_state=plan.promote_states(stable, version)[-1].as_dict(), window_seconds=seconds)
        return {"outcome": "promoted", "version": version, "replaced": stable, "rollout_id": rollout_id,
                "steps": verdicts, "promote_seconds": round(seconds, 2)}

    def _rollback(self, hook, spec, plan, client, rollout_id: str, stable: str, version: str, reason: str,
                  step: dict[str, Any]) -> None:
        """Weight 0 and canary emptied (one config), then tags and the history row; the caller fails the task."""
        from decisionflow.rollout import history

        self.log.error("rolling back %s version %s: %s", self.model_name, version, reason)
        state = plan.rollback_state(stable)
        self.apply(hook, spec, state)
        history.mark_rolled_back(client, self.model_name, version, rollout_id=rollout_id, reason=reason)
        self.record(rollout_id, action="rolled_back", to_version=version, from_version=stable, status="fail",
                    canary_weight=step.get("weight"), shadow=step.get("shadow"), reason=reason,
                    serving_state=state.as_dict())
