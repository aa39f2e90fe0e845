"""Read ingestion progress from bronze Delta tables without Spark (delta-rs), for Airflow tasks."""

from __future__ import annotations


def max_offsets(table_uri: str, storage_options: dict[str, str] | None = None) -> dict[tuple[str, int], int]:
    """``{(topic, partition): max offset}`` in a bronze table; empty if the table does not exist yet."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        table = DeltaTable(table_uri, storage_options=storage_options or None)
    except TableNotFoundError:
        return {}
    data = table.to_pyarrow_table(columns=["topic", "partition", "offset"])
    if data.num_rows == 0:
        return {}
    grouped = data.group_by(["topic", "partition"]).aggregate([("offset", "max")])
    return {
        (topic, int(partition)): int(offset)
        for topic, partition, offset in zip(
            grouped["topic"].to_pylist(), grouped["partition"].to_pylist(), grouped["offset_max"].to_pylist()
        )
    }
