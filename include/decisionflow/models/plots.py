"""Evaluation plots of a training run as PNG files (for MLflow artifacts or a report).

Uses matplotlib's object API (``Figure`` + the Agg canvas) rather than ``pyplot``: no display, no global
figure state shared between tasks of a worker, nothing to close. matplotlib is imported lazily.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["write_evaluation_plots"]

_TOP_FEATURES = 25  # bars beyond this are unreadable and near zero anyway


def _new_figure(width: float = 6.4, height: float = 4.8):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself to the figure: savefig renders with Agg, whatever the backend
    return figure


def _pr_curve(path: Path, labels: np.ndarray, scores_by_model: Mapping[str, np.ndarray]) -> Path:
    from sklearn.metrics import average_precision_score, precision_recall_curve

    figure = _new_figure()
    ax = figure.add_subplot()
    for name, scores in scores_by_model.items():
        precision, recall, _ = precision_recall_curve(labels, scores)
        ax.step(recall, precision, where="post", label=f"{name} (AP {average_precision_score(labels, scores):.3f})")
    # The precision of flagging at random: what a useless model reaches.
    base_rate = float(labels.mean())
    ax.axhline(base_rate, color="grey", linestyle="--", linewidth=1, label=f"fraud rate {base_rate:.3f}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="Precision-recall")
    ax.legend(loc="upper right")
    figure.savefig(path, dpi=100)
    return path


def _calibration_curve(path: Path, labels: np.ndarray, scores_by_model: Mapping[str, np.ndarray]) -> Path:
    from sklearn.calibration import calibration_curve

    figure = _new_figure()
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for name, scores in scores_by_model.items():
        observed, predicted = calibration_curve(labels, np.clip(scores, 0.0, 1.0), n_bins=10, strategy="uniform")
        ax.plot(predicted, observed, marker="o", label=name)
    ax.set(xlabel="mean predicted fraud probability", ylabel="observed fraud rate", xlim=(0, 1), ylim=(0, 1),
           title="Calibration (reliability diagram, 10 bins)")
    ax.legend(loc="upper left")
    figure.savefig(path, dpi=100)
    return path


def _importance_chart(path: Path, importance: pd.Series) -> Path:
    top = importance.sort_values(ascending=False).head(_TOP_FEATURES)[::-1]  # largest at the top of the chart
    figure = _new_figure(height=max(3.0, 0.3 * len(top) + 1.2))
    ax = figure.add_subplot()
    ax.barh([str(i) for i in top.index], top.to_numpy(dtype=np.float64))
    ax.set(xlabel=f"importance ({importance.name or 'gain'})", title="Feature importance")
    figure.savefig(path, dpi=100)
    return path


def write_evaluation_plots(directory: str | Path, labels: Sequence[int] | np.ndarray,
                           scores_by_model: Mapping[str, Sequence[float] | np.ndarray],
                           importance: pd.Series) -> list[Path]:
    """Write ``pr_curve.png``, ``calibration_curve.png`` and ``feature_importance.png`` into ``directory``.

    ``labels`` are the 0/1 labels of the evaluated set (usually the holdout), ``scores_by_model`` the scores
    of each model on it (one curve each, e.g. ``{"lightgbm": ..., "baseline": ...}``), ``importance`` a
    feature -> importance Series (e.g. :func:`~decisionflow.models.training.feature_importance`). The
    directory is created when missing. Returns the written paths in that order.
    """
    y = np.asarray(labels).astype(np.int64).ravel()
    scores = {name: np.asarray(s, dtype=np.float64).ravel() for name, s in scores_by_model.items()}
    if not scores:
        raise ValueError("scores_by_model is empty: nothing to plot")
    for name, s in scores.items():
        if s.shape != y.shape:
            raise ValueError(f"scores of {name!r} have {s.size} values for {y.size} labels")
        if not np.isfinite(s).all():
            raise ValueError(f"scores of {name!r} contain NaN or infinite values")
    if not 0 < y.sum() < y.size:
        raise ValueError("labels must contain both classes to draw precision-recall and calibration curves")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    return [
        _pr_curve(out / "pr_curve.png", y, scores),
        _calibration_curve(out / "calibration_curve.png", y, scores),
        _importance_chart(out / "feature_importance.png", importance),
    ]
