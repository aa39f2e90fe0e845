"""The decision run as a LangGraph ``StateGraph``: every node works on the whole batch, vectorised.

    load -> score -> retrieve -> decide -> escalate -> record -> act

* **load** - the gold transactions not decided yet (anti-join with ``gold/decisions``), with their point-in-time
  gold features (exactly the values the model was trained on), and the champion model version, *pinned* for the
  whole run (a promotion during the run changes nothing).
* **score** - the pinned version's probabilities.
* **retrieve** - similar past cases from Milvus for the rows where they can change the outcome or are wanted as
  evidence (:meth:`Policy.needs_similar_cases`), in batched hybrid searches, point-in-time.
* **decide** - the versioned policy: bands, hard rules, the similar-case rule, the review budget, actions.
* **escalate** - the cases the policy sent to review go to the brain (:mod:`decisionflow.decisions.agent`): a
  LangChain agent on the ``llm_default`` chat model, bound in code to what the policy allows for the case, or -
  without one - the policy itself. At most ``escalation.budget_per_run`` cases reach the agent, riskiest first
  (the rest go to human review by score). Each case's agent is checkpointed on its own thread (the decision id),
  so a retried run repeats no finished model or tool call. The cases still at review go to the review queue,
  where Airflow HITL tasks (``review_decisions``) pick them up.
* **record** - the audit rows (``gold/decisions``, MERGE by decision id) and the outbox rows, in that order.
* **act** - delivers the outbox (Kafka topic ``decisions``, the actions webhook), exactly once.

Nodes pass *files*, not frames: each writes its result as Parquet under the run's work dir and puts the path in
the state, so the checkpoint stays small however large the batch. The checkpointer (SQLite by default) is keyed
by the run (``thread_id``): a retried or cleared task resumes after the last finished node, and a run that has
finished does nothing when invoked again - no side effect is repeated. Within a node, every side effect is
idempotent on its own (MERGE by decision id, outbox read-back), because a node killed half-way starts again
from its beginning.

No Airflow here: the operator in :mod:`decisionflow.operators.decisions` builds a :class:`DecisionContext` from
connections and calls :func:`run_decisions`. The ``retrieve`` and ``decide`` nodes are thin wrappers of
:func:`retrieve_similar` and :func:`decide_frame`, which the online gateway (``POST /v1/decisions``) calls too: a
transaction gets the same similar cases and the same decision either way. Its decisions reach ``gold/decisions``
through the ``decisions`` topic (:mod:`decisionflow.decisions.online_import`, the ``import_online`` task that runs
before ``load``), so ``load``'s anti-join skips every transaction decided online.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

from decisionflow import constants
from decisionflow.exceptions import NonRetryableError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from decisionflow.decisions.policy import Policy, Thresholds

log = logging.getLogger(__name__)

NODES = ("load", "score", "retrieve", "decide", "escalate", "record", "act")

#: Columns of the gold transaction the decision keeps besides the features.
TRANSACTION_COLUMNS = ("event_id", "event_time", "account_id", "merchant_id", "amount", "currency", "mcc",
                       "channel", "country", "device_id", "ip", "memo")


class DecisionRunError(NonRetryableError, RuntimeError):
    """A decision run cannot go on; the message names the layer, the cause and the remedy.

    ``not_ready`` marks what a fresh platform lacks until the loop has run once (no gold table, no champion):
    the operator skips instead of failing, and nothing is decided.
    """

    def __init__(self, layer: str, cause: str, remedy: str, *, not_ready: bool = False):
        super().__init__(f"[{layer}] {cause} -- remedy: {remedy}")
        self.layer, self.cause, self.remedy, self.not_ready = layer, cause, remedy, not_ready


# -- what the graph needs from outside (ports) ---------------------------------------------------------------
@dataclass(frozen=True)
class PinnedModel:
    """The model version a run scores with, resolved once at its start."""

    name: str
    version: str
    run_id: str
    feature_columns: tuple[str, ...]
    review: float
    decline: float

    def thresholds(self) -> Thresholds:
        from decisionflow.decisions.policy import Thresholds

        return Thresholds(review=self.review, decline=self.decline)


class ModelSource(Protocol):
    def pin(self) -> PinnedModel:
        """The champion now; raises :class:`DecisionRunError` when there is none."""

    def scorer(self, pinned: PinnedModel) -> Callable[[pd.DataFrame], np.ndarray]:
        """A function scoring a frame with exactly ``pinned``'s version."""


def _is_missing(exc: Exception) -> bool:
    """An MLflow answer saying the model or alias does not exist (not: the server is down)."""
    code = getattr(exc, "error_code", "") or ""
    return "RESOURCE_DOES_NOT_EXIST" in code or "INVALID_PARAMETER_VALUE" in code


class MlflowModelSource:
    """The champion of the MLflow registry: version, training run, feature columns and the run's thresholds.

    ``version`` pins an exact registered version instead of the one behind ``alias`` (the serving gateway loads
    the version it is told to serve).
    """

    def __init__(self, tracking_uri: str, model_name: str = constants.MODEL_NAME,
                 alias: str = constants.CHAMPION_ALIAS, version: str | int | None = None):
        self.tracking_uri, self.model_name, self.alias = tracking_uri, model_name, alias
        self.version = None if version is None else str(version)

    def _client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def pin(self) -> PinnedModel:
        from decisionflow.models.tracking import MODEL, read_thresholds, run_feature_columns

        client = self._client()
        wanted = f"version {self.version}" if self.version is not None else f"'{self.alias}' version"
        try:
            mv = (client.get_model_version(self.model_name, self.version) if self.version is not None
                  else client.get_model_version_by_alias(self.model_name, self.alias))
        except Exception as exc:  # noqa: BLE001 - MlflowException for a missing model or alias, or no server
            raise DecisionRunError(
                "models", f"no {wanted} of {self.model_name} in the MLflow registry at "
                f"{self.tracking_uri} ({type(exc).__name__}: {str(exc)[:200]})",
                "run the train_risk_model DAG until a model is promoted (or check mlflow_default)",
                not_ready=_is_missing(exc)) from exc
        run = client.get_run(mv.run_id)
        thresholds = read_thresholds(client, mv.run_id).get(MODEL)
        if thresholds is None:
            raise DecisionRunError("models", f"{self.model_name} v{mv.version}: run {mv.run_id} has no model "
                                   "thresholds (evaluation/thresholds.json)", "retrain with train_risk_model")
        features = run_feature_columns(run)
        if not features:
            raise DecisionRunError("models", f"{self.model_name} v{mv.version}: run {mv.run_id} does not say "
                                   "which feature columns it takes (param feature_columns)",
                                   "retrain with train_risk_model")
        return PinnedModel(self.model_name, str(mv.version), mv.run_id, tuple(features),
                           float(thresholds.review), float(thresholds.decline))

    def scorer(self, pinned: PinnedModel) -> Callable[[pd.DataFrame], np.ndarray]:
        import mlflow.sklearn

        from decisionflow.models.tracking import import_skops, use_mlflow_server
        from decisionflow.models.training import predict_scores

        import_skops()
        with use_mlflow_server(self._client()):
            model = mlflow.sklearn.load_model(f"models:/{pinned.name}/{pinned.version}")
        columns = list(pinned.feature_columns)
        return lambda frame: predict_scores(model, frame, columns)


class InMemoryModelSource:
    """A fitted model held in memory (tests, the benchmark, a drill): ``pin()`` returns ``pinned``."""

    def __init__(self, model: Any, pinned: PinnedModel):
        self.model, self.pinned = model, pinned
        self.pins = 0  # how often a run asked: a resumed run must not ask again

    def pin(self) -> PinnedModel:
        self.pins += 1
        return self.pinned

    def scorer(self, pinned: PinnedModel) -> Callable[[pd.DataFrame], np.ndarray]:
        from decisionflow.models.training import predict_scores

        if pinned.version != self.pinned.version:
            raise DecisionRunError("models", f"version {pinned.version} is not loaded here "
                                   f"(have {self.pinned.version})", "pin again")
        columns = list(pinned.feature_columns)
        return lambda frame: predict_scores(self.model, frame, columns)


class SimilarCaseSource(Protocol):
    def search(self, rows: pd.DataFrame, k: int) -> list[list[dict[str, Any]]]:
        """Similar cases (JSON-safe dicts) of each row, point-in-time (notes created before its event_time)."""


class MilvusSimilarCases:
    """Similar cases from the Milvus ``case_notes`` collection, point in time.

    :param hybrid: ``True`` dense + BM25 fused by RRF, ``False`` dense only, ``None`` (default) hybrid for up to
        ``hybrid_max_queries`` distinct query texts and dense beyond: BM25 costs ~40-120 ms a query on Milvus Lite
        even batched, dense ~1-3 ms, so a large backlog would otherwise spend minutes in BM25. The mode used is
        in :attr:`last_mode` (and the run's summary).
    """

    def __init__(self, client_factory: Callable[[], Any], embedder_factory: Callable[[], Any],
                 collection: str = constants.CASE_NOTES_COLLECTION, batch_size: int = 200,
                 hybrid: bool | None = None, hybrid_max_queries: int = 300):
        self.client_factory, self.embedder_factory = client_factory, embedder_factory
        self.collection, self.batch_size = collection, batch_size
        self.hybrid, self.hybrid_max_queries = hybrid, hybrid_max_queries
        self.last_mode: str | None = None

    def search(self, rows: pd.DataFrame, k: int) -> list[list[dict[str, Any]]]:
        from decisionflow.vectors.search import CaseQuery, SimilarCaseSearch, query_text

        client = self.client_factory()
        try:
            search = SimilarCaseSearch(client, self.embedder_factory(), self.collection)
            records = rows.to_dict("records")
            queries = [CaseQuery(text=query_text(r), before=_as_datetime(r["event_time"]),
                                 exclude_event_id=r["event_id"]) for r in records]
            hybrid = self.hybrid
            if hybrid is None:
                hybrid = len({q.text for q in queries}) <= self.hybrid_max_queries
            self.last_mode = "hybrid" if hybrid else "dense"
            found = search.search(queries, k=k, batch_size=self.batch_size, hybrid=hybrid)
        finally:
            close = getattr(client, "close", None)
            if close is not None:
                close()
        return [[case.as_dict() for case in cases] for cases in found]


Deliverer = Callable[[Any], Mapping[str, Any]]  # (outbox) -> delivery report as a dict


@dataclass
class DecisionContext:
    """Everything a decision run needs: where the lake is, the policy, and the ports to the other layers.

    :param run_id: the Airflow run (also the checkpoint thread and the audit's ``run_id``).
    :param lake_root: the lake root (``lake_default``); ``storage_options`` for object stores.
    :param work_dir: where the nodes keep their Parquet results (one folder per run).
    :param policy: the loaded :class:`~decisionflow.decisions.policy.Policy`.
    :param models: where the champion comes from (:class:`MlflowModelSource`).
    :param similar: similar-case search, or ``None`` when no vector store is configured (the run then decides
        without the similar-case rule and says so in every affected audit row).
    :param deliverers: outbox channels, in order (Kafka, then the webhook).
    :param max_transactions: at most this many transactions per run (oldest first); the rest wait for the next.
    :param similar_k: similar cases per transaction.
    :param brain: who handles the escalated cases: an :class:`~decisionflow.decisions.agent.AgentBrain` (a chat
        model) or ``None`` for the :class:`~decisionflow.decisions.agent.PolicyBrain` (the policy decides).
    :param account_history: the agent's ``account_history`` tool (default: from the lake).
    :param checkpointer: set by :func:`run_decisions`: the agents' per-case threads live beside the run's.
    """

    run_id: str
    lake_root: str
    work_dir: Path
    policy: Policy
    models: ModelSource
    similar: SimilarCaseSource | None = None
    deliverers: Sequence[tuple[str, Deliverer]] = ()
    storage_options: dict[str, str] | None = None
    max_transactions: int | None = None
    similar_k: int = 5
    brain: Any = None
    account_history: Callable[[str, datetime], list[dict[str, Any]]] | None = None
    checkpointer: Any = None
    timings: dict[str, float] = field(default_factory=dict)


class DecisionState(TypedDict, total=False):
    run_id: str
    started_at: str
    model: dict[str, Any]
    gold_version: int
    transactions: int
    batch_path: str
    scores_path: str
    similar_path: str
    similar_summary: dict[str, Any]
    decisions_path: str
    mix: dict[str, int]
    escalated_path: str
    escalation: dict[str, Any]
    review_queued: int
    recorded: int
    enqueued: int
    delivery: dict[str, Any]
    timings: dict[str, float]


# -- helpers -------------------------------------------------------------------------------------------------
def _as_datetime(value: Any) -> datetime:
    import pandas as pd

    ts = pd.Timestamp(value)
    return (ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")).to_pydatetime()


def _write(frame: pd.DataFrame, path: Path) -> str:
    """Write atomically: a node killed mid-write leaves no half file for its rerun to trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return str(path)


def _read(path: str) -> pd.DataFrame:
    import pandas as pd

    return pd.read_parquet(path)


def _timed(ctx: DecisionContext, name: str, fn: Callable[[DecisionState], dict]) -> Callable[[DecisionState], dict]:
    def node(state: DecisionState) -> dict:
        t0 = time.perf_counter()
        out = fn(state)
        elapsed = time.perf_counter() - t0
        ctx.timings[name] = elapsed
        timings = dict(state.get("timings") or {})
        timings[name] = round(elapsed, 4)
        log.info("decision run %s: %s done in %.2fs", ctx.run_id, name, elapsed)
        return {**out, "timings": timings}
    node.__name__ = name
    return node


def feature_columns_json(frame: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """One JSON object per row with the feature values used (NaN as null)."""
    if frame.empty:
        return []
    text = frame[list(columns)].to_json(orient="records", lines=True, double_precision=10)
    return text.rstrip("\n").split("\n")


# -- the decision itself, shared by the batch run and the online gateway -------------------------------------
def retrieve_similar(similar: SimilarCaseSource | None, policy: Policy, frame: pd.DataFrame, scores: np.ndarray,
                     thresholds: Thresholds, k: int, *, run_id: str | None = None
                     ) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """
    Similar past cases for the rows of ``frame`` where the policy wants them (:meth:`Policy.needs_similar_cases`).

    The batch run's ``retrieve`` node and the online gateway (``POST /v1/decisions``) both call this, so a
    transaction gets the same evidence either way.

    :param similar: the similar-case search (:class:`MilvusSimilarCases`), or ``None`` when no vector store is
        configured: the rows that wanted a search say so in their ``similar_cases``.
    :param policy: the loaded policy.
    :param frame: the transactions (with their features), one row each.
    :param scores: the model's score of each row.
    :param thresholds: the pinned model's thresholds (:meth:`PinnedModel.thresholds`).
    :param k: similar cases per searched row.
    :param run_id: named in the log when the search fails.
    :return: ``(similar_cases, searched, summary)``: per row the ``similar_cases`` audit value (a JSON string:
        the list of cases, or ``{"searched": false, "reason": ...}``), per row whether a search was made and
        answered (bool array), and a summary ``{"wanted", "searched", "status": "ok" | "unavailable",
        "reason"?, "mode"?}``. A failed search never raises: the rows are decided without the similar-case rule
        and the audit and the log say why.
    """
    import numpy as np

    wanted = (policy.needs_similar_cases(frame, scores, thresholds) if len(frame)
              else np.zeros(0, dtype=bool))
    wanted = np.asarray(wanted, dtype=bool)
    found_cases = np.full(len(frame), None, dtype=object)
    summary: dict[str, Any] = {"wanted": int(wanted.sum()), "searched": 0, "status": "ok"}
    if wanted.any():
        if similar is None:
            summary.update(status="unavailable", reason="no vector store configured (milvus_default)")
        else:
            try:
                found = similar.search(frame.loc[wanted], k)
            except Exception as exc:  # noqa: BLE001 - degrade, never silently: the audit and the log say so
                summary.update(status="unavailable", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
                log.warning("[milvus] similar-case search failed for run %s: %s -- remedy: check that the "
                            "Milvus server of milvus_default is up and run sync_case_embeddings; deciding "
                            "without the similar-case rule", run_id, summary["reason"])
            else:
                found_cases[np.flatnonzero(wanted)] = [json.dumps(cases) for cases in found]
                summary["searched"] = int(wanted.sum())
                summary["mode"] = getattr(similar, "last_mode", None)
    not_searched = json.dumps({"searched": False, "reason": "not needed by the policy"})
    unavailable = json.dumps({"searched": False, "reason": f"unavailable: {summary.get('reason', '')}"})
    column = np.where(wanted & (found_cases == None), unavailable,  # noqa: E711 - elementwise on an object array
                      np.where(found_cases == None, not_searched, found_cases))  # noqa: E711
    searched = wanted & (summary["status"] == "ok")
    return [str(v) for v in column], np.asarray(searched, dtype=bool), summary


def decide_frame(policy: Policy, frame: pd.DataFrame, scores: np.ndarray, pinned: PinnedModel,
                 similar_cases: Sequence[str], searched: Sequence[bool] | np.ndarray, run_id: str,
                 decided_at: datetime | pd.Timestamp) -> pd.DataFrame:
    """
    The policy's decisions on ``frame`` as audit rows (the columns of ``gold/decisions`` before escalation,
    plus ``band``): exactly what the batch run's ``decide`` node writes, and what the online gateway returns.

    :param policy: the loaded policy (its name and version go into every row; the decision id is
        :func:`~decisionflow.decisions.audit.decision_id` of ``(event_id, policy.version)``).
    :param frame: the transactions with their features (the :data:`TRANSACTION_COLUMNS` used: ``event_id``,
        ``account_id``, ``merchant_id``, ``event_time``, ``amount``; plus ``pinned.feature_columns``).
    :param scores: the model's score of each row.
    :param pinned: the model version that scored them (name, version, run, feature columns, thresholds).
    :param similar_cases: per row, the ``similar_cases`` JSON from :func:`retrieve_similar`.
    :param searched: per row, whether the search was made (only then the similar-case rule applies).
    :param run_id: the audit's ``run_id`` (the Airflow run; ``"online"`` for the gateway).
    :param decided_at: when (UTC), the same for every row.
    :return: one row per transaction, in ``frame``'s order: ``decision_id, event_id, account_id, merchant_id,
        event_time, decided_at, run_id, decision, band, reason_codes, score, model_name, model_version,
        model_run_id, features, similar_cases, policy_name, policy_version, escalated, rationale, actions``.
        ``brain`` and ``escalation`` are not set here (the escalation step sets them).
    """
    import numpy as np
    import pandas as pd

    from decisionflow.decisions.audit import decision_ids

    scores = np.asarray(scores, dtype="float64")
    similar_cases = list(similar_cases)
    searched = np.asarray(searched, dtype=bool)
    if not (len(scores) == len(similar_cases) == len(searched) == len(frame)):
        raise ValueError(f"decide_frame: {len(frame)} transactions but {len(scores)} scores, "
                         f"{len(similar_cases)} similar_cases and {len(searched)} searched flags")
    similar_lists = [json.loads(s) if was_searched else None for s, was_searched in zip(similar_cases, searched)]
    result = policy.decide(frame, scores, pinned.thresholds(), similar=similar_lists)
    stamp = pd.Timestamp(decided_at)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    policy_version = policy.version
    return pd.DataFrame({
        "decision_id": decision_ids(frame["event_id"], policy_version),
        "event_id": frame["event_id"],
        "account_id": frame["account_id"],
        "merchant_id": frame["merchant_id"],
        "event_time": frame["event_time"],
        "decided_at": stamp,
        "run_id": run_id,
        "decision": result.decision,
        "band": result.band,
        "reason_codes": result.reason_codes,
        "score": scores,
        "model_name": pinned.name,
        "model_version": pinned.version,
        "model_run_id": pinned.run_id,
        "features": feature_columns_json(frame, list(dict.fromkeys([*pinned.feature_columns, "amount"]))),
        "similar_cases": pd.Series(similar_cases, index=frame.index, dtype=object),
        "policy_name": policy.name,
        "policy_version": policy_version,
        "escalated": np.asarray(result.escalated, dtype=bool),
        "rationale": result.rationale,
        "actions": result.actions,
    })


# -- the nodes -----------------------------------------------------------------------------------------------
def load_undecided(ctx: DecisionContext) -> tuple[pd.DataFrame, int]:
    """Gold transactions without a decision (any policy version), oldest first, and gold's Delta version."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    from decisionflow.decisions.audit import decided_event_ids
    from decisionflow.lakehouse.tables import join_path
    from decisionflow.models.config import GOLD_FEATURE_COLUMNS

    path = join_path(ctx.lake_root, constants.GOLD_ENRICHED_TABLE)
    try:
        gold = DeltaTable(path, storage_options=ctx.storage_options)
    except TableNotFoundError as exc:
        raise DecisionRunError("lakehouse", f"{constants.GOLD_ENRICHED_TABLE} does not exist at {path}",
                               "run ingest_transactions and build_lakehouse first", not_ready=True) from exc
    columns = list(dict.fromkeys([*TRANSACTION_COLUMNS, *GOLD_FEATURE_COLUMNS]))
    table = gold.to_pyarrow_table(columns=columns)
    decided = decided_event_ids(ctx.lake_root, storage_options=ctx.storage_options)
    if len(decided):
        decided_array = decided if isinstance(decided, (pa.Array, pa.ChunkedArray)) else pa.array(list(decided),
                                                                                                   pa.string())
        table = table.filter(pc.invert(pc.is_in(table["event_id"], value_set=decided_array)))
    frame = table.to_pandas()
    frame = frame.sort_values(["event_time", "event_id"], kind="stable").reset_index(drop=True)
    if ctx.max_transactions is not None and len(frame) > ctx.max_transactions:
        frame = frame.iloc[: ctx.max_transactions].reset_index(drop=True)
    return frame, gold.version()


def escalate_cases(ctx: DecisionContext, decisions: pd.DataFrame, batch: pd.DataFrame, pinned: PinnedModel
                   ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The escalation step on a decided batch: ``decisions`` with ``brain`` and ``escalation`` filled, and the
    escalated cases the brain resolved re-decided (decision, actions, reason codes, rationale); plus a summary.

    The brain's answer is already bound to the policy (the agent refuses what the policy does not allow, and its
    fallback is the policy's decision); the actions always come from the policy, never from the brain. Cases
    beyond the agent's budget keep ``review`` with ``ESCALATION_BUDGET``, riskiest first to the agent.
    """
    import numpy as np

    from decisionflow.decisions.agent import AgentPorts, CaseFile, PolicyBrain, write_escalations

    decisions = decisions.copy()
    decisions["brain"] = "policy"
    decisions["escalation"] = None
    brain = ctx.brain if ctx.brain is not None else PolicyBrain()
    escalated = np.flatnonzero(decisions["escalated"].to_numpy(dtype=bool))
    summary: dict[str, Any] = {"brain": getattr(brain, "name", type(brain).__name__), "escalated": len(escalated),
                               "to_brain": 0, "over_budget": 0, "accepted": 0, "refused": 0, "fallbacks": 0}
    if not len(escalated):
        return decisions, summary
    order = escalated[np.argsort(-decisions["score"].to_numpy()[escalated], kind="stable")]
    is_agent = getattr(brain, "name", "policy") != "policy"
    budget = ctx.policy.escalation.budget_per_run if is_agent else len(order)
    to_brain, over = order[:budget], order[budget:]
    summary.update(to_brain=len(to_brain), over_budget=len(over))

    decisions["reason_codes"] = decisions["reason_codes"].astype(object)
    decisions["actions"] = decisions["actions"].astype(object)
    if len(over):
        note = json.dumps({"brain": "policy", "reason": "escalation budget of the run used up "
                           f"({budget} cases); left for human review by score"})
        for at in decisions.index[over]:
            decisions.at[at, "reason_codes"] = [*decisions.at[at, "reason_codes"], "ESCALATION_BUDGET"]
            decisions.at[at, "escalation"] = note

    if not len(to_brain):
        return decisions, summary
    by_event = batch.set_index("event_id", drop=False)
    scorer_cache: dict[str, Callable] = {}

    def scorer(frame):
        if "fn" not in scorer_cache:
            scorer_cache["fn"] = ctx.models.scorer(pinned)
        return scorer_cache["fn"](frame)

    if ctx.account_history is not None:
        history = ctx.account_history
    else:
        from decisionflow.decisions.agent import account_history_from_lake

        history = account_history_from_lake(ctx.lake_root, storage_options=ctx.storage_options)
    ports = AgentPorts(scorer=scorer, similar=ctx.similar, account_history=history, policy=ctx.policy)
    if getattr(brain, "checkpointer", False) is None and ctx.checkpointer is not None:
        brain.checkpointer = ctx.checkpointer  # the agents' threads (decision ids) beside the run's own
    transaction_columns = [c for c in TRANSACTION_COLUMNS if c in batch.columns]
    results = []
    for i in to_brain:
        row = decisions.iloc[i]
        case = CaseFile.from_rows(row, by_event.loc[row["event_id"], transaction_columns].to_dict())
        result = brain.escalate(case, ports)
        results.append(result)
        codes = [str(c) for c in row["reason_codes"]]
        if result.reason_code:
            codes.append(result.reason_code)
            summary["accepted"] += 1
        elif result.chat_model:  # the agent was asked and its answer not applied: the policy's decision stands
            codes.append("AGENT_FALLBACK")
            summary["fallbacks"] += 1
        summary["refused"] += len(result.refused)
        at = decisions.index[i]
        decisions.at[at, "decision"] = result.decision
        decisions.at[at, "reason_codes"] = codes
        decisions.at[at, "actions"] = ctx.policy.actions_for(result.decision)
        decisions.at[at, "brain"] = result.brain
        decisions.at[at, "escalation"] = result.summary_json()
        if result.chat_model:
            decisions.at[at, "rationale"] = f"{row['rationale']}; escalation ({result.brain}): {result.rationale}"
    write_escalations(ctx.lake_root, results, ctx.run_id, [decisions.iloc[i]["event_id"] for i in to_brain],
                      storage_options=ctx.storage_options)
    return decisions, summary


def build_graph(ctx: DecisionContext):
    """The uncompiled ``StateGraph`` of one decision run (see the module docstring)."""
    import numpy as np
    import pandas as pd
    from langgraph.graph import END, START, StateGraph

    work = Path(ctx.work_dir)

    def load(state: DecisionState) -> dict:
        from decisionflow.features.transforms import add_on_demand_features

        pinned = ctx.models.pin()
        frame, gold_version = load_undecided(ctx)
        # Request-time features (Feast's on-demand view) by the same code the training set used, once for the
        # batch: score and decide read them from here.
        frame = add_on_demand_features(frame, pinned.feature_columns)
        log.info("decision run %s: %d undecided transactions (gold v%d), model %s v%s", ctx.run_id, len(frame),
                 gold_version, pinned.name, pinned.version)
        return {"model": asdict(pinned), "gold_version": gold_version, "transactions": len(frame),
                "batch_path": _write(frame, work / "batch.parquet")}

    def score(state: DecisionState) -> dict:
        pinned = PinnedModel(**{**state["model"], "feature_columns": tuple(state["model"]["feature_columns"])})
        frame = _read(state["batch_path"])
        scores = ctx.models.scorer(pinned)(frame) if len(frame) else np.zeros(0)
        out = pd.DataFrame({"event_id": frame["event_id"], "score": np.asarray(scores, dtype="float64")})
        return {"scores_path": _write(out, work / "scores.parquet")}

    def retrieve(state: DecisionState) -> dict:
        frame = _read(state["batch_path"])
        scores = _read(state["scores_path"])["score"].to_numpy()
        thresholds = PinnedModel(**{**state["model"], "feature_columns": ()}).thresholds()
        similar_cases, searched, summary = retrieve_similar(ctx.similar, ctx.policy, frame, scores, thresholds,
                                                            ctx.similar_k, run_id=ctx.run_id)
        out = pd.DataFrame({"event_id": frame["event_id"], "similar_cases": pd.Series(similar_cases, dtype=object),
                            "similar_searched": searched})
        return {"similar_path": _write(out, work / "similar.parquet"), "similar_summary": summary}

    def decide(state: DecisionState) -> dict:
        frame = _read(state["batch_path"])
        scores = _read(state["scores_path"])["score"].to_numpy()
        similar_frame = _read(state["similar_path"])
        pinned = PinnedModel(**{**state["model"], "feature_columns": tuple(state["model"]["feature_columns"])})
        out = decide_frame(ctx.policy, frame, scores, pinned, similar_frame["similar_cases"].tolist(),
                           similar_frame["similar_searched"].to_numpy(dtype=bool), ctx.run_id,
                           datetime.now(timezone.utc))
        mix = {k: int(v) for k, v in out["decision"].value_counts().items()}
        return {"decisions_path": _write(out, work / "decisions.parquet"), "mix": mix}

    def escalate(state: DecisionState) -> dict:
        from decisionflow.decisions.review_queue import enqueue_reviews

        decisions = _read(state["decisions_path"])
        batch = _read(state["batch_path"])
        pinned = PinnedModel(**{**state["model"], "feature_columns": tuple(state["model"]["feature_columns"])})
        decisions, summary = escalate_cases(ctx, decisions, batch, pinned)
        still_review = decisions["escalated"].to_numpy(dtype=bool) & (decisions["decision"] == "review").to_numpy()
        queued = enqueue_reviews(ctx.lake_root, decisions[still_review], ctx.run_id,
                                 storage_options=ctx.storage_options)
        mix = {k: int(v) for k, v in decisions["decision"].value_counts().items()}
        return {"escalated_path": _write(decisions, work / "escalated.parquet"), "escalation": summary,
                "review_queued": queued, "mix": mix}

    def record(state: DecisionState) -> dict:
        from decisionflow.decisions.audit import write_decisions
        from decisionflow.decisions.outbox import Outbox

        decisions = _read(state["escalated_path"]).drop(columns=["band"])
        recorded = write_decisions(ctx.lake_root, decisions, storage_options=ctx.storage_options)
        enqueued = Outbox(ctx.lake_root, storage_options=ctx.storage_options).enqueue(decisions, ctx.run_id)
        return {"recorded": recorded, "enqueued": enqueued}

    def act(state: DecisionState) -> dict:
        from decisionflow.decisions.outbox import Outbox

        outbox = Outbox(ctx.lake_root, storage_options=ctx.storage_options)
        delivery = {}
        for channel, deliver in ctx.deliverers:
            report = deliver(outbox)
            delivery[channel] = dict(report.as_dict() if hasattr(report, "as_dict") else report)
        return {"delivery": delivery}

    graph = StateGraph(DecisionState)
    steps = {"load": load, "score": score, "retrieve": retrieve, "decide": decide, "escalate": escalate,
             "record": record, "act": act}
    for name in NODES:
        graph.add_node(name, _timed(ctx, name, steps[name]))
    graph.add_edge(START, NODES[0])
    for a, b in zip(NODES, NODES[1:]):
        graph.add_edge(a, b)
    graph.add_edge(NODES[-1], END)
    return graph


def sqlite_checkpointer(path: str | Path):
    """A LangGraph SQLite saver on ``path`` (a context manager), the default checkpoint store."""
    from langgraph.checkpoint.sqlite import SqliteSaver

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return SqliteSaver.from_conn_string(str(path))


def run_decisions(ctx: DecisionContext, checkpointer: Any, thread_id: str | None = None) -> DecisionState:
    """Run (or resume) the decision graph of ``ctx.run_id`` and return its final state.

    A thread that already finished returns its final state and runs nothing again; one that stopped part-way
    resumes after its last finished node.
    """
    thread = thread_id or ctx.run_id
    ctx.checkpointer = checkpointer  # the agents' per-case threads (thread = decision id) live beside the run's
    graph = build_graph(ctx).compile(checkpointer=checkpointer)
    config = {"configurable": {"thread_id": thread}}
    snapshot = graph.get_state(config)
    if snapshot.values and not snapshot.next:
        log.info("decision run %s finished before (thread %s): nothing to do again", ctx.run_id, thread)
        return snapshot.values
    if snapshot.values:
        log.info("decision run %s resumes at %s (thread %s)", ctx.run_id, list(snapshot.next), thread)
        payload = None
    else:
        payload = {"run_id": ctx.run_id, "started_at": datetime.now(timezone.utc).isoformat(), "timings": {}}
    return graph.invoke(payload, config, durability="sync")
