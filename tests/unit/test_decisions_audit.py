"""gold/decisions: deterministic decision ids, validation naming the column, MERGE writing each decision once."""

from __future__ import annotations

import threading

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from decisionflow.decisions import audit
from decisionflow.decisions.audit import AuditError
from decisionflow.lakehouse import tables as T
from decisionflow.lakehouse.maintenance import tables_needing_migration

try:
    from .decision_rows import POLICY_VERSION, make_decisions
except ImportError:
    from decision_rows import POLICY_VERSION, make_decisions


def test_decision_id_is_deterministic_and_versioned():
    one = audit.decision_id("ev-1", "2026.12.1")
    assert one == audit.decision_id("ev-1", "2026.12.1") and len(one) == 36
    assert audit.decision_id("ev-1", "2026.12.2") != one
    assert audit.decision_id("ev-2", "2026.12.1") != one
    assert audit.decision_ids(["ev-1", "ev-2"], "2026.12.1") == [one, audit.decision_id("ev-2", "2026.12.1")]
    assert audit.decision_ids(pa.array(["ev-1"]), ["2026.12.1"]) == [one]
    with pytest.raises(ValueError):
        audit.decision_id("ev-1", "")


def test_decision_id_namespace_never_changes():
    # every decision already written depends on this value: a change would decide everything again
    assert audit.decision_id("ev-1", "2026.12.1") == "fce7f0d5-79dc-5ee6-afc6-a325b8cfddae"
    assert str(audit.DECISION_ID_NAMESPACE) == "c015eaf6-22d5-5d39-b6af-66945aad3bfc"


def test_schema_matches_the_declaration():
    spec = T.table("gold/decisions")
    assert [name for name, _ in audit.AUDIT_COLUMNS] == list(spec.column_names)
    schema = audit.audit_schema()
    assert schema.field("event_time").type == pa.timestamp("us", tz="UTC")
    assert schema.field("reason_codes").type == pa.list_(pa.string())
    v2 = {"brain", "escalation", "review_decision", "reviewed_by", "reviewed_at", "review_note", "review_source"}
    assert {f.name for f in schema if f.nullable} == v2  # schema version 2 adds them (a migration: nullable)
    assert spec.schema_version == 2


def test_merge_twice_inserts_once(tmp_path):
    lake = str(tmp_path / "lake")
    rows = make_decisions(300)
    assert audit.write_decisions(lake, rows) == 300
    assert audit.write_decisions(lake, rows) == 0  # a retried write is a no-op
    more = make_decisions(100, start=250)  # 50 already there, 50 new
    assert audit.write_decisions(lake, more) == 50
    back = audit.read_decisions(lake)
    assert len(back) == 350 and back["decision_id"].is_unique
    assert "band" not in back.columns
    # a written decision is never rewritten: a changed retry does not overwrite it
    changed = make_decisions(1)
    changed["rationale"] = "second opinion"
    assert audit.write_decisions(lake, changed) == 0
    assert audit.read_decisions(lake, event_ids=["ev-000000"])["rationale"].item() == "score band approve"


def test_new_policy_version_is_a_new_decision(tmp_path):
    lake = str(tmp_path / "lake")
    audit.write_decisions(lake, make_decisions(10))
    assert audit.write_decisions(lake, make_decisions(10, policy_version="2026.12.2")) == 10
    assert len(audit.decided_event_ids(lake)) == 20
    assert len(audit.decided_event_ids(lake, policy_version="2026.12.2")) == 10


def test_decided_event_ids_and_read_by_run(tmp_path):
    lake = str(tmp_path / "lake")
    assert len(audit.decided_event_ids(lake)) == 0  # no table yet
    assert audit.read_decisions(lake).empty
    audit.write_decisions(lake, make_decisions(40, run_id="run-a"))
    audit.write_decisions(lake, make_decisions(20, start=40, run_id="run-b"))
    ids = audit.decided_event_ids(lake)
    assert isinstance(ids, pa.Array) and ids.type == pa.string()
    assert set(ids.to_pylist()) == {f"ev-{i:06d}" for i in range(60)}
    run_b = audit.read_decisions(lake, run_id="run-b", columns=["event_id", "reason_codes", "actions", "event_time"])
    assert len(run_b) == 20 and list(run_b.columns) == ["event_id", "reason_codes", "actions", "event_time"]
    assert str(run_b["event_time"].dt.tz) == "UTC"


def test_table_created_with_declared_properties(tmp_path):
    lake = str(tmp_path / "lake")
    audit.write_decisions(lake, make_decisions(3))
    dt = DeltaTable(T.table("gold/decisions").path(lake))
    config = dt.metadata().configuration
    assert config[T.PROPERTY_TABLE] == "gold/decisions" and config[T.PROPERTY_SCHEMA_VERSION] == "2"
    # what build_lakehouse's migrate task reads: the table created here needs no Spark migrate job
    assert tables_needing_migration(lake, specs=[T.table("gold/decisions")]) == {}


@pytest.mark.parametrize(("column", "value", "needle"), [
    ("model_version", "", "column model_version: 1 row(s) are empty"),
    ("policy_version", None, "column policy_version: 1 row(s) are null"),
    ("decision", "maybe", "column decision: 1 row(s) are not one of"),
    ("score", float("inf"), "column score: 1 row(s) are not finite"),
    ("score", float("nan"), "column score: 1 row(s) are null"),  # pandas' NaN arrives as a null
    ("rationale", "  ", "column rationale: 1 row(s) are empty"),
    ("run_id", None, "column run_id: 1 row(s) are null"),
    ("brain", "robot", "column brain: 1 row(s) are not one of ['policy', 'agent']"),
    ("brain", None, "column brain: 1 row(s) are null"),  # nullable in the table, but every run fills it
])
def test_validation_names_column_and_decision(tmp_path, column, value, needle):
    rows = make_decisions(5)
    rows[column] = rows[column].astype(object)
    rows.at[2, column] = value
    with pytest.raises(AuditError) as info:
        audit.write_decisions(str(tmp_path / "lake"), rows)
    text = str(info.value)
    assert needle in text and "gold/decisions" in text and "nothing was written" in text
    assert info.value.column == column
    if column != "policy_version":  # its decision id no longer matches, the row is still named
        assert rows.at[2, "decision_id"] in text
    assert not (tmp_path / "lake" / "gold" / "decisions").exists()


def test_validation_of_lists_ids_and_missing_columns(tmp_path):
    lake = str(tmp_path / "lake")
    rows = make_decisions(4)
    rows["reason_codes"] = [[] if i == 1 else list(r) for i, r in enumerate(rows["reason_codes"])]
    with pytest.raises(AuditError, match="column reason_codes: 1 row"):
        audit.write_decisions(lake, rows)
    rows = make_decisions(4)
    rows["actions"] = [["block_card", ""] if i == 3 else list(a) for i, a in enumerate(rows["actions"])]
    with pytest.raises(AuditError, match=f"column actions.*{rows.at[3, 'decision_id']}"):
        audit.write_decisions(lake, rows)
    rows = make_decisions(4)
    rows.at[0, "decision_id"] = audit.decision_id("ev-other", POLICY_VERSION)
    with pytest.raises(AuditError, match=r"column decision_id: 1 row\(s\) are not decision_id\(event_id"):
        audit.write_decisions(lake, rows)
    rows = make_decisions(4)
    doubled = rows.iloc[[0, 0, 1]].reset_index(drop=True)
    with pytest.raises(AuditError, match="appear more than once"):
        audit.write_decisions(lake, doubled)
    with pytest.raises(AuditError, match="column model_version: .*missing"):
        audit.write_decisions(lake, make_decisions(2).drop(columns=["model_version"]))
    assert audit.write_decisions(lake, make_decisions(0)) == 0
    with pytest.raises(AuditError, match="column brain: .*missing"):
        audit.write_decisions(lake, make_decisions(2).drop(columns=["brain"]))


def test_review_columns_start_empty_and_escalation_is_kept(tmp_path):
    lake = str(tmp_path / "lake")
    rows = make_decisions(3)
    rows["escalation"] = [None, '{"brain": "agent", "accepted": true}', None]
    assert audit.write_decisions(lake, rows) == 3
    back = audit.read_decisions(lake).set_index("decision_id")
    assert back.loc[rows.at[1, "decision_id"], "escalation"] == '{"brain": "agent", "accepted": true}'
    assert back["escalation"].isna().sum() == 2 and (back["brain"] == "policy").all()
    for column in ("review_decision", "reviewed_by", "reviewed_at", "review_note", "review_source"):
        assert back[column].isna().all(), column


def test_concurrent_writers_insert_each_decision_once(tmp_path):
    lake = str(tmp_path / "lake")
    audit.write_decisions(lake, make_decisions(1))  # the table exists: the race is on the MERGE commits
    results, errors = [], []

    def write(start):
        try:
            results.append(audit.write_decisions(lake, make_decisions(200, start=start)))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(s,)) for s in (0, 100, 150)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    back = audit.read_decisions(lake, columns=["decision_id"])
    assert back["decision_id"].is_unique and len(back) == 350
    assert sum(results) == 349


def test_a_table_behind_its_declaration_is_refused_with_the_remedy(tmp_path):
    from deltalake import write_deltalake

    lake = str(tmp_path / "lake")
    old = audit.audit_schema().remove(audit.audit_schema().get_field_index("rationale"))
    write_deltalake(T.table("gold/decisions").path(lake), old.empty_table())
    with pytest.raises(T.IncompatibleTableError, match="table gold/decisions, column rationale: declared but "
                                                       "missing.*migrate"):
        audit.write_decisions(lake, make_decisions(2))
