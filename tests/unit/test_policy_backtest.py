"""Policy backtest: the policy beside approve-all and the thresholds alone; the ``decisionflow policy`` CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from decisionflow.decisions.backtest import backtest, labelled_history
from decisionflow.decisions.costs import NEVER, Thresholds, apply_policy, outcome_of_decisions
from decisionflow.decisions.generated import generated_history
from decisionflow.decisions.policy import SHIPPED_POLICY, Policy

THR = Thresholds(review=0.1, decline=0.5)


@pytest.fixture(scope="module")
def history() -> pd.DataFrame:
    return generated_history(2500, seed=5)


def _scores(frame: pd.DataFrame, seed: int = 0) -> np.ndarray:
    """Plausible scores: higher for the generator's fraud, noisy."""
    rng = np.random.default_rng(seed)
    truth = frame["truth_is_fraud"].to_numpy()
    return np.clip(np.where(truth, rng.beta(2, 2, len(frame)), rng.beta(0.6, 12, len(frame))), 0, 1)


def test_three_rows_consistent_with_apply_policy(history):
    policy = Policy.load()
    frame = labelled_history(history, truth=True)
    scores = _scores(frame)
    report = backtest(policy, frame, scores, THR)
    assert [r.name for r in report.rows] == ["policy", "thresholds_only", "approve_all"]
    y = frame["y"].to_numpy()
    thr = apply_policy(scores, y, THR, policy.costs)
    row = report.row("thresholds_only")
    assert row.total_cost == pytest.approx(thr.total_cost) and row.reviewed == thr.reviewed
    assert row.declined_fraud == thr.declined_fraud and row.declined_legit == thr.declined_legit
    everything = apply_policy(scores, y, Thresholds(NEVER, NEVER), policy.costs)
    assert report.row("approve_all").total_cost == pytest.approx(everything.total_cost)
    assert report.row("approve_all").approve_rate == 1.0 and report.row("approve_all").fraud_caught == 0.0
    decided = policy.decide(frame, scores, THR)
    assert report.policy.total_cost == pytest.approx(outcome_of_decisions(decided.decision, y, policy.costs).total_cost)
    p = report.policy
    assert p.approved + p.reviewed + p.declined == p.n == len(frame)
    assert p.decline_precision == pytest.approx(p.declined_fraud / p.declined)
    assert p.fraud_caught == pytest.approx((p.declined_fraud + p.reviewed_fraud) / p.fraud)
    assert "similar-case rule NOT evaluated" in " ".join(report.notes) and not report.similar_evaluated
    table = report.format_table()
    assert "thresholds_only" in table and "approve_all" in table and "cost/txn" in table
    json.dumps(report.as_dict(), allow_nan=False)
    metrics = report.metrics("eval_")
    assert metrics["eval_thresholds_only_expected_cost"] == pytest.approx(thr.expected_cost)
    assert metrics["eval_saving_vs_thresholds"] == pytest.approx(report.saving_vs_thresholds)
    assert "eval_approve_all_decline_precision" not in metrics  # NaN (no decline) is left out


def test_similar_cases_evaluated_and_budget_per_run(history):
    policy = Policy.load()
    frame = labelled_history(history, truth=True)
    scores = _scores(frame, 1)
    similar = [[{"outcome": "fraud"}] * 4 if t else None for t in frame["truth_is_fraud"]]
    report = backtest(policy, frame, scores, THR, similar=similar)
    assert report.similar_evaluated and report.reason_codes.get("SIMILAR_CASES_FRAUD", 0) > 0
    hourly = frame.assign(run=frame["event_time"].dt.floor("6h"))
    per_run = backtest(policy, hourly, scores, THR, run_key="run")
    assert "per run" in " ".join(per_run.notes) and per_run.policy.n == len(frame)


def test_labelled_history_maturity(history):
    as_of = history["event_time"].max() + pd.Timedelta(days=10)
    rows = labelled_history(history, as_of=as_of, label_maturity_days=15)
    labelled = history["label"].notna() & (history["labelled_at"] <= as_of)
    mature = history["event_time"] <= as_of - pd.Timedelta(days=15)
    assert len(rows) == int((labelled | mature).sum()) < len(history)
    assert int(rows["y"].sum()) == int((labelled & history["label"].eq("fraud")).sum())
    assert set(rows["y"].unique()) <= {0, 1}
    with pytest.raises(ValueError, match="NULL"):
        backtest(Policy.load(), history, np.zeros(len(history)), THR, labels=history["is_fraud"])


def _write_lake(tmp_path, history) -> str:
    from deltalake import write_deltalake

    lake = tmp_path / "lake"
    gold = history.drop(columns=["truth_is_fraud", "truth_pattern", "truth_decoy"])
    write_deltalake(str(lake / "gold" / "transactions_enriched"), gold)
    return str(lake)


def test_cli_backtest_with_scores_on_a_delta_table(tmp_path, history, capsys):
    from decisionflow.cli import main

    lake = _write_lake(tmp_path, history)
    scores = tmp_path / "scores.parquet"
    pd.DataFrame({"event_id": history["event_id"], "score": _scores(history, 2)}).to_parquet(scores)
    argv = ["policy", "backtest", "--policy", str(SHIPPED_POLICY), "--lake", lake, "--scores", str(scores),
            "--thresholds", "0.1,0.5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "policy" in out and "thresholds_only" in out and "approve_all" in out
    assert "similar-case rule NOT evaluated" in out
    assert main([*argv, "--json", "--since", str(history["event_time"].iloc[500])]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in payload["rows"]] == ["policy", "thresholds_only", "approve_all"]
    assert payload["policy"]["version"] == "2026.12.2" and payload["rows"][0]["n"] < len(history)


def test_cli_errors_name_the_layer(tmp_path, capsys):
    from decisionflow.cli import main

    assert main(["policy", "backtest", "--lake", str(tmp_path / "nowhere"), "--scores", "x.parquet",
                 "--thresholds", "0.1,0.5"]) == 1
    assert "[lake] gold/transactions_enriched does not exist" in capsys.readouterr().err


def test_cli_validate(tmp_path, capsys):
    from decisionflow.cli import main

    assert main(["policy", "validate"]) == 0
    assert "transaction_risk 2026.12.2 OK" in capsys.readouterr().out
    data = yaml.safe_load(SHIPPED_POLICY.read_text())
    data["rules"][2]["when"]["all"][0]["op"] = "gte"
    bad = tmp_path / "mine.yaml"
    bad.write_text(yaml.safe_dump(data))
    assert main(["policy", "validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "mine.yaml: rules[2] (id=impossible_travel)" in err and "field 'op'" in err


def test_cli_backtest_on_generated_data(capsys):
    """No lake, no MLflow: a model trained on the older generated rows, the policy replayed on the newest."""
    from decisionflow.cli import main

    assert main(["policy", "backtest", "--generated", "6000", "--seed", "3", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in payload["rows"]}
    assert set(rows) == {"policy", "thresholds_only", "approve_all"}
    assert rows["approve_all"]["expected_cost"] > rows["thresholds_only"]["expected_cost"]
    print(f"\ngenerated 6000 events seed 3: cost/txn policy {rows['policy']['expected_cost']:.3f}, thresholds only "
          f"{rows['thresholds_only']['expected_cost']:.3f}, approve all {rows['approve_all']['expected_cost']:.3f}")
