"""Feast operators: apply the feature repo, materialize features into the online store."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from decisionflow import constants
from decisionflow.operators.base import DecisionflowOperatorMixin

if TYPE_CHECKING:
    from airflow.sdk import Asset, Context

#: Run types whose data interval is a real slice of event time (the others are triggered by an event).
INTERVAL_RUN_TYPES = ("scheduled", "backfill")
WINDOWS = ("auto", "data_interval", "changes")


class FeastApplyOperator(DecisionflowOperatorMixin, BaseOperator):
    """
    Apply the feature repo to the registry and online store -- ``feast apply`` without a yaml file; idempotent.

    Objects removed from the repo are removed from the registry, as with ``feast apply``.

    :param feast_conn_id: Airflow connection (type ``feast``) with project, registry and stores.
    :param lake_conn_id: Airflow connection (type ``delta_lake``) whose root the Delta sources live under.
    :param skip_source_validation: do not check that the sources exist (e.g. before the first gold build).
    """

    layer = "feast"

    def __init__(self, *, feast_conn_id: str = "feast_default", lake_conn_id: str = "lake_default",
                 skip_source_validation: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.feast_conn_id = feast_conn_id
        self.lake_conn_id = lake_conn_id
        self.skip_source_validation = skip_source_validation

    def execute(self, context: Context) -> dict[str, Any]:
        from decisionflow.hooks.feast import FeastHook

        applied = FeastHook(self.feast_conn_id, lake_conn_id=self.lake_conn_id).apply(self.skip_source_validation)
        self.log.info("applied %s: views %s, services %s", applied["repo_path"],
                      applied["feature_views"] + applied["on_demand_feature_views"], applied["feature_services"])
        return applied


class FeastMaterializeOperator(DecisionflowOperatorMixin, BaseOperator):
    """
    Materialize online feature views for a window of event time, in bounded chunks, safe to clear and rerun.

    Which window (``window``):

    * ``data_interval`` -- the run's data interval (or ``start``/``end`` when given), the Feast convention for
      scheduled runs;
    * ``changes`` -- the event-time range of the gold rows whose ``updated_at`` is newer than the watermark of
      the previous ``fresh_asset`` event (all rows the first time): late events and MERGE corrections reach the
      online store even though their event time is in the past;
    * ``auto`` (default) -- ``start``/``end`` when given, ``data_interval`` for scheduled and backfill runs,
      ``changes`` for asset-triggered and manual runs.

    Whatever the window, its end is extended to the latest end already materialized for the view, so a rerun
    of an older window never puts older values back (see :mod:`decisionflow.features.materialization`). On
    success the ``fresh_asset`` event carries the windows and the new watermark in its ``extra``.

    :param feature_views: names of the online views; ``None`` for all of them.
    :param window: ``auto``, ``data_interval`` or ``changes`` (see above).
    :param start: explicit window start (ISO 8601 or datetime; templated); needs ``end``.
    :param end: explicit window end (ISO 8601 or datetime; templated).
    :param chunk: the longest piece of event time materialized at once (bounds memory on long windows).
    :param chunk_rows: adjacent chunks of a Delta-backed view are joined while their gold rows add up to at
        most this many (counted over the time column), so months without data cost nothing; ``None``: never join.
    :param fresh_asset: the asset that marks features fresh; its previous event holds the watermark.
    :param feast_conn_id: Airflow connection (type ``feast``).
    :param lake_conn_id: Airflow connection (type ``delta_lake``), for the Delta tables' storage options.
    """

    layer = "feast"

    template_fields: Sequence[str] = ("feature_views", "window", "start", "end")

    def __init__(
        self,
        *,
        feature_views: list[str] | None = None,
        window: str = "auto",
        start: str | datetime | None = None,
        end: str | datetime | None = None,
        chunk: timedelta = timedelta(hours=6),
        chunk_rows: int | None = 500_000,
        fresh_asset: Asset | None = None,
        feast_conn_id: str = "feast_default",
        lake_conn_id: str = "lake_default",
        **kwargs,
    ) -> None:
        if fresh_asset is not None:
            kwargs["inlets"] = [*kwargs.get("inlets", []), fresh_asset]
            kwargs["outlets"] = [*kwargs.get("outlets", []), fresh_asset]
        super().__init__(**kwargs)
        self.feature_views = feature_views
        self.window = window
        self.start = start
        self.end = end
        self.chunk = chunk
        self.chunk_rows = chunk_rows
        self.fresh_asset = fresh_asset
        self.feast_conn_id = feast_conn_id
        self.lake_conn_id = lake_conn_id

    def _skip_before_the_first_gold_build(self, views, storage_options) -> None:
        """A fresh platform: the views' Delta tables do not exist yet -- nothing to materialize, not a failure."""
        from airflow.sdk.exceptions import AirflowSkipException
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        from decisionflow.features import materialization as m

        for view in views:
            try:
                path = self._delta_path(view)
            except m.MaterializationError:
                continue  # not a Delta source
            try:
                DeltaTable(path, storage_options=storage_options or None)
            except TableNotFoundError as exc:
                raise AirflowSkipException(f"feature view {view.name}: its table {path} does not exist yet -- run "
                                           "ingest_transactions and build_lakehouse first") from exc

    def execute(self, context: Context) -> dict[str, Any]:
        from decisionflow.features import materialization as m
        from decisionflow.hooks.feast import FeastHook

        hook = FeastHook(self.feast_conn_id, lake_conn_id=self.lake_conn_id)
        store = hook.get_store()
        views = m.select_views(store, self.feature_views)
        storage_options = _storage_options(hook)
        self._skip_before_the_first_gold_build(views, storage_options)
        mode = self._mode(context)
        watermark = self._previous_watermark(context)
        new_watermark = watermark
        if mode == "explicit":
            if self.start in (None, "") or self.end in (None, ""):
                raise m.MaterializationError(f"start and end must both be given, got start={self.start!r} "
                                             f"end={self.end!r}")
            start, end = m.utc(self.start), m.utc(self.end)
        elif mode == "data_interval":
            start, end = context["data_interval_start"], context["data_interval_end"]
            if start is None or end is None:
                raise m.MaterializationError("window 'data_interval': this run has no data interval; give "
                                             "start/end or use window 'changes'")
        else:
            changed = m.changed_event_time_range(
                [self._delta_path(view) for view in views], m.utc(watermark) if watermark else None,
                storage_options=storage_options)
            if changed is None:
                self.log.info("no gold row changed since %s: nothing to materialize", watermark or "the start")
                self._mark_fresh(context, mode, [], watermark)
                return {"mode": mode, "windows": [], "watermark": watermark}
            start, last_event, updated_through = changed
            end = last_event + timedelta(seconds=1)  # Feast's end bound is exclusive of the newest microsecond
            new_watermark = updated_through.isoformat()

        def count_rows(view, pieces):
            try:
                path = self._delta_path(view)
            except m.MaterializationError:
                return None  # not a Delta source: keep the time chunks
            return m.rows_per_chunk(path, pieces, time_column=view.batch_source.timestamp_field,
                                    storage_options=storage_options)

        windows = m.plan(views, start, end, self.chunk, count_rows if self.chunk_rows else None, self.chunk_rows)
        self.log.info("window %s: %s", mode, [w.as_dict() for w in windows])
        report = m.materialize(store, windows, log=self.log.info)
        result = {"mode": mode, **report.as_dict(), "watermark": new_watermark}
        self._mark_fresh(context, mode, report.as_dict()["windows"], new_watermark)
        return result

    # -- helpers --------------------------------------------------------------------------------------------
    def _mode(self, context: Context) -> str:
        if self.window not in WINDOWS:
            from decisionflow.exceptions import ParamsError

            raise ParamsError(f"window must be one of {WINDOWS}, got {self.window!r}")
        if self.start not in (None, "") or self.end not in (None, ""):
            return "explicit"
        if self.window != "auto":
            return self.window
        run_type = str(getattr(context.get("dag_run"), "run_type", "") or "")
        return "data_interval" if run_type.split(".")[-1].lower() in INTERVAL_RUN_TYPES else "changes"

    def _previous_watermark(self, context: Context) -> str | None:
        from decisionflow.operators._asset_events import latest_extra

        return latest_extra(context, self.fresh_asset, "watermark") if self.fresh_asset is not None else None

    def _mark_fresh(self, context: Context, mode: str, windows: list, watermark: str | None) -> None:
        if self.fresh_asset is not None and context.get("outlet_events") is not None:
            context["outlet_events"][self.fresh_asset].extra = {"mode": mode, "windows": windows,
                                                               "watermark": watermark}

    @staticmethod
    def _delta_path(view) -> str:
        from feast import FileSource
        from feast.data_format import DeltaFormat

        from decisionflow.features.materialization import MaterializationError

        source = view.batch_source
        if not (isinstance(source, FileSource) and isinstance(source.file_format, DeltaFormat)):
            raise MaterializationError(f"window 'changes' needs a Delta source; view {view.name!r} reads "
                                       f"{type(source).__name__} {getattr(source, 'path', '')}")
        return source.path

class BuildTrainingSetOperator(DecisionflowOperatorMixin, BaseOperator):
    """
    Write the point-in-time training set of a feature service to parquet, with its lineage, for training.

    Entity rows are the labelled (or mature unlabelled) transactions of ``silver/transactions`` and
    ``silver/labels`` at their event time; features come from Feast's point-in-time join
    (:func:`decisionflow.features.training_set.build_training_set`). The file is run-scoped
    (``<data dir>/training/<dag_id>/<run_id>/training_set.parquet``), so a rerun rewrites the same file.

    :param feature_service: the Feast feature service (``risk_v1``).
    :param label_maturity_days: an unlabelled transaction older than this counts as legit (templated).
    :param as_of: labels known at this moment (ISO 8601, templated); default: now.
    :param output_dir: where the run folders go; default ``<data dir>/training``.
    :param feast_conn_id: Airflow connection (type ``feast``).
    :param lake_conn_id: Airflow connection (type ``delta_lake``) with the lake root.
    """

    layer = "feast"

    template_fields: Sequence[str] = ("feature_service", "label_maturity_days", "as_of", "output_dir")

    def __init__(self, *, feature_service: str = constants.FEATURE_SERVICE, label_maturity_days: float | str = 30.0,
                 as_of: str | None = None, output_dir: str | None = None, feast_conn_id: str = "feast_default",
                 lake_conn_id: str = "lake_default", **kwargs) -> None:
        super().__init__(**kwargs)
        self.feature_service = feature_service
        self.label_maturity_days = label_maturity_days
        self.as_of = as_of
        self.output_dir = output_dir
        self.feast_conn_id = feast_conn_id
        self.lake_conn_id = lake_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        from pathlib import Path

        from decisionflow import config
        from decisionflow.features.materialization import utc
        from decisionflow.features.training_set import build_training_set
        from decisionflow.hooks.feast import FeastHook
        from decisionflow.hooks.lake import LakeHook

        from decisionflow.exceptions import ParamsError

        lake = LakeHook(self.lake_conn_id)
        store = FeastHook(self.feast_conn_id, lake_conn_id=self.lake_conn_id).get_store()
        try:
            maturity = float(self.label_maturity_days)
        except (TypeError, ValueError) as exc:
            raise ParamsError(f"label_maturity_days must be a number, got {self.label_maturity_days!r}") from exc
        # a fresh platform (no silver yet) raises NotReadyError: the operator base turns it into a skip
        training = build_training_set(
            store, lake.root, feature_service=self.feature_service, as_of=utc(self.as_of) if self.as_of else None,
            label_maturity_days=maturity, storage_options=lake.storage_options or None)
        run_dir = Path(self.output_dir or config.data_dir() / "training", context["dag"].dag_id,
                       _safe(context["run_id"]))
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "training_set.parquet"
        training.frame.to_parquet(path, index=False)
        self.log.info("training set: %d rows (%d fraud), counts %s, tables %s -> %s", len(training.frame),
                      int(training.frame["is_fraud"].sum()), training.counts, training.table_versions, path)
        return {"path": str(path), "feature_columns": training.feature_columns,
                "lineage": {k: str(v) for k, v in training.lineage().items()}, "rows": len(training.frame)}


def _storage_options(hook) -> dict[str, str] | None:
    """The lake connection's storage options (None without a lake connection or options)."""
    lake = hook.lake()
    return (lake.storage_options or None) if lake else None


def _safe(run_id: str) -> str:
    """A run id as one path component (run ids carry ':' and '+')."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
