"""Serve config builder, rollout plan and the routing backend (fake handles), without Ray."""

from __future__ import annotations

import asyncio
import copy
import random

import pytest

from decisionflow.rollout.plan import RolloutPlan, RolloutPlanError
from decisionflow.rollout.serve_config import (
    AppSpec,
    ServeConfigError,
    ServingState,
    application_config,
    merge_applications,
    same_application,
    serve_config,
    state_from_application,
)

ARGS = {"mlflow_uri": "http://127.0.0.1:5000", "model_name": "m"}


def test_same_inputs_same_config_and_round_trip():
    spec = AppSpec(args=ARGS, scale={"stable": {"num_replicas": 2}, "canary": {"autoscaling": {"max_replicas": 3,
                                                                                               "min_replicas": 1}}})
    state = ServingState("3", "4", 10, shadow=True)
    a, b = application_config(spec, state), application_config(spec, state)
    assert a == b
    by_name = {d["name"]: d for d in a["deployments"]}
    assert by_name["stable"]["num_replicas"] == 2 and "num_replicas" not in by_name["canary"]
    assert by_name["canary"]["autoscaling_config"] == {"max_replicas": 3, "min_replicas": 1}
    assert all(d["ray_actor_options"] == {"num_cpus": 0.25} for d in a["deployments"])
    assert by_name["Gateway"]["user_config"]["canary_weight"] == 10.0
    assert by_name["canary"]["user_config"] == {"model_version": "4"}
    assert state_from_application(a) == state


def test_empty_canary_and_validation():
    app = application_config(AppSpec(args=ARGS), ServingState("3"))
    assert {d["name"]: d["user_config"] for d in app["deployments"]}["canary"] == {"model_version": None}
    with pytest.raises(ServeConfigError, match="needs a canary_version"):
        ServingState("3", None, 10)
    with pytest.raises(ServeConfigError, match="stable_version is required"):
        ServingState(None)
    with pytest.raises(ServeConfigError, match="mlflow_uri"):
        AppSpec(args={})
    with pytest.raises(ServeConfigError, match="not the secret"):
        AppSpec(args={**ARGS, "kafka_password": "x"})
    with pytest.raises(ServeConfigError, match="unknown deployment"):
        AppSpec(args=ARGS, scale={"router": {}})


def test_merge_keeps_other_applications_and_http_options_stay_on_loopback():
    other = {"name": "other", "import_path": "x:y", "route_prefix": "/other"}
    ours = application_config(AppSpec(args=ARGS), ServingState("1"))
    old_ours = application_config(AppSpec(args=ARGS), ServingState("0"))
    merged = merge_applications([other, old_ours], ours)
    assert [a["name"] for a in merged] == ["other", "decisionflow"] and merged[1] == ours
    body = serve_config(merged, port=8123)
    assert body["http_options"] == {"host": "127.0.0.1", "port": 8123}


def test_same_application_ignores_serve_defaults_but_not_user_configs():
    wanted = application_config(AppSpec(args=ARGS), ServingState("1", "2", 10))
    deployed = copy.deepcopy(wanted)
    deployed["runtime_env"] = {}
    for dep in deployed["deployments"]:
        dep["max_ongoing_requests"] = 64  # Serve echoes fields we did not set
        dep["ray_actor_options"]["num_gpus"] = 0
    deployed["args"] = dict(deployed["args"])
    assert same_application(wanted, deployed)
    moved = copy.deepcopy(deployed)
    next(d for d in moved["deployments"] if d["name"] == "Gateway")["user_config"]["canary_weight"] = 50
    assert not same_application(wanted, moved)
    emptied = copy.deepcopy(deployed)
    next(d for d in emptied["deployments"] if d["name"] == "canary")["user_config"] = {"model_version": None}
    assert not same_application(wanted, emptied)
    assert not same_application(wanted, None)


def test_plan_states():
    plan = RolloutPlan(weights=(10, 50, 100), shadow=True, window_seconds=5)
    steps = plan.steps()
    assert [(s.index, s.weight, s.shadow) for s in steps] == [(0, 0, True), (1, 10, True), (2, 50, True),
                                                              (3, 100, False)]
    assert plan.step_state(steps[1], "1", "2") == ServingState("1", "2", 10, shadow=True)
    first, last = plan.promote_states("1", "2")
    assert (first.stable_version, first.canary_version, first.canary_weight) == ("2", "2", 100)
    assert (last.stable_version, last.canary_version, last.canary_weight) == ("2", None, 0)
    assert plan.rollback_state("1") == ServingState("1")
    assert plan.passed("pass") and not plan.passed("fail") and not plan.passed("inconclusive")
    assert not plan.passed("error")
    assert RolloutPlan(on_inconclusive="pass").passed("inconclusive")
    assert [s.weight for s in RolloutPlan(weights=(25, 100), shadow=False).steps()] == [25, 100]


@pytest.mark.parametrize("weights", [(50, 10), (0, 100), (10, 150), (10, 10)])
def test_plan_refuses_bad_weights(weights):
    with pytest.raises(RolloutPlanError, match="weights"):
        RolloutPlan(weights=weights)


# -- routing (fake handles) ----------------------------------------------------------------------------------------
class FakeResponse:
    def __init__(self, coro):
        self._coro = coro
        self.cancelled = False

    def __await__(self):
        return self._coro.__await__()

    def cancel(self):
        self.cancelled = True


class FakeHandle:
    """``handle.score.remote(rows)`` / ``handle.info.remote()`` like a DeploymentHandle."""

    def __init__(self, version, fail=lambda rows: False, delay=0.0, offset=0.0):
        self.version, self.fail, self.delay, self.offset = version, fail, delay, offset
        self.calls = 0
        owner = self

        class Method:
            def __init__(self, fn):
                self.fn = fn

            def remote(self, *args):
                return FakeResponse(self.fn(*args))

        async def score(rows):
            owner.calls += 1
            if owner.delay:
                await asyncio.sleep(owner.delay)
            if owner.fail(rows):
                raise RuntimeError(f"version {owner.version} failed")
            from decisionflow_serving.backends import Scored

            return Scored([0.5 + owner.offset] * len(rows), "m", owner.version, 0.5, 0.9, "run", ("amount",))

        async def info():
            return {"model_version": owner.version}

        self.score, self.info = Method(score), Method(info)


def run(coro):
    return asyncio.run(coro)


def test_weighted_routing_is_exact_and_one_version_per_request():
    from decisionflow_serving.routing import RoutedBackend

    stable, canary = FakeHandle("1"), FakeHandle("2")
    backend = RoutedBackend(stable, canary, {"canary_weight": 10, "stable_version": "1", "canary_version": "2"},
                            rng=random.Random(7))

    async def go():
        return [await backend.score([{"amount": 1.0}, {"amount": 2.0}]) for _ in range(1000)]

    answers = run(go())
    versions = [a.model_version for a in answers]
    assert versions.count("2") in (99, 100, 101)
    assert all(len(a.scores) == 2 for a in answers)
    assert backend.ready()


def test_canary_failure_and_timeout_are_answered_by_stable_and_counted():
    from decisionflow_serving.routing import FALLBACKS, MODEL_REQUESTS, RoutedBackend

    def count(role, version, outcome):
        return MODEL_REQUESTS.labels(role=role, model_version=version, outcome=outcome)._value.get()

    errors_before = count("canary", "7", "error")
    fallbacks_before = FALLBACKS.labels(model_version="7")._value.get()
    stable = FakeHandle("6")
    canary = FakeHandle("7", fail=lambda rows: rows[0]["amount"] < 0)
    backend = RoutedBackend(stable, canary, {"canary_weight": 100, "stable_version": "6", "canary_version": "7",
                                             "canary_timeout_s": 0.05})

    async def go():
        bad = await backend.score([{"amount": -1.0}])
        good = await backend.score([{"amount": 1.0}])
        canary.delay = 0.2
        slow = await backend.score([{"amount": 1.0}])
        return bad, good, slow

    bad, good, slow = run(go())
    assert (bad.model_version, good.model_version, slow.model_version) == ("6", "7", "6")
    assert count("canary", "7", "error") - errors_before == 2
    assert FALLBACKS.labels(model_version="7")._value.get() - fallbacks_before == 2


def test_shadow_mirrors_and_records_the_score_diff():
    from decisionflow_serving.routing import SHADOW_DIFF, RoutedBackend

    stable, canary = FakeHandle("11"), FakeHandle("12", offset=0.25)
    backend = RoutedBackend(stable, canary, {"canary_weight": 0, "shadow": True, "shadow_share": 0.5,
                                             "stable_version": "11", "canary_version": "12"})

    async def go():
        answers = [await backend.score([{"amount": 1.0}]) for _ in range(20)]
        await backend.drain_shadow()
        return answers

    answers = run(go())
    assert {a.model_version for a in answers} == {"11"}
    assert canary.calls == 10
    diff = SHADOW_DIFF.labels(stable_version="11", canary_version="12")
    assert diff._sum.get() == pytest.approx(10 * 0.25)


def test_routing_config_is_validated_by_field():
    from decisionflow_serving.routing import RoutingConfig, RoutingConfigError

    with pytest.raises(RoutingConfigError, match="canary_weight"):
        RoutingConfig.from_mapping({"canary_weight": 120, "canary_version": "2"})
    with pytest.raises(RoutingConfigError, match="unknown field"):
        RoutingConfig.from_mapping({"weight": 10})
    with pytest.raises(RoutingConfigError, match="needs canary_version"):
        RoutingConfig.from_mapping({"canary_weight": 10})
    assert RoutingConfig.from_mapping({"canary_weight": 5, "canary_version": 3}).canary_version == "3"


# -- RayServeHook over a scripted REST API ----------------------------------------------------------------------------
class ScriptedServe:
    """GET/PUT of /api/serve/applications/ in memory (Serve echoes the config, adds status and deployments)."""

    def __init__(self, apps):
        self.apps = {a["name"]: a for a in apps}
        self.puts = []
        self.status = "RUNNING"

    def __call__(self, method, path, body=None, timeout=30.0):
        assert path == "/api/serve/applications/"
        if method == "PUT":
            self.puts.append(copy.deepcopy(body))
            self.apps = {a["name"]: copy.deepcopy(a) for a in body["applications"]}
            return None
        apps = {}
        for name, app in self.apps.items():
            deployments = {d["name"]: {"status": "HEALTHY", "status_trigger": "CONFIG_UPDATE_COMPLETED",
                                       "deployment_config": {"user_config": d.get("user_config")},
                                       "replicas": [{"state": "RUNNING"}]} for d in app.get("deployments", [])}
            apps[name] = {"status": self.status, "message": "boom" if self.status == "DEPLOY_FAILED" else "",
                          "deployed_app_config": copy.deepcopy(app), "deployments": deployments}
        return {"applications": apps}


def scripted_hook(monkeypatch, serve):
    from airflow.sdk import Connection

    from decisionflow.hooks.ray_serve import RayServeHook

    conn = Connection(conn_id="ray_default", conn_type="ray", host="127.0.0.1", port=1, password="t",
                      extra='{"dashboard_url": "http://127.0.0.1:2", "serve_url": "http://127.0.0.1:8123"}')
    monkeypatch.setattr(RayServeHook, "get_connection", classmethod(lambda cls, conn_id: conn))
    hook = RayServeHook()
    monkeypatch.setattr(hook, "_request", serve)
    return hook


def test_hook_keeps_other_apps_sends_nothing_when_unchanged_and_names_deploy_failed(monkeypatch):
    from decisionflow.hooks.ray_serve import ServeDeployError

    other = {"name": "other", "import_path": "x:y", "route_prefix": "/other"}
    serve = ScriptedServe([other])
    hook = scripted_hook(monkeypatch, serve)
    app = application_config(AppSpec(args=ARGS), ServingState("1"))
    assert hook.deploy_application(app) is True
    assert [a["name"] for a in serve.puts[-1]["applications"]] == ["other", "decisionflow"]
    assert serve.puts[-1]["http_options"] == {"host": "127.0.0.1", "port": 8123}
    assert hook.wait_running(app, timeout=1)["status"] == "RUNNING"
    assert hook.deploy_application(app) is False and len(serve.puts) == 1
    moved = application_config(AppSpec(args=ARGS), ServingState("1", "2", 10))
    assert hook.deploy_application(moved) is True
    serve.status = "DEPLOY_FAILED"
    with pytest.raises(ServeDeployError, match="DEPLOY_FAILED: boom"):
        hook.wait_running(moved, timeout=1)
    assert hook.auth_headers() == {"Authorization": "Bearer t"}
