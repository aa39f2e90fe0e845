"""The audit trail: Delta table ``gold/decisions``, one row per decision, written once (only its review columns are
set later, once).

* :func:`decision_id` / :func:`decision_ids` - the decision's identity, ``uuid5`` over a fixed namespace of
  ``(event_id, policy_version)``: a retried or re-run decision of the same transaction under the same policy
  version gets the same id, so the MERGE below makes the retry a no-op; a new policy version is a new decision.
* :func:`write_decisions` - validates every row first (:class:`AuditError` names the column and an example
  decision id), creates the table when missing (declared in :mod:`decisionflow.lakehouse.tables` with its
  ``decisionflow.table`` / ``decisionflow.schema_version`` properties, so the Spark migrate job and the
  maintenance jobs treat it like every other table), then MERGEs by ``decision_id`` inserting only the rows not
  already there. Concurrent commits are retried (bounded).
* :func:`decided_event_ids` - the event ids already decided (reads one column), for the decision run's
  anti-join; :func:`read_decisions` - rows back as a DataFrame.

Columns (:data:`AUDIT_COLUMNS`; NOT NULL unless said): decision_id, event_id, account_id, merchant_id, event_time and
decided_at (timestamp[us, UTC]), run_id, decision (approve | review | decline), reason_codes (list<string>, at
least one), score (double, finite), model_name, model_version, model_run_id, features (JSON object of the feature
values used), similar_cases (JSON, see below), policy_name, policy_version, escalated (bool), rationale,
actions (list<string>, may be empty: an approval usually triggers nothing). Schema version 2 adds, nullable in
the table: brain (``policy`` | ``agent``: who chose the decision; every run fills it), escalation (JSON summary
of the escalation step, NULL when the case was not escalated; the full transcript is in ``gold/escalations``)
and the review columns review_decision, reviewed_by, reviewed_at, review_note, review_source: NULL when written,
set once by a reviewer's answer (:mod:`decisionflow.decisions.review`) - the only update a row ever gets.

``similar_cases`` is always a JSON string, one of two shapes:

* a list (possibly empty: searched, nothing similar before the event time) of
  ``{"case_id", "note_id", "event_id", "outcome", "score", "created_at"}`` objects
  (:meth:`decisionflow.vectors.SimilarCase.as_dict`), best first;
* ``{"searched": false, "reason": "..."}`` when no search was made for that row - not needed by the policy, or
  the vector store was unavailable (the reason says which, so a degraded run is visible in the audit).

No ``decision_date`` partition: a MERGE by ``decision_id`` cannot prune partitions of a date the id does not
determine, and small daily partitions only multiply files. OPTIMIZE (Z-order ``account_id, event_time``) and
VACUUM come from the maintenance job, which covers every declared table.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from decisionflow import constants
from decisionflow.decisions import _delta
from decisionflow.lakehouse.tables import table as _declared
from decisionflow.exceptions import NonRetryableError

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

__all__ = [
    "AUDIT_COLUMNS",
    "AuditError",
    "BRAINS",
    "DECISIONS",
    "DECISION_ID_NAMESPACE",
    "NOT_SEARCHED",
    "audit_schema",
    "decided_event_ids",
    "decision_id",
    "decision_ids",
    "not_searched",
    "read_decisions",
    "validate_decisions",
    "write_decisions",
]

log = logging.getLogger(__name__)

#: Allowed values of ``decision``.
DECISIONS = ("approve", "review", "decline")
#: Fixed namespace of decision ids (uuid5(NAMESPACE_URL, "https://decisionflow.dev/decisions")); never change it:
#: the ids of every decision already written depend on it.
DECISION_ID_NAMESPACE = uuid.UUID("c015eaf6-22d5-5d39-b6af-66945aad3bfc")
#: Separator between event id and policy version in the uuid5 name (a character neither contains).
_SEP = "\x1f"

SPEC = _declared(constants.DECISIONS_TABLE)
#: ``(name, arrow type)`` of every audit column, in table order.
AUDIT_COLUMNS: list[tuple[str, Any]] = [(c.name, _delta.arrow_type(c.type)) for c in SPEC.columns]
#: ``similar_cases`` marker reason when the policy did not need a search.
NOT_SEARCHED = "not needed by the policy"

#: Who chose a decision: the policy, or the escalation agent within what the policy allows.
BRAINS = ("policy", "agent")
#: Nullable in the table (added by schema version 2) but every decision run fills it.
_WRITER_REQUIRED = ("brain",)

_LISTS_NON_EMPTY = ("reason_codes",)  # actions may be empty: an approval usually triggers nothing


class AuditError(NonRetryableError, ValueError):
    """A decision that cannot be written to the audit trail; names the column and an example decision id."""

    def __init__(self, column: str, problem: str, example: str | None = None, count: int | None = None):
        self.column, self.problem, self.example, self.count = column, problem, example, count
        where = f"{count} row(s)" if count is not None else "rows"
        shown = f" (e.g. decision_id {example})" if example else ""
        super().__init__(f"[audit] {constants.DECISIONS_TABLE}, column {column}: {where} {problem}{shown}; nothing "
                         "was written -- remedy: fix the decision run's output (a decision needs every field, "
                         "a model version and a policy version)")


def decision_id(event_id: str, policy_version: str) -> str:
    """The deterministic id of the decision on ``event_id`` under ``policy_version`` (uuid5, 36 characters)."""
    if not event_id or not policy_version:
        raise ValueError(f"decision_id needs an event id and a policy version, got {event_id!r}, {policy_version!r}")
    return str(uuid.uuid5(DECISION_ID_NAMESPACE, f"{event_id}{_SEP}{policy_version}"))


def decision_ids(event_ids: Iterable[str], policy_version: str | Iterable[str]) -> list[str]:
    """:func:`decision_id` for many events (a list, numpy array, pandas Series or pyarrow array); the policy
    version is one string for all or one per event."""
    events = event_ids.to_pylist() if hasattr(event_ids, "to_pylist") else list(event_ids)
    if isinstance(policy_version, str):
        if not policy_version:
            raise ValueError("decision_ids needs a non-empty policy version")
        versions: Sequence[str] = [policy_version] * len(events)
    else:
        versions = policy_version.to_pylist() if hasattr(policy_version, "to_pylist") else list(policy_version)
        if len(versions) != len(events):
            raise ValueError(f"{len(events)} event ids but {len(versions)} policy versions")
    ns, uuid5 = DECISION_ID_NAMESPACE, uuid.uuid5
    return [str(uuid5(ns, f"{e}{_SEP}{v}")) if e and v else "" for e, v in zip(events, versions)]


def not_searched(reason: str = NOT_SEARCHED) -> str:
    """The ``similar_cases`` value of a row for which no similar-case search was made."""
    import json

    return json.dumps({"searched": False, "reason": reason})


def audit_schema() -> pa.Schema:
    """The Arrow schema of ``gold/decisions`` (NOT NULL as declared)."""
    return _delta.arrow_schema(SPEC)


def _to_arrow(rows: pa.Table | pd.DataFrame | Sequence[dict]) -> pa.Table:
    import pyarrow as pa

    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, (list, tuple)):
        return pa.Table.from_pylist(list(rows))
    return pa.Table.from_pandas(rows, preserve_index=False)


def validate_decisions(rows: pa.Table | pd.DataFrame | Sequence[dict]) -> pa.Table:
    """
    ``rows`` as a table of exactly the audit schema, or :class:`AuditError` for the first problem found.

    Checked: every declared column present and non-null; strings non-empty (so model_version and policy_version
    are always filled); reason_codes non-empty; decision in :data:`DECISIONS`; score finite; decision_id equal
    to :func:`decision_id` of (event_id, policy_version) and unique in the batch. Extra columns are dropped.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    table = _to_arrow(rows)
    schema = audit_schema()
    if table.num_rows == 0:  # an empty frame's columns have no useful types (pandas says float64)
        return schema.empty_table()
    missing = [f.name for f in schema if f.name not in table.column_names
               and (not f.nullable or f.name in _WRITER_REQUIRED)]
    if missing:
        raise AuditError(missing[0], f"missing from the batch (columns missing: {missing})")
    ids = table["decision_id"]

    def example(mask) -> str | None:
        hit = pc.filter(ids, mask)
        return str(hit[0]) if len(hit) and hit[0].is_valid else None

    arrays = {}
    for field in schema:
        if field.name not in table.column_names:  # a nullable column the run does not set (the review ones)
            arrays[field.name] = pa.nulls(table.num_rows, field.type)
            continue
        try:
            column = table[field.name].cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise AuditError(field.name, f"cannot be read as {field.type} ({exc})") from None
        nulls = column.null_count
        if nulls and (not field.nullable or field.name in _WRITER_REQUIRED):
            raise AuditError(field.name, "are null", example(pc.is_null(column)), nulls)
        if pa.types.is_string(field.type) and not field.nullable:
            empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)
            if pc.any(empty).as_py():
                raise AuditError(field.name, "are empty", example(empty), pc.sum(empty).as_py())
        if field.name in _LISTS_NON_EMPTY:
            empty = pc.equal(pc.list_value_length(column), 0)
            if pc.any(empty).as_py():
                raise AuditError(field.name, "are empty lists (every decision says why)", example(empty),
                                 pc.sum(empty).as_py())
        if pa.types.is_list(field.type):
            inner = pc.list_flatten(column)
            bad_items = pc.fill_null(pc.equal(pc.utf8_length(inner), 0), True)
            if pc.any(bad_items).as_py():
                rows_hit = pc.unique(pc.filter(pc.list_parent_indices(column), bad_items))
                mask = pc.is_in(pa.array(range(table.num_rows), pa.int64()), value_set=rows_hit.cast(pa.int64()))
                raise AuditError(field.name, "contain null or empty elements", example(mask), len(rows_hit))
        arrays[field.name] = column
    for name, allowed in (("decision", DECISIONS), ("brain", BRAINS)):
        unknown = pc.invert(pc.is_in(arrays[name], value_set=pa.array(allowed)))
        if pc.any(unknown).as_py():
            values = sorted(set(pc.filter(arrays[name], unknown).to_pylist()))[:5]
            raise AuditError(name, f"are not one of {list(allowed)} (got {values})", example(unknown),
                             pc.sum(unknown).as_py())
    score = arrays["score"]
    finite = pc.is_finite(score)
    if not pc.all(finite).as_py():
        raise AuditError("score", "are not finite numbers", example(pc.invert(finite)),
                         pc.sum(pc.invert(finite)).as_py())
    expected = pa.array(decision_ids(arrays["event_id"], arrays["policy_version"]), pa.string())
    wrong = pc.not_equal(arrays["decision_id"], expected)
    if pc.any(wrong).as_py():
        raise AuditError("decision_id", "are not decision_id(event_id, policy_version)", example(wrong),
                         pc.sum(wrong).as_py())
    if pc.count_distinct(arrays["decision_id"]).as_py() != table.num_rows:
        counts = pc.value_counts(arrays["decision_id"])
        dupes = [c["values"].as_py() for c in counts if c["counts"].as_py() > 1]
        raise AuditError("decision_id", "appear more than once in the batch", dupes[0], len(dupes))
    return pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema)


def write_decisions(lake_root: str, rows: pa.Table | pd.DataFrame | Sequence[dict],
                    storage_options: dict[str, str] | None = None) -> int:
    """
    Validate ``rows`` and MERGE them into ``<lake_root>/gold/decisions`` by ``decision_id``, inserting only
    decisions not already there (a written decision is never rewritten; a retried write inserts nothing).

    :param lake_root: the lake root (``LakeHook().root``), a path or object-store URI.
    :param rows: one row per decision with every audit column (extra columns are ignored).
    :param storage_options: delta-rs object-store options (``LakeHook().storage_options``).
    :return: rows inserted.
    :raises AuditError: before anything is written, naming the column and an example decision id.
    """
    table = validate_decisions(rows)
    if table.num_rows == 0:
        return 0
    started = time.monotonic()

    def merge(dt) -> dict[str, Any]:
        return (dt.merge(table, predicate="t.decision_id = s.decision_id", source_alias="s", target_alias="t")
                .when_not_matched_insert_all().execute())

    metrics = _delta.merge_with_retry(SPEC, lake_root, storage_options, merge, what="MERGE of decisions")
    inserted = int(metrics.get("num_target_rows_inserted", 0))
    log.info("%s: %d of %d decisions inserted (%d already there) in %.2fs", SPEC.name, inserted, table.num_rows,
             table.num_rows - inserted, time.monotonic() - started)
    return inserted


def decided_event_ids(lake_root: str, storage_options: dict[str, str] | None = None, *,
                      policy_version: str | None = None) -> pa.Array:
    """
    Event ids that already have a decision (under ``policy_version``, or any when None), as a pyarrow string
    array (empty when the table does not exist yet). Reads only the ``event_id`` (+ ``policy_version``) column.
    """
    import pyarrow as pa

    dt = _delta.open_table(SPEC, lake_root, storage_options)
    if dt is None:
        return pa.array([], pa.string())
    where = {"policy_version": policy_version} if policy_version is not None else None
    column = _delta.select(SPEC, dt, ["event_id"], where)["event_id"]
    return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)


def read_decisions(lake_root: str, run_id: str | None = None, *, columns: Sequence[str] | None = None,
                   event_ids: Iterable[str] | None = None, storage_options: dict[str, str] | None = None
                   ) -> pd.DataFrame:
    """
    Audit rows as a DataFrame (empty, with the audit columns, when the table does not exist yet).

    :param run_id: only the decisions of that run.
    :param columns: only these columns.
    :param event_ids: only the decisions of these events.
    """
    dt = _delta.open_table(SPEC, lake_root, storage_options)
    wanted = list(columns) if columns else [name for name, _ in AUDIT_COLUMNS]
    if dt is None:
        return audit_schema().empty_table().select(wanted).to_pandas()
    where: dict[str, Any] = {"run_id": run_id} if run_id is not None else {}
    if event_ids is not None:
        where["event_id"] = list(event_ids)
    return _delta.select(SPEC, dt, wanted, where).to_pandas()

