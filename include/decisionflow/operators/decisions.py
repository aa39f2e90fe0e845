"""Decision operators: import the online decisions, run the decision graph over undecided transactions; score the
decisions against labels."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from decisionflow import constants
from decisionflow.operators.base import DecisionflowOperatorMixin

if TYPE_CHECKING:
    from airflow.sdk import Asset, Context

#: The policy shipped with the project (package data).
DEFAULT_POLICY = str(Path(__file__).resolve().parents[1] / "policies" / "transaction_risk.yaml")


#: Partitions of a new ``decisions`` topic (keyed by decision id).
DECISIONS_TOPIC_PARTITIONS = 3


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:200]


def outbox_deliverers(kafka_conn_id: str, webhook_conn_id: str, log: Any) -> tuple[list, Any]:
    """The outbox's channels from connections, in order: Kafka topic ``decisions`` (created with
    :data:`DECISIONS_TOPIC_PARTITIONS` when missing), then the actions webhook when its connection exists; and
    the :class:`~decisionflow.hooks.kafka.KafkaHook` (for other topics of the same cluster)."""
    from decisionflow.decisions.outbox import deliver_kafka, deliver_webhook
    from decisionflow.hooks.kafka import KafkaHook
    from decisionflow.hooks.webhook import webhook_url

    # The connection's librdkafka settings; the outbox adds its own producer/consumer settings on top.
    hook = KafkaHook(kafka_config_id=kafka_conn_id)
    kafka_config = dict(hook.config)
    channels = [("kafka", lambda outbox: deliver_kafka(
        outbox, kafka_config, topic=constants.DECISIONS_TOPIC,
        ensure_topic=lambda topic: hook.ensure_topic(topic, DECISIONS_TOPIC_PARTITIONS)))]
    url, headers = webhook_url(webhook_conn_id, log)
    if url:
        channels.append(("webhook", lambda outbox: deliver_webhook(outbox, url, headers=headers)))
    return channels, hook


class DecisionRunOperator(DecisionflowOperatorMixin, BaseOperator):
    """
    Decide every gold transaction that has no decision yet, once: the LangGraph decision graph
    (:mod:`decisionflow.decisions.graph`) with a checkpoint per Airflow run.

    Clearing or retrying the task resumes the run's graph after its last finished node; a finished run does
    nothing again. The audit rows (``gold/decisions``) and the outbox make every side effect happen once.

    :param policy_path: the policy YAML file (default: the shipped ``policies/transaction_risk.yaml``).
    :param lake_conn_id: ``delta_lake`` connection whose root holds gold and the decision tables.
    :param mlflow_conn_id: MLflow connection; the run pins its registry's ``champion`` version at the start.
    :param milvus_conn_id: Milvus connection of the ``case_notes`` collection; a missing connection or an
        unreachable server degrades to deciding without the similar-case rule, saying so in every affected audit
        row and in the log.
    :param kafka_conn_id: Kafka connection the ``decisions`` topic is written through.
    :param webhook_conn_id: HTTP connection of the actions webhook (``host`` a URL, or host/port/schema; extra
        ``endpoint``, default ``actions``; ``password`` a bearer token); when it does not exist the webhook
        channel is off (logged).
    :param llm_conn_id: the chat model of the escalation agent (``llm_default``: provider, model, base URL,
        key; see :class:`~decisionflow.hooks.llm.LlmHook`). When the connection does not exist, the policy
        decides the escalated cases itself and every audit row says so (``brain = policy``).
    :param max_transactions: decide at most this many transactions (oldest first); the rest wait for the next
        run. ``None``: all of them.
    :param similar_k: similar cases kept per transaction.
    :param decisions_asset: the asset whose event carries the run's summary (mix, model and policy versions).
    :param checkpoint_path: the SQLite checkpoint file (default ``$DECISIONFLOW_DATA/decisions/checkpoints.sqlite``).
    """

    layer = "decisions"

    template_fields = ("max_transactions", "policy_path")

    def __init__(self, *, policy_path: str = DEFAULT_POLICY, lake_conn_id: str = "lake_default",
                 mlflow_conn_id: str = "mlflow_default", milvus_conn_id: str = "milvus_default",
                 kafka_conn_id: str = "kafka_default", webhook_conn_id: str = constants.ACTIONS_WEBHOOK_CONN_ID,
                 llm_conn_id: str = constants.LLM_CONN_ID, max_transactions: int | str | None = None, similar_k: int = 5,
                 decisions_asset: Asset | None = None, checkpoint_path: str | None = None, **kwargs) -> None:
        if decisions_asset is not None:
            kwargs["outlets"] = [*kwargs.get("outlets", []), decisions_asset]
        super().__init__(**kwargs)
        self.policy_path = policy_path
        self.lake_conn_id = lake_conn_id
        self.mlflow_conn_id = mlflow_conn_id
        self.milvus_conn_id = milvus_conn_id
        self.kafka_conn_id = kafka_conn_id
        self.webhook_conn_id = webhook_conn_id
        self.llm_conn_id = llm_conn_id
        self.max_transactions = max_transactions
        self.similar_k = similar_k
        self.decisions_asset = decisions_asset
        self.checkpoint_path = checkpoint_path

    # -- wiring ---------------------------------------------------------------------------------------------
    def _similar_source(self):
        from decisionflow.decisions.graph import MilvusSimilarCases
        from decisionflow.hooks.milvus import MilvusHook
        from decisionflow.vectors.embedders import embedder_from_config

        try:
            hook = MilvusHook(self.milvus_conn_id)
            hook.uri  # noqa: B018 - resolves the connection now: a missing one is reported here
        except Exception as exc:  # noqa: BLE001
            self.log.warning("[milvus] connection %s unusable (%s): deciding without similar cases -- remedy: "
                             "define it (see airflow_settings.yaml)", self.milvus_conn_id, exc)
            return None
        from decisionflow import config

        cache = config.data_dir() / "embeddings"
        return MilvusSimilarCases(hook.get_client, lambda: embedder_from_config(cache_dir=cache))

    def execute(self, context: Context) -> dict[str, Any]:
        from decisionflow import config
        from decisionflow.decisions.graph import (
            DecisionContext,
            MlflowModelSource,
            run_decisions,
            sqlite_checkpointer,
        )
        from decisionflow.decisions.policy import Policy
        from decisionflow.hooks.lake import LakeHook
        from decisionflow.hooks.llm import brain_from_connection
        from decisionflow.hooks.mlflow import MlflowHook

        dag_id, run_id = context["dag"].dag_id, context["run_id"]
        lake = LakeHook(self.lake_conn_id)
        policy = Policy.load(self.policy_path)
        try:
            max_transactions = (int(self.max_transactions) if self.max_transactions not in (None, "", "None")
                                else None)
        except (TypeError, ValueError) as exc:
            from decisionflow.exceptions import ParamsError

            raise ParamsError(f"max_transactions must be an integer or empty, got {self.max_transactions!r}") from exc
        ctx = DecisionContext(
            run_id=run_id, lake_root=lake.root, storage_options=lake.storage_options or None,
            work_dir=config.data_dir() / "decisions" / "runs" / _safe(f"{dag_id}__{run_id}"),
            policy=policy, models=MlflowModelSource(MlflowHook(self.mlflow_conn_id).tracking_uri),
            similar=self._similar_source(),
            deliverers=outbox_deliverers(self.kafka_conn_id, self.webhook_conn_id, self.log)[0],
            max_transactions=max_transactions, similar_k=self.similar_k,
            brain=brain_from_connection(self.llm_conn_id),
        )
        checkpoints = self.checkpoint_path or str(config.data_dir() / "decisions" / "checkpoints.sqlite")
        # DecisionRunError is a NonRetryableError: the operator base fails the task without retries (the same
        # cause fails the same way on every try); one with not_ready (a fresh stack: no gold or no champion yet)
        # becomes a skip -- nothing is decided, never a silent approve, and the transactions wait for the run that
        # follows the first promotion (the DAG runs on it).
        with sqlite_checkpointer(checkpoints) as saver:
            state = run_decisions(ctx, saver, thread_id=f"{dag_id}/{run_id}")
        summary = {
            "run_id": run_id, "transactions": state.get("transactions", 0), "mix": state.get("mix", {}),
            "recorded": state.get("recorded", 0), "review_queued": state.get("review_queued", 0),
            "model": {k: state["model"][k] for k in ("name", "version", "run_id")} if state.get("model") else None,
            "policy": {"name": policy.name, "version": policy.version}, "gold_version": state.get("gold_version"),
            "similar_cases": state.get("similar_summary"), "escalation": state.get("escalation"),
            "delivery": state.get("delivery", {}),
            "timings": state.get("timings", {}),
        }
        self.log.info("decided %s transactions: %s; delivery %s", summary["transactions"], summary["mix"],
                      summary["delivery"])
        if self.decisions_asset is not None:
            context["outlet_events"][self.decisions_asset].extra = {
                k: summary[k] for k in ("run_id", "transactions", "mix", "model", "policy", "gold_version")}
        return summary


class ImportOnlineDecisionsOperator(DecisionflowOperatorMixin, BaseOperator):
    """
    Bring the decisions the online gateway made (``POST /v1/decisions``, published to the ``decisions`` topic
    with the header ``origin: online``) into the audit trail ``gold/decisions``, exactly once
    (:func:`decisionflow.decisions.online_import.import_online_decisions`).

    Reads the topic from the offsets stored in the Delta commit of ``gold/decisions`` itself and commits the new
    rows and the new offsets in one Delta commit, so a killed or retried task neither loses nor duplicates a
    decision. A decision id already in the table (decided by a batch run, imported before, or re-sent) stays one
    row; the ``review`` decisions go to the review queue (``review_decisions`` raises their HITL tasks); a
    malformed record goes to ``quarantine/online_decisions`` with its topic/partition/offset and the reason (the
    task logs it and goes on: one bad record never blocks the decision run). Run it before the batch decides:
    its anti-join then never decides again a transaction decided online.

    :param lake_conn_id: ``delta_lake`` connection whose root holds ``gold/decisions`` and the review queue.
    :param kafka_conn_id: Kafka connection the ``decisions`` topic is read through (the connection's librdkafka
        settings; the import uses a throwaway group id and commits nothing to Kafka).
    :param topic: the topic the gateway publishes to (created with :data:`DECISIONS_TOPIC_PARTITIONS`
        partitions when missing, like the outbox does).
    :param max_records: records read per chunk; each chunk is one Delta commit (bounds memory and what a
        killed task re-reads).
    :param read_timeout: seconds for broker calls, and the longest wait without progress towards the end offsets
        taken at the start; then what was read is committed and the task fails (the downstream ``decide`` must
        not run on an incomplete import), its retry going on from the committed offsets.
    """

    layer = "decisions"

    template_fields = ("topic",)

    def __init__(self, *, lake_conn_id: str = "lake_default", kafka_conn_id: str = "kafka_default",
                 topic: str = constants.DECISIONS_TOPIC, max_records: int = 100_000, read_timeout: float = 120.0,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.lake_conn_id = lake_conn_id
        self.kafka_conn_id = kafka_conn_id
        self.topic = topic
        self.max_records = max_records
        self.read_timeout = read_timeout

    def execute(self, context: Context) -> dict[str, Any]:
        from decisionflow.decisions.online_import import import_online_decisions
        from decisionflow.hooks.kafka import KafkaHook
        from decisionflow.hooks.lake import LakeHook

        lake = LakeHook(self.lake_conn_id)
        hook = KafkaHook(kafka_config_id=self.kafka_conn_id)
        report = import_online_decisions(
            lake.root, dict(hook.config), self.topic, storage_options=lake.storage_options or None,
            ensure_topic=lambda topic: hook.ensure_topic(topic, DECISIONS_TOPIC_PARTITIONS),
            max_records=self.max_records, timeout=self.read_timeout)
        if report.quarantined:
            self.log.warning("%d malformed online decision record(s) quarantined to quarantine/online_decisions: "
                             "%s -- remedy: fix the publisher (the gateway), then replay them from the quarantine",
                             report.quarantined, report.errors[:5])
        self.log.info("online decisions: %d imported, %d already recorded, %d queued for review (%d records read)",
                      report.imported, report.already_recorded, report.review_queued, report.read)
        if not report.complete:
            from decisionflow.decisions.online_import import OnlineImportError

            raise OnlineImportError(
                f"[online import] topic {self.topic} was not read to its end ({'; '.join(report.errors[:3])}); what "
                f"was read is committed ({report.imported} imported), but the batch run must not decide yet: it could "
                "decide again a transaction decided online -- remedy: check the broker (kafka_default); the retry "
                "goes on from the committed offsets")
        return report.as_dict()


class EvaluateDecisionsOperator(DecisionflowOperatorMixin, BaseOperator):
    """
    Score the decisions made so far against the labels known now (and, on generated data, the generator's
    hidden truth), beside two baselines -- approve everything, and the model's thresholds alone -- and log an
    evaluation run to MLflow, tagged with the model and policy versions.

    :param lake_conn_id: ``delta_lake`` connection (``gold/decisions``, ``gold/transactions_enriched``).
    :param mlflow_conn_id: MLflow connection of the evaluation experiment.
    :param policy_path: the policy whose costs price the outcomes (default: the shipped policy).
    :param truth_glob: generator truth files (JSON lines) to score against too, relative to the data dir;
        none found means labels only.
    :param experiment: MLflow experiment of the evaluation runs.
    """

    layer = "decisions"

    def __init__(self, *, lake_conn_id: str = "lake_default", mlflow_conn_id: str = "mlflow_default",
                 policy_path: str = DEFAULT_POLICY, truth_glob: str = "generator/truth*.jsonl",
                 experiment: str = constants.DECISION_EVALUATION_EXPERIMENT, **kwargs) -> None:
        super().__init__(**kwargs)
        self.lake_conn_id = lake_conn_id
        self.mlflow_conn_id = mlflow_conn_id
        self.policy_path = policy_path
        self.truth_glob = truth_glob
        self.experiment = experiment

    def execute(self, context: Context) -> dict[str, Any]:
        from decisionflow import config
        from decisionflow.decisions.evaluation import evaluate_decisions, log_evaluation
        from decisionflow.decisions.policy import Policy
        from decisionflow.hooks.lake import LakeHook
        from decisionflow.hooks.mlflow import MlflowHook

        from decisionflow.models.tracking import MODEL, read_thresholds

        lake = LakeHook(self.lake_conn_id)
        policy = Policy.load(self.policy_path)
        truth = sorted(config.data_dir().glob(self.truth_glob))
        client = MlflowHook(self.mlflow_conn_id).get_client()
        report = evaluate_decisions(lake.root, policy, lambda run_id: read_thresholds(client, run_id)[MODEL],
                                    storage_options=lake.storage_options or None, truth_paths=truth)
        self.log.info("decision quality:\n%s", report.format())
        run_id = log_evaluation(client, self.experiment, report, airflow_run_id=context["run_id"])
        return {**report.as_dict(), "mlflow_run_id": run_id}


def summary_line(summary: Mapping[str, Any]) -> str:
    """One line for logs and the demo: how many, the mix, model and policy."""
    mix = ", ".join(f"{k} {v}" for k, v in sorted((summary.get("mix") or {}).items()))
    model = summary.get("model") or {}
    policy = summary.get("policy") or {}
    return (f"{summary.get('transactions', 0)} decided ({mix or 'none'}) with {model.get('name')} "
            f"v{model.get('version')} and policy {policy.get('name')} {policy.get('version')}")
