"""The review queue: decisions the policy sent to review, waiting for the escalation agent or a person.

A Delta table (``gold/review_queue``), one row per decision id, MERGEd insert-only: a rerun of the escalation
step queues nothing twice, and a queued case keeps its first ``queued_at``. ``priority`` is the rank by score
within its run (1 = the riskiest), so whoever picks cases up takes the riskiest first. Human review tasks
(Airflow HITL) pick cases from here in a later step; until then they stay ``open``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from decisionflow.lakehouse.tables import join_path

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

REVIEW_QUEUE_TABLE = "gold/review_queue"
OPEN = "open"


def _schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([
        pa.field("decision_id", pa.string(), nullable=False),
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("account_id", pa.string(), nullable=False),
        pa.field("event_time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("reason_codes", pa.list_(pa.string())),
        pa.field("priority", pa.int64(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("queued_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("status", pa.string(), nullable=False),
    ])


def enqueue_reviews(lake_root: str, decisions: pd.DataFrame, run_id: str,
                    storage_options: Mapping[str, str] | None = None) -> int:
    """Queue these (escalated) decisions; returns how many were new. Idempotent by ``decision_id``."""
    import pandas as pd
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake
    from deltalake.exceptions import TableNotFoundError

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
        "queued_at": pd.Timestamp(datetime.now(timezone.utc)),
        "status": OPEN,
    })
    table = pa.Table.from_pandas(frame, schema=_schema(), preserve_index=False)
    path = join_path(lake_root, REVIEW_QUEUE_TABLE)
    options = dict(storage_options or {})
    try:
        target = DeltaTable(path, storage_options=options)
    except TableNotFoundError:
        write_deltalake(path, table, mode="error", storage_options=options)
        return table.num_rows
    result = (target.merge(table, predicate="t.decision_id = s.decision_id", source_alias="s", target_alias="t")
              .when_not_matched_insert_all().execute())
    return int(result.get("num_target_rows_inserted", 0))


def open_reviews(lake_root: str, storage_options: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The open cases, riskiest first (empty when nothing was queued yet)."""
    import pandas as pd
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        frame = DeltaTable(join_path(lake_root, REVIEW_QUEUE_TABLE), storage_options=dict(storage_options or {})
                           ).to_pandas()
    except TableNotFoundError:
        return pd.DataFrame(columns=_schema().names)
    return frame[frame["status"] == OPEN].sort_values("score", ascending=False).reset_index(drop=True)
