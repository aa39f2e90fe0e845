"""
### rollout_model — a new champion onto Ray Serve: canary, shadow, weighted steps, automatic rollback

Runs when `train_risk_model` promotes a champion (asset `model_risk_champion`) and on demand ("Trigger DAG w/
config"): set `model_version` to roll out any registered version — on-call rolls back to an earlier version this
way (it goes through the same canary analysis).

`rollout` (`RolloutOperator`, deferrable):

1. Nothing serving yet: the version is deployed as `stable` directly and gets the MLflow alias `live`.
2. Otherwise it is deployed as `canary` next to `stable` (stable untouched until the canary is RUNNING), at
   weight 0 with shadow mirroring (stable's requests copied to the canary, scores compared), then at each of
   `weights`. After each step the task defers for `window_seconds` to the canary analysis trigger, which reads
   the gateway's `/metrics`: canary error rate, p99 latency (absolute and vs stable) and the shadow score shift
   against `limits`, failing fast.
3. Every window passed: promoted — stable loads the version while the canary answers 100 %, then the canary is
   emptied; alias `live` moves. A failed window: rolled back at once (weight 0, canary emptied), the reason in
   `serving/rollouts` and on the MLflow version's tags, and the task fails naming it.

A failed canary call is answered by stable (and counted against the canary): clients never see its faults.
An environment's own analysis defaults (e.g. a staging Airflow with short windows) go in the Airflow Variable
`decisionflow_rollout` (JSON: any of `weights`, `shadow`, `window_seconds`, `limits`, `on_inconclusive`); they
apply to asset-triggered runs and to every param a manual run's conf leaves out.

Weights live in the gateway deployment's `user_config`: a step restarts no replica. Replicas / autoscaling come
from the params below (`ray_default` can point at a real Ray cluster).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param

from decisionflow import constants
from decisionflow.assets import MODEL_CHAMPION
from decisionflow.notifications.failure import failure_alerts
from decisionflow.operators.serving import RolloutOperator

with DAG(
    dag_id="rollout_model",
    description="champion -> Ray Serve canary (shadow, 10/50/100 %) with analysis -> promote or roll back",
    schedule=[MODEL_CHAMPION],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    doc_md=__doc__,
    tags=["decisionflow", "serving", "ray", "mlflow"],
    params={
        "model_version": Param(None, type=["null", "string"],
                               description="version to roll out; empty = the champion alias (any earlier version "
                                           "rolls back to it)"),
        "weights": Param([10, 50, 100], type="array", items={"type": "number"},
                         description="canary weights (percent) of the steps, increasing, ending at 100"),
        "shadow": Param(True, type="boolean", description="shadow window first, and mirroring during the steps"),
        "window_seconds": Param(60, type="number", minimum=1, description="length of each analysis window"),
        "limits": Param({"max_error_rate": 0.01, "max_p99_seconds": 0.5, "max_p99_ratio": 3.0,
                         "max_mean_score_shift": 0.1, "min_requests": 50}, type="object",
                        description="canary analysis limits (decisionflow.rollout.analysis.Limits)"),
        "on_inconclusive": Param("fail", enum=["fail", "pass"],
                                 description="a window with too little traffic: roll back (fail) or go on (pass)"),
        "replicas": Param({"Gateway": 1, "stable": 1, "canary": 1}, type="object",
                          description="num_replicas per deployment (ignored for one with autoscaling)"),
        "autoscaling": Param({}, type="object",
                             description='per deployment a Ray Serve autoscaling_config, e.g. {"stable": '
                                         '{"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}}'),
        "gateway_settings": Param({}, type="object",
                                  description="decisionflow_serving GatewaySettings fields (paths / URIs, no "
                                              "secrets), e.g. kafka_bootstrap, milvus_uri; mlflow_uri defaults "
                                              "to mlflow_default"),
    },
    default_args=failure_alerts({"retries": 2, "retry_delay": timedelta(minutes=1), "owner": "ml-platform"}),
) as dag:
    RolloutOperator(
        task_id="rollout",
        model_name=constants.MODEL_NAME,
        model_version="{{ params.model_version }}",
        weights="{{ params.weights }}",
        shadow="{{ params.shadow }}",
        window_seconds="{{ params.window_seconds }}",
        limits="{{ params.limits }}",
        on_inconclusive="{{ params.on_inconclusive }}",
        replicas="{{ params.replicas }}",
        autoscaling="{{ params.autoscaling }}",
        app_args="{{ params.gateway_settings }}",
        defaults_variable="decisionflow_rollout",
        execution_timeout=timedelta(hours=2),
    )
