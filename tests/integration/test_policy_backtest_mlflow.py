"""``decisionflow policy backtest`` against a real (private) MLflow: the champion scores gold history from Delta.

A model is trained on seeded generated history, logged and registered as ``decisionflow-risk@champion`` on a
private MLflow server; the history is written to ``gold/transactions_enriched`` with ``deltalake``. The CLI then
loads the champion (``models:/decisionflow-risk@champion`` via its version), reads the thresholds its run logged
and prints the policy beside both baselines.
"""

from __future__ import annotations

import json

import pytest

try:
    from .fixtures_ml import mlflow_server  # noqa: F401 - pytest fixture
except ImportError:  # collected as a plain directory (rootdir-relative import mode)
    from fixtures_ml import mlflow_server  # noqa: F401

from decisionflow.constants import CHAMPION_ALIAS, MODEL_NAME
from decisionflow.decisions.backtest import labelled_history
from decisionflow.decisions.generated import TRUTH_COLUMNS, generated_history
from decisionflow.models import DEFAULT_FEATURE_COLUMNS, TrainingConfig
from decisionflow.models.pipeline import MODEL, train_and_evaluate
from decisionflow.models.registry import register_challenger
from decisionflow.models.tracking import log_training_run, mlflow_client, read_thresholds

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def champion(mlflow_server):  # noqa: F811 - fixture injection
    history = generated_history(6000, seed=2)
    labelled = labelled_history(history)
    frame = labelled.assign(event_timestamp=labelled["event_time"], is_fraud=labelled["y"].astype(bool))
    config = TrainingConfig.from_dict({"lightgbm": {"n_estimators": 100}})
    outcome = train_and_evaluate(frame[["event_id", "event_timestamp", "is_fraud", *DEFAULT_FEATURE_COLUMNS]],
                                 list(DEFAULT_FEATURE_COLUMNS), config)
    client = mlflow_client(mlflow_server.url)
    run_id = log_training_run(client, "policy-backtest", outcome, run_name="policy-backtest",
                              idempotency_key="test/policy-backtest")
    version = register_challenger(client, MODEL_NAME, run_id).version
    client.set_registered_model_alias(MODEL_NAME, CHAMPION_ALIAS, version)
    return history, client, run_id, version, outcome


def test_backtest_scores_with_the_champion(tmp_path, champion, mlflow_server, capsys):  # noqa: F811
    from deltalake import write_deltalake

    from decisionflow.cli import main

    history, client, run_id, version, outcome = champion
    lake = tmp_path / "lake"
    write_deltalake(str(lake / "gold" / "transactions_enriched"), history.drop(columns=list(TRUTH_COLUMNS)))
    argv = ["policy", "backtest", "--lake", str(lake), "--tracking-uri", mlflow_server.url, "--json"]

    assert main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    thresholds = read_thresholds(client, run_id)[MODEL]
    assert payload["thresholds"] == {"review": thresholds.review, "decline": thresholds.decline}
    assert payload["source"]["model_version"] == str(version) and payload["source"]["model_run_id"] == run_id
    rows = {r["name"]: r for r in payload["rows"]}
    assert set(rows) == {"policy", "thresholds_only", "approve_all"} and rows["policy"]["n"] == len(history)
    assert rows["approve_all"]["expected_cost"] > rows["thresholds_only"]["expected_cost"]

    assert main(["policy", "backtest", "--lake", str(lake), "--tracking-uri", mlflow_server.url,
                 "--model-version", str(version)]) == 0
    table = capsys.readouterr().out
    assert "thresholds_only" in table and "approve_all" in table
    print(table)

    assert main([*argv, "--model-name", "no-such-model"]) == 1
    err = capsys.readouterr().err
    assert "[mlflow] no-such-model alias @champion not found" in err and "remedy" in err
