"""Recording a training run in MLflow, and finding it again.

:func:`log_training_run` turns a :class:`~decisionflow.models.pipeline.TrainingOutcome` into one MLflow run:

* params - the :class:`~decisionflow.models.config.TrainingConfig` (flat, ``costs.review``, ``lightgbm.*``),
  ``feature_columns`` (a JSON list), the split summary (rows, positives, fraud rate and time range per split,
  the boundaries ``validation_start`` / ``holdout_start``), the chosen thresholds and ``shuffle_labels``;
* metrics - each model's evaluation on validation and holdout: ``holdout_pr_auc``, ``validation_expected_cost``,
  ``baseline_holdout_pr_auc``, ... Thresholds (which may be ``inf``) are not metrics: they are params and JSON;
  a metric that is NaN (a split with one class) is left out;
* tags - the caller's (e.g. ``decisionflow.feature_service``), the lineage as ``lineage.<key>`` (e.g.
  ``lineage.delta.silver/labels.version`` = ``"12"``), ``decisionflow.idempotency_key`` when given,
  ``decisionflow.shuffle_labels`` and ``decisionflow.model_id`` (the MLflow logged model);
* the model (``mlflow.sklearn``, artifact name ``model``, skops format) with a signature inferred from the
  holdout features and ``predict_proba``, an input example of a few holdout rows, and ``predict_proba`` as
  its pyfunc method;
* artifacts - ``plots/{pr_curve,calibration_curve,feature_importance}.png``, ``evaluation/holdout.parquet``
  (the holdout rows: id, time, features, label), ``evaluation/thresholds.json`` and ``evaluation/metrics.json``.

JSON artifacts hold only strict JSON: a non-finite float is written as the string ``"inf"``, ``"-inf"`` or
``"nan"`` (:func:`json_safe`; ``float()`` reads each back).

``mlflow`` is imported inside the functions only; no Airflow here.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from decisionflow.models.dataset import feature_matrix
from decisionflow.models.metrics import Thresholds
from decisionflow.models.pipeline import BASELINE, MODEL, TrainingOutcome

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

__all__ = [
    "FEATURE_SERVICE_TAG",
    "HOLDOUT_ARTIFACT",
    "IDEMPOTENCY_TAG",
    "METRICS_ARTIFACT",
    "MODEL_ARTIFACT_PATH",
    "THRESHOLDS_ARTIFACT",
    "ensure_experiment",
    "filter_literal",
    "find_run",
    "import_skops",
    "json_safe",
    "log_training_run",
    "mlflow_client",
    "read_holdout",
    "read_thresholds",
    "run_feature_columns",
    "run_summary",
    "use_mlflow_server",
]

IDEMPOTENCY_TAG = "decisionflow.idempotency_key"
FEATURE_SERVICE_TAG = "decisionflow.feature_service"
SHUFFLE_TAG = "decisionflow.shuffle_labels"
MODEL_ID_TAG = "decisionflow.model_id"
LINEAGE_PREFIX = "lineage."
MODEL_ARTIFACT_PATH = "model"
HOLDOUT_ARTIFACT = "evaluation/holdout.parquet"
THRESHOLDS_ARTIFACT = "evaluation/thresholds.json"
METRICS_ARTIFACT = "evaluation/metrics.json"
PLOTS_DIR = "plots"
INPUT_EXAMPLE_ROWS = 5

# Evaluation fields that are not metrics: the thresholds (may be inf) and the budget (a config param).
_NOT_METRICS = ("threshold_review", "threshold_decline", "review_budget")
# What loading the logged model needs (CalibratedClassifierCV(FrozenEstimator(LGBMClassifier)) in skops format):
# listed explicitly because MLflow's inference of requirements imports the model in a subprocess, slow on a
# busy box.
_MODEL_REQUIREMENTS = ("scikit-learn", "lightgbm", "numpy", "pandas", "scipy", "skops")
_MAX_TAG_VALUE = 5000


# -- helpers -------------------------------------------------------------------------------------------------
def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``"inf"`` / ``"-inf"`` / ``"nan"`` (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) or hasattr(value, "item"):  # numpy scalars too
        number = value.item() if hasattr(value, "item") else value
        if isinstance(number, float) and not math.isfinite(number):
            return "nan" if math.isnan(number) else ("inf" if number > 0 else "-inf")
        return number
    return str(value)


def _dump(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(payload), indent=2, sort_keys=True, allow_nan=False))


def mlflow_client(client_or_tracking_uri: Any) -> MlflowClient:
    """An ``MlflowClient``: ``client_or_tracking_uri`` itself, or one for that tracking (and registry) URI."""
    from mlflow import MlflowClient

    if isinstance(client_or_tracking_uri, MlflowClient):
        return client_or_tracking_uri
    if isinstance(client_or_tracking_uri, (str, os.PathLike)):
        uri = str(client_or_tracking_uri)
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    raise TypeError(f"expected an MlflowClient or a tracking URI, got {type(client_or_tracking_uri).__name__}")


@contextmanager
def use_mlflow_server(client: MlflowClient) -> Iterator[None]:
    """Point MLflow's fluent API (``mlflow.start_run``, ``mlflow.sklearn.log_model`` / ``load_model``) at the
    tracking and registry URIs of ``client`` for the duration of the block, then restore what was set.

    The fluent API only knows process-global URIs; this keeps a task from leaving them changed behind it.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env_keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {key: os.environ.get(key) for key in env_keys}
    saved = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None))
    mlflow.set_tracking_uri(client.tracking_uri)
    mlflow.set_registry_uri(client._registry_uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def filter_literal(value: str, what: str) -> str:
    """``value`` quoted for an MLflow search filter (which has no escapes: a value with both quotes is refused)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{what} {value!r} contains both quote characters; MLflow search filters cannot express it")


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """Id of experiment ``name``: created if missing, restored if deleted (idempotent)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"experiment name must be a non-empty string, got {name!r}")
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        from mlflow.exceptions import MlflowException

        try:
            return client.create_experiment(name, tags={"decisionflow.purpose": "risk-model-training"})
        except MlflowException:  # created concurrently by another task
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{"a.b": "value"}`` with every value as a string (MLflow tags are strings)."""
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(json_safe(value))
    return flat


def _requirements() -> list[str]:
    pins = []
    for dist in _MODEL_REQUIREMENTS:
        try:
            pins.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pins.append(dist)
    return pins


def import_skops() -> Any:
    """``skops.io``, imported with warnings silenced.

    On import skops looks for scipy's ufuncs in every loaded module; in an Airflow worker that touches
    Airflow's deprecated module shims, each of which warns (over a thousand lines in the task log). Call this
    before MLflow first saves or loads a model in skops format, which imports it otherwise.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import skops.io
    return skops.io


def _skops_trusted_types(model: Any) -> list[str]:
    """The types skops does not trust by default that ``model`` contains (LightGBM's, private sklearn ones).

    The model is saved in MLflow's default, safe ``skops`` format (no arbitrary code on load); the types it is
    made of, and only those, are recorded as trusted in its MLmodel file, so a tampered artifact bringing other
    types fails to load. They are computed from the model just trained in this process, never from a file.
    """
    skops_io = import_skops()
    return sorted(skops_io.get_untrusted_types(data=skops_io.dumps(model)))


def _metrics(outcome: TrainingOutcome) -> dict[str, float]:
    """Finite metrics, model ones as ``<split>_<name>``, baseline ones as ``baseline_<split>_<name>``."""
    out: dict[str, float] = {}
    for model_name, by_split in outcome.evaluations.items():
        lead = "" if model_name == MODEL else f"{model_name}_"
        for split_name, evaluation in by_split.items():
            for key, value in evaluation.as_dict().items():
                if key not in _NOT_METRICS and math.isfinite(value):
                    out[f"{lead}{split_name}_{key}"] = value
    return out


def _params(outcome: TrainingOutcome) -> dict[str, str]:
    params: dict[str, Any] = dict(outcome.config.as_params())
    params["feature_columns"] = json.dumps(list(outcome.feature_columns))
    params["n_features"] = len(outcome.feature_columns)
    params["shuffle_labels"] = outcome.shuffle_labels
    params.update(outcome.split.summary())
    for model_name, chosen in outcome.thresholds.items():
        lead = "" if model_name == MODEL else f"{model_name}_"
        params[f"{lead}threshold_review"] = json_safe(chosen.review)
        params[f"{lead}threshold_decline"] = json_safe(chosen.decline)
    return {key: str(json_safe(value)) for key, value in params.items()}


def _tags(outcome: TrainingOutcome, tags: Mapping[str, Any] | None, lineage: Mapping[str, Any] | None,
          idempotency_key: str | None) -> dict[str, str]:
    out = _flatten(tags or {})
    out.update(_flatten(lineage or {}, LINEAGE_PREFIX))
    out[SHUFFLE_TAG] = str(outcome.shuffle_labels).lower()
    out["decisionflow.model_kind"] = "calibrated-lightgbm"
    if idempotency_key is not None:
        if not isinstance(idempotency_key, str) or not idempotency_key:
            raise ValueError(f"idempotency_key must be a non-empty string, got {idempotency_key!r}")
        filter_literal(idempotency_key, "idempotency_key")  # refuse now what find_run could not search for
        out[IDEMPOTENCY_TAG] = idempotency_key
    note = (f"holdout PR-AUC {outcome.holdout.pr_auc:.4f} (baseline {outcome.baseline_holdout.pr_auc:.4f}), "
            f"expected cost {outcome.holdout.expected_cost:.4f} per transaction")
    if outcome.shuffle_labels:
        note = "DEGRADED on purpose: trained on shuffled labels. " + note
    out.setdefault("mlflow.note.content", note)
    return {key: value[:_MAX_TAG_VALUE] for key, value in out.items()}


def _write_artifacts(directory: Path, outcome: TrainingOutcome) -> None:
    from decisionflow.models.plots import write_evaluation_plots

    labels = outcome.holdout_frame[outcome.config.label_column].to_numpy()
    write_evaluation_plots(directory / PLOTS_DIR, labels,
                           {"lightgbm": outcome.holdout_scores[MODEL], "baseline": outcome.holdout_scores[BASELINE]},
                           outcome.importance)
    evaluation = directory / "evaluation"
    evaluation.mkdir(parents=True, exist_ok=True)
    outcome.holdout_frame.to_parquet(directory / HOLDOUT_ARTIFACT, index=False)
    _dump(directory / THRESHOLDS_ARTIFACT, {
        **{name: {"review": t.review, "decline": t.decline} for name, t in outcome.thresholds.items()},
        "chosen_on": "validation",
        "costs": outcome.config.costs.as_dict(),
        "review_budget": outcome.config.review_budget,
    })
    _dump(directory / METRICS_ARTIFACT, {
        name: {split: e.as_dict() for split, e in by_split.items()} for name, by_split in outcome.evaluations.items()
    })


# -- logging -------------------------------------------------------------------------------------------------
def log_training_run(client_or_tracking_uri: Any, experiment_name: str, outcome: TrainingOutcome, *,
                     run_name: str, tags: Mapping[str, Any] | None = None, lineage: Mapping[str, Any] | None = None,
                     idempotency_key: str | None = None) -> str:
    """Record ``outcome`` as one finished MLflow run of ``experiment_name`` (created if missing); its run id.

    What is recorded is listed in the module docstring. ``tags`` are set as given (non-string values as JSON),
    ``lineage`` under ``lineage.<key>`` (nested mappings joined with dots). ``idempotency_key`` is stored as
    tag ``decisionflow.idempotency_key`` so :func:`find_run` can find the run again. The run ends ``FINISHED``
    only once everything is logged; an error on the way leaves it ``FAILED`` (which :func:`find_run` ignores).
    """
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature

    client = mlflow_client(client_or_tracking_uri)
    experiment_id = ensure_experiment(client, experiment_name)
    run_tags = _tags(outcome, tags, lineage, idempotency_key)
    features = feature_matrix(outcome.holdout_frame, outcome.feature_columns)
    signature = infer_signature(features, outcome.model.predict_proba(features))

    with use_mlflow_server(client), tempfile.TemporaryDirectory(prefix="decisionflow-run-") as tmp:
        _write_artifacts(Path(tmp), outcome)
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=run_tags) as run:
            run_id = run.info.run_id
            mlflow.log_params(_params(outcome))
            info = mlflow.sklearn.log_model(
                outcome.model,
                name=MODEL_ARTIFACT_PATH,
                signature=signature,
                input_example=features.head(INPUT_EXAMPLE_ROWS),
                pyfunc_predict_fn="predict_proba",
                pip_requirements=_requirements(),
                serialization_format="skops",
                skops_trusted_types=_skops_trusted_types(outcome.model),
            )
            mlflow.set_tag(MODEL_ID_TAG, info.model_id)
            mlflow.log_metrics(_metrics(outcome))
            mlflow.log_artifacts(str(Path(tmp) / PLOTS_DIR), PLOTS_DIR)
            mlflow.log_artifacts(str(Path(tmp) / "evaluation"), "evaluation")
    return run_id


# -- reading back ------------------------------------------------------------------------------------------
def find_run(client: MlflowClient, experiment_name: str, idempotency_key: str, *,
             fingerprint: str | None = None, fingerprint_tag: str = "decisionflow.input_fingerprint") -> str | None:
    """Id of the newest ``FINISHED`` run of ``experiment_name`` tagged ``decisionflow.idempotency_key`` =
    ``idempotency_key`` (and, when ``fingerprint`` is given, tagged ``fingerprint_tag`` = ``fingerprint``);
    ``None`` when there is none (or no such experiment). Failed, running and deleted runs never match.
    """
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        return None
    conditions = [f"tags.`{IDEMPOTENCY_TAG}` = {filter_literal(idempotency_key, 'idempotency_key')}",
                  "attributes.status = 'FINISHED'"]
    if fingerprint is not None:
        conditions.append(f"tags.`{fingerprint_tag}` = {filter_literal(fingerprint, 'fingerprint')}")
    runs = client.search_runs([experiment.experiment_id], filter_string=" and ".join(conditions),
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def run_feature_columns(run: Any) -> list[str] | None:
    """The ``feature_columns`` param of a run logged by :func:`log_training_run`, or ``None``."""
    raw = run.data.params.get("feature_columns")
    return None if raw is None else list(json.loads(raw))


def _download(client: MlflowClient, run_id: str, path: str, directory: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        local = client.download_artifacts(run_id, path, directory)
    except (MlflowException, OSError) as exc:
        raise FileNotFoundError(f"run {run_id} has no artifact {path!r} (was it logged by log_training_run?): "
                                f"{exc}") from exc
    if not os.path.exists(local):
        raise FileNotFoundError(f"run {run_id} has no artifact {path!r}")
    return local


def read_thresholds(client: MlflowClient, run_id: str) -> dict[str, Thresholds]:
    """The thresholds of ``evaluation/thresholds.json`` of a run, per model (``model``, ``baseline``)."""
    with tempfile.TemporaryDirectory(prefix="decisionflow-thr-") as tmp:
        payload = json.loads(Path(_download(client, run_id, THRESHOLDS_ARTIFACT, tmp)).read_text())
    return {name: Thresholds(review=float(payload[name]["review"]), decline=float(payload[name]["decline"]))
            for name in (MODEL, BASELINE) if name in payload}


def read_holdout(client: MlflowClient, run_id: str) -> pd.DataFrame:
    """The holdout rows of a run (``evaluation/holdout.parquet``)."""
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="decisionflow-holdout-") as tmp:
        return pd.read_parquet(_download(client, run_id, HOLDOUT_ARTIFACT, tmp))


def run_summary(client: MlflowClient, run_id: str) -> dict[str, Any]:
    """A small JSON-serialisable summary of a training run (e.g. an XCom): ids, model URI, headline metrics.

    Missing metrics are ``None``.
    """
    run = client.get_run(run_id)
    metrics = run.data.metrics
    headline = ("holdout_pr_auc", "baseline_holdout_pr_auc", "validation_pr_auc", "holdout_roc_auc",
                "holdout_recall_at_review_budget", "holdout_expected_cost", "baseline_holdout_expected_cost",
                "holdout_ece")
    return {
        "run_id": run_id,
        "experiment_id": run.info.experiment_id,
        "status": run.info.status,
        "model_uri": f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}",
        "model_id": run.data.tags.get(MODEL_ID_TAG),
        "feature_columns": run_feature_columns(run),
        "shuffle_labels": run.data.tags.get(SHUFFLE_TAG) == "true",
        **{name: metrics.get(name) for name in headline},
    }
