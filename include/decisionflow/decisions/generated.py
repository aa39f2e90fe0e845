"""Labelled history from the seeded generator, without Kafka or Spark: ``gold/transactions_enriched``-shaped rows.

For backtests, evaluation drills and benchmarks of the decision policy on generated data. The events come from
:mod:`decisionflow.risk.generator` (clean stream: ``bad_share=0``); the gold features are recomputed here in
numpy with the definitions of :mod:`decisionflow.lakehouse.gold` (account windows ``(t - w, t]`` with peers,
``seconds_since_prev_txn`` 0 for same-instant peers and NULL for an account's first transaction,
``amount_to_avg_7d = amount * count_7d / sum_7d``, merchant counts, and the merchant fraud rate from labels
known at ``event_time``). The label columns hold the latest label the stream delivered (``label`` NULL when
the transaction was never labelled); the generator's hidden truth is kept beside them in ``truth_is_fraud``,
``truth_pattern`` and ``truth_decoy`` (never a feature: :class:`~decisionflow.decisions.policy.Policy`
rules cannot reference them).

The gold tables built by Spark remain the reference; this is a faithful, fast stand-in for tests.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["TRUTH_COLUMNS", "generated_history"]

#: The generator's hidden truth, kept beside the gold columns for evaluation only.
TRUTH_COLUMNS = ("truth_is_fraud", "truth_pattern", "truth_decoy")

_US = 1_000_000
_HOUR_US, _DAY_US = 3600 * _US, 86_400 * _US
_WEEK_US = 7 * _DAY_US


def _window_bounds(group: Any, ts: Any, width_us: int) -> tuple[Any, Any]:
    """Per row, [left, right) indices of its group's rows with ``t - width < ts <= t`` (rows sorted by group, ts)."""
    import numpy as np

    # One searchsorted over a composite key (group, ts): groups are contiguous, times within them ascending.
    span = int(ts.max() - ts.min()) + 2 * width_us + 1
    key = group.astype(np.int64) * span + (ts - ts.min())
    left = np.searchsorted(key, key - width_us, side="right")
    right = np.searchsorted(key, key, side="right")
    return left, right


def _distinct(values: list, left: Any, right: Any) -> Any:
    """Distinct non-null values in each row's window (a short Python loop: windows hold a handful of rows)."""
    import numpy as np

    return np.fromiter((len({v for v in values[a:b] if v is not None}) for a, b in zip(left, right)),
                       dtype=np.int64, count=len(left))


def _account_features(tx: pd.DataFrame) -> pd.DataFrame:
    import numpy as np
    import pandas as pd

    tx = tx.sort_values(["account_id", "_ts", "event_id"], kind="mergesort").reset_index(drop=True)
    group = pd.factorize(tx["account_id"])[0]
    ts = tx["_ts"].to_numpy(np.int64)
    amount = tx["amount"].to_numpy(np.float64)
    csum = np.concatenate([[0.0], np.cumsum(amount)])
    out = {}
    for name, width in (("1h", _HOUR_US), ("24h", _DAY_US), ("7d", _WEEK_US)):
        left, right = _window_bounds(group, ts, width)
        out[f"txn_count_{name}"] = right - left
        out[f"amount_sum_{name}"] = csum[right] - csum[left]
        if name in ("24h", "7d"):
            out[f"distinct_devices_{name}"] = _distinct(tx["device_id"].tolist(), left, right)
            out[f"distinct_countries_{name}"] = _distinct(tx["country"].tolist(), left, right)
    # previous strictly earlier transaction of the same account; same-instant peers give 0 (as gold does)
    key = group.astype(np.int64) * (int(ts.max() - ts.min()) + 1) + (ts - ts.min())
    first_of_instant = np.searchsorted(key, key, side="left")
    peer_count = np.searchsorted(key, key, side="right") - first_of_instant
    prev = np.clip(first_of_instant - 1, 0, None)
    has_prev = (first_of_instant > 0) & (group[prev] == group)
    since = np.where(has_prev, (ts - ts[prev]) / _US, np.nan)
    since = np.where(peer_count > 1, 0.0, since)
    frame = pd.DataFrame({"event_id": tx["event_id"], **out, "seconds_since_prev_txn": since})
    frame["amount_to_avg_7d"] = amount * frame["txn_count_7d"] / frame["amount_sum_7d"]
    return frame


def _merchant_features(tx: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    import numpy as np
    import pandas as pd

    tx = tx.sort_values(["merchant_id", "_ts", "event_id"], kind="mergesort").reset_index(drop=True)
    codes, uniques = pd.factorize(tx["merchant_id"])
    ts = tx["_ts"].to_numpy(np.int64)
    out = {}
    for name, width in (("24h", _DAY_US), ("7d", _WEEK_US)):
        left, right = _window_bounds(codes, ts, width)
        out[f"merchant_txn_count_{name}"] = (right - left).astype(np.int64)
    # labels of the merchant's transactions known at each event time (labelled_at <= event_time)
    lab = labels.merge(tx[["event_id", "merchant_id"]], on="event_id", how="inner")
    lab = lab.assign(_code=pd.Index(uniques).get_indexer(lab["merchant_id"]),
                     _lts=lab["labelled_at"].astype("int64") // 1000,
                     _fraud=(lab["label"] == "fraud").astype(np.int64))
    lab = lab.sort_values(["_code", "_lts"], kind="mergesort")
    base = min(int(ts.min()), int(lab["_lts"].min()) if len(lab) else int(ts.min()))
    span = max(int(ts.max()), int(lab["_lts"].max()) if len(lab) else 0) - base + 1
    lab_key = lab["_code"].to_numpy(np.int64) * span + (lab["_lts"].to_numpy(np.int64) - base)
    txn_key = codes.astype(np.int64) * span + (ts - base)
    start_key = codes.astype(np.int64) * span
    upto = np.searchsorted(lab_key, txn_key, side="right")
    first = np.searchsorted(lab_key, start_key, side="left")
    fraud_cum = np.concatenate([[0], np.cumsum(lab["_fraud"].to_numpy(np.int64))])
    known = upto - first
    fraud = fraud_cum[upto] - fraud_cum[first]
    out["merchant_labels_known"] = known.astype(np.int64)
    out["merchant_fraud_labels"] = fraud.astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["merchant_fraud_rate"] = np.where(known > 0, fraud / np.maximum(known, 1), np.nan)
    return pd.DataFrame({"event_id": tx["event_id"], **out})


def generated_history(events: int = 20_000, seed: int = 0, **overrides: Any) -> pd.DataFrame:
    """Seeded ``gold/transactions_enriched``-shaped rows (+ :data:`TRUTH_COLUMNS`), ordered by event time.

    :param events: transactions to generate.
    :param seed: the generator seed.
    :param overrides: further :class:`~decisionflow.risk.generator.GeneratorConfig` fields (``days``,
        ``fraud_rate``, ...); ``bad_share`` defaults to 0 (a clean stream: bad input is the ingest layer's test).
    """
    import numpy as np
    import pandas as pd

    from decisionflow.contracts import LABELS, TRANSACTIONS
    from decisionflow.models.config import GOLD_FEATURE_COLUMNS
    from decisionflow.risk.generator import GeneratorConfig, generate

    overrides.setdefault("bad_share", 0.0)
    config = GeneratorConfig(events=events, seed=seed, **overrides)
    txns: list[dict] = []
    labels: list[dict] = []
    for message in generate(config):
        if message.value is None or not message.contract_valid:
            continue
        if message.topic == TRANSACTIONS:
            if message.kind == "duplicate":
                continue
            record = json.loads(message.value)
            record.update(truth_is_fraud=bool(message.is_fraud), truth_pattern=message.pattern,
                          truth_decoy=message.decoy)
            txns.append(record)
        elif message.topic == LABELS:
            labels.append(json.loads(message.value))
    tx = pd.DataFrame(txns).drop(columns=["schema_version"], errors="ignore")
    tx = tx.drop_duplicates("event_id", keep="first")
    tx["event_time"] = pd.to_datetime(tx["event_time"], utc=True)
    tx["amount"] = tx["amount"].astype(np.float64)
    tx["_ts"] = tx["event_time"].astype("int64") // 1000
    lab = pd.DataFrame(labels, columns=["event_id", "label", "source", "labelled_at"])
    lab["labelled_at"] = pd.to_datetime(lab["labelled_at"], utc=True)
    lab = lab.sort_values(["event_id", "labelled_at"], kind="mergesort").drop_duplicates("event_id", keep="last")

    frame = (tx.merge(_account_features(tx), on="event_id", how="left")
             .merge(_merchant_features(tx, lab), on="event_id", how="left")
             .merge(lab.rename(columns={"source": "label_source"}), on="event_id", how="left"))
    frame["is_fraud"] = frame["label"].map({"fraud": True, "legit": False}).astype("boolean")
    columns = ["event_id", "event_time", "account_id", "merchant_id", "amount", "currency", "mcc", "channel",
               "country", "device_id", "ip", "memo", *GOLD_FEATURE_COLUMNS, "label", "labelled_at", "is_fraud",
               "label_source", *TRUTH_COLUMNS]
    return frame.sort_values(["event_time", "event_id"], kind="mergesort")[columns].reset_index(drop=True)
