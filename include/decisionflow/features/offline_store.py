"""A Feast offline store that reads Delta tables at their current snapshot.

Why: Feast's default ``file`` (dask) offline store reads a Delta folder as plain parquet, including the files a
MERGE or DELETE has removed from the table -- deleted rows stay visible and rewritten rows appear twice. Feast's
``duckdb`` store reads Delta through DuckDB's ``delta`` extension, which it downloads at run time (not possible
offline, and an unpinned binary otherwise). This store is Feast's DuckDB/ibis engine unchanged, except that a
``FileSource`` with ``file_format=DeltaFormat()`` is opened with ``deltalake`` (delta-rs): the transaction log
decides which parquet files are live, and DuckDB scans only those, lazily (filters are pushed down).

Select it in the Feast connection (``FeastHook`` makes it the default)::

    "offline_store": {"type": "decisionflow.features.offline_store.DeltaLakeOfflineStore"}

Other sources (parquet files, ...) are read exactly as Feast's DuckDB store reads them.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

import ibis
import pandas as pd
from feast import FileSource
from feast.data_format import DeltaFormat
from feast.data_source import DataSource
from feast.infra.offline_stores import duckdb as feast_duckdb
from feast.infra.offline_stores.ibis import (
    get_historical_features_ibis,
    pull_all_from_table_or_query_ibis,
    pull_latest_from_table_or_query_ibis,
)
from feast.infra.offline_stores.offline_store import RetrievalJob
from feast.infra.registry.base_registry import BaseRegistry
from feast.repo_config import RepoConfig
from pydantic import StrictStr

STORE_TYPE = "decisionflow.features.offline_store.DeltaLakeOfflineStore"


class DeltaSourceError(RuntimeError):
    """A Delta source of a feature view cannot be opened (missing table, unreadable log)."""


def read_delta_source(data_source: DataSource, repo_path: str) -> ibis.Table:
    """An ibis table over the current snapshot of a Delta ``FileSource``; Feast's reader for anything else."""
    if not (isinstance(data_source, FileSource) and isinstance(data_source.file_format, DeltaFormat)):
        return feast_duckdb._read_data_source(data_source, repo_path)
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    options = {"AWS_ENDPOINT_URL": data_source.s3_endpoint_override} if data_source.s3_endpoint_override else None
    try:
        table = DeltaTable(data_source.path, storage_options=options)
    except TableNotFoundError as exc:
        raise DeltaSourceError(
            f"Feast source {data_source.name!r}: no Delta table at {data_source.path} "
            "(has build_lakehouse written it yet?)") from exc
    backend = ibis.get_backend()  # the default DuckDB backend that Feast's ibis engine executes on
    # One view name per (path, version): re-registering the same snapshot replaces it instead of piling up.
    name = "delta_" + hashlib.sha1(f"{data_source.path}@{table.version()}".encode()).hexdigest()[:20]
    backend.con.register(name, table.to_pyarrow_dataset())
    return backend.table(name)


class DeltaLakeOfflineStoreConfig(feast_duckdb.DuckDBOfflineStoreConfig):
    """Same settings as Feast's DuckDB store (``staging_location``...), selected by this ``type``."""

    type: StrictStr = STORE_TYPE


class DeltaLakeOfflineStore(feast_duckdb.DuckDBOfflineStore):
    """Feast's DuckDB offline store with Delta sources read at their current snapshot (see the module)."""

    @staticmethod
    def _staging(config: RepoConfig) -> dict[str, Any]:
        return {
            "data_source_reader": read_delta_source,
            "data_source_writer": feast_duckdb._write_data_source,
            "staging_location": config.offline_store.staging_location,
            "staging_location_endpoint_override": config.offline_store.staging_location_endpoint_override,
        }

    @staticmethod
    def pull_latest_from_table_or_query(
        config: RepoConfig,
        data_source: DataSource,
        join_key_columns: list[str],
        feature_name_columns: list[str],
        timestamp_field: str,
        created_timestamp_column: str | None,
        start_date: datetime,
        end_date: datetime,
    ) -> RetrievalJob:
        return pull_latest_from_table_or_query_ibis(
            config=config, data_source=data_source, join_key_columns=join_key_columns,
            feature_name_columns=feature_name_columns, timestamp_field=timestamp_field,
            created_timestamp_column=created_timestamp_column, start_date=start_date, end_date=end_date,
            **DeltaLakeOfflineStore._staging(config),
        )

    @staticmethod
    def get_historical_features(
        config: RepoConfig,
        feature_views: list,
        feature_refs: list[str],
        entity_df: pd.DataFrame | str,
        registry: BaseRegistry,
        project: str,
        full_feature_names: bool = False,
        filter_by_created_timestamp: bool = False,
    ) -> RetrievalJob:
        return get_historical_features_ibis(
            config=config, feature_views=feature_views, feature_refs=feature_refs, entity_df=entity_df,
            registry=registry, project=project, full_feature_names=full_feature_names,
            filter_by_created_timestamp=filter_by_created_timestamp,
            **DeltaLakeOfflineStore._staging(config),
        )

    @staticmethod
    def pull_all_from_table_or_query(
        config: RepoConfig,
        data_source: DataSource,
        join_key_columns: list[str],
        feature_name_columns: list[str],
        timestamp_field: str,
        created_timestamp_column: str | None = None,
        start_date: datetime | None = None,
        end_date: datetime | None = None,
    ) -> RetrievalJob:
        return pull_all_from_table_or_query_ibis(
            config=config, data_source=data_source, join_key_columns=join_key_columns,
            feature_name_columns=feature_name_columns, timestamp_field=timestamp_field,
            created_timestamp_column=created_timestamp_column, start_date=start_date, end_date=end_date,
            **DeltaLakeOfflineStore._staging(config),
        )
