"""The model registry side of the loop: register a trained run as the challenger, and the promotion gate.

Two aliases of one registered model carry the state:

* ``challenger`` - the newest candidate, set by :func:`register_challenger`;
* ``champion`` - the version that serves, moved only by :func:`run_promotion_gate` when the challenger wins.

The gate scores *both* models on the challenger's holdout (``evaluation/holdout.parquet`` of its run), each with
the policy thresholds its own run chose on validation (``evaluation/thresholds.json``), and applies
:func:`~decisionflow.models.promotion.decide_promotion`. A challenger that is not promoted changes nothing in
the registry: no alias, no tag.

``mlflow`` is imported inside the functions only; no Airflow here.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from decisionflow import constants
from decisionflow.models.config import CostModel, TrainingConfig
from decisionflow.models.dataset import label_array
from decisionflow.models.metrics import Evaluation, evaluate
from decisionflow.models.pipeline import MODEL
from decisionflow.models.promotion import HIGHER_IS_BETTER, PromotionDecision, decide_promotion
from decisionflow.models.tracking import (
    FEATURE_SERVICE_TAG,
    LINEAGE_PREFIX,
    MODEL_ARTIFACT_PATH,
    filter_literal,
    import_skops,
    read_holdout,
    read_thresholds,
    run_feature_columns,
    use_mlflow_server,
)
from decisionflow.models.training import predict_scores

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "ModelGateError",
    "RegisteredVersion",
    "model_aliases",
    "register_challenger",
    "run_promotion_gate",
]

log = logging.getLogger(__name__)

CHALLENGER = constants.CHALLENGER_ALIAS
CHAMPION = constants.CHAMPION_ALIAS
PROMOTED_AT_TAG = "decisionflow.promoted_at"
PROMOTION_REASON_TAG = "decisionflow.promotion_reason"
REPLACED_VERSION_TAG = "decisionflow.replaced_version"

MODEL_DESCRIPTION = (
    "decisionflow transaction-risk model: calibrated LightGBM returning the fraud probability "
    "(pyfunc predict = predict_proba). Alias 'champion' serves; alias 'challenger' is the newest candidate, "
    "promoted only by the promotion gate (same holdout, own validation thresholds, metric margin)."
)
_READY_TIMEOUT = 300.0


class ModelGateError(RuntimeError):
    """The registry is not in a state the gate or the registration can work with; the message says why."""


@dataclass(frozen=True)
class RegisteredVersion:
    """One model version as :func:`register_challenger` left it. ``created`` is ``False`` when it was reused."""

    name: str
    version: str
    run_id: str
    source: str
    status: str
    created: bool
    aliases: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable (e.g. an XCom)."""
        out = asdict(self)
        out["aliases"] = list(self.aliases)
        return out


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", ""))


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" not in _error_code(exc):
            raise
    try:
        client.create_registered_model(name, description=MODEL_DESCRIPTION,
                                       tags={"decisionflow.purpose": "transaction-risk"})
    except MlflowException as exc:  # created concurrently
        if "ALREADY_EXISTS" not in _error_code(exc):
            raise


def _wait_ready(client: MlflowClient, name: str, version: str, timeout: float = _READY_TIMEOUT) -> Any:
    import time

    deadline = time.monotonic() + timeout
    while True:
        mv = client.get_model_version(name, version)
        if mv.status == "READY":
            return mv
        if mv.status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise ModelGateError(f"model {name!r} version {version} is {mv.status}: "
                                 f"{getattr(mv, 'status_message', '') or 'no message'}")
        time.sleep(1)


def _logged_model_source(client: MlflowClient, run: Any, artifact_path: str) -> tuple[str, str | None]:
    """``(source, model_id)`` of the model logged by ``run`` under ``artifact_path``.

    MLflow 3 stores a logged model outside the run's artifacts (``models:/<model_id>``); a model saved as plain
    run artifacts (``<artifact_uri>/<artifact_path>/MLmodel``) is accepted too.
    """
    run_id = run.info.run_id
    outputs = getattr(getattr(run, "outputs", None), "model_outputs", None) or []
    candidates = []
    for output in outputs:
        model = client.get_logged_model(output.model_id)
        if model.name == artifact_path:
            candidates.append((output.step, model.model_id))
    if not candidates:
        found = client.search_logged_models([run.info.experiment_id],
                                            filter_string=f"source_run_id = {filter_literal(run_id, 'run id')}")
        candidates = [(0, m.model_id) for m in found if m.name == artifact_path]
    if candidates:
        model_id = max(candidates)[1]
        return f"models:/{model_id}", model_id
    if any(f.path == f"{artifact_path}/MLmodel" for f in client.list_artifacts(run_id, artifact_path)):
        return f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}", None
    raise ModelGateError(f"run {run_id} has no model logged under {artifact_path!r}")


def model_aliases(client: MlflowClient, model_name: str) -> dict[str, str]:
    """Alias -> version of registered model ``model_name`` (``{}`` when the model does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return {alias: str(version) for alias, version in client.get_registered_model(model_name).aliases.items()}
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in _error_code(exc):
            return {}
        raise


def register_challenger(client: MlflowClient, model_name: str, run_id: str,
                        artifact_path: str = MODEL_ARTIFACT_PATH) -> RegisteredVersion:
    """Register the model of training run ``run_id`` as a version of ``model_name`` and alias it ``challenger``.

    Idempotent: when a version of ``model_name`` from this run already exists it is reused (no second
    version), and only the alias is (re)set. The registered model is created, with a description, when missing.
    A new version gets the run's feature-service and lineage tags, so the registry shows where it came from.

    :raises ModelGateError: the run is not ``FINISHED``, or has no model under ``artifact_path``.
    """
    run = client.get_run(run_id)
    if run.info.status != "FINISHED":
        raise ModelGateError(f"run {run_id} is {run.info.status}, not FINISHED: only a completed training run can "
                             "become the challenger")
    _ensure_registered_model(client, model_name)
    query = (f"name = {filter_literal(model_name, 'model name')} and "
             f"run_id = {filter_literal(run_id, 'run id')}")
    existing = [mv for mv in client.search_model_versions(query) if mv.status != "FAILED_REGISTRATION"]
    if existing:
        mv = min(existing, key=lambda v: int(v.version))
        if mv.status != "READY":
            mv = _wait_ready(client, model_name, mv.version)
        created = False
        log.info("model %s: run %s is already version %s; reusing it", model_name, run_id, mv.version)
    else:
        source, model_id = _logged_model_source(client, run, artifact_path)
        tags = {k: v for k, v in run.data.tags.items() if k == FEATURE_SERVICE_TAG or k.startswith(LINEAGE_PREFIX)}
        mv = client.create_model_version(model_name, source, run_id=run_id, tags=tags, model_id=model_id,
                                         description=f"trained by run {run_id}")
        mv = _wait_ready(client, model_name, mv.version)
        created = True
        log.info("model %s: registered run %s as version %s", model_name, run_id, mv.version)
    client.set_registered_model_alias(model_name, CHALLENGER, mv.version)
    aliases = tuple(sorted(a for a, v in model_aliases(client, model_name).items() if v == str(mv.version)))
    return RegisteredVersion(name=model_name, version=str(mv.version), run_id=run_id, source=mv.source,
                             status=mv.status, created=created, aliases=aliases)


# -- the gate ------------------------------------------------------------------------------------------------
@dataclass
class _Side:
    """One model of the comparison: its version, run, model and features."""

    version: str
    run: Any
    model: Any
    features: list[str]


def _load_side(client: MlflowClient, model_name: str, version: str, role: str) -> _Side:
    import mlflow.sklearn

    mv = client.get_model_version(model_name, version)
    if not mv.run_id:
        raise ModelGateError(f"{role} {model_name} version {version} has no training run: the gate needs the run's "
                             "holdout and thresholds")
    run = client.get_run(mv.run_id)
    import_skops()
    with use_mlflow_server(client):
        model = mlflow.sklearn.load_model(f"models:/{model_name}/{version}")
    features = run_feature_columns(run)
    if features is None:
        names = getattr(model, "feature_names_in_", None)
        if names is None:
            raise ModelGateError(f"{role} {model_name} version {version}: neither its run {mv.run_id} (param "
                                 "feature_columns) nor the model say which feature columns it takes")
        features = [str(n) for n in names]
    return _Side(version=str(version), run=run, model=model, features=features)


def _costs(run: Any, costs: CostModel | None, review_budget: float | None) -> tuple[CostModel, float]:
    """Explicit values, else the challenger run's params, else :class:`TrainingConfig` defaults (logged)."""
    params = run.data.params
    defaults = TrainingConfig()
    if costs is None:
        keys = ("missed_fraud", "review", "false_decline")
        if all(f"costs.{k}" in params for k in keys):
            costs = CostModel(**{k: float(params[f"costs.{k}"]) for k in keys})
        else:
            log.warning("run %s has no costs.* params; evaluating with the default costs", run.info.run_id)
            costs = defaults.costs
    if review_budget is None:
        if "review_budget" in params:
            review_budget = float(params["review_budget"])
        else:
            log.warning("run %s has no review_budget param; evaluating with the default", run.info.run_id)
            review_budget = defaults.review_budget
    return costs, review_budget


def _evaluate_side(client: MlflowClient, side: _Side, role: str, holdout: pd.DataFrame, labels: Any,
                   costs: CostModel, review_budget: float, holdout_source: str) -> tuple[Evaluation, Any]:
    missing = [c for c in side.features if c not in holdout.columns]
    if missing:
        raise ModelGateError(
            f"{role} version {side.version} needs feature column(s) {', '.join(missing)} that the challenger's "
            f"holdout ({holdout_source}) lacks; columns there: {', '.join(map(str, holdout.columns))}")
    thresholds = read_thresholds(client, side.run.info.run_id).get(MODEL)
    if thresholds is None:
        raise ModelGateError(f"{role} version {side.version}: run {side.run.info.run_id} has no model thresholds in "
                             "evaluation/thresholds.json")
    scores = predict_scores(side.model, holdout, side.features)
    return evaluate(scores, labels, costs, review_budget, thresholds), scores


def _warn_if_champion_saw_the_holdout(challenger: _Side, champion: _Side) -> None:
    """A champion fitted on rows of the challenger's holdout period looks better there than it is."""
    import pandas as pd

    mine = challenger.run.data.params.get("holdout_start")
    theirs = champion.run.data.params.get("holdout_start")
    if mine and theirs and pd.Timestamp(theirs) > pd.Timestamp(mine):
        log.warning("champion version %s was trained/calibrated on events up to %s, after the challenger's holdout "
                    "starts (%s): its holdout score is optimistic, the comparison favours it", champion.version,
                    theirs, mine)


def run_promotion_gate(client: MlflowClient, model_name: str, *, metric: str = "pr_auc", margin: float = 0.01,
                       costs: CostModel | None = None, review_budget: float | None = None,
                       higher_is_better: bool | None = None) -> PromotionDecision:
    """Decide whether the ``challenger`` version of ``model_name`` replaces the ``champion``; act on a win.

    Both versions are scored on the challenger run's ``evaluation/holdout.parquet``, each with the thresholds of
    its own run (``evaluation/thresholds.json``) and the costs / review budget given here, else those of the
    challenger run's params; then :func:`~decisionflow.models.promotion.decide_promotion` (``metric``,
    ``margin``, ``higher_is_better``). Without a champion the first sane challenger is promoted.

    On promotion the challenger version is tagged (``decisionflow.promoted_at``, ``decisionflow.promotion_reason``,
    ``decisionflow.replaced_version``) and then gets alias ``champion``. Otherwise nothing in the registry changes
    and the reason starts with ``not promoted:``. When the challenger already is the champion (a rerun after a
    promotion) the decision says so and nothing changes.

    :raises ModelGateError: no ``challenger`` alias, a version without run, thresholds or model, or a champion
        needing a feature column that the challenger's holdout lacks (named).
    """
    aliases = model_aliases(client, model_name)
    challenger_version = aliases.get(CHALLENGER)
    if challenger_version is None:
        raise ModelGateError(f"registered model {model_name!r} has no {CHALLENGER!r} alias (aliases: {aliases}); "
                             "register a training run first")
    champion_version = aliases.get(CHAMPION)
    direction = HIGHER_IS_BETTER.get(metric, True) if higher_is_better is None else higher_is_better

    if champion_version == challenger_version:
        run_id = client.get_model_version(model_name, challenger_version).run_id
        value = client.get_run(run_id).data.metrics.get(f"holdout_{metric}", float("nan")) if run_id else float("nan")
        return PromotionDecision(
            promote=True, reason=f"promoted: version {challenger_version} already is the champion; nothing changed",
            metric=metric, challenger_value=float(value), champion_value=float(value), margin=float(margin),
            higher_is_better=direction)

    challenger = _load_side(client, model_name, challenger_version, CHALLENGER)
    challenger_run_id = challenger.run.info.run_id
    holdout = read_holdout(client, challenger_run_id)
    costs, review_budget = _costs(challenger.run, costs, review_budget)
    labels = label_array(holdout, challenger.run.data.params.get("label_column", TrainingConfig().label_column))
    source = f"run {challenger_run_id}, {len(holdout)} rows"
    challenger_eval, challenger_scores = _evaluate_side(client, challenger, CHALLENGER, holdout, labels, costs,
                                                        review_budget, source)
    champion_eval = None
    if champion_version is not None:
        champion = _load_side(client, model_name, champion_version, CHAMPION)
        _warn_if_champion_saw_the_holdout(challenger, champion)
        champion_eval, _ = _evaluate_side(client, champion, CHAMPION, holdout, labels, costs, review_budget, source)

    decision = decide_promotion(challenger_eval, champion_eval, challenger_scores, metric=metric, margin=margin,
                                higher_is_better=higher_is_better)
    versions = (f"challenger version {challenger_version} vs champion version {champion_version}"
                if champion_version is not None else f"challenger version {challenger_version}, no champion")
    decision = replace(decision, reason=f"{decision.reason} ({versions}; holdout of {source})")
    if not decision.promote:
        log.info("%s: %s", model_name, decision.reason)
        return decision

    client.set_model_version_tag(model_name, challenger_version, PROMOTED_AT_TAG,
                                 datetime.now(timezone.utc).isoformat(timespec="seconds"))
    client.set_model_version_tag(model_name, challenger_version, PROMOTION_REASON_TAG, decision.reason[:5000])
    client.set_model_version_tag(model_name, challenger_version, REPLACED_VERSION_TAG, champion_version or "none")
    # The alias is the commit point: set last, so a failure above leaves the serving champion untouched.
    client.set_registered_model_alias(model_name, CHAMPION, challenger_version)
    log.info("%s: %s", model_name, decision.reason)
    return decision
