"""
### train_risk_model — Feast training set → MLflow run → registry → promotion gate

Weekly (Monday 03:00 UTC) and on demand ("Trigger DAG w/ config" for the params below).

1. `build_training_set` — labelled transactions of `silver/transactions` + `silver/labels` at their event time,
   features from the `risk_v1` feature service by Feast's point-in-time join; written to a run-scoped parquet
   file with the Delta table versions used.
2. `train` — time-based train / validation / holdout split; LightGBM (calibrated on validation) and a
   logistic-regression baseline on the same split; PR-AUC, recall at the review budget, expected cost,
   calibration; everything logged to MLflow (params, metrics, signature, input example, plots, holdout set,
   feature service, Delta versions). Clearing and rerunning reuses the finished MLflow run.
3. `register_challenger` — registers the run's model (once per run) and points the `challenger` alias at it.
4. `promotion_gate` — scores challenger and `champion` on the challenger's holdout; moves `champion` only if
   the challenger is better by the margin and its scores are sane. Otherwise the task succeeds with
   "not promoted: <reason>" and the registry is unchanged. The first model becomes champion.
5. `announce_champion` — only after a promotion: the `model_risk_champion` asset event for the rollout DAG.

`shuffle_labels` trains a deliberately degraded model (a drill for the gate: it must never be promoted).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param, task
from airflow.timetables.trigger import CronTriggerTimetable

from decisionflow import constants
from decisionflow.assets import MODEL_CHAMPION
from decisionflow.notifications.failure import failure_alerts
from decisionflow.operators.feast import BuildTrainingSetOperator
from decisionflow.operators.mlflow import PromotionGateOperator, RegisterModelOperator, TrainRiskModelOperator

MODEL_NAME = constants.MODEL_NAME
EXPERIMENT = "decisionflow-risk-training"

with DAG(
    dag_id="train_risk_model",
    description="point-in-time training set -> LightGBM vs baseline in MLflow -> challenger -> promotion gate",
    schedule=CronTriggerTimetable("0 3 * * 1", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,  # dict and bool params reach the operators as such
    doc_md=__doc__,
    tags=["decisionflow", "models", "mlflow", "feast"],
    params={
        "label_maturity_days": Param(30, type="number", minimum=0,
                                     description="an unlabelled transaction this old counts as legit"),
        "training_config": Param({}, type="object",
                                 description="decisionflow.models.TrainingConfig overrides, e.g. "
                                             '{"review_budget": 0.02, "costs": {"missed_fraud": 500}}'),
        "metric": Param("pr_auc", enum=["pr_auc", "expected_cost", "recall_at_review_budget", "roc_auc"],
                        description="what the promotion gate compares"),
        "margin": Param(0.01, type="number", minimum=0, description="how much better the challenger must be"),
        "shuffle_labels": Param(False, type="boolean", description="drill: train on shuffled labels"),
    },
    default_args=failure_alerts({"retries": 2, "retry_delay": timedelta(minutes=1), "owner": "ml-platform"}),
) as dag:
    training_set = BuildTrainingSetOperator(
        task_id="build_training_set",
        feature_service=constants.FEATURE_SERVICE,
        label_maturity_days="{{ params.label_maturity_days }}",
        execution_timeout=timedelta(hours=1),
    )
    train = TrainRiskModelOperator(
        task_id="train",
        training_set_path="{{ ti.xcom_pull(task_ids='build_training_set')['path'] }}",
        feature_columns="{{ ti.xcom_pull(task_ids='build_training_set')['feature_columns'] }}",
        lineage="{{ ti.xcom_pull(task_ids='build_training_set')['lineage'] }}",
        training_config="{{ params.training_config }}",
        shuffle_labels="{{ params.shuffle_labels }}",
        experiment_name=EXPERIMENT,
        feature_service_name=constants.FEATURE_SERVICE,
        execution_timeout=timedelta(hours=2),
    )
    register = RegisterModelOperator(
        task_id="register_challenger",
        run_id="{{ ti.xcom_pull(task_ids='train')['run_id'] }}",
        model_name=MODEL_NAME,
    )
    gate = PromotionGateOperator(
        task_id="promotion_gate", model_name=MODEL_NAME, metric="{{ params.metric }}", margin="{{ params.margin }}"
    )

    @task.short_circuit
    def promoted(decision: dict) -> bool:
        """Go on to the announcement only when the gate moved the champion alias."""
        return bool(decision.get("promoted"))

    @task(outlets=[MODEL_CHAMPION])
    def announce_champion(decision: dict, *, outlet_events=None) -> dict:
        """The asset event the rollout DAG listens to, with the new champion in its extra."""
        outlet_events[MODEL_CHAMPION].extra = {k: v for k, v in decision.items() if isinstance(v, str | int | float)}
        return decision

    training_set >> train >> register >> gate
    announce_champion(gate.output) << promoted(gate.output)
