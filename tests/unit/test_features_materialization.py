"""Materialization windows: chunks, no going backwards, which window a run gets, the watermark."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pandas as pd
import pytest

from decisionflow.features import materialization as m
from decisionflow.operators.feast import FeastMaterializeOperator

T = datetime(2025, 1, 6, tzinfo=timezone.utc)


def view(name: str, intervals=()):
    return SimpleNamespace(name=name, materialization_intervals=list(intervals))


def test_chunks_cover_the_window_in_order_without_gaps():
    pieces = m.chunks(T, T + timedelta(hours=13), timedelta(hours=6))
    assert pieces == ((T, T + timedelta(hours=6)), (T + timedelta(hours=6), T + timedelta(hours=12)),
                      (T + timedelta(hours=12), T + timedelta(hours=13)))
    assert m.chunks(T, T, timedelta(hours=1)) == ((T, T),)


@pytest.mark.parametrize("start, end, size, message", [
    (T, T - timedelta(seconds=1), timedelta(hours=1), "before its start"),
    (T, T + timedelta(hours=1), timedelta(0), "chunk size must be positive"),
])
def test_bad_windows_are_named(start, end, size, message):
    with pytest.raises(m.MaterializationError, match=message):
        m.chunks(start, end, size)


def test_a_rerun_of_an_older_window_extends_to_the_newest_materialized_end():
    done = [(T, T + timedelta(days=1)), (T + timedelta(days=1), T + timedelta(days=3))]
    (window,) = m.plan([view("account_features", done)], T, T + timedelta(days=1), timedelta(days=1))
    assert window.end == T + timedelta(days=3) and window.extended_to == T + timedelta(days=3)
    assert window.chunks[-1][1] == T + timedelta(days=3)  # the newest values are written last
    (fresh,) = m.plan([view("merchant_features")], T, T + timedelta(days=1), timedelta(days=1))
    assert fresh.end == T + timedelta(days=1) and fresh.extended_to is None


def test_utc_accepts_iso_strings_and_naive_datetimes():
    assert m.utc("2025-01-06T00:00:00Z") == T
    assert m.utc(datetime(2025, 1, 6)) == T
    with pytest.raises(m.MaterializationError, match="not an ISO 8601 timestamp: 'yesterday'"):
        m.utc("yesterday")


def test_materialize_runs_chunks_oldest_first():
    calls = []
    store = SimpleNamespace(materialize=lambda start_date, end_date, feature_views: calls.append(
        (feature_views[0], start_date, end_date)))
    windows = m.plan([view("a")], T, T + timedelta(hours=12), timedelta(hours=6))
    report = m.materialize(store, windows, log=lambda line: None)
    assert calls == [("a", T, T + timedelta(hours=6)), ("a", T + timedelta(hours=6), T + timedelta(hours=12))]
    assert report.as_dict()["windows"][0]["chunks"] == 2


def test_select_views_refuses_unknown_names():
    store = SimpleNamespace(project="p", list_feature_views=lambda: [
        SimpleNamespace(name="account_features", online=True), SimpleNamespace(name="offline_only", online=False)])
    assert [v.name for v in m.select_views(store, None)] == ["account_features"]
    with pytest.raises(m.MaterializationError, match=r"\['offline_only'\] are not online feature views"):
        m.select_views(store, ["offline_only"])


def test_chunks_merge_up_to_max_rows_and_empty_stretches_vanish():
    day = timedelta(days=1)
    pieces = m.chunks(T, T + 6 * day, day)
    assert m.merge_chunks(pieces, [0, 0, 3, 0, 2, 4], max_rows=5) == ((T, T + 5 * day), (T + 5 * day, T + 6 * day))
    assert m.merge_chunks(pieces, [0] * 6, max_rows=1) == ((T, T + 6 * day),)
    # a chunk above the limit on its own stays as it is: the limit only decides joining
    assert m.merge_chunks(pieces[:2], [9, 1], max_rows=5) == pieces[:1] + ((T + day, T + 2 * day),)
    with pytest.raises(m.MaterializationError, match="2 row counts for 6 chunks"):
        m.merge_chunks(pieces, [1, 2], max_rows=5)


def test_rows_per_chunk_counts_the_current_delta_snapshot_by_event_time(tmp_path):
    from deltalake import write_deltalake

    day = timedelta(days=1)
    times = [T, T + timedelta(hours=1), T + 2 * day, T + 2 * day + timedelta(hours=5), T + 9 * day]
    write_deltalake(str(tmp_path / "t"), pd.DataFrame({"event_time": pd.to_datetime(times[:3], utc=True)}))
    write_deltalake(str(tmp_path / "t"), pd.DataFrame({"event_time": pd.to_datetime(times[3:], utc=True)}),
                    mode="append")
    pieces = m.chunks(T, T + 3 * day, day)
    assert m.rows_per_chunk(str(tmp_path / "t"), pieces, time_column="event_time") == [2, 0, 2]
    # an overwrite replaces the snapshot: removed files are not counted
    write_deltalake(str(tmp_path / "t"), pd.DataFrame({"event_time": pd.to_datetime([T + day], utc=True)}),
                    mode="overwrite")
    assert m.rows_per_chunk(str(tmp_path / "t"), pieces, time_column="event_time") == [0, 1, 0]


def test_plan_joins_chunks_by_row_count_when_it_can_count():
    day = timedelta(days=1)
    counted = []

    def count(v, pieces):
        counted.append(v.name)
        return None if v.name == "not_delta" else [1] * len(pieces)

    a, b = m.plan([view("account_features"), view("not_delta")], T, T + 10 * day, day, count, max_rows=4)
    assert a.chunks == ((T, T + 4 * day), (T + 4 * day, T + 8 * day), (T + 8 * day, T + 10 * day))
    assert len(b.chunks) == 10 and counted == ["account_features", "not_delta"]


def test_changed_event_time_range_reads_only_rows_updated_after_the_watermark(tmp_path):
    from deltalake import write_deltalake

    rows = pd.DataFrame({
        "event_id": ["e1", "e2", "e3"],
        "event_time": pd.to_datetime(["2025-01-01", "2025-01-05", "2025-01-09"], utc=True),
        "updated_at": pd.to_datetime(["2026-01-01", "2026-03-01", "2026-02-01"], utc=True),
    })
    write_deltalake(str(tmp_path / "t"), rows)
    everything = m.changed_event_time_range([str(tmp_path / "t")], None)
    assert everything == (m.utc("2025-01-01"), m.utc("2025-01-09"), m.utc("2026-03-01"))
    assert m.changed_event_time_range([str(tmp_path / "t")], m.utc("2026-01-15")) == (
        m.utc("2025-01-05"), m.utc("2025-01-09"), m.utc("2026-03-01"))
    assert m.changed_event_time_range([str(tmp_path / "t")], m.utc("2026-03-01")) is None


@pytest.mark.parametrize("run_type, window, start, expected", [
    ("scheduled", "auto", "", "data_interval"),
    ("backfill", "auto", "", "data_interval"),
    ("asset_triggered", "auto", "", "changes"),
    ("manual", "auto", "", "changes"),
    ("manual", "auto", "2025-01-01T00:00:00Z", "explicit"),
    ("asset_triggered", "data_interval", None, "data_interval"),
])
def test_which_window_a_run_gets(run_type, window, start, expected):
    op = FeastMaterializeOperator(task_id="m", window=window, start=start, end=start)
    assert op._mode({"dag_run": SimpleNamespace(run_type=run_type)}) == expected


def test_unknown_window_is_named():
    with pytest.raises(ValueError, match="window must be one of"):
        FeastMaterializeOperator(task_id="m", window="everything")._mode({})


def test_watermark_comes_from_the_latest_fresh_asset_event():
    from decisionflow.assets import FEATURES_FRESH

    op = FeastMaterializeOperator(task_id="m", fresh_asset=FEATURES_FRESH)
    assert FEATURES_FRESH in op.inlets and FEATURES_FRESH in op.outlets
    events = {FEATURES_FRESH: [SimpleNamespace(extra={"watermark": "2026-01-01T00:00:00+00:00"}),
                               SimpleNamespace(extra={"watermark": "2026-02-01T00:00:00+00:00"}),
                               SimpleNamespace(extra={})]}
    assert op._previous_watermark({"inlet_events": events}) == "2026-02-01T00:00:00+00:00"
    assert op._previous_watermark({"inlet_events": {FEATURES_FRESH: []}}) is None
