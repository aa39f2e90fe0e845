"""MLflow operators of the training loop: train and record a run, register it as challenger, run the gate.

Thin wrappers: the work is done by :mod:`decisionflow.models.pipeline`, :mod:`~decisionflow.models.tracking`
and :mod:`~decisionflow.models.registry`; pandas, scikit-learn, LightGBM and MLflow are imported in
``execute`` only, so DAG files that use these operators parse fast.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from decisionflow import constants
from decisionflow.exceptions import ParamsError
from decisionflow.operators.base import DecisionflowOperatorMixin

if TYPE_CHECKING:
    from airflow.sdk import Context

#: Tag holding a hash of a training task's inputs: a cleared task reuses its run only when they are unchanged.
FINGERPRINT_TAG = "decisionflow.input_fingerprint"

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


def _as_bool(value: Any, name: str) -> bool:
    """A templated flag: a bool, or its string rendering (``"True"``, ``"false"``, ``"1"``...)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ParamsError(f"{name} must be a boolean, got {value!r}")


def _as_mapping(value: Any, name: str) -> dict[str, Any]:
    """A templated dict: a mapping, a JSON object string (a template rendered to text) or ``None`` (empty)."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ParamsError(f"{name} must be a mapping or a JSON object, got {value!r}: {exc}") from exc
    if not isinstance(value, Mapping):
        raise ParamsError(f"{name} must be a mapping, got {type(value).__name__}")
    return dict(value)


def _xcom_safe(value: Any) -> Any:
    """``value`` with non-finite floats as ``None``: XComs travel as strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): _xcom_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_xcom_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _client(conn_id: str):
    from decisionflow.hooks.mlflow import MlflowHook

    return MlflowHook(mlflow_conn_id=conn_id).get_client()


class TrainRiskModelOperator(DecisionflowOperatorMixin, BaseOperator):
    """
    Train the transaction-risk model (calibrated LightGBM) and its logistic baseline, and record the run in MLflow.

    Reads the training set, runs :func:`decisionflow.models.pipeline.train_and_evaluate` (time split, both
    models, thresholds chosen on validation, holdout evaluation) and logs everything with
    :func:`decisionflow.models.tracking.log_training_run`: params, metrics, the model with signature and input
    example, plots, the holdout rows, thresholds and metrics as JSON, the feature service and lineage as tags.

    Idempotent per task instance: the run is tagged ``decisionflow.idempotency_key`` =
    ``"<dag_id>/<run_id>/<task_id>"`` (``/<map_index>`` for a mapped task) and a hash of the inputs. When the
    task is cleared and rerun, a ``FINISHED`` run with the same key and the same inputs is reused instead of
    training again; changed inputs (another config, path, lineage...) train a new run. Failed runs are never
    reused.

    Logs the holdout PR-AUC of the model and of the baseline and returns (XCom) a summary of the run:
    ``run_id``, ``experiment_id``, ``model_uri``, ``holdout_pr_auc``, ``baseline_holdout_pr_auc``,
    ``validation_pr_auc``, ``holdout_expected_cost``, ... (see :func:`decisionflow.models.tracking.run_summary`)
    and ``reused``.

    :param training_set_path: Parquet file (local path or fsspec URL pandas can read) with the feature columns,
        ``event_id``, a tz-aware ``event_timestamp`` and the ``is_fraud`` label (column names as in
        ``training_config``), e.g. the output of :func:`decisionflow.features.training_set.build_training_set`.
        (templated)
    :param experiment_name: MLflow experiment the run is recorded in; created when missing. (templated)
    :param feature_columns: Model inputs, in order. ``None`` (default) means every column of
        :data:`decisionflow.models.config.DEFAULT_FEATURE_COLUMNS` that the training set has (absent ones are
        logged as a warning). (templated)
    :param training_config: :class:`decisionflow.models.config.TrainingConfig` as a dict (or a JSON string),
        nested ``costs`` / ``lightgbm`` allowed; missing keys take their defaults, unknown keys fail the task.
        (templated)
    :param feature_service_name: Feast feature service the training set was built from, recorded as tag
        ``decisionflow.feature_service``. Defaults to ``risk_v1``. (templated)
    :param lineage: Where the data came from, recorded as ``lineage.<key>`` tags, e.g.
        ``{"delta.silver/labels.version": 12}`` (``TrainingSet.lineage()``). Dict or JSON string. (templated)
    :param shuffle_labels: Train on permuted training labels: a deliberately useless model for drills of the
        promotion gate (validation and holdout labels stay true). Bool or ``"true"``/``"false"``. Defaults to
        ``False``. (templated)
    :param mlflow_conn_id: Airflow connection of the MLflow server (type ``mlflow``). Defaults to
        ``mlflow_default``.
    """

    layer = "mlflow"

    template_fields: Sequence[str] = ("training_set_path", "experiment_name", "feature_columns", "training_config",
                                      "feature_service_name", "lineage", "shuffle_labels")
    ui_color = "#e3eefc"

    def __init__(
        self,
        *,
        training_set_path: str,
        experiment_name: str,
        feature_columns: list[str] | None = None,
        training_config: dict[str, Any] | str | None = None,
        feature_service_name: str = constants.FEATURE_SERVICE,
        lineage: dict[str, Any] | str | None = None,
        shuffle_labels: bool | str = False,
        mlflow_conn_id: str = "mlflow_default",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.training_set_path = training_set_path
        self.experiment_name = experiment_name
        self.feature_columns = feature_columns
        self.training_config = training_config
        self.feature_service_name = feature_service_name
        self.lineage = lineage
        self.shuffle_labels = shuffle_labels
        self.mlflow_conn_id = mlflow_conn_id

    def _task_identity(self, context: Context) -> dict[str, str]:
        ti = context.get("ti")
        dag_id = getattr(ti, "dag_id", None) or getattr(context.get("dag"), "dag_id", None)
        run_id = getattr(ti, "run_id", None) or context.get("run_id")
        if not dag_id or not run_id:
            raise ValueError("the task context has no dag_id / run_id (no 'ti' in the context?)")
        identity = {"dag_id": str(dag_id), "run_id": str(run_id), "task_id": self.task_id}
        map_index = getattr(ti, "map_index", -1)
        if isinstance(map_index, int) and map_index >= 0:
            identity["map_index"] = str(map_index)
        return identity

    def _features(self, frame) -> list[str]:
        from decisionflow.models.config import DEFAULT_FEATURE_COLUMNS
        from decisionflow.models.dataset import TrainingDataError

        if self.feature_columns:
            return list(self.feature_columns)
        features = [c for c in DEFAULT_FEATURE_COLUMNS if c in frame.columns]
        absent = [c for c in DEFAULT_FEATURE_COLUMNS if c not in frame.columns]
        if not features:
            raise TrainingDataError(f"training set {self.training_set_path} has none of the default feature columns "
                                    f"{list(DEFAULT_FEATURE_COLUMNS)}; columns present: {list(frame.columns)}")
        if absent:
            self.log.warning("training set lacks default feature column(s) %s; training on the other %d", absent,
                             len(features))
        return features

    def execute(self, context: Context) -> dict[str, Any]:
        import pandas as pd

        from decisionflow.models import tracking
        from decisionflow.models.config import TrainingConfig
        from decisionflow.models.pipeline import train_and_evaluate

        config = TrainingConfig.from_dict(_as_mapping(self.training_config, "training_config"))
        lineage = _as_mapping(self.lineage, "lineage")
        shuffle = _as_bool(self.shuffle_labels, "shuffle_labels")
        identity = self._task_identity(context)
        key = "/".join(identity[k] for k in ("dag_id", "run_id", "task_id", "map_index") if k in identity)
        inputs = {"training_set_path": str(self.training_set_path), "feature_columns": self.feature_columns,
                  "config": config.as_dict(), "feature_service": self.feature_service_name, "lineage": lineage,
                  "shuffle_labels": shuffle}
        fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:32]

        client = _client(self.mlflow_conn_id)
        run_id = tracking.find_run(client, self.experiment_name, key, fingerprint=fingerprint,
                                   fingerprint_tag=FINGERPRINT_TAG)
        reused = run_id is not None
        if reused:
            self.log.info("reusing finished MLflow run %s (same task instance %s, same inputs): not training again",
                          run_id, key)
        else:
            stale = tracking.find_run(client, self.experiment_name, key)
            if stale:
                self.log.warning("run %s of this task instance had other inputs; training a new run", stale)
            frame = pd.read_parquet(self.training_set_path)
            features = self._features(frame)
            self.log.info("training on %d rows x %d features from %s%s", len(frame), len(features),
                          self.training_set_path, " with SHUFFLED labels (degraded on purpose)" if shuffle else "")
            outcome = train_and_evaluate(frame, features, config, shuffle_labels=shuffle)
            tags = {
                tracking.FEATURE_SERVICE_TAG: self.feature_service_name,
                FINGERPRINT_TAG: fingerprint,
                "decisionflow.training_set_path": str(self.training_set_path),
                **{f"airflow.{k}": v for k, v in identity.items()},
            }
            run_id = tracking.log_training_run(client, self.experiment_name, outcome,
                                               run_name=f"{identity['task_id']} {identity['run_id']}", tags=tags,
                                               lineage=lineage, idempotency_key=key)
        summary = tracking.run_summary(client, run_id)
        summary["reused"] = reused
        summary["idempotency_key"] = key
        self.log.info("holdout PR-AUC: model %s, baseline %s (run %s, experiment %s)",
                      _fmt(summary.get("holdout_pr_auc")), _fmt(summary.get("baseline_holdout_pr_auc")), run_id,
                      self.experiment_name)
        return _xcom_safe(summary)


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


class RegisterModelOperator(DecisionflowOperatorMixin, BaseOperator):
    """
    Register the model of a training run as a version of a registered model and alias it ``challenger``.

    Idempotent (:func:`decisionflow.models.registry.register_challenger`): a run already registered under
    ``model_name`` reuses its version, so a cleared and rerun task never creates a duplicate. The registered model
    is created when missing. Returns (XCom) ``name``, ``version``, ``run_id``, ``source``, ``status``,
    ``created`` (``False`` when reused) and ``aliases``.

    :param run_id: MLflow run id of a ``FINISHED`` training run, usually
        ``"{{ ti.xcom_pull(task_ids='train')['run_id'] }}"``. (templated)
    :param model_name: Registered model name, e.g. ``transaction-risk``. (templated)
    :param artifact_path: Name the model was logged under in the run. Defaults to ``model``.
    :param mlflow_conn_id: Airflow connection of the MLflow server (type ``mlflow``). Defaults to
        ``mlflow_default``.
    """

    layer = "mlflow"

    template_fields: Sequence[str] = ("run_id", "model_name")
    ui_color = "#e3eefc"

    def __init__(self, *, run_id: str, model_name: str, artifact_path: str = "model",
                 mlflow_conn_id: str = "mlflow_default", **kwargs) -> None:
        super().__init__(**kwargs)
        self.run_id = run_id
        self.model_name = model_name
        self.artifact_path = artifact_path
        self.mlflow_conn_id = mlflow_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        from decisionflow.models.registry import register_challenger

        if not self.run_id or not isinstance(self.run_id, str):
            raise ValueError(f"run_id must be a non-empty MLflow run id, got {self.run_id!r}")
        registered = register_challenger(_client(self.mlflow_conn_id), self.model_name, self.run_id.strip(),
                                         artifact_path=self.artifact_path)
        self.log.info("model %s version %s (%s) from run %s is the challenger", registered.name, registered.version,
                      "new" if registered.created else "already registered, reused", registered.run_id)
        return registered.as_dict()


class PromotionGateOperator(DecisionflowOperatorMixin, BaseOperator):
    """
    Compare the ``challenger`` version of a registered model with the ``champion`` and promote it if it wins.

    Both are scored on the challenger's holdout, each with the thresholds its own run chose
    (:func:`decisionflow.models.registry.run_promotion_gate`); the challenger is promoted (alias ``champion``
    moved, version tagged ``decisionflow.promoted_at``) when its scores are sane and it beats the champion on
    ``metric`` by ``margin``, or when there is no champion yet. Otherwise the registry is left unchanged.

    The task succeeds whenever a decision is made, promoted or not; it fails only on errors (no challenger, a
    missing artifact, a feature the champion needs missing from the holdout...). It logs ``promoted: ...`` or
    ``not promoted: <reason>`` and returns (XCom) the decision (``promote``, ``reason``, ``metric``,
    ``challenger_value``, ``champion_value``, ``margin``, ``higher_is_better``, ``problems``) plus
    ``promoted`` (bool), ``challenger_version`` and ``champion_version`` (after the gate).

    :param model_name: Registered model name. (templated)
    :param metric: :class:`~decisionflow.models.metrics.Evaluation` field compared: ``pr_auc`` (default),
        ``roc_auc``, ``recall_at_review_budget``, ``expected_cost``, ``brier``, ``ece``; its direction is
        known. (templated)
    :param margin: How much better (absolute, in the metric's units) the challenger must be. Defaults to
        ``0.01``. (templated)
    :param mlflow_conn_id: Airflow connection of the MLflow server (type ``mlflow``). Defaults to
        ``mlflow_default``.
    """

    layer = "mlflow"

    template_fields: Sequence[str] = ("model_name", "metric", "margin")
    ui_color = "#e3eefc"

    def __init__(self, *, model_name: str, metric: str = "pr_auc", margin: float | str = 0.01,
                 mlflow_conn_id: str = "mlflow_default", **kwargs) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.metric = metric
        self.margin = margin
        self.mlflow_conn_id = mlflow_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        from decisionflow.models.registry import CHALLENGER, CHAMPION, model_aliases, run_promotion_gate

        try:
            margin = float(self.margin)
        except (TypeError, ValueError) as exc:
            raise ParamsError(f"margin must be a number, got {self.margin!r}") from exc
        client = _client(self.mlflow_conn_id)
        decision = run_promotion_gate(client, self.model_name, metric=self.metric, margin=margin)
        aliases = model_aliases(client, self.model_name)
        if decision.promote:
            self.log.info("%s", decision.reason)
        else:
            self.log.warning("%s", decision.reason)
        result = decision.as_dict()
        result.update(promoted=decision.promote, challenger_version=aliases.get(CHALLENGER),
                      champion_version=aliases.get(CHAMPION))
        return _xcom_safe(result)
