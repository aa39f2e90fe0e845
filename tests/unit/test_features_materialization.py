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
