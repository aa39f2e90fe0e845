"""The online feature vector of a transaction: Feast online (``risk_v1``) plus its own request-time features.

:class:`OnlineFeatures` reads the account and merchant views of the feature service through
:class:`decisionflow.features.online.OnlineFeatureReader` (Feast's values, one ``online_read`` per view per
request) with the transaction's ``amount`` as request data; the service's on-demand view computes the
request-time features with :mod:`decisionflow.features.transforms`, the code the training set and the batch
decision run use. Gold features include the transaction itself (a gold row is computed at or before its event
time), so a transaction whose row is the latest materialized one gets exactly its training vector.

Freshness: Feast 0.67 serves a materialized row however old. Each view's row event time is returned as
``features_as_of``; a row older than the limit (the view's TTL unless ``max_age_seconds``) *relative to the
transaction's event time* is listed in ``stale``, and a view with no row for the entity in ``missing`` (its
features are null: the policy's ``FEATURES_MISSING`` rule sends such a decision to review; scores are still
given, the model handles nulls).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from decisionflow_serving.settings import GatewaySettings

#: Entity and request keys the reader is called with.
ENTITY_KEYS = ("account_id", "merchant_id")
REQUEST_KEYS = ("amount",)


class FeatureStoreUnavailable(RuntimeError):
    """The online store cannot be read; the message names Feast, the store and the remedy."""


@dataclass
class FeatureVector:
    """One transaction with its features (``row``) and how fresh they were."""

    row: dict[str, Any]
    features_as_of: dict[str, str | None] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def state(self) -> dict[str, Any]:
        return {"features_as_of": self.features_as_of, "stale": self.stale, "missing": self.missing}


def parse_event_time(value: Any) -> datetime:
    """An RFC 3339 ``...Z`` text (the contract's event_time) as an aware UTC datetime."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    text = str(value)
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    # Python < 3.12 accepts at most 6 fractional digits: the contract allows 9.
    head, dot, rest = text.partition(".")
    if dot:
        digits = "".join(ch for ch in rest if ch.isdigit())
        text = f"{head}.{digits[:6]}{rest[len(digits):]}"
    return datetime.fromisoformat(text).astimezone(timezone.utc)


def _iso(ts: datetime | None) -> str | None:
    return None if ts is None else ts.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


class OnlineFeatures:
    """Feature vectors for transactions from an :class:`OnlineFeatureReader`.

    Args:
        reader: the reader over the feature service (``risk_v1``).
        max_age_seconds: one freshness limit for every view; ``None`` = each view's Feast TTL (no limit for a
            view without one).
        describe: names the store in error messages.
    """

    def __init__(self, reader: Any, max_age_seconds: float | None = None, describe: str = "the online store"):
        self.reader = reader
        self.describe = describe
        self._lock = threading.Lock()  # the SQLite online store's connection is not shared across threads safely
        limits: dict[str, timedelta | None] = {}
        for view, ttl in reader.view_ttls.items():
            if max_age_seconds is not None:
                limits[view] = timedelta(seconds=max_age_seconds)
            else:
                limits[view] = ttl if ttl else None
        self.limits = limits

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> OnlineFeatures:
        """The feature store of ``settings`` (registry + online store, no ``feature_store.yaml``) and its reader."""
        from feast import FeatureStore
        from feast.repo_config import RepoConfig

        from decisionflow.features.online import OnlineFeatureReader

        repo = settings.feast_repo_config()
        where = f"Feast project {repo['project']} (registry {repo['registry']}, online store " \
                f"{repo['online_store'].get('type')})"
        try:
            store = FeatureStore(config=RepoConfig(**repo))
            reader = OnlineFeatureReader(store, settings.feature_service)
        except Exception as exc:
            raise FeatureStoreUnavailable(
                f"[feast] cannot open feature service {settings.feature_service!r} of {where}: "
                f"{type(exc).__name__}: {str(exc)[:300]} -- remedy: apply the feature repo ({settings.feature_repo}) "
                "and materialize (the materialize_features DAG), or fix the gateway's feast_* settings") from exc
        return cls(reader, settings.max_feature_age_seconds, describe=where)

    def vectors(self, transactions: Sequence[dict[str, Any]]) -> list[FeatureVector]:
        """Each transaction's record merged with its features, in order, with their freshness."""
        if not transactions:
            return []
        entity_rows = [{k: t.get(k) for k in (*ENTITY_KEYS, *REQUEST_KEYS)} for t in transactions]
        try:
            with self._lock:
                values, times = self.reader.read_with_event_times(entity_rows)
        except Exception as exc:
            raise FeatureStoreUnavailable(
                f"[feast] online read from {self.describe} failed: {type(exc).__name__}: {str(exc)[:300]} -- "
                "remedy: check the online store is up (Redis / SQLite file) and materialized") from exc
        out = []
        names = [n for n in values if n not in ENTITY_KEYS]
        for i, transaction in enumerate(transactions):
            row = dict(transaction)
            for name in names:
                row[name] = values[name][i]
            event_time = parse_event_time(transaction["event_time"])
            vector = FeatureVector(row=row)
            for view, column in times.items():
                ts = column[i]
                vector.features_as_of[view] = _iso(ts)
                if ts is None:
                    vector.missing.append(view)
                    continue
                limit = self.limits.get(view)
                if limit is not None and event_time - ts > limit:
                    vector.stale.append(view)
            out.append(vector)
        return out


class StaticFeatures:
    """Feature vectors from a fixed table (unit tests, benchmarks): ``lookup(transaction) -> features``."""

    def __init__(self, lookup: Callable[[dict[str, Any]], dict[str, Any] | None]):
        self.lookup = lookup

    def vectors(self, transactions: Sequence[dict[str, Any]]) -> list[FeatureVector]:
        out = []
        for t in transactions:
            found = self.lookup(t)
            vector = FeatureVector(row={**t, **(found or {})})
            if found is None:
                vector.missing.append("all")
            out.append(vector)
        return out
