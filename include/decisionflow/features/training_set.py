"""Point-in-time training sets: labelled transactions as Feast entity rows, features from the ``risk_v1`` service.

Entity rows are built from the silver layer, read with ``deltalake`` at one pinned version per table (recorded
for lineage): each transaction of ``silver/transactions`` at its ``event_time``, with the latest label of
``silver/labels``. Card fraud is confirmed by chargebacks that can take weeks, so a transaction without a fraud
label counts as legitimate only once it is *mature* (``label_maturity_days`` old at ``as_of``); younger
unlabelled transactions are left out rather than taught as legit. Features then come from Feast's
point-in-time join (:class:`decisionflow.features.offline_store.DeltaLakeOfflineStore`): for each row, the gold
values of the latest transaction of that account / merchant at or before ``event_time``.

No Airflow here: the training DAG's task calls :func:`build_training_set` and hands the parquet file on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from decisionflow import constants
from decisionflow.exceptions import NonRetryableError, NotReadyError
from decisionflow.lakehouse.tables import join_path

if TYPE_CHECKING:
    import pandas as pd
    from feast import FeatureStore

TRANSACTIONS, LABELS = "silver/transactions", "silver/labels"
REQUEST_FEATURES = ("amount",)
ENTITY_COLUMNS = ("event_id", "account_id", "merchant_id", "amount", "event_timestamp", "is_fraud")


class TrainingSetError(NonRetryableError, ValueError):
    """The training set cannot be built: a missing table or column, no labelled rows, a missing feature."""


class TrainingSourceMissingError(TrainingSetError, NotReadyError):
    """A table the training set reads has not been built yet (a fresh platform)."""


@dataclass
class TrainingSet:
    """The point-in-time frame and where it came from."""

    frame: pd.DataFrame
    feature_service: str
    feature_columns: list[str]
    table_versions: dict[str, int]
    as_of: datetime
    counts: dict[str, int] = field(default_factory=dict)

    def lineage(self) -> dict[str, Any]:
        """Flat lineage for MLflow tags: ``delta.<table>.version``, the feature service, ``as_of``, counts."""
        tags: dict[str, Any] = {f"delta.{table}.version": version for table, version in self.table_versions.items()}
        tags["feature_service"] = self.feature_service
        tags["as_of"] = self.as_of.isoformat()
        tags.update({f"rows.{name}": value for name, value in self.counts.items()})
        return tags


def _open(lake_root: str, name: str, storage_options: dict[str, str] | None):
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    path = join_path(lake_root, name)
    try:
        return DeltaTable(path, storage_options=storage_options)
    except TableNotFoundError as exc:
        raise TrainingSourceMissingError(f"table {name} does not exist at {path}: run build_lakehouse first") from exc


def _read(table, name: str, columns: list[str]) -> pd.DataFrame:
    present = {f.name for f in table.schema().fields}
    missing = [c for c in columns if c not in present]
    if missing:
        raise TrainingSetError(f"table {name} lacks column(s) {missing} (has {sorted(present)})")
    return table.to_pandas(columns=columns)


def labelled_entity_rows(
    lake_root: str,
    *,
    as_of: datetime | None = None,
    label_maturity_days: float = 30.0,
    storage_options: dict[str, str] | None = None,
) -> tuple[pd.DataFrame, dict[str, int], dict[str, int]]:
    """Entity rows (``ENTITY_COLUMNS``) with the label, the silver table versions read, and row counts.

    :param as_of: the moment the labels are taken as known (default: now, UTC); labels after it are ignored.
    :param label_maturity_days: an unlabelled transaction older than this at ``as_of`` counts as legit.
    """
    import pandas as pd

    as_of = as_of or datetime.now(timezone.utc)
    transactions = _open(lake_root, TRANSACTIONS, storage_options)
    labels = _open(lake_root, LABELS, storage_options)
    versions = {TRANSACTIONS: transactions.version(), LABELS: labels.version()}
    txns = _read(transactions, TRANSACTIONS, ["event_id", "account_id", "merchant_id", "amount", "event_time"])
    known = _read(labels, LABELS, ["event_id", "label", "labelled_at"])

    known = known[known["labelled_at"] <= pd.Timestamp(as_of)]
    latest = known.sort_values(["event_id", "labelled_at"]).drop_duplicates("event_id", keep="last")
    rows = txns.merge(latest[["event_id", "label"]], on="event_id", how="left")
    rows = rows[rows["event_time"] <= pd.Timestamp(as_of)]
    mature = rows["event_time"] <= pd.Timestamp(as_of - timedelta(days=label_maturity_days))
    labelled = rows["label"].notna()
    counts = {"transactions": int(len(rows)), "labelled": int(labelled.sum()),
              "fraud_labels": int((rows["label"] == "fraud").sum()),
              "mature_unlabelled": int((~labelled & mature).sum()),
              "immature_unlabelled_left_out": int((~labelled & ~mature).sum())}
    rows = rows[labelled | mature].copy()
    rows["is_fraud"] = rows["label"].eq("fraud")
    rows = rows.rename(columns={"event_time": "event_timestamp"})
    rows["event_timestamp"] = pd.to_datetime(rows["event_timestamp"], utc=True)
    counts["entity_rows"] = int(len(rows))
    return rows[list(ENTITY_COLUMNS)].reset_index(drop=True), versions, counts


def build_training_set(
    store: FeatureStore,
    lake_root: str,
    *,
    feature_service: str = constants.FEATURE_SERVICE,
    as_of: datetime | None = None,
    label_maturity_days: float = 30.0,
    storage_options: dict[str, str] | None = None,
) -> TrainingSet:
    """The point-in-time training frame: entity rows + every feature of ``feature_service``.

    :raises TrainingSetError: no table, no entity row, an unknown feature service, or a feature the
        service declares that the result lacks (named).
    """
    as_of = as_of or datetime.now(timezone.utc)
    entity_rows, versions, counts = labelled_entity_rows(
        lake_root, as_of=as_of, label_maturity_days=label_maturity_days, storage_options=storage_options)
    if entity_rows.empty:
        raise TrainingSetError(
            f"empty training set: no labelled or mature transaction in {TRANSACTIONS} / {LABELS} as of "
            f"{as_of.isoformat()} (counts {counts})")
    try:
        service = store.get_feature_service(feature_service)
    except Exception as exc:  # feast raises FeatureServiceNotFoundException
        try:
            applied = bool(store.list_feature_services())
        except Exception:  # noqa: BLE001 - an unreadable registry: report the lookup's error below
            applied = True
        # a registry with no feature service at all is a fresh platform (a skip); another name is a wrong config
        error = TrainingSetError if applied else TrainingSourceMissingError
        raise error(f"feature service {feature_service!r} is not in the Feast registry "
                    f"(apply the feature repo first: materialize_features does): {exc}") from exc
    expected = [f.name for projection in service.feature_view_projections for f in projection.features]
    frame = store.get_historical_features(entity_df=entity_rows, features=service).to_df()
    missing = [name for name in expected if name not in frame.columns]
    if missing:
        raise TrainingSetError(f"feature service {feature_service!r}: feature(s) {missing} missing from the "
                               "point-in-time result")
    if len(frame) != len(entity_rows):
        raise TrainingSetError(f"point-in-time join returned {len(frame)} rows for {len(entity_rows)} entity rows")
    # The request field the on-demand view reads is a model input too (the decision request carries it).
    features = list(dict.fromkeys([*expected, *REQUEST_FEATURES]))
    return TrainingSet(frame=frame.sort_values("event_timestamp").reset_index(drop=True),
                       feature_service=feature_service, feature_columns=features, table_versions=versions,
                       as_of=as_of, counts=counts)
