"""Training runs, model registry and promotion gate against a real MLflow server (SQLite, proxied artifacts).

Three models on one synthetic frame (3k rows, seeded; ``decisionflow.models.synthetic``):

* ``weak`` - LightGBM on four features that see only one of the fraud patterns (holdout PR-AUC ~0.28);
* ``good`` - LightGBM on every feature (~0.69);
* ``degraded`` - every feature but shuffled training labels (~0.12, near the 4.5% fraud rate), trained through
  ``TrainRiskModelOperator``.

The lifecycle: weak becomes the first champion, degraded is refused (registry untouched), good replaces weak.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from airflow.sdk import Connection

try:
    from .fixtures_ml import mlflow_server  # noqa: F401 - pytest fixture
except ImportError:  # collected as a plain directory (rootdir-relative import mode)
    from fixtures_ml import mlflow_server  # noqa: F401

from decisionflow.hooks.mlflow import MlflowHook
from decisionflow.models import DEFAULT_FEATURE_COLUMNS, TrainingConfig
from decisionflow.models.pipeline import train_and_evaluate
from decisionflow.models.registry import (
    CHALLENGER,
    CHAMPION,
    PROMOTED_AT_TAG,
    PROMOTION_REASON_TAG,
    ModelGateError,
    model_aliases,
    register_challenger,
    run_promotion_gate,
)
from decisionflow.models.tracking import (
    FEATURE_SERVICE_TAG,
    IDEMPOTENCY_TAG,
    find_run,
    log_training_run,
    mlflow_client,
    read_holdout,
    read_thresholds,
    use_mlflow_server,
)
from decisionflow.models.synthetic import make_transactions
from decisionflow.operators.mlflow import PromotionGateOperator, RegisterModelOperator, TrainRiskModelOperator

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

EXPERIMENT = "risk-model-test"
FEATURES = list(DEFAULT_FEATURE_COLUMNS)
WEAK_FEATURES = ["amount_to_avg_7d", "distinct_devices_24h", "amount", "txn_count_24h"]
# 100 trees instead of 300: three trainings must fit in the test's time budget on a shared 2-core machine.
CONFIG = TrainingConfig.from_dict({"lightgbm": {"n_estimators": 100}})
LINEAGE = {"delta.silver/labels.version": 12, "delta.silver/transactions.version": 7}


# -- fixtures --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(mlflow_server):  # noqa: F811 - fixture injection
    return mlflow_client(mlflow_server.url)


@pytest.fixture(scope="module")
def connection(mlflow_server):  # noqa: F811
    """``mlflow_default`` pointing at the private server, for the operators' MlflowHook."""
    conn = Connection(conn_id="mlflow_default", conn_type="mlflow", host="127.0.0.1", port=mlflow_server.port,
                      schema="http")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MlflowHook, "get_connection", classmethod(lambda cls, conn_id: conn))
        yield conn


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return make_transactions()


@pytest.fixture(scope="module")
def weak_run(client, frame):
    outcome = train_and_evaluate(frame, WEAK_FEATURES, CONFIG)
    run_id = log_training_run(client, EXPERIMENT, outcome, run_name="weak", idempotency_key="test/weak/train",
                              tags={FEATURE_SERVICE_TAG: "risk_v1"}, lineage=LINEAGE)
    return run_id, outcome


@pytest.fixture(scope="module")
def good_run(client, frame):
    outcome = train_and_evaluate(frame, FEATURES, CONFIG)
    run_id = log_training_run(client, EXPERIMENT, outcome, run_name="good", idempotency_key="test/good/train",
                              tags={FEATURE_SERVICE_TAG: "risk_v1", "team": "risk"}, lineage=LINEAGE)
    return run_id, outcome


def task_context(task_id: str, run_id: str = "manual__2025-02-05T00:00:00+00:00") -> dict:
    ti = SimpleNamespace(dag_id="train_risk_model", run_id=run_id, task_id=task_id, map_index=-1, try_number=1)
    return {"ti": ti, "run_id": run_id}


@pytest.fixture(scope="module")
def degraded_run(connection, frame, tmp_path_factory):
    """A shuffled-label model trained and logged by the operator (the path is a real parquet file)."""
    path = tmp_path_factory.mktemp("training-set") / "training_set.parquet"
    frame.assign(account_id="acc-1").to_parquet(path, index=False)  # extra columns are ignored
    operator = TrainRiskModelOperator(
        task_id="train", training_set_path=str(path), experiment_name=EXPERIMENT,
        training_config={"lightgbm": {"n_estimators": 100}}, lineage=json.dumps(LINEAGE), shuffle_labels="true",
    )
    context = task_context("train")
    return operator.execute(context), operator, context


def registry_snapshot(client, name: str) -> dict:
    """Everything the gate could change: aliases and tags of the model and of each version."""
    model = client.get_registered_model(name)
    versions = client.search_model_versions(f"name = '{name}'")
    return {
        "aliases": dict(model.aliases),
        "tags": dict(model.tags),
        "versions": {mv.version: dict(mv.tags) for mv in versions},
    }


# -- tests -------------------------------------------------------------------------------------------------------
def test_training_run_is_fully_recorded(client, good_run, mlflow_server):  # noqa: F811
    run_id, outcome = good_run
    assert os.environ.get("MLFLOW_TRACKING_URI") != mlflow_server.url  # the fluent API's URI was restored
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert json.loads(params["feature_columns"]) == FEATURES
    assert params["lightgbm.n_estimators"] == "100" and params["costs.missed_fraud"] == "500.0"
    for name in ("train", "validation", "holdout"):
        assert int(params[f"{name}_rows"]) == len(outcome.split.frames()[name])
    assert pd.Timestamp(params["holdout_start"]) == outcome.split.holdout_start
    assert float(params["threshold_decline"]) == outcome.thresholds["model"].decline  # "inf" parses too
    assert metrics["holdout_pr_auc"] == pytest.approx(outcome.holdout.pr_auc)
    assert metrics["baseline_holdout_pr_auc"] == pytest.approx(outcome.baseline_holdout.pr_auc)
    assert metrics["holdout_pr_auc"] > metrics["baseline_holdout_pr_auc"] + 0.1
    assert "validation_pr_auc" in metrics and "baseline_validation_expected_cost" in metrics
    assert not any("threshold" in key for key in metrics)
    assert tags[FEATURE_SERVICE_TAG] == "risk_v1" and tags["team"] == "risk"
    assert tags["lineage.delta.silver/labels.version"] == "12"
    assert tags[IDEMPOTENCY_TAG] == "test/good/train" and tags["decisionflow.shuffle_labels"] == "false"

    listed = {f.path for f in client.list_artifacts(run_id)} | {
        f.path for folder in ("plots", "evaluation") for f in client.list_artifacts(run_id, folder)}
    assert {"plots/pr_curve.png", "plots/calibration_curve.png", "plots/feature_importance.png",
            "evaluation/holdout.parquet", "evaluation/thresholds.json", "evaluation/metrics.json"} <= listed
    holdout = read_holdout(client, run_id)
    assert list(holdout.columns) == ["event_id", "event_timestamp", *FEATURES, "is_fraud"]
    assert len(holdout) == len(outcome.holdout_frame)
    assert read_thresholds(client, run_id)["model"] == outcome.thresholds["model"]

    import mlflow.models
    import mlflow.pyfunc

    with use_mlflow_server(client):
        info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
        pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert [spec.name for spec in info.signature.inputs.inputs] == FEATURES
    assert info.signature.outputs is not None
    assert info.saved_input_example_info is not None
    assert info.flavors["sklearn"]["serialization_format"] == "skops"
    probabilities = np.asarray(pyfunc.predict(holdout[FEATURES].astype("float64").head(3)))
    assert probabilities.shape == (3, 2)  # pyfunc predict is predict_proba
    np.testing.assert_allclose(probabilities[:, 1], outcome.holdout_scores["model"][:3])


def test_find_run_by_idempotency_key(client, weak_run):
    run_id, _ = weak_run
    assert find_run(client, EXPERIMENT, "test/weak/train") == run_id
    assert find_run(client, EXPERIMENT, "test/other/train") is None
    assert find_run(client, EXPERIMENT, "test/weak/train", fingerprint="not-this-one") is None
    assert find_run(client, "no-such-experiment", "test/weak/train") is None


def test_registry_lifecycle_and_promotion_gate(client, weak_run, good_run, degraded_run):
    name = "risk-lifecycle"
    weak_id, weak = weak_run
    good_id, good = good_run
    degraded_id = degraded_run[0]["run_id"]

    # Registering the same run twice gives one version.
    first = register_challenger(client, name, weak_id)
    again = register_challenger(client, name, weak_id)
    assert first.created and not again.created and first.version == again.version
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert client.get_registered_model(name).description
    assert model_aliases(client, name) == {CHALLENGER: first.version}

    # No champion yet: the first sane model is promoted.
    decision = run_promotion_gate(client, name)
    assert decision.promote and decision.reason.startswith("promoted: first model")
    assert decision.challenger_value == pytest.approx(weak.holdout.pr_auc)
    assert model_aliases(client, name)[CHAMPION] == first.version
    assert PROMOTED_AT_TAG in client.get_model_version(name, first.version).tags

    # A degraded challenger is refused and nothing in the registry moves.
    degraded = register_challenger(client, name, degraded_id)
    assert degraded.created and degraded.version != first.version
    before = registry_snapshot(client, name)
    decision = run_promotion_gate(client, name)
    assert not decision.promote and decision.reason.startswith("not promoted:"), decision.reason
    assert decision.champion_value == pytest.approx(weak.holdout.pr_auc)  # same holdout rows, own thresholds
    assert decision.challenger_value < decision.champion_value
    assert registry_snapshot(client, name) == before
    assert model_aliases(client, name)[CHAMPION] == first.version

    # A better challenger (all features vs the weak champion's four) is promoted.
    better = register_challenger(client, name, good_id)
    decision = run_promotion_gate(client, name)
    assert decision.promote and decision.reason.startswith("promoted:"), decision.reason
    assert decision.challenger_value == pytest.approx(good.holdout.pr_auc)
    assert decision.champion_value == pytest.approx(weak.holdout.pr_auc)
    assert model_aliases(client, name) == {CHALLENGER: better.version, CHAMPION: better.version}
    tags = client.get_model_version(name, better.version).tags
    assert tags[PROMOTION_REASON_TAG].startswith("promoted:") and PROMOTED_AT_TAG in tags
    assert tags[FEATURE_SERVICE_TAG] == "risk_v1" and tags["lineage.delta.silver/labels.version"] == "12"
    assert PROMOTED_AT_TAG not in client.get_model_version(name, degraded.version).tags

    # Rerunning the gate once promoted changes nothing.
    before = registry_snapshot(client, name)
    decision = run_promotion_gate(client, name)
    assert decision.promote and "already is the champion" in decision.reason
    assert registry_snapshot(client, name) == before

    # A champion needing columns the challenger's holdout lacks is an error naming them, not a decision.
    register_challenger(client, name, weak_id)
    before = registry_snapshot(client, name)
    with pytest.raises(ModelGateError, match="merchant_fraud_rate"):
        run_promotion_gate(client, name)
    assert registry_snapshot(client, name) == before


def test_operators_train_register_and_gate(client, connection, degraded_run, good_run):
    summary, train, context = degraded_run
    assert summary["shuffle_labels"] and not summary["reused"]
    assert summary["holdout_pr_auc"] < 0.2 and summary["baseline_holdout_pr_auc"] is not None
    tags = client.get_run(summary["run_id"]).data.tags
    assert tags[IDEMPOTENCY_TAG] == "train_risk_model/manual__2025-02-05T00:00:00+00:00/train"
    assert tags["lineage.delta.silver/transactions.version"] == "7"

    # Clear + rerun of the same task instance: the finished run is reused, nothing is trained.
    rerun = train.execute(context)
    assert rerun["reused"] and rerun["run_id"] == summary["run_id"]
    assert rerun["holdout_pr_auc"] == summary["holdout_pr_auc"]

    name = "risk-operators"
    register = RegisterModelOperator(task_id="register", run_id=good_run[0], model_name=name)
    gate = PromotionGateOperator(task_id="gate", model_name=name, metric="pr_auc", margin="0.01")
    champion = register.execute(task_context("register"))
    assert champion["created"] and champion["aliases"] == [CHALLENGER]
    assert gate.execute(task_context("gate"))["promoted"]

    register_degraded = RegisterModelOperator(task_id="register", run_id=summary["run_id"], model_name=name)
    first = register_degraded.execute(task_context("register"))
    second = register_degraded.execute(task_context("register"))
    assert first["created"] and not second["created"] and first["version"] == second["version"]
    assert len(client.search_model_versions(f"name = '{name}'")) == 2

    before = registry_snapshot(client, name)
    result = gate.execute(task_context("gate"))
    assert result["promoted"] is False and result["promote"] is False
    assert result["reason"].startswith("not promoted:")
    assert result["champion_version"] == champion["version"] and result["challenger_version"] == first["version"]
    json.dumps(result, allow_nan=False)  # a valid XCom
    assert registry_snapshot(client, name) == before
