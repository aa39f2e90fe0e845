"""The review queue: decisions the policy sent to review, waiting for a person (Airflow HITL task or the CLI).

A small Delta table (``gold/review_queue``), one row per decision id, written by delta-rs only (created when
missing, with the columns below; a queue created by an older version gets the newer nullable columns added on
first use). :func:`enqueue_reviews` MERGEs insert-only: a rerun of the escalation step queues nothing twice, and
a queued case keeps its first ``queued_at``. ``priority`` is the rank by score within its run (1 = the
riskiest); whoever picks cases up takes the highest scores first.

Statuses (``status``)::

    open --claim_reviews--> in_review --mark_resolved--> resolved | escalated
      ^                         |
      +---- claim gone stale ---+   (an in_review claim older than ``stale_after`` may be claimed again)

* ``open`` - queued, nobody is on it yet.
* ``in_review`` - claimed by one ``review_decisions`` run: ``review_run_id``, ``review_map_index`` (the mapped
  HITL task that shows it, so ``decisionflow review answer`` can answer that task) and ``claimed_at``. Claiming
  is a MERGE conditioned on the row still being claimable, so two concurrent runs never claim the same case.
* ``resolved`` - answered ``approve`` or ``decline`` (by a person, or by the policy's default on a timeout).
* ``escalated`` - answered ``escalate``: handed on to investigations outside the platform. Terminal here like
  ``resolved``: the audit row's review columns are set once, so the platform does not ask again; the
  transaction's outcome arrives later as a chargeback label.

``resolved_by`` / ``resolved_at`` / ``resolution`` / ``review_source`` repeat the answer (the audit row in
``gold/decisions`` is the record). ``events_scan_from`` / ``events_sent_at`` belong to the label and case-note
publication of :mod:`decisionflow.decisions.review` (the topics' end offsets taken before the first send, so a
retried apply reads back what an earlier attempt committed; and when it finished).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from decisionflow.decisions import _delta
from decisionflow.lakehouse.tables import Column, TableSpec


def _col(name: str, sql_type: str, comment: str = "", *, null: bool = True) -> Column:
    return Column(name, sql_type, nullable=null, comment=comment)

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

log = logging.getLogger(__name__)

REVIEW_QUEUE_TABLE = "gold/review_queue"
OPEN, IN_REVIEW, RESOLVED, ESCALATED = "open", "in_review", "resolved", "escalated"
STATUSES = (OPEN, IN_REVIEW, RESOLVED, ESCALATED)
#: Statuses after which a case takes no answer any more.
FINAL = (RESOLVED, ESCALATED)
#: An ``in_review`` claim older than this may be claimed again (its run died or was cleared without answering):
#: a day beyond the policy's 24 h response timeout, after which the scheduler has answered every live task.
DEFAULT_STALE_AFTER = timedelta(hours=48)

_V1 = (
    _col("decision_id", "STRING", "the queued decision (gold/decisions)", null=False),
    _col("event_id", "STRING", null=False),
    _col("account_id", "STRING", null=False),
    _col("event_time", "TIMESTAMP", null=False),
    _col("score", "DOUBLE", null=False),
    _col("reason_codes", "ARRAY<STRING>"),
    _col("priority", "BIGINT", "rank by score within the queuing run (1 = riskiest)", null=False),
    _col("run_id", "STRING", "the decision run that queued it", null=False),
    _col("queued_at", "TIMESTAMP", null=False),
    _col("status", "STRING", "open | in_review | resolved | escalated", null=False),
)
_V2 = (
    _col("review_run_id", "STRING", "the review_decisions run that claimed it"),
    _col("review_map_index", "BIGINT", "map index of its HITL task in that run"),
    _col("claimed_at", "TIMESTAMP"),
    _col("resolution", "STRING", "approve | decline | escalate"),
    _col("resolved_by", "STRING"),
    _col("resolved_at", "TIMESTAMP"),
    _col("review_source", "STRING", "hitl | cli | timeout"),
    _col("events_scan_from", "STRING", "JSON {topic: {partition: offset}} before the first label/note send"),
    _col("events_sent_at", "TIMESTAMP", "label and case note committed to Kafka"),
)
#: Declared here, not in :mod:`decisionflow.lakehouse.tables`: only delta-rs writes this small table.
SPEC = TableSpec(name=REVIEW_QUEUE_TABLE, columns=_V1 + _V2, keys=("decision_id",),
                 description="Review queue: one row per decision sent to review, with its claim and resolution.")


def _schema() -> pa.Schema:
    return _delta.arrow_schema(SPEC)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _upgrade(lake_root: str, storage_options: Mapping[str, str] | None) -> None:
    """Add the columns a queue written by an older version lacks (nullable; one schema commit)."""
    import pyarrow as pa
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError
    from deltalake.schema import Field

    try:
        dt = DeltaTable(SPEC.path(lake_root), storage_options=dict(storage_options or {}) or None)
    except TableNotFoundError:
        return
    have = {f.name for f in pa.schema(dt.schema().to_arrow())}
    missing = [c for c in SPEC.columns if c.name not in have]
    if missing:
        dt.alter.add_columns([Field.from_arrow(pa.field(c.name, _delta.arrow_type(c.type), nullable=True))
                              for c in missing])
        log.info("%s: added columns %s", SPEC.name, [c.name for c in missing])


_UPGRADED: set[str] = set()


def _merge(lake_root: str, storage_options: Mapping[str, str] | None, run, what: str) -> dict[str, Any]:
    key = SPEC.path(lake_root)
    if key not in _UPGRADED:
        _upgrade(lake_root, storage_options)
        _UPGRADED.add(key)
    return _delta.merge_with_retry(SPEC, lake_root, dict(storage_options or {}) or None, run, what=what)


def enqueue_reviews(lake_root: str, decisions: pd.DataFrame, run_id: str,
                    storage_options: Mapping[str, str] | None = None) -> int:
    """Queue these (escalated) decisions as ``open``; returns how many were new. Idempotent by ``decision_id``."""
    import pandas as pd
    import pyarrow as pa

    if decisions.empty:
        return 0
    frame = pd.DataFrame({
        "decision_id": decisions["decision_id"].astype(str),
        "event_id": decisions["event_id"].astype(str),
        "account_id": decisions["account_id"].astype(str),
        "event_time": pd.to_datetime(decisions["event_time"], utc=True),
        "score": decisions["score"].astype("float64"),
        "reason_codes": [list(r) for r in decisions["reason_codes"]],
        "priority": decisions["score"].rank(ascending=False, method="first").astype("int64"),
        "run_id": run_id,
        "queued_at": pd.Timestamp(_now()),
        "status": OPEN,
    })
    table = _delta.conform(pa.Table.from_pandas(frame, preserve_index=False), _schema())

    def merge(dt) -> dict[str, Any]:
        return (dt.merge(table, predicate="t.decision_id = s.decision_id", source_alias="s", target_alias="t")
                .when_not_matched_insert_all().execute())

    return int(_merge(lake_root, storage_options, merge, "enqueue").get("num_target_rows_inserted", 0))


def read_queue(lake_root: str, storage_options: Mapping[str, str] | None = None, *,
               statuses: Iterable[str] | None = None, decision_ids: Iterable[str] | None = None,
               review_run_id: str | None = None) -> pd.DataFrame:
    """Queue rows (optionally of these statuses / decision ids / claiming run), riskiest first; empty (with the
    queue's columns) when nothing was queued yet."""
    import pyarrow as pa

    options = dict(storage_options or {}) or None
    key = SPEC.path(lake_root)
    if key not in _UPGRADED:
        _upgrade(lake_root, options)
        _UPGRADED.add(key)
    dt = _delta.open_table(SPEC, lake_root, options)
    if dt is None:
        return _schema().empty_table().to_pandas()
    where: dict[str, Any] = {}
    if statuses is not None:
        where["status"] = list(statuses)
    if decision_ids is not None:
        where["decision_id"] = list(decision_ids)
    if review_run_id is not None:
        where["review_run_id"] = review_run_id
    table: pa.Table = _delta.select(SPEC, dt, list(SPEC.column_names), where)
    frame = table.to_pandas()
    return frame.sort_values(["score", "queued_at"], ascending=[False, True], kind="stable").reset_index(drop=True)


def open_reviews(lake_root: str, storage_options: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The open cases, riskiest first (empty when nothing was queued yet)."""
    return read_queue(lake_root, storage_options, statuses=[OPEN])


def claim_reviews(lake_root: str, review_run_id: str, limit: int,
                  storage_options: Mapping[str, str] | None = None, *,
                  stale_after: timedelta = DEFAULT_STALE_AFTER, now: datetime | None = None) -> pd.DataFrame:
    """
    Claim up to ``limit`` cases for the review run ``review_run_id``: the riskiest ``open`` ones (and ``in_review``
    ones whose claim is older than ``stale_after``), status -> ``in_review`` with ``review_map_index`` 0, 1, ...
    in that order. Idempotent per run: a retried pick gets back exactly what the run claimed before (same map
    indexes), and claims nothing more. Concurrent runs never claim one case twice (the MERGE re-checks the
    status). Returns the run's claimed rows ordered by ``review_map_index``.
    """
    import pandas as pd
    import pyarrow as pa

    mine = read_queue(lake_root, storage_options, review_run_id=review_run_id)
    mine = mine[mine["status"] != OPEN]
    if not mine.empty or limit <= 0:
        return mine.sort_values("review_map_index").reset_index(drop=True)
    now = now or _now()
    stale = pd.Timestamp(now - stale_after)
    candidates = read_queue(lake_root, storage_options, statuses=[OPEN, IN_REVIEW])
    claimable = (candidates["status"] == OPEN) | (pd.to_datetime(candidates["claimed_at"], utc=True) < stale)
    chosen = candidates[claimable].head(int(limit))
    if chosen.empty:
        return mine
    source = pa.table({
        "decision_id": pa.array(chosen["decision_id"].tolist(), pa.string()),
        "review_run_id": pa.array([review_run_id] * len(chosen), pa.string()),
        "review_map_index": pa.array(range(len(chosen)), pa.int64()),
        "claimed_at": pa.array([now] * len(chosen), pa.timestamp("us", tz="UTC")),
        "stale_before": pa.array([stale.to_pydatetime()] * len(chosen), pa.timestamp("us", tz="UTC")),
    })
    condition = (f"t.status = {_delta.sql_string(OPEN)} OR (t.status = {_delta.sql_string(IN_REVIEW)} "
                 "AND t.claimed_at < s.stale_before)")

    def merge(dt) -> dict[str, Any]:
        return (dt.merge(source, predicate="t.decision_id = s.decision_id", source_alias="s", target_alias="t")
                .when_matched_update(updates={"status": _delta.sql_string(IN_REVIEW),
                                              "review_run_id": "s.review_run_id",
                                              "review_map_index": "s.review_map_index",
                                              "claimed_at": "s.claimed_at"}, predicate=condition).execute())

    _merge(lake_root, storage_options, merge, "claim")
    claimed = read_queue(lake_root, storage_options, review_run_id=review_run_id)
    claimed = claimed[claimed["status"] == IN_REVIEW].sort_values("review_map_index").reset_index(drop=True)
    if len(claimed) < len(chosen):
        log.info("%s: %d of %d cases were claimed by a concurrent run first", SPEC.name,
                 len(chosen) - len(claimed), len(chosen))
        # the mapped tasks are numbered 0..n-1 in this order: the queue must name the same index
        renumber = pa.table({"decision_id": pa.array(claimed["decision_id"].tolist(), pa.string()),
                             "review_map_index": pa.array(range(len(claimed)), pa.int64()),
                             "review_run_id": pa.array([review_run_id] * len(claimed), pa.string())})

        def again(dt) -> dict[str, Any]:
            return (dt.merge(renumber, predicate="t.decision_id = s.decision_id AND t.review_run_id = "
                                                 "s.review_run_id", source_alias="s", target_alias="t")
                    .when_matched_update(updates={"review_map_index": "s.review_map_index"}).execute())

        _merge(lake_root, storage_options, again, "renumber claims")
        claimed["review_map_index"] = range(len(claimed))
    return claimed


def mark_resolved(lake_root: str, decision_id: str, *, resolution: str, resolved_by: str, resolved_at: datetime,
                  review_source: str, storage_options: Mapping[str, str] | None = None) -> int:
    """Status -> ``escalated`` (answer ``escalate``) or ``resolved``, with who/when/how; a row already final keeps
    its first resolution. Returns rows changed (0 or 1)."""
    import pyarrow as pa

    status = ESCALATED if resolution == "escalate" else RESOLVED
    source = pa.table({
        "decision_id": pa.array([decision_id], pa.string()), "status": pa.array([status], pa.string()),
        "resolution": pa.array([resolution], pa.string()), "resolved_by": pa.array([resolved_by], pa.string()),
        "resolved_at": pa.array([resolved_at], pa.timestamp("us", tz="UTC")),
        "review_source": pa.array([review_source], pa.string()),
    })
    final = ", ".join(_delta.sql_string(s) for s in FINAL)

    def merge(dt) -> dict[str, Any]:
        return (dt.merge(source, predicate="t.decision_id = s.decision_id", source_alias="s", target_alias="t")
                .when_matched_update(updates={n: f"s.{n}" for n in source.column_names if n != "decision_id"},
                                     predicate=f"t.status NOT IN ({final})").execute())

    return int(_merge(lake_root, storage_options, merge, "resolve").get("num_target_rows_updated", 0))


def claim_events(lake_root: str, decision_id: str, scan_from: Mapping[str, Mapping[int, int]],
                 storage_options: Mapping[str, str] | None = None) -> dict[str, dict[int, int]]:
    """Record ``scan_from`` (topic -> partition -> end offset) unless an earlier attempt recorded its own; returns
    the recorded one (the first attempt's offsets bound every later read-back)."""
    import pyarrow as pa

    text = json.dumps({t: {str(p): int(o) for p, o in parts.items()} for t, parts in scan_from.items()})
    source = pa.table({"decision_id": pa.array([decision_id], pa.string()),
                       "events_scan_from": pa.array([text], pa.string())})

    def merge(dt) -> dict[str, Any]:
        return (dt.merge(source, predicate="t.decision_id = s.decision_id", source_alias="s", target_alias="t")
                .when_matched_update(updates={"events_scan_from": "s.events_scan_from"},
                                     predicate="t.events_scan_from IS NULL").execute())

    _merge(lake_root, storage_options, merge, "claim events")
    row = read_queue(lake_root, storage_options, decision_ids=[decision_id])
    recorded = json.loads(row["events_scan_from"].iloc[0])
    return {t: {int(p): int(o) for p, o in parts.items()} for t, parts in recorded.items()}


def mark_events_sent(lake_root: str, decision_id: str, storage_options: Mapping[str, str] | None = None,
                     when: datetime | None = None) -> int:
    """``events_sent_at`` (kept when already set)."""
    import pyarrow as pa

    source = pa.table({"decision_id": pa.array([decision_id], pa.string()),
                       "events_sent_at": pa.array([when or _now()], pa.timestamp("us", tz="UTC"))})

    def merge(dt) -> dict[str, Any]:
        return (dt.merge(source, predicate="t.decision_id = s.decision_id", source_alias="s", target_alias="t")
                .when_matched_update(updates={"events_sent_at": "s.events_sent_at"},
                                     predicate="t.events_sent_at IS NULL").execute())

    return int(_merge(lake_root, storage_options, merge, "events sent").get("num_target_rows_updated", 0))


def case_rows(frame: pd.DataFrame, columns: Sequence[str] = ("decision_id", "event_id", "account_id", "score",
                                                             "review_map_index")) -> list[dict[str, Any]]:
    """JSON-safe dicts of queue rows (XCom: the mapped review tasks' input)."""
    out = []
    for row in frame[list(columns)].to_dict("records"):
        clean = {}
        for key, value in row.items():
            if hasattr(value, "item"):
                value = value.item()
            clean[key] = value
        out.append(clean)
    return out
