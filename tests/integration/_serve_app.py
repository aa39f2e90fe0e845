"""Pieces the Ray Serve rollout tests load *inside* Ray replicas (importable there through the PYTHONPATH the test sets).

* :func:`scoring_app` - a minimal gateway app over the :class:`RoutedBackend` (the rows of ``/v1/score`` are the
  feature rows as sent; no Feast), ``/metrics`` from the shared registry: what the rollout needs of the gateway.
* :class:`ScoreModel` / :class:`FaultyModel` - MLflow pyfunc models: a deterministic score of ``amount`` (offset
  per version), and one that raises on a share of inputs (by amount) - the faulty challenger.
* :func:`load_pyfunc_version` - the ``model_loader`` for those models: pinned metadata from the registered version.
"""

from __future__ import annotations

import hashlib
import math
from types import SimpleNamespace
from typing import Any

import mlflow.pyfunc


class ScoreModel(mlflow.pyfunc.PythonModel):
    """score = sigmoid(amount / 100 - 3 + offset)."""

    def __init__(self, offset: float = 0.0, delay_s: float = 0.0):
        self.offset, self.delay_s = offset, delay_s

    def predict(self, context, model_input, params=None):
        if self.delay_s:
            import time

            time.sleep(self.delay_s)
        return [1 / (1 + math.exp(-(float(a) / 100 - 3 + self.offset))) for a in model_input["amount"]]


def _share(event_id: str) -> float:
    return int(hashlib.sha256(str(event_id).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


class FaultyModel(ScoreModel):
    """Like :class:`ScoreModel`, but raises for rows whose amount hashes below ``fail_share`` (the model sees only
    numeric features: the gateway casts them to float64)."""

    def __init__(self, fail_share: float = 0.3, offset: float = 0.0):
        super().__init__(offset)
        self.fail_share = fail_share

    def predict(self, context, model_input, params=None):
        bad = [a for a in model_input["amount"] if _share(repr(float(a))) < self.fail_share]
        if bad:
            raise ValueError(f"faulty challenger cannot score amount(s) {bad[:3]}")
        return super().predict(context, model_input, params)


def load_pyfunc_version(tracking_uri: str, model_name: str, version: str) -> Any:
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    mv = MlflowClient(tracking_uri=tracking_uri).get_model_version(model_name, version)
    model = mlflow.pyfunc.load_model(f"models:/{model_name}/{version}")
    pinned = SimpleNamespace(name=model_name, version=str(version), run_id=mv.run_id or "", review=0.5, decline=0.9,
                             feature_columns=("amount",))
    return SimpleNamespace(pinned=pinned, predict=lambda frame: list(model.predict(frame)))


def scoring_app(args, backend):
    from fastapi import FastAPI, Response

    from decisionflow_serving.metrics import exposition

    app = FastAPI(title="rollout test gateway")

    @app.get("/ready")
    async def ready():
        return Response(status_code=200 if backend.ready() else 503)

    @app.get("/metrics")
    async def metrics():
        body, content_type = exposition()
        return Response(body, media_type=content_type)

    @app.post("/v1/score")
    async def score(body: dict):
        rows = body["transactions"]
        scored = await backend.score(rows)
        return {"model": {"name": scored.model_name, "version": scored.model_version},
                "scores": [{"event_id": r.get("event_id"), "score": s} for r, s in zip(rows, scored.scores)]}

    return app
