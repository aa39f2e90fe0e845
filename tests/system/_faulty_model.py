"""A faulty challenger for the rollout system test: the champion's own model, raising on a share of its inputs.

:func:`register_faulty_version` logs it into the champion's training run (so the new version has the run's
thresholds and feature columns, as a real challenger would) and registers it as a new version. It is saved with
cloudpickle *by value*, so the Ray Serve replicas load it without this module on their path.
"""

from __future__ import annotations

import hashlib
from typing import Any


class RaisesOnAShare:
    """``predict_proba`` of ``model``, but a ``ValueError`` for any batch holding a row whose feature values hash
    below ``share`` (deterministic per row, so about ``share`` of single-row requests fail)."""

    def __init__(self, model: Any, share: float = 0.3):
        self.model, self.share = model, share

    def predict_proba(self, frame):
        import numpy as np

        values = np.ascontiguousarray(np.asarray(frame, dtype="float64"))
        for row in values:
            digest = hashlib.sha256(np.nan_to_num(row, nan=-1.0).tobytes()).digest()
            if int.from_bytes(digest[:4], "big") / 2**32 < self.share:
                raise ValueError("faulty challenger: cannot score this row")
        return self.model.predict_proba(frame)


def register_faulty_version(tracking_uri: str, model_name: str, champion_version: str, share: float = 0.3) -> str:
    """Register a new version of ``model_name``: the champion wrapped in :class:`RaisesOnAShare`. Returns it."""
    import sys

    import cloudpickle
    import mlflow
    import mlflow.sklearn
    from mlflow import MlflowClient

    from decisionflow.models.tracking import import_skops

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    champion = client.get_model_version(model_name, champion_version)
    import_skops()
    model = mlflow.sklearn.load_model(f"models:/{model_name}/{champion_version}")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with mlflow.start_run(run_id=champion.run_id):
            info = mlflow.sklearn.log_model(RaisesOnAShare(model, share), name="faulty_model",
                                            serialization_format="cloudpickle",
                                            pip_requirements=["scikit-learn", "lightgbm", "numpy", "pandas"],
                                            registered_model_name=model_name)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    return str(info.registered_model_version)
