"""RolloutOperator / RayServeDeployOperator logic over a fake Serve hook, a fake MLflow client and a real Delta dir;
the CanaryAnalysisTrigger's serialize round trip and its fail-fast run against a scripted metrics source."""

from __future__ import annotations

import asyncio
import copy
import time
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

from decisionflow.operators.serving import RayServeDeployOperator, RolloutOperator
from decisionflow.rollout import history
from decisionflow.rollout.serve_config import state_from_application
from decisionflow.triggers.canary import CanaryAnalysisTrigger


class FakeServe:
    """Serve's REST API in memory: PUT replaces the applications; every deploy is RUNNING at once."""

    serve_url = "http://127.0.0.1:1"

    def __init__(self, apps=None, fail_when=None):
        self.apps = {a["name"]: a for a in (apps or [])}
        self.puts: list[dict] = []
        self.fail_when = fail_when or (lambda app: None)

    def application(self, name):
        app = self.apps.get(name)
        return None if app is None else {"status": "RUNNING", "deployed_app_config": copy.deepcopy(app)}

    def deploy_application(self, app):
        from decisionflow.rollout.serve_config import same_application

        if same_application(app, self.apps.get(app["name"])):
            return False
        self.puts.append(copy.deepcopy(app))
        self.apps[app["name"]] = copy.deepcopy(app)
        return True

    def wait_running(self, app, timeout=0):
        from decisionflow.hooks.ray_serve import ServeDeployError

        why = self.fail_when(app)
        if why:
            raise ServeDeployError(f"Serve application 'decisionflow' is DEPLOY_FAILED: {why}")
        return {"status": "RUNNING"}

    def state(self):
        return state_from_application(self.apps.get("decisionflow"))


class FakeMlflow:
    def __init__(self, aliases=None, versions=("1", "2", "3")):
        self.aliases = dict(aliases or {})
        self.versions = set(versions)
        self.tags: dict[str, dict[str, str]] = {}

    def get_registered_model(self, name):
        return SimpleNamespace(aliases=dict(self.aliases))

    def get_model_version(self, name, version):
        if str(version) not in self.versions:
            raise RuntimeError("RESOURCE_DOES_NOT_EXIST")
        return SimpleNamespace(version=str(version), tags=self.tags.get(str(version), {}))

    def set_model_version_tag(self, name, version, key, value):
        self.tags.setdefault(str(version), {})[key] = value

    def set_registered_model_alias(self, name, alias, version):
        self.aliases[alias] = str(version)


@pytest.fixture
def env(monkeypatch, tmp_path):
    serve, mlflow = FakeServe(), FakeMlflow(aliases={"champion": "2"})
    monkeypatch.setattr(RolloutOperator, "serve_hook", lambda self: serve)
    monkeypatch.setattr(RayServeDeployOperator, "serve_hook", lambda self: serve)
    monkeypatch.setattr(RolloutOperator, "mlflow_client", lambda self: mlflow)
    monkeypatch.setattr(RolloutOperator, "tracking_uri", lambda self: "http://mlflow")
    monkeypatch.setattr(RayServeDeployOperator, "tracking_uri", lambda self: "http://mlflow")
    monkeypatch.setattr(RolloutOperator, "lake", lambda self: (str(tmp_path / "lake"), None))
    return SimpleNamespace(serve=serve, mlflow=mlflow, lake=str(tmp_path / "lake"))


CONTEXT = {"ti": SimpleNamespace(dag_id="rollout_model", run_id="r1", task_id="rollout", map_index=-1)}


def op(**kwargs):
    return RolloutOperator(task_id="rollout", model_name="m", window_seconds=5, poll_interval=0.1, **kwargs)


def drive(operator, verdicts):
    """execute, then each deferral answered with the next scripted verdict status."""
    events = []
    call = lambda: operator.execute(CONTEXT)  # noqa: E731
    statuses = iter(verdicts)
    while True:
        try:
            return call(), events
        except TaskDeferred as deferred:
            trigger = deferred.trigger
            path, kwargs = trigger.serialize()
            assert path == "decisionflow.triggers.canary.CanaryAnalysisTrigger"
            events.append(kwargs)
            status = next(statuses)
            event = {"status": status, "reason": f"scripted {status}", "measurements": {"canary_requests": 99},
                     "window_seconds": 5.0, "step": kwargs["step"]}
            call = lambda d=deferred, e=event: getattr(operator, d.method_name)(CONTEXT, event=e, **d.kwargs)  # noqa: E731


def test_first_deploy_goes_straight_to_stable_and_sets_live(env):
    result, events = drive(op(model_version="1"), [])
    assert result["outcome"] == "first_deploy" and not events
    assert env.serve.state().stable_version == "1" and env.serve.state().canary_version is None
    assert env.mlflow.aliases["live"] == "1"
    rows = history.read_history(env.lake)
    assert list(rows["action"]) == ["first_deploy"] and rows.iloc[0]["rollout_id"] == "rollout_model/r1/rollout"


def test_full_rollout_promotes_through_every_step(env):
    drive(op(model_version="1"), [])
    result, events = drive(op(), ["pass"] * 4)  # empty model_version: the champion alias (2)
    assert result["outcome"] == "promoted" and result["version"] == "2" and result["replaced"] == "1"
    assert [e["step"]["weight"] for e in events] == [0, 10, 50, 100]
    states = [state_from_application(p) for p in env.serve.puts]
    assert [(s.stable_version, s.canary_version, s.canary_weight, s.shadow) for s in states] == [
        ("1", None, 0, False),  # first deploy
        ("1", "2", 0, True), ("1", "2", 10, True), ("1", "2", 50, True), ("1", "2", 100, False),
        ("2", "2", 100, False),  # stable reloads while the canary serves everything
        ("2", None, 0, False),
    ]
    assert env.mlflow.aliases["live"] == "2"
    assert env.mlflow.tags["2"][history.STATUS_TAG] == "live"
    assert env.mlflow.tags["1"][history.STATUS_TAG] == "replaced"
    rows = history.read_history(env.lake)
    assert list(rows["action"]) == ["first_deploy", "canary_deployed"] + ["analysis"] * 4 + ["promoted"]
    assert list(rows["step"]) == list(range(7))  # one rollout id (same context): its steps continue


def test_failed_window_rolls_back_records_and_fails_naming_the_reason(env):
    drive(op(model_version="1"), [])
    with pytest.raises(AirflowFailException, match="rolled back m version 3 to version 1: step 1 .*scripted fail"):
        drive(op(model_version="3"), ["pass", "fail"])
    state = env.serve.state()
    assert (state.stable_version, state.canary_version, state.canary_weight, state.shadow) == ("1", None, 0, False)
    assert env.mlflow.aliases["live"] == "1"
    assert env.mlflow.tags["3"][history.STATUS_TAG] == "rolled_back"
    assert "scripted fail" in env.mlflow.tags["3"][history.REASON_TAG]
    rows = history.read_history(env.lake)
    assert list(rows["action"])[-2:] == ["analysis", "rolled_back"]
    assert "scripted fail" in rows.iloc[-1]["reason"]


def test_inconclusive_rolls_back_unless_told_otherwise(env):
    drive(op(model_version="1"), [])
    with pytest.raises(AirflowFailException, match="inconclusive"):
        drive(op(model_version="2"), ["inconclusive"])
    result, _ = drive(op(model_version="2", on_inconclusive="pass", shadow=False, weights=[100]), ["inconclusive"])
    assert result["outcome"] == "promoted"


def test_a_canary_that_does_not_deploy_is_rolled_back(env):
    drive(op(model_version="1"), [])
    env.serve.fail_when = lambda app: ("replica of canary raised: no such model" if
                                       state_from_application(app).canary_version == "3" else None)
    with pytest.raises(AirflowFailException, match="did not deploy.*no such model"):
        drive(op(model_version="3"), [])
    assert env.serve.state().canary_version is None
    assert history.read_history(env.lake).iloc[-1]["action"] == "rolled_back"


def test_same_version_is_a_noop_and_unknown_version_is_named(env):
    drive(op(model_version="1"), [])
    puts = len(env.serve.puts)
    result, events = drive(op(model_version="1"), [])
    assert result["outcome"] == "noop" and not events and len(env.serve.puts) == puts
    with pytest.raises(AirflowFailException, match="model_version '9'"):
        drive(op(model_version="9"), [])


def test_deploy_operator_is_idempotent_and_names_deploy_failed(env):
    deploy = RayServeDeployOperator(task_id="deploy", stable_version="4", replicas={"stable": 2})
    first = deploy.execute({})
    assert first["changed"] is True and deploy.execute({})["changed"] is False
    stable = next(d for d in env.serve.puts[-1]["deployments"] if d["name"] == "stable")
    assert stable["num_replicas"] == 2
    env.serve.fail_when = lambda app: "ImportError: no module named nope"
    with pytest.raises(AirflowFailException, match="DEPLOY_FAILED: ImportError"):
        RayServeDeployOperator(task_id="deploy", stable_version="5").execute({})


def test_scale_from_replicas_and_autoscaling_params():
    operator = RolloutOperator(task_id="r", replicas={"Gateway": 1, "stable": 2, "canary": 1},
                               autoscaling={"stable": {"min_replicas": 1, "max_replicas": 4}, "canary": {}})
    scale = operator.scale_spec()
    assert scale["stable"] == {"num_replicas": 2, "autoscaling": {"min_replicas": 1, "max_replicas": 4}}
    assert scale["canary"] == {"num_replicas": 1}


# -- trigger ---------------------------------------------------------------------------------------------------------
def test_trigger_serialize_round_trip():
    trigger = CanaryAnalysisTrigger(metrics_url="http://127.0.0.1:8000/metrics", canary_version="4",
                                    stable_version="3", window_seconds=30, limits={"min_requests": 10},
                                    poll_interval=1.5, step={"index": 1, "weight": 10.0, "shadow": True})
    path, kwargs = trigger.serialize()
    again = CanaryAnalysisTrigger(**kwargs)
    assert again.serialize() == (path, kwargs)
    assert path == "decisionflow.triggers.canary.CanaryAnalysisTrigger"


def _text(ok, errors):
    return (f'decisionflow_model_requests_total{{role="canary",model_version="4",outcome="ok"}} {ok}\n'
            f'decisionflow_model_requests_total{{role="canary",model_version="4",outcome="error"}} {errors}\n')


def _run(trigger):
    async def first():
        async for event in trigger.run():
            return event.payload

    return asyncio.run(first())


def test_trigger_fails_fast_and_passes_at_the_end(monkeypatch):
    import decisionflow.triggers.canary as module

    scrapes = iter([_text(0, 0), _text(5, 0), _text(8, 3)])
    monkeypatch.setattr(module, "scrape", lambda url, timeout=10.0: next(scrapes))
    trigger = CanaryAnalysisTrigger(metrics_url="http://x/metrics", canary_version="4", stable_version="3",
                                    window_seconds=60, limits={"min_requests": 20}, poll_interval=0.01,
                                    step={"index": 0}, min_fire_seconds=0.5)
    started = time.monotonic()
    event = _run(trigger)
    assert event["status"] == "fail" and "already exceed" in event["reason"] and event["window_seconds"] < 0.5
    # decided at once, delivered no sooner than min_fire_seconds (apache/airflow#72716: a trigger firing before
    # the scheduler saw the deferral gets the resumed task killed)
    assert time.monotonic() - started >= 0.5
    assert event["step"] == {"index": 0}

    scrapes = iter([_text(0, 0)] + [_text(100, 0)] * 50)
    monkeypatch.setattr(module, "scrape", lambda url, timeout=10.0: next(scrapes))
    trigger = CanaryAnalysisTrigger(metrics_url="http://x/metrics", canary_version="4", stable_version="3",
                                    window_seconds=0.05, limits={"min_requests": 20}, poll_interval=0.01,
                                    min_fire_seconds=0)
    assert _run(trigger)["status"] == "pass"


def test_trigger_gives_up_with_error_when_metrics_stay_unreadable(monkeypatch):
    import decisionflow.triggers.canary as module

    def down(url, timeout=10.0):
        raise OSError("connection refused")

    monkeypatch.setattr(module, "scrape", down)
    trigger = CanaryAnalysisTrigger(metrics_url="http://x/metrics", canary_version="4", stable_version="3",
                                    window_seconds=5, poll_interval=0.01, max_scrape_failures=3, min_fire_seconds=0)
    event = _run(trigger)
    assert event["status"] == "error" and "connection refused" in event["reason"]


def test_environment_defaults_from_a_variable_the_run_conf_wins_and_a_rollout_keeps_its_values(env, monkeypatch):
    from airflow.sdk import Variable

    variables = {"decisionflow_rollout": {"window_seconds": 7, "weights": [25, 100], "limits": {"min_requests": 3}}}
    monkeypatch.setattr(Variable, "get", classmethod(lambda cls, key, default=None, deserialize_json=False:
                                                     variables.get(key, default)))
    context = {**CONTEXT, "dag_run": SimpleNamespace(conf={"weights": [50, 100]})}
    drive(op(model_version="1", defaults_variable="decisionflow_rollout"), [])
    # the DAG renders params (conf included) into the arguments: weights [50, 100] came from the conf
    operator = op(model_version="2", defaults_variable="decisionflow_rollout", limits={"max_error_rate": 0.2},
                  weights=[50, 100])
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context)
    kwargs = deferred.value.trigger.serialize()[1]
    assert kwargs["window_seconds"] == 7  # from the Variable
    assert kwargs["limits"]["min_requests"] == 3 and kwargs["limits"]["max_error_rate"] == 0.2  # merged
    # the run's conf set weights: [50, 100] (shadow first), not the Variable's
    variables["decisionflow_rollout"] = {"window_seconds": 99}  # changed mid-rollout: not picked up
    resumed = op(model_version="2", defaults_variable="decisionflow_rollout", weights=[50, 100])
    event = {"status": "pass", "reason": "ok", "measurements": {}, "window_seconds": 7.0,
             "step": kwargs["step"]}
    with pytest.raises(TaskDeferred) as nxt:
        resumed.execute_complete(context, event=event, **deferred.value.kwargs)
    step = nxt.value.trigger.serialize()[1]
    assert step["step"]["weight"] == 50 and step["window_seconds"] == 7

    variables["decisionflow_rollout"] = {"window_secs": 5}
    with pytest.raises(AirflowFailException, match="decisionflow_rollout.*window_secs"):
        op(model_version="3", defaults_variable="decisionflow_rollout").execute(context)
