"""The seam between the HTTP gateway and whatever scores: one model version in-process, or Ray Serve handles.

A backend scores full feature rows (every ``risk_v1`` feature plus the request fields); the model picks its own
``feature_columns``. One call is answered by ONE model version, named in the returned :class:`Scored`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Scored:
    """The scores of one request, and the model version that produced all of them.

    Attributes:
        scores: One fraud probability per input row, in input order.
        model_name: Registered MLflow model name.
        model_version: The MLflow model version that scored every row.
        review: That version's review threshold (``PinnedModel.review``): score >= review → band ``review``.
        decline: That version's decline threshold (``PinnedModel.decline``): score >= decline → band ``decline``.
        run_id: The MLflow run the version was logged from.
        feature_columns: The columns the model read, in its order.
    """

    scores: list[float]
    model_name: str
    model_version: str
    review: float
    decline: float
    run_id: str
    feature_columns: tuple[str, ...]


@runtime_checkable
class ScoringBackend(Protocol):
    """What the gateway needs from a scorer."""

    async def score(self, rows: list[dict[str, Any]]) -> Scored:
        """Score ``rows`` (full feature dicts) with one model version."""
        ...

    def ready(self) -> bool:
        """True when a model version is loaded and ``score`` can answer."""
        ...
