"""Seeded synthetic training frames with the gold feature columns, for tests, drills and benchmarks.

Fraud follows *interactions* of features (a large amount relative to the account's usual AND several devices;
a second country AND a very short gap since the previous transaction; a merchant with a high fraud rate): no
single feature separates the classes and a linear model cannot express the AND, so a tree model must clearly
beat a logistic baseline on it. NaNs appear where real gold data has them (first transaction of an account,
merchant without a known label).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["make_enriched_transactions", "make_transactions"]


def make_transactions(n: int = 3000, seed: int = 4, days: int = 30) -> pd.DataFrame:
    """Seeded labelled transactions, time-ordered over ``days``, with every gold feature and NaNs where real."""
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2025-01-06", tz="UTC")
    times = start + pd.to_timedelta(np.sort(rng.uniform(0, days * 86400, n)), unit="s")
    amount = rng.lognormal(3.5, 1.0, n)
    count_1h = rng.poisson(0.4, n) + 1
    count_24h = count_1h + rng.poisson(3, n)
    count_7d = count_24h + rng.poisson(15, n)
    devices_24h = 1 + rng.poisson(0.35, n)
    countries_24h = 1 + rng.binomial(1, 0.15, n)
    since_prev = rng.exponential(3 * 3600, n)
    since_prev[rng.random(n) < 0.05] = np.nan  # first transaction of the account
    to_avg = rng.lognormal(0, 0.6, n)
    merchant_count_7d = rng.poisson(280, n)
    labels_known = rng.poisson(30, n)
    fraud_rate = rng.beta(1, 25, n)
    fraud_rate[rng.random(n) < 0.1] = np.nan  # no merchant label known yet
    fraud_rate[labels_known == 0] = np.nan

    large_on_new_devices = (to_avg > 2.2) & (devices_24h >= 2)
    quick_abroad = (countries_24h >= 2) & (np.nan_to_num(since_prev, nan=np.inf) < 1800)
    risky_merchant = np.nan_to_num(fraud_rate, nan=0.0) > 0.12
    logit = -6.0 + 7.5 * large_on_new_devices + 7.5 * quick_abroad + 3.0 * risky_merchant + rng.normal(0, 0.5, n)
    is_fraud = rng.random(n) < 1 / (1 + np.exp(-logit))

    return pd.DataFrame({
        "event_timestamp": times,
        "event_id": [f"evt-{i:06d}" for i in range(n)],
        "is_fraud": is_fraud,
        "amount": amount,
        "txn_count_1h": count_1h,
        "txn_count_24h": count_24h,
        "txn_count_7d": count_7d,
        "amount_sum_1h": amount * count_1h,
        "amount_sum_24h": amount * count_24h * rng.uniform(0.5, 1.5, n),
        "amount_sum_7d": amount * count_7d * rng.uniform(0.5, 1.5, n),
        "distinct_devices_24h": devices_24h,
        "distinct_devices_7d": devices_24h + rng.poisson(0.5, n),
        "distinct_countries_24h": countries_24h,
        "distinct_countries_7d": countries_24h + rng.binomial(1, 0.1, n),
        "seconds_since_prev_txn": since_prev,
        "amount_to_avg_7d": to_avg,
        "merchant_txn_count_24h": rng.poisson(40, n),
        "merchant_txn_count_7d": merchant_count_7d,
        "merchant_labels_known": labels_known,
        "merchant_fraud_labels": np.round(np.nan_to_num(fraud_rate) * labels_known),
        "merchant_fraud_rate": fraud_rate,
    })


_MCCS = ("5411", "5812", "5732", "5999", "4829", "7995", "5311")
_CHANNELS = ("card_present", "ecommerce", "mobile", "atm")  # the contract's enum
_COUNTRIES = ("DE", "FR", "NL", "ES", "GB", "US", "NG")


def make_enriched_transactions(n: int = 3000, seed: int = 4, days: int = 30, accounts: int = 400,
                               merchants: int = 60) -> pd.DataFrame:
    """:func:`make_transactions` shaped like ``gold/transactions_enriched``: transaction columns, the gold
    features, ``label`` / ``labelled_at`` / ``is_fraud``; for decision tests and the decision benchmark.

    The transaction columns (account, merchant, mcc, channel, country, device, ip, memo) are seeded noise: the
    label follows the features only, as in :func:`make_transactions`.
    """
    rng = np.random.default_rng(seed + 1)
    frame = make_transactions(n, seed=seed, days=days).rename(columns={"event_timestamp": "event_time"})
    frame["event_id"] = [f"00000000-0000-4000-8000-{seed % 10_000:04d}{i:08d}" for i in range(n)]
    frame.insert(2, "account_id", [f"acc-{a:06d}" for a in rng.integers(0, accounts, n)])
    frame.insert(3, "merchant_id", [f"mer-{m:05d}" for m in rng.integers(0, merchants, n)])
    frame["currency"] = "EUR"
    frame["mcc"] = rng.choice(_MCCS, n)
    frame["channel"] = rng.choice(_CHANNELS, n, p=(0.45, 0.35, 0.15, 0.05))
    frame["country"] = rng.choice(_COUNTRIES, n, p=(0.55, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05))
    frame["device_id"] = [f"dev-{d:06d}" for d in rng.integers(0, accounts * 2, n)]
    frame["ip"] = [f"10.{a}.{b}.{c}" for a, b, c in rng.integers(0, 255, (n, 3))]
    frame["memo"] = None
    frame["label"] = np.where(frame["is_fraud"], "fraud", "legit")
    frame["labelled_at"] = frame["event_time"] + pd.Timedelta(days=3)
    frame["label_source"] = "chargeback"
    frame["updated_at"] = frame["event_time"]
    return frame
