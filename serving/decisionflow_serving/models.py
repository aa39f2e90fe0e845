"""Model versions from the MLflow registry, loaded once, and the in-process scoring backend.

:func:`load_model_version` resolves a version (its training run, feature columns and thresholds) through
:class:`decisionflow.decisions.graph.MlflowModelSource` -- the code the batch decision run pins its model with --
and loads the model the same way, so the gateway scores with exactly what a decision run would use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from decisionflow import constants
from decisionflow_serving.backends import Scored

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from decisionflow.decisions.graph import PinnedModel


@dataclass(frozen=True)
class LoadedModel:
    """A pinned model version and its scoring function (a frame of full feature rows -> fraud probabilities)."""

    pinned: PinnedModel
    predict: Callable[[pd.DataFrame], np.ndarray]


def load_model_version(tracking_uri: str, name: str = constants.MODEL_NAME, version: str | int | None = None,
                       *, alias: str = constants.CHAMPION_ALIAS) -> LoadedModel:
    """Load ``name`` version ``version`` (or the one behind ``alias`` when ``version`` is ``None``).

    Raises:
        decisionflow.decisions.graph.DecisionRunError: no such version, or its run lacks thresholds or feature
            columns (the message names the layer and the remedy).
    """
    from decisionflow.decisions.graph import MlflowModelSource

    source = MlflowModelSource(tracking_uri, name, alias=alias, version=version)
    pinned = source.pin()
    return LoadedModel(pinned=pinned, predict=source.scorer(pinned))


def score_rows(loaded: LoadedModel, rows: list[dict[str, Any]]) -> Scored:
    """Score full feature rows with ``loaded`` (the model picks its own feature columns)."""
    import numpy as np
    import pandas as pd

    pinned = loaded.pinned
    columns = list(pinned.feature_columns)
    # float64 with None -> NaN, as gold's columns reach the batch run (a feature missing online is None)
    frame = pd.DataFrame.from_records([{c: row.get(c) for c in columns} for row in rows], columns=columns,
                                      coerce_float=True).astype("float64")
    scores = np.asarray(loaded.predict(frame), dtype="float64") if rows else np.zeros(0)
    return Scored(scores=[float(s) for s in scores], model_name=pinned.name, model_version=pinned.version,
                  review=pinned.review, decline=pinned.decline, run_id=pinned.run_id,
                  feature_columns=tuple(pinned.feature_columns))


class LocalModelBackend:
    """One MLflow model version in this process: plain-uvicorn serving and the benchmark's baseline.

    Args:
        tracking_uri: MLflow tracking URI.
        model_name: registered model name.
        version: the version to serve; ``None`` = the one behind ``alias`` at load time.
        alias: see ``version``.
        load: load at construction (default); ``False`` leaves :meth:`ready` false until :meth:`load` runs.
    """

    def __init__(self, tracking_uri: str, model_name: str = constants.MODEL_NAME, version: str | int | None = None,
                 *, alias: str = constants.CHAMPION_ALIAS, load: bool = True):
        self.tracking_uri, self.model_name, self.version, self.alias = tracking_uri, model_name, version, alias
        self._loaded: LoadedModel | None = None
        self._lock = threading.Lock()
        self.error: str | None = None
        if load:
            self.load()

    @classmethod
    def from_loaded(cls, loaded: LoadedModel) -> LocalModelBackend:
        """A backend over an already loaded model (tests, benchmarks)."""
        backend = cls("", loaded.pinned.name, loaded.pinned.version, load=False)
        backend._loaded = loaded
        return backend

    def load(self) -> LoadedModel:
        with self._lock:
            try:
                self._loaded = load_model_version(self.tracking_uri, self.model_name, self.version,
                                                  alias=self.alias)
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                raise
            self.error = None
            return self._loaded

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    def ready(self) -> bool:
        return self._loaded is not None

    async def score(self, rows: list[dict[str, Any]]) -> Scored:
        loaded = self._loaded
        if loaded is None:
            raise ModelNotLoaded(f"[models] no version of {self.model_name} is loaded"
                                 f"{f' ({self.error})' if self.error else ''} -- remedy: register and promote a "
                                 "model (train_risk_model) or start the gateway with --model-version")
        return score_rows(loaded, rows)


class ModelNotLoaded(RuntimeError):
    """The backend holds no model version (``/ready`` is 503 meanwhile)."""
