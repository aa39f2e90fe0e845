"""On-demand (request-time) feature transforms, in plain Python: one implementation for every path.

The Feast on-demand view ``transaction_context`` (``include/feature_repo``) calls :func:`transaction_context`
for training sets and online reads, and the decision run calls :func:`add_on_demand_features` on its gold batch,
so the model sees the same values whichever way its features were assembled (no train/serve skew).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

#: Output columns of :func:`transaction_context` and the inputs it reads.
TRANSACTION_CONTEXT_OUTPUTS = ("amount_to_avg_24h", "share_of_24h_spend")
TRANSACTION_CONTEXT_INPUTS = ("amount", "txn_count_24h", "amount_sum_24h")


def transaction_context(amount: Sequence[Any], txn_count_24h: Sequence[Any],
                        amount_sum_24h: Sequence[Any]) -> dict[str, list[float | None]]:
    """The transaction's amount against the account's last 24 h: ``amount / (sum / count)`` and ``amount / sum``
    (``None`` where an input is missing or zero). Lists in, lists out (Feast's python mode)."""
    to_avg, share = [], []
    for value, count, total in zip(amount, txn_count_24h, amount_sum_24h):
        missing = value is None or value != value  # None or NaN
        average = total / count if not missing and count and total is not None and total == total else None
        to_avg.append(value / average if average else None)
        share.append(value / total if not missing and total and total == total else None)
    return {"amount_to_avg_24h": to_avg, "share_of_24h_spend": share}


def add_on_demand_features(frame: pd.DataFrame, wanted: Sequence[str] | None = None) -> pd.DataFrame:
    """``frame`` with the on-demand columns among ``wanted`` (all when ``None``) added where it lacks them."""
    import numpy as np

    outputs = [c for c in TRANSACTION_CONTEXT_OUTPUTS if (wanted is None or c in wanted) and c not in frame.columns]
    if not outputs or frame.empty:
        for column in outputs:
            frame[column] = np.zeros(0) if frame.empty else np.nan
        return frame
    values = transaction_context(*(frame[c].tolist() for c in TRANSACTION_CONTEXT_INPUTS))
    for column in outputs:
        frame[column] = np.array([np.nan if v is None else v for v in values[column]], dtype="float64")
    return frame
