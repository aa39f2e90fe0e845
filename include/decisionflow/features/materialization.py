"""Which window to materialize into the online store, cut into bounded chunks, without ever going backwards.

Feast materializes by *event time*: for each entity, the latest row whose event timestamp falls in
[start, end] is written to the online store. Two things make that subtle here:

* **Reruns must not regress the online store.** The SQLite online store overwrites whatever it holds, so
  re-materializing an old window after a newer one would put older values back. :func:`plan` therefore
  extends the window's end to the latest end already materialized for the view: the last chunk then rewrites
  the newest values, and a clear-and-rerun of any run leaves the store as it was.
* **Gold changes rows in the past.** Late events and corrections MERGE into gold rows whose event time an
  earlier run already covered. A run triggered by the gold asset materializes the event-time range of the gold
  rows changed since the previous materialization (``updated_at`` above a watermark), see
  :func:`changed_event_time_range`. Scheduled runs materialize their data interval, as Feast users expect.

Memory stays bounded by the chunk: a chunk is at most ``chunk`` of event time, and :func:`merge_chunks` joins
adjacent chunks only while their gold rows add up to at most ``max_rows`` (counted by :func:`rows_per_chunk`
over the time column alone). Empty stretches (a window extended over months without data) cost nothing:
every chunk is a Feast materialization that reads and rewrites the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from decisionflow.exceptions import NonRetryableError

if TYPE_CHECKING:
    from feast import FeatureStore


class MaterializationError(NonRetryableError, ValueError):
    """A window or view cannot be materialized (unknown view, end before start, non-positive chunk)."""


@dataclass(frozen=True)
class Window:
    """What one view gets: [start, end] cut into chunks; ``extended_to`` set when end was pushed forward."""

    view: str
    start: datetime
    end: datetime
    chunks: tuple[tuple[datetime, datetime], ...]
    extended_to: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"view": self.view, "start": self.start.isoformat(), "end": self.end.isoformat(),
                "chunks": len(self.chunks),
                "extended_to": self.extended_to.isoformat() if self.extended_to else None}


@dataclass
class Report:
    """What a materialization did, for logs, XCom and the asset event's extra."""

    windows: list[Window] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"windows": [w.as_dict() for w in self.windows], "seconds": round(self.seconds, 2)}


def utc(value: datetime | str) -> datetime:
    """An aware UTC datetime from a datetime (naive = UTC) or an ISO 8601 string."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise MaterializationError(f"not an ISO 8601 timestamp: {value!r}") from exc
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def chunks(start: datetime, end: datetime, size: timedelta) -> tuple[tuple[datetime, datetime], ...]:
    """[start, end] as consecutive [a, b] pieces of at most ``size``, in time order."""
    if size <= timedelta(0):
        raise MaterializationError(f"chunk size must be positive, got {size}")
    if end < start:
        raise MaterializationError(f"window end {end.isoformat()} is before its start {start.isoformat()}")
    pieces, cursor = [], start
    while cursor < end:
        upper = min(cursor + size, end)
        pieces.append((cursor, upper))
        cursor = upper
    return tuple(pieces) or ((start, end),)


def latest_materialized_end(view) -> datetime | None:
    """The latest end of the view's recorded materialization intervals (Feast keeps them in the registry)."""
    ends = [utc(end) for _, end in getattr(view, "materialization_intervals", []) or []]
    return max(ends) if ends else None


def merge_chunks(pieces: tuple[tuple[datetime, datetime], ...], rows: list[int],
                 max_rows: int) -> tuple[tuple[datetime, datetime], ...]:
    """Adjacent chunks joined while their rows add up to at most ``max_rows`` (so empty ones always join)."""
    if len(rows) != len(pieces):
        raise MaterializationError(f"{len(rows)} row counts for {len(pieces)} chunks")
    if max_rows <= 0:
        raise MaterializationError(f"max_rows must be positive, got {max_rows}")
    merged: list[list] = []
    for (lower, upper), count in zip(pieces, rows):
        if merged and merged[-1][2] + count <= max_rows:
            merged[-1][1], merged[-1][2] = upper, merged[-1][2] + count
        else:
            merged.append([lower, upper, count])
    return tuple((lower, upper) for lower, upper, _ in merged)


def rows_per_chunk(table_uri: str, pieces: tuple[tuple[datetime, datetime], ...], *, time_column: str,
                   storage_options: dict[str, str] | None = None) -> list[int]:
    """Rows of the Delta table's current snapshot in each chunk, by event time (a row on a shared bound counts
    in the later chunk). Reads only ``time_column``, batch by batch, so memory stays flat."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    from deltalake import DeltaTable

    def micros(moment: datetime) -> int:
        return int(round(utc(moment).timestamp() * 1_000_000))

    edges = np.array([micros(lower) for lower, _ in pieces] + [micros(pieces[-1][1])], dtype=np.int64)
    counts = np.zeros(len(pieces), dtype=np.int64)
    dataset = DeltaTable(table_uri, storage_options=storage_options or None).to_pyarrow_dataset()
    bounds = (ds.field(time_column) >= pa.scalar(utc(pieces[0][0]), pa.timestamp("us", "UTC"))) & \
             (ds.field(time_column) <= pa.scalar(utc(pieces[-1][1]), pa.timestamp("us", "UTC")))
    for batch in dataset.to_batches(columns=[time_column], filter=bounds):
        values = pc.drop_null(batch.column(0)).cast(pa.timestamp("us", "UTC")).cast(pa.int64()).to_numpy()
        index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(pieces) - 1)
        counts += np.bincount(index, minlength=len(pieces))
    return counts.tolist()


def plan(views: Iterable, start: datetime, end: datetime, chunk: timedelta,
         count_rows: Callable[[Any, tuple[tuple[datetime, datetime], ...]], list[int] | None] | None = None,
         max_rows: int | None = None) -> list[Window]:
    """One :class:`Window` per view: [start, max(end, latest end already materialized)] in chunks of at most
    ``chunk``; with ``count_rows(view, chunks)`` (``None`` when it cannot count that view) and ``max_rows``,
    adjacent chunks merged up to that many rows."""
    start, end = utc(start), utc(end)
    windows = []
    for view in views:
        done = latest_materialized_end(view)
        upper = max(end, done) if done else end
        pieces = chunks(start, upper, chunk)
        rows = count_rows(view, pieces) if count_rows is not None and max_rows is not None else None
        if rows is not None:
            pieces = merge_chunks(pieces, rows, max_rows)
        windows.append(Window(view=view.name, start=start, end=upper, chunks=pieces,
                              extended_to=upper if upper > end else None))
    return windows


def select_views(store: FeatureStore, names: Iterable[str] | None) -> list:
    """The online feature views to materialize: all of them, or the named ones (unknown names are refused)."""
    views = [v for v in store.list_feature_views() if v.online]
    if names is None:
        return views
    wanted = list(names)
    by_name = {v.name: v for v in views}
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise MaterializationError(f"feature view(s) {unknown} are not online feature views of project "
                                   f"{store.project!r} (known: {sorted(by_name)})")
    return [by_name[n] for n in wanted]


def materialize(
    store: FeatureStore,
    windows: list[Window],
    log: Callable[[str], None] = print,
) -> Report:
    """Materialize each window chunk by chunk, oldest first (later chunks overwrite earlier ones)."""
    import time

    report, started = Report(), time.monotonic()
    for window in windows:
        for number, (lower, upper) in enumerate(window.chunks, 1):
            log(f"{window.view}: chunk {number}/{len(window.chunks)} [{lower.isoformat()}, {upper.isoformat()}]")
            store.materialize(start_date=lower, end_date=upper, feature_views=[window.view])
        report.windows.append(window)
    report.seconds = time.monotonic() - started
    return report


def changed_event_time_range(
    table_uris: Iterable[str],
    since: datetime | None,
    *,
    storage_options: dict[str, str] | None = None,
    time_column: str = "event_time",
    updated_column: str = "updated_at",
) -> tuple[datetime, datetime, datetime] | None:
    """(min event time, max event time, max updated_at) of the rows changed after ``since``; None if none.

    Reads only the two timestamp columns of the tables' current snapshots (``deltalake``; the ``updated_at``
    filter is pushed down to the parquet statistics). ``since=None`` means every row.
    """
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    from deltalake import DeltaTable

    lows, highs, updated = [], [], []
    for uri in table_uris:
        dataset = DeltaTable(uri, storage_options=storage_options).to_pyarrow_dataset()
        condition = None if since is None else ds.field(updated_column) > utc(since)
        table = dataset.to_table(columns=[time_column, updated_column], filter=condition)
        if table.num_rows == 0:
            continue
        lows.append(pc.min(table[time_column]).as_py())
        highs.append(pc.max(table[time_column]).as_py())
        updated.append(pc.max(table[updated_column]).as_py())
    if not lows:
        return None
    return utc(min(lows)), utc(max(highs)), utc(max(updated))
