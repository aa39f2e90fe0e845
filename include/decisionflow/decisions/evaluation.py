"""Decision quality: the decisions actually made, scored against the labels known now and the generator's truth.

Each block (``labels``: decisions whose transaction has a label by now; ``truth``: on generated data, every
decision against the generator's hidden ``is_fraud``) has three rows, computed by the backtest's own accounting
(:class:`~decisionflow.decisions.backtest.BacktestRow`) so a replay and a real run are priced the same way:

* ``policy`` - what was decided (the audit's ``decision``);
* ``thresholds_only`` - what the model's own thresholds would have decided from the same scores;
* ``approve_all`` - no fraud control at all.

:func:`log_evaluation` writes one MLflow run per Airflow run (idempotent: a cleared task reuses it), tagged
with the model name, version and training run and the policy name and version, with a metric per block, row
and measure (``labels.policy.expected_cost``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from decisionflow import constants
from decisionflow.lakehouse.tables import join_path

if TYPE_CHECKING:
    import pandas as pd

    from decisionflow.decisions.costs import Thresholds
    from decisionflow.decisions.policy import Policy

log = logging.getLogger(__name__)

_MEASURES = ("approve_rate", "review_rate", "decline_rate", "decline_precision", "decline_recall", "fraud_caught",
             "expected_cost")


@dataclass
class DecisionEvaluation:
    """Quality blocks (``labels``, ``truth``) of the decisions made so far, and what they were made with."""

    decisions: int
    blocks: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: list[dict[str, str]] = field(default_factory=list)
    policies: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"decisions": self.decisions, **self.blocks, "models": self.models, "policies": self.policies}

    def format(self) -> str:
        lines = [f"{self.decisions} decisions; models {self.models}; policies {self.policies}"]
        for name, block in self.blocks.items():
            lines.append(f"against {name}: {block['n']} decisions, {block['fraud']} fraud")
            for row in block["rows"]:
                lines.append("  {name:<16} approve {a}  review {r}  decline {d}  decl.prec {p}  decl.recall {c}  "
                             "fraud caught {f}  cost/txn {e}".format(
                                 name=row["name"], a=_pct(row["approve_rate"]), r=_pct(row["review_rate"]),
                                 d=_pct(row["decline_rate"]), p=_pct(row["decline_precision"]),
                                 c=_pct(row["decline_recall"]), f=_pct(row["fraud_caught"]),
                                 e=_num(row["expected_cost"])))
        return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2%}"


def _num(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def read_truth(paths: Iterable[str | Path]) -> dict[str, bool]:
    """``event_id -> is_fraud`` of the valid transactions in generator truth files (JSON lines)."""
    truth: dict[str, bool] = {}
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                if row.get("topic") == "transactions" and row.get("event_id") and row.get("is_fraud") is not None:
                    truth[row["event_id"]] = bool(row["is_fraud"])
    return truth


def _rows(decisions: pd.DataFrame, y, thresholds: pd.DataFrame, policy: Policy) -> list[dict[str, Any]]:
    import numpy as np

    from decisionflow.decisions.backtest import APPROVE_ALL, POLICY, THRESHOLDS_ONLY, BacktestRow

    from decisionflow.decisions.costs import decisions_by_thresholds

    y = np.asarray(y, dtype=np.int64)
    by_thresholds = decisions_by_thresholds(decisions["score"].to_numpy(dtype=np.float64),
                                            thresholds["review"].to_numpy(), thresholds["decline"].to_numpy())
    made = decisions["decision"].to_numpy(dtype=object)
    return [BacktestRow.of(POLICY, made, y, policy.costs).as_dict(),
            BacktestRow.of(THRESHOLDS_ONLY, by_thresholds, y, policy.costs).as_dict(),
            BacktestRow.of(APPROVE_ALL, np.full(len(made), "approve", dtype=object), y, policy.costs).as_dict()]


def evaluate_decisions(lake_root: str, policy: Policy, thresholds_for: Callable[[str], Thresholds], *,
                       storage_options: Mapping[str, str] | None = None,
                       truth_paths: Iterable[str | Path] = ()) -> DecisionEvaluation:
    """Score every decision in ``gold/decisions`` against the labels in ``gold/transactions_enriched`` (and the
    generator truth when given).

    :param thresholds_for: the model thresholds of a training run id (the audit keeps ``model_run_id``), for the
        threshold-only baseline of the same scores.
    """
    import pandas as pd
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    options = dict(storage_options or {})
    try:
        audit = DeltaTable(join_path(lake_root, constants.DECISIONS_TABLE), storage_options=options)
    except TableNotFoundError:
        return DecisionEvaluation(decisions=0)
    decisions = audit.to_pandas(
        columns=["decision_id", "event_id", "decision", "score", "model_name", "model_version", "model_run_id",
                 "policy_name", "policy_version"])
    report = DecisionEvaluation(decisions=len(decisions))
    if decisions.empty:
        return report
    report.models = (decisions[["model_name", "model_version", "model_run_id"]].drop_duplicates()
                     .astype(str).to_dict("records"))
    report.policies = decisions[["policy_name", "policy_version"]].drop_duplicates().astype(str).to_dict("records")
    per_run = {run: thresholds_for(run) for run in decisions["model_run_id"].unique()}
    thresholds = pd.DataFrame({"review": decisions["model_run_id"].map(lambda r: per_run[r].review),
                               "decline": decisions["model_run_id"].map(lambda r: per_run[r].decline)})

    gold = DeltaTable(join_path(lake_root, constants.GOLD_ENRICHED_TABLE), storage_options=options).to_pandas(
        columns=["event_id", "is_fraud"])
    labelled = decisions.merge(gold, on="event_id", how="left")
    known = labelled["is_fraud"].notna().to_numpy()
    if known.any():
        y = labelled.loc[known, "is_fraud"].astype(bool).to_numpy()
        report.blocks["labels"] = {"n": int(known.sum()), "fraud": int(y.sum()),
                                   "rows": _rows(decisions[known], y, thresholds[known], policy)}
    truth = read_truth(truth_paths)
    if truth:
        hidden = decisions["event_id"].map(truth)
        has = hidden.notna().to_numpy()
        if has.any():
            y = hidden[has].astype(bool).to_numpy()
            report.blocks["truth"] = {"n": int(has.sum()), "fraud": int(y.sum()),
                                      "rows": _rows(decisions[has], y, thresholds[has], policy)}
    return report


def log_evaluation(client: Any, experiment: str, report: DecisionEvaluation, *, airflow_run_id: str) -> str | None:
    """Log ``report`` as one MLflow run (reused when the same Airflow run logs again); returns its id."""
    from decisionflow.models.tracking import IDEMPOTENCY_TAG, ensure_experiment, find_run

    if not report.decisions:
        return None
    key = f"evaluate:{airflow_run_id}"
    existing = find_run(client, experiment, key)
    if existing:
        return existing
    experiment_id = ensure_experiment(client, experiment)
    models, policies = report.models, report.policies
    tags = {IDEMPOTENCY_TAG: key, "decisionflow.airflow_run_id": airflow_run_id,
            "decisionflow.purpose": "decision-evaluation",
            "decisionflow.model_name": ",".join(sorted({m["model_name"] for m in models})),
            "decisionflow.model_version": ",".join(sorted({m["model_version"] for m in models})),
            "decisionflow.model_run_id": ",".join(sorted({m["model_run_id"] for m in models})),
            "decisionflow.policy_name": ",".join(sorted({p["policy_name"] for p in policies})),
            "decisionflow.policy_version": ",".join(sorted({p["policy_version"] for p in policies}))}
    run = client.create_run(experiment_id, run_name=f"evaluate {airflow_run_id}", tags=tags)
    run_id = run.info.run_id
    metrics = {"decisions": float(report.decisions)}
    for block_name, block in report.blocks.items():
        metrics[f"{block_name}.n"] = float(block["n"])
        metrics[f"{block_name}.fraud"] = float(block["fraud"])
        for row in block["rows"]:
            for measure in _MEASURES:
                value = row.get(measure)
                if value is not None and not (isinstance(value, float) and math.isnan(value)):
                    metrics[f"{block_name}.{row['name']}.{measure}"] = float(value)
    for name, value in metrics.items():
        client.log_metric(run_id, name, value)
    client.log_text(run_id, json.dumps(report.as_dict(), indent=2, default=str), "evaluation/decision_quality.json")
    client.set_terminated(run_id)
    return run_id
