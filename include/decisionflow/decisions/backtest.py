"""Replay a decision policy over labelled history, beside two baselines: approve everything, and the score alone.

:func:`backtest` is what ``decisionflow policy backtest`` prints and what a decision run's evaluation reuses:

* ``policy`` - :meth:`Policy.decide` (bands with the policy's offsets, rules, similar cases when given, the
  review budget);
* ``thresholds_only`` - the champion's thresholds alone (no rules, no similar cases, no budget): exactly
  :func:`~decisionflow.decisions.costs.apply_policy`;
* ``approve_all`` - every transaction approved: the cost of having no fraud control at all.

Each row: approve / review / decline rates, decline precision and recall, fraud caught (declined or reviewed,
the review is assumed to catch it), expected cost per transaction under the policy's :class:`CostModel`.

History is what a risk team has: :func:`labelled_history` keeps labelled transactions and unlabelled ones old
enough to count as legitimate (the convention of training); on generated data the generator's hidden truth can
be used instead. :func:`generated_backtest` runs the whole thing on seeded generated data (a model trained on
the older part, the policy replayed on the newest), no services needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from decisionflow.decisions.costs import (
    NEVER,
    CostModel,
    PolicyOutcome,
    Thresholds,
    decisions_by_thresholds,
    outcome_of_decisions,
)

if TYPE_CHECKING:
    import pandas as pd

    from decisionflow.decisions.policy import Policy

__all__ = [
    "BASELINES",
    "BacktestInputError",
    "BacktestReport",
    "BacktestRow",
    "backtest",
    "champion_scores",
    "generated_backtest",
    "labelled_history",
    "read_history",
    "scores_from_file",
]

#: Row names of a :class:`BacktestReport`, in print order.
POLICY = "policy"
THRESHOLDS_ONLY = "thresholds_only"
APPROVE_ALL = "approve_all"
BASELINES = (THRESHOLDS_ONLY, APPROVE_ALL)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


@dataclass(frozen=True)
class BacktestRow:
    """What one way of deciding did to the labelled history."""

    name: str
    n: int
    fraud: int
    approved: int
    reviewed: int
    declined: int
    approved_fraud: int
    reviewed_fraud: int
    declined_fraud: int
    declined_legit: int
    total_cost: float

    @property
    def approve_rate(self) -> float:
        return _ratio(self.approved, self.n)

    @property
    def review_rate(self) -> float:
        return _ratio(self.reviewed, self.n)

    @property
    def decline_rate(self) -> float:
        return _ratio(self.declined, self.n)

    @property
    def decline_precision(self) -> float:
        """Share of declines that were fraud (``nan`` with no decline)."""
        return _ratio(self.declined_fraud, self.declined)

    @property
    def decline_recall(self) -> float:
        """Share of fraud declined."""
        return _ratio(self.declined_fraud, self.fraud)

    @property
    def fraud_caught(self) -> float:
        """Share of fraud declined or reviewed."""
        return _ratio(self.declined_fraud + self.reviewed_fraud, self.fraud)

    @property
    def expected_cost(self) -> float:
        """Cost per transaction."""
        return _ratio(self.total_cost, self.n)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("approve_rate", "review_rate", "decline_rate", "decline_precision", "decline_recall",
                     "fraud_caught", "expected_cost"):
            value = getattr(self, name)
            out[name] = None if isinstance(value, float) and math.isnan(value) else value
        return out

    @classmethod
    def of(cls, name: str, decisions: np.ndarray, y: np.ndarray, costs: CostModel) -> BacktestRow:
        outcome: PolicyOutcome = outcome_of_decisions(decisions, y, costs)
        review = decisions == "review"
        return cls(name=name, n=outcome.n, fraud=int(y.sum()), approved=int((decisions == "approve").sum()),
                   reviewed=outcome.reviewed, declined=outcome.declined_fraud + outcome.declined_legit,
                   approved_fraud=outcome.approved_fraud, reviewed_fraud=int((review & (y == 1)).sum()),
                   declined_fraud=outcome.declined_fraud, declined_legit=outcome.declined_legit,
                   total_cost=outcome.total_cost)


@dataclass
class BacktestReport:
    """The policy's row beside the baselines, and what the replay was made of."""

    rows: tuple[BacktestRow, ...]
    policy_name: str
    policy_version: str
    policy_content_hash: str
    thresholds: Thresholds
    policy_thresholds: Thresholds
    costs: CostModel
    similar_evaluated: bool
    reason_codes: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)

    def row(self, name: str) -> BacktestRow:
        return next(r for r in self.rows if r.name == name)

    @property
    def policy(self) -> BacktestRow:
        return self.row(POLICY)

    @property
    def saving_vs_thresholds(self) -> float:
        """Expected cost per transaction saved by the policy over the threshold-only baseline (> 0: better)."""
        return self.row(THRESHOLDS_ONLY).expected_cost - self.policy.expected_cost

    def as_dict(self) -> dict[str, Any]:
        def thr(t: Thresholds) -> dict[str, Any]:
            return {k: (None if v == NEVER else v) for k, v in asdict(t).items()}

        return {"policy": {"name": self.policy_name, "version": self.policy_version,
                           "content_hash": self.policy_content_hash},
                "thresholds": thr(self.thresholds), "policy_thresholds": thr(self.policy_thresholds),
                "costs": self.costs.as_dict(), "similar_cases_evaluated": self.similar_evaluated,
                "rows": [r.as_dict() for r in self.rows], "saving_vs_thresholds": self.saving_vs_thresholds,
                "reason_codes": self.reason_codes, "notes": list(self.notes), "source": self.source}

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat ``{prefix}{row}_{metric}`` floats for ``mlflow.log_metrics`` (NaN ones left out), + the saving."""
        out: dict[str, float] = {}
        for r in self.rows:
            for name in ("approve_rate", "review_rate", "decline_rate", "decline_precision", "decline_recall",
                         "fraud_caught", "expected_cost"):
                value = float(getattr(r, name))
                if math.isfinite(value):
                    out[f"{prefix}{r.name}_{name}"] = value
            out[f"{prefix}{r.name}_n"] = float(r.n)
        if math.isfinite(self.saving_vs_thresholds):
            out[f"{prefix}saving_vs_thresholds"] = float(self.saving_vs_thresholds)
        return out

    def format_table(self) -> str:
        """A small aligned table: one line per row, then the notes."""
        head = ("", "approve", "review", "decline", "decl.prec", "decl.recall", "fraud caught", "cost/txn")
        lines = []
        for r in self.rows:
            lines.append((r.name, f"{r.approve_rate:.2%}", f"{r.review_rate:.2%}", f"{r.decline_rate:.2%}",
                          "-" if math.isnan(r.decline_precision) else f"{r.decline_precision:.1%}",
                          f"{r.decline_recall:.1%}", f"{r.fraud_caught:.1%}", f"{r.expected_cost:.3f}"))
        widths = [max(len(str(row[i])) for row in (head, *lines)) for i in range(len(head))]
        fmt = "  ".join(["{:<%d}" % widths[0]] + ["{:>%d}" % w for w in widths[1:]])
        p = self.policy
        out = [f"policy {self.policy_name} {self.policy_version} (sha256 {self.policy_content_hash[:12]}) on "
               f"{p.n} labelled transactions, {p.fraud} fraud ({_ratio(p.fraud, p.n):.2%})",
               f"champion thresholds review >= {self.thresholds.review:.4f}, decline >= {self.thresholds.decline:.4f}"
               f"; costs {self.costs.as_dict()}",
               fmt.format(*head), *(fmt.format(*line) for line in lines),
               f"policy saves {self.saving_vs_thresholds:+.3f} per transaction vs the thresholds alone"]
        if self.reason_codes:
            top = sorted(self.reason_codes.items(), key=lambda kv: (-kv[1], kv[0]))[:8]
            out.append("reason codes: " + ", ".join(f"{k} {v}" for k, v in top))
        out.extend(f"note: {n}" for n in self.notes)
        return "\n".join(out)


def _labels(frame: pd.DataFrame, labels: Any) -> np.ndarray:
    if labels is None:
        for column in ("y", "is_fraud"):
            if column in frame.columns:
                labels = frame[column]
                break
        else:
            raise ValueError("no labels: pass labels= or a frame with a 'y' or 'is_fraud' column "
                             "(see labelled_history)")
    import pandas as pd

    y = pd.Series(np.asarray(labels, dtype=object))
    if y.isna().any():
        raise ValueError(f"{int(y.isna().sum())} labels are NULL (unlabelled rows): filter with labelled_history "
                         "first")
    return y.astype(float).to_numpy().astype(np.int64)


def backtest(policy: Policy, frame: pd.DataFrame, scores: np.ndarray, thresholds: Thresholds,
             similar: Sequence[Sequence[Any] | None] | None = None, *, labels: Any = None,
             run_key: str | None = None) -> BacktestReport:
    """Replay ``policy`` over labelled ``frame`` beside the two baselines.

    :param policy: the policy to test.
    :param frame: labelled history: gold transactions with their features and a 0/1 label (``y`` or
        ``is_fraud`` column, or ``labels``).
    :param scores: the champion's score per row.
    :param thresholds: the champion's thresholds (``thresholds_only`` uses them as they are; the policy applies
        its band offsets).
    :param similar: per row its similar cases (or ``None``); without them the similar-case rule is not
        evaluated, and a note says so.
    :param labels: 0/1 labels per row, instead of the frame's column.
    :param run_key: a column grouping rows into decision runs (e.g. an hourly bucket): the review budget is
        per run; by default the whole frame is one run.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size != len(frame):
        raise ValueError(f"{scores.size} scores for {len(frame)} rows")
    y = _labels(frame, labels)
    notes: list[str] = []
    if run_key is None:
        result = policy.decide(frame, scores, thresholds, similar=similar)
        decisions, codes, evaluated = result.decision, result.reason_codes, result.similar_evaluated
        effective = result.thresholds
    else:
        decisions = np.empty(len(frame), dtype=object)
        codes: list[list[str]] = [[] for _ in range(len(frame))]
        evaluated = np.zeros(len(frame), dtype=bool)
        keys = frame[run_key].to_numpy()
        effective = policy.thresholds(thresholds)
        for key in dict.fromkeys(keys.tolist()):
            idx = np.flatnonzero(keys == key)
            part = policy.decide(frame.iloc[idx], scores[idx], thresholds,
                                 similar=None if similar is None else [similar[i] for i in idx])
            decisions[idx] = part.decision
            evaluated[idx] = part.similar_evaluated
            for j, i in enumerate(idx.tolist()):
                codes[i] = part.reason_codes[j]
        notes.append(f"review budget applied per run ({run_key}: {len(set(keys.tolist()))} runs)")
    if policy.similar_cases is not None and not evaluated.any():
        notes.append("similar-case rule NOT evaluated (no similar cases given): the policy row omits it")
    elif policy.similar_cases is not None:
        notes.append(f"similar-case rule evaluated on {int(evaluated.sum())} rows")
    counts: dict[str, int] = {}
    for row_codes in codes:
        for code in row_codes:
            counts[code] = counts.get(code, 0) + 1
    d = decisions_by_thresholds(scores, thresholds.review, thresholds.decline)
    rows = (BacktestRow.of(POLICY, np.asarray(decisions, dtype=object), y, policy.costs),
            BacktestRow.of(THRESHOLDS_ONLY, d, y, policy.costs),
            BacktestRow.of(APPROVE_ALL, np.full(len(frame), "approve", dtype=object), y, policy.costs))
    return BacktestReport(rows=rows, policy_name=policy.name, policy_version=policy.version,
                          policy_content_hash=policy.content_hash, thresholds=thresholds,
                          policy_thresholds=effective, costs=policy.costs,
                          similar_evaluated=bool(evaluated.any()), reason_codes=counts, notes=notes)


def labelled_history(frame: pd.DataFrame, *, as_of: Any = None, label_maturity_days: float = 30.0,
                     truth: bool = False) -> pd.DataFrame:
    """The rows a backtest can be scored on, with a 0/1 ``y``: labelled, or unlabelled and mature (= legit).

    The convention of training (:func:`decisionflow.features.training_set.labelled_entity_rows`): chargebacks
    take weeks, so an unlabelled transaction counts as legitimate only once ``label_maturity_days`` old at
    ``as_of`` (default: now); younger unlabelled rows are left out, and labels after ``as_of`` ignored.
    ``truth=True`` uses the generator's hidden truth (``truth_is_fraud``) on every row instead.
    """
    import pandas as pd

    if truth:
        if "truth_is_fraud" not in frame.columns:
            raise ValueError("truth=True needs the generator's truth_is_fraud column (generated data only)")
        return frame.assign(y=frame["truth_is_fraud"].astype(int)).reset_index(drop=True)
    as_of = pd.Timestamp.now(tz="UTC") if as_of is None else pd.Timestamp(as_of)
    if as_of.tzinfo is None:
        as_of = as_of.tz_localize("UTC")
    event_time = pd.to_datetime(frame["event_time"], utc=True)
    labelled_at = pd.to_datetime(frame["labelled_at"], utc=True)
    labelled = (frame["label"].notna() & (labelled_at <= as_of)).to_numpy()
    mature = (event_time <= as_of - pd.Timedelta(days=label_maturity_days)).to_numpy()
    keep = (labelled | mature) & (event_time <= as_of).to_numpy()
    rows = frame[keep]
    y = (rows["label"].eq("fraud").to_numpy() & labelled[keep]).astype(int)
    return rows.assign(y=y).reset_index(drop=True)


def generated_backtest(policy: Policy, *, events: int = 20_000, seed: int = 0, truth: bool = False,
                       holdout_share: float = 0.3) -> BacktestReport:
    """Backtest on seeded generated data: train the risk model on the older rows, replay on the newest.

    The frame comes from :func:`~decisionflow.decisions.generated.generated_history`; the model and its
    thresholds from :func:`~decisionflow.models.pipeline.train_and_evaluate` (validation picks the thresholds,
    as a training run does); the policy is replayed on that run's holdout (never seen in training), labelled
    with observed labels (or the hidden truth with ``truth=True``). No similar cases (no Milvus here).
    """
    from decisionflow.decisions.generated import generated_history
    from decisionflow.models.config import DEFAULT_FEATURE_COLUMNS, TrainingConfig
    from decisionflow.models.pipeline import MODEL, train_and_evaluate
    from decisionflow.models.training import predict_scores

    history = generated_history(events, seed=seed)
    labelled = labelled_history(history, truth=truth)
    train = labelled.assign(event_timestamp=labelled["event_time"], is_fraud=labelled["y"].astype(bool))
    config = TrainingConfig(holdout_share=holdout_share, validation_share=0.2, random_seed=seed,
                            costs=policy.costs)
    outcome = train_and_evaluate(train[["event_id", "event_timestamp", "is_fraud", *DEFAULT_FEATURE_COLUMNS]],
                                 list(DEFAULT_FEATURE_COLUMNS), config)
    holdout_ids = set(outcome.holdout_frame["event_id"])
    frame = labelled[labelled["event_id"].isin(holdout_ids)].reset_index(drop=True)
    scores = predict_scores(outcome.model, frame, list(DEFAULT_FEATURE_COLUMNS))
    report = backtest(policy, frame, scores, outcome.thresholds[MODEL])
    report.source = {"generated_events": events, "seed": seed, "labels": "truth" if truth else "observed",
                     "holdout_rows": len(frame), "trained_on_rows": len(train) - len(frame)}
    return report


class BacktestInputError(ValueError):
    """The history, the scores or the model a backtest needs cannot be had; the message names layer and remedy."""


def read_history(lake_root: str, *, since: Any = None, until: Any = None,
                 storage_options: dict[str, str] | None = None) -> pd.DataFrame:
    """``gold/transactions_enriched`` rows with ``since <= event_time < until`` (read with ``deltalake``)."""
    import pandas as pd
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    from decisionflow.constants import GOLD_ENRICHED_TABLE
    from decisionflow.lakehouse.tables import join_path

    path = join_path(lake_root, GOLD_ENRICHED_TABLE)
    try:
        table = DeltaTable(path, storage_options=storage_options)
    except TableNotFoundError as exc:
        raise BacktestInputError(f"[lake] {GOLD_ENRICHED_TABLE} does not exist at {path} -- remedy: run "
                                 "build_lakehouse (or pass --lake ROOT)") from exc
    frame = table.to_pandas()
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True)
    if "labelled_at" in frame.columns:
        frame["labelled_at"] = pd.to_datetime(frame["labelled_at"], utc=True)
    if since is not None:
        frame = frame[frame["event_time"] >= _utc(since)]
    if until is not None:
        frame = frame[frame["event_time"] < _utc(until)]
    return frame.sort_values(["event_time", "event_id"], kind="mergesort").reset_index(drop=True)


def _utc(value: Any) -> pd.Timestamp:
    import pandas as pd

    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def scores_from_file(frame: pd.DataFrame, path: str) -> np.ndarray:
    """The ``score`` of each row of ``frame``, joined by ``event_id`` from a parquet file (event_id, score)."""
    import pandas as pd

    given = pd.read_parquet(path)
    missing = [c for c in ("event_id", "score") if c not in given.columns]
    if missing:
        raise BacktestInputError(f"[scores] {path} lacks column(s) {missing} (needs event_id, score)")
    joined = frame[["event_id"]].merge(given[["event_id", "score"]].drop_duplicates("event_id"), on="event_id",
                                       how="left")
    absent = int(joined["score"].isna().sum())
    if absent == len(frame) and len(frame):
        raise BacktestInputError(f"[scores] {path} has no score for any of the {len(frame)} history rows "
                                 "(event_id mismatch?)")
    return joined["score"].to_numpy(dtype=np.float64)


def champion_scores(frame: pd.DataFrame, tracking_uri: str, model_name: str | None = None,
                    version: str | None = None) -> tuple[np.ndarray, Thresholds, dict[str, Any]]:
    """Score ``frame`` with a registered model version (default: the ``champion`` alias) from MLflow.

    Returns the scores, the thresholds its training run logged (``evaluation/thresholds.json``) and what was
    used (name, version, run id). :class:`BacktestInputError` names the layer and the remedy.
    """
    import mlflow.sklearn

    from decisionflow.constants import CHAMPION_ALIAS, MODEL_NAME
    from decisionflow.models.pipeline import MODEL
    from decisionflow.models.tracking import (
        import_skops,
        mlflow_client,
        read_thresholds,
        run_feature_columns,
        use_mlflow_server,
    )
    from decisionflow.models.training import predict_scores

    name = model_name or MODEL_NAME
    client = mlflow_client(tracking_uri)
    try:
        mv = (client.get_model_version(name, version) if version
              else client.get_model_version_by_alias(name, CHAMPION_ALIAS))
    except Exception as exc:  # noqa: BLE001 - MLflow raises RestException / MlflowException / connection errors
        which = f"version {version}" if version else f"alias @{CHAMPION_ALIAS}"
        raise BacktestInputError(f"[mlflow] {name} {which} not found at {tracking_uri}: {exc} -- remedy: train and "
                                 "promote a model (train_risk_model), or pass --scores / --tracking-uri") from exc
    run = client.get_run(mv.run_id)
    thresholds = read_thresholds(client, mv.run_id).get(MODEL)
    if thresholds is None:
        raise BacktestInputError(f"[mlflow] run {mv.run_id} of {name} v{mv.version} logged no model thresholds")
    import_skops()
    with use_mlflow_server(client):
        model = mlflow.sklearn.load_model(f"models:/{name}/{mv.version}")
    features = run_feature_columns(run) or [str(c) for c in getattr(model, "feature_names_in_", [])]
    absent = [c for c in features if c not in frame.columns]
    if absent:
        raise BacktestInputError(f"[lake] the history lacks the model's feature column(s) {absent}")
    scores = predict_scores(model, frame, features)
    return scores, thresholds, {"model_name": name, "model_version": str(mv.version), "model_run_id": mv.run_id}
