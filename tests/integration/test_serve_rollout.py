"""Rollouts on a real Ray Serve: a private token-authenticated Ray head on free ports, a real MLflow server, Delta.

The ``decisionflow`` Serve application (``decisionflow_serving.deployments:build_app``) is deployed through the
dashboard's REST API by the provider's own operators, driven here the way Airflow drives them: ``execute``, the
deferral's trigger (rebuilt from ``serialize()``) run to its first event, ``execute_complete`` - and so on.
The gateway app is a minimal one over the real :class:`RoutedBackend` (``tests/integration/_serve_app.py``: rows
as sent, no Feast), the models are MLflow pyfunc models loaded inside the replicas.

Under steady load from concurrent clients for the whole time:

1. nothing serving -> the first rollout deploys version 1 as stable directly (alias ``live``);
2. version 2 goes shadow -> 10 -> 50 -> 100 % -> promoted: 0 failed requests, every response names its version,
   each step's canary share within 5 points of its weight, ``live`` = 2, history in ``serving/rollouts``;
3. version 3 raises on ~30 % of inputs: rolled back within its first analysis window, 0 failed requests
   (its faults were answered by stable), the reason in ``serving/rollouts`` and on the MLflow version.
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import json
import random
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

try:
    from .fixtures_ml import free_port, mlflow_server, ray_head  # noqa: F401 - pytest fixtures
except ImportError:  # collected as a plain directory (rootdir-relative import mode)
    from fixtures_ml import free_port, mlflow_server, ray_head  # noqa: F401

pytestmark = pytest.mark.integration

MODEL = "rollout-test"
CHECKOUT = Path(__file__).resolve().parents[2]
# The helpers as this module's package sees them (``tests.integration`` or ``integration``, by import mode): the
# pickled pyfunc models reference that module name, so the replicas get the same roots on their PYTHONPATH.
HELPERS = importlib.import_module(f"{__package__}._serve_app" if __package__ else "_serve_app")
REPLICA_PYTHONPATH = ":".join(str(p) for p in (CHECKOUT, CHECKOUT / "tests", CHECKOUT / "tests" / "integration"))
WINDOW = 6.0
LIMITS = {"max_error_rate": 0.05, "max_p99_seconds": 3.0, "max_p99_ratio": 10.0, "max_mean_score_shift": 0.05,
          "min_requests": 20}
TIMINGS: dict[str, float] = {}


# -- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def versions(mlflow_server):  # noqa: F811
    """v1, v2 (a slightly shifted score) and v3 (raises on ~30 % of inputs), registered in MLflow."""
    import mlflow

    FaultyModel, ScoreModel = HELPERS.FaultyModel, HELPERS.ScoreModel
    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_experiment("serve-rollout")
    started = time.monotonic()
    for model in (ScoreModel(0.0), ScoreModel(0.01), FaultyModel(0.3)):
        with mlflow.start_run():
            mlflow.pyfunc.log_model(name="model", python_model=model, registered_model_name=MODEL,
                                    pip_requirements=[])
    TIMINGS["register 3 versions"] = time.monotonic() - started
    return ["1", "2", "3"]


@pytest.fixture(scope="module")
def serve(ray_head, mlflow_server, versions, tmp_path_factory):  # noqa: F811
    """Connections (env) for the operators, the Serve HTTP port, and the application spec args."""
    mp = pytest.MonkeyPatch()
    port = free_port()
    lake = tmp_path_factory.mktemp("lake")
    mp.setenv("AIRFLOW_CONN_RAY_DEFAULT", json.dumps({
        "conn_type": "ray", "host": "127.0.0.1", "port": ray_head.gcs_port,
        "extra": {**json.loads(ray_head.extra()), "serve_url": f"http://127.0.0.1:{port}"}}))
    mp.setenv("AIRFLOW_CONN_MLFLOW_DEFAULT", json.dumps({"conn_type": "mlflow", "extra": {
        "tracking_uri": mlflow_server.url}}))
    mp.setenv("AIRFLOW_CONN_LAKE_DEFAULT", json.dumps({"conn_type": "delta_lake", "extra": {"root": str(lake)}}))
    yield SimpleNamespace(port=port, lake=str(lake), url=f"http://127.0.0.1:{port}", mlflow=mlflow_server.url)
    mp.undo()


def operator_kwargs(**overrides):
    kwargs = dict(
        model_name=MODEL,
        app_args={"model_loader": f"{HELPERS.__name__}:load_pyfunc_version",
                  "app_factory": f"{HELPERS.__name__}:scoring_app"},
        # Serve takes no local working_dir: the replicas import the test helpers through PYTHONPATH.
        runtime_env={"env_vars": {"PYTHONPATH": REPLICA_PYTHONPATH}},
        window_seconds=WINDOW, limits=LIMITS, poll_interval=1.0, canary_timeout_s=5.0, deploy_timeout=420,
    )
    kwargs.update(overrides)
    return kwargs


class Load:
    """Concurrent clients scoring one transaction per request until stopped; each answer tagged with the phase."""

    def __init__(self, url: str, clients: int = 4):
        self.url, self.clients = url, clients
        self.phase = "warmup"
        self.answers: list[tuple[str, str]] = []  # (phase, version)
        self.failures: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        self._lock = threading.Lock()

    def _run(self):
        while not self._stop.is_set():
            phase = self.phase
            amount = round(random.uniform(1, 500), 2)
            body = json.dumps({"transactions": [{"event_id": str(uuid.uuid4()), "amount": amount}]}).encode()
            request = urllib.request.Request(f"{self.url}/v1/score", data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
                    answer = json.loads(response.read())
                version = answer["model"]["version"]
                assert answer["scores"] and version
                with self._lock:
                    self.answers.append((phase, version))
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                with self._lock:
                    self.failures.append((phase, f"{type(exc).__name__}: {exc}"[:300]))

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)

    def share(self, phase: str) -> tuple[collections.Counter, int]:
        counts = collections.Counter(v for p, v in self.answers if p == phase)
        return counts, sum(counts.values())


def drive(op, load: Load | None = None, context=None, label: str = ""):
    """Run ``op`` like Airflow: execute, then each deferral's trigger (rebuilt from serialize()) and its callback.

    Returns (result, [(step, event), ...]); an AirflowFailException propagates.
    """
    from airflow.sdk.exceptions import TaskDeferred

    context = context or {"ti": SimpleNamespace(dag_id="rollout_model", run_id=f"test-{uuid.uuid4().hex[:8]}",
                                                task_id="rollout", map_index=-1)}
    events = []
    call = lambda: op.execute(context)  # noqa: E731
    while True:
        try:
            return call(), events
        except TaskDeferred as deferred:
            path, kwargs = deferred.trigger.serialize()
            module, _, name = path.rpartition(".")
            trigger = getattr(importlib.import_module(module), name)(**kwargs)
            step = kwargs["step"]
            if load is not None:
                load.phase = f"{label}step{step['index']}"

            async def first_event():
                async for event in trigger.run():
                    return event.payload

            payload = asyncio.run(first_event())
            if load is not None:
                load.phase = "transition"
                counts, total = load.share(f"{label}step{step['index']}")
                print(f"\n{label}step {step}: {payload.get('status')} ({payload.get('reason')}); answers {dict(counts)}, "
                      f"failures so far {len(load.failures)} {load.failures[:2]}; measurements "
                      f"{payload.get('measurements')}")
            events.append((step, payload))
            method = getattr(op, deferred.method_name)
            call = lambda method=method, payload=payload, kw=deferred.kwargs: method(context, event=payload, **kw)  # noqa: E731


def client(serve):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=serve.mlflow)


# -- the test ------------------------------------------------------------------------------------------------------
def test_rollouts_under_load(serve):
    from airflow.sdk.exceptions import AirflowFailException

    from decisionflow.hooks.ray_serve import RayServeHook
    from decisionflow.operators.serving import RolloutOperator
    from decisionflow.rollout import history

    # 1. nothing serving: deployed as stable directly
    started = time.monotonic()
    first, _ = drive(RolloutOperator(task_id="rollout", model_version="1", **operator_kwargs()))
    TIMINGS["first deploy (Serve start + 3 replicas)"] = time.monotonic() - started
    assert first["outcome"] == "first_deploy"
    assert history.live_version(client(serve), MODEL) == "1"

    with Load(serve.url) as load:
        time.sleep(3)
        # 2. a good version through shadow, 10, 50, 100 % and promotion
        started = time.monotonic()
        result, events = drive(RolloutOperator(task_id="rollout", model_version="2", **operator_kwargs()), load)
        TIMINGS["rollout v2 (shadow + 3 steps + promote)"] = time.monotonic() - started
        load.phase = "after promotion"
        time.sleep(3)
        assert result["outcome"] == "promoted", result
        assert [e["status"] for _, e in events] == ["pass"] * 4, events
        # 3. the faulty challenger, live at 20 % then 100 %: rolled back in its first window
        load.phase = "faulty"
        started = time.monotonic()
        with pytest.raises(AirflowFailException) as failed:
            drive(RolloutOperator(task_id="rollout", model_version="3", **operator_kwargs(shadow=False,
                                                                                        weights=[20, 100])), load,
                  label="faulty ")
        TIMINGS["faulty v3 deploy -> rollback"] = time.monotonic() - started
        load.phase = "after rollback"
        time.sleep(3)

    print("\nrollout timings (s):", {k: round(v, 1) for k, v in TIMINGS.items()})
    print("answers per phase:", {p: dict(load.share(p)[0]) for p in sorted({p for p, _ in load.answers})})
    assert not load.failures, f"{len(load.failures)} failed request(s): {load.failures[:5]}"

    # every response named the version that scored it, and each step's share matched its weight
    for step, event in events:
        counts, total = load.share(f"step{step['index']}")
        assert total >= 20, f"step {step}: only {total} answers"
        canary_share = 100 * counts.get("2", 0) / total
        assert abs(canary_share - step["weight"]) <= 5, f"step {step}: canary share {canary_share:.1f}% ({counts})"
        assert set(counts) <= {"1", "2"}
        assert event["measurements"]["canary_errors"] == 0
    shadow_step = events[0][1]["measurements"]
    assert shadow_step["shadow_rows"] >= LIMITS["min_requests"] and shadow_step["mean_score_shift"] < 0.01
    assert dict(load.share("after promotion")[0]) .keys() == {"2"}
    assert history.live_version(client(serve), MODEL) == "2"

    # the faulty version: rolled back within one window, the reason recorded, clients saw nothing
    reason = str(failed.value)
    assert "rolled back" in reason and "error" in reason, reason
    assert set(load.share("after rollback")[0]) == {"2"}
    rollouts = history.read_history(serve.lake)
    faulty = rollouts[rollouts["to_version"] == "3"]
    assert list(faulty["action"]) == ["canary_deployed", "analysis", "rolled_back"], faulty
    analysis = faulty[faulty["action"] == "analysis"].iloc[0]
    assert analysis["status"] == "fail" and analysis["window_seconds"] <= WINDOW + 2
    assert "error" in faulty.iloc[-1]["reason"]
    tags = client(serve).get_model_version(MODEL, "3").tags
    assert tags[history.STATUS_TAG] == "rolled_back" and "error" in tags[history.REASON_TAG]
    assert client(serve).get_model_version(MODEL, "2").tags[history.STATUS_TAG] == "live"
    promoted = rollouts[(rollouts["to_version"] == "2")]
    assert list(promoted["action"]) == ["canary_deployed"] + ["analysis"] * 4 + ["promoted"]

    # what serves now: stable 2, canary empty, weight 0
    hook = RayServeHook()
    app = hook.application("decisionflow")
    by_name = {d["name"]: d["user_config"] for d in app["deployed_app_config"]["deployments"]}
    assert by_name["stable"] == {"model_version": "2"} and by_name["canary"] == {"model_version": None}
    assert by_name["Gateway"]["canary_weight"] == 0


def test_same_version_again_is_a_noop_and_deploy_is_idempotent(serve):
    from decisionflow.operators.serving import RayServeDeployOperator, RolloutOperator

    result, events = drive(RolloutOperator(task_id="rollout", model_version="2", **operator_kwargs()))
    assert result["outcome"] == "noop" and not events
    kwargs = {k: v for k, v in operator_kwargs().items()
              if k in ("app_args", "runtime_env", "deploy_timeout")}
    deploy = RayServeDeployOperator(task_id="deploy", stable_version="2", app_args=dict(kwargs["app_args"],
                                    model_name=MODEL), runtime_env=kwargs["runtime_env"])
    deploy.execute({})  # the rollouts ran with canary_timeout_s 5: this config differs in that one field
    started = time.monotonic()
    assert deploy.execute({})["changed"] is False
    TIMINGS["idempotent deploy (no-op)"] = time.monotonic() - started
    print("\nno-op deploy took", round(TIMINGS["idempotent deploy (no-op)"], 2), "s")
