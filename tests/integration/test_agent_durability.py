"""The escalation agent killed mid-case (SIGKILL) resumes from its SQLite checkpoint without repeating a finished
model call or tool call, and acts once; escalation rows land in gold/escalations once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from decisionflow.decisions.agent import (
    Escalation,
    PolicyBrain,
    read_escalations,
    write_escalations,
)

pytestmark = pytest.mark.integration

CASE_SCRIPT = Path(__file__).with_name("_agent_case.py")
ALL_TOOLS = ("get_features", "score", "account_history", "policy_check", "similar_cases", "recommend")


def run_case(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CASE_SCRIPT), str(tmp_path / "checkpoints.sqlite"),
                           str(tmp_path / "counts.txt"), str(tmp_path / "result.json"), *flags],
                          capture_output=True, text=True, timeout=120)


def counts(tmp_path: Path) -> Counter:
    return Counter((tmp_path / "counts.txt").read_text().splitlines())


def result_of(tmp_path: Path) -> Escalation:
    return Escalation.from_dict(json.loads((tmp_path / "result.json").read_text()))


def assert_concluded(result: Escalation) -> None:
    assert (result.brain, result.decision, result.accepted) == ("agent", "decline", True)
    assert result.model_calls == 4 and result.tool_calls == 6
    assert [m["name"] for m in result.transcript if m["role"] == "tool"] == list(ALL_TOOLS)


def test_killed_during_a_model_call_resumes_without_repeating_finished_calls(tmp_path):
    killed = run_case(tmp_path, "--kill-model-at", "2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    before = counts(tmp_path)
    assert before == Counter({"model 0": 1, "model 1": 1, "model 2": 1,
                              **{f"tool {t} {e}": 1 for t in ALL_TOOLS[:4] for e in ("start", "end")}})
    assert not (tmp_path / "result.json").exists()

    resumed = run_case(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = counts(tmp_path)
    # only the killed (unfinished) model call is made again; every tool ran exactly once
    assert after == Counter({"model 0": 1, "model 1": 1, "model 2": 2, "model 3": 1,
                             **{f"tool {t} {e}": 1 for t in ALL_TOOLS for e in ("start", "end")}})
    first = result_of(tmp_path)
    assert_concluded(first)

    again = run_case(tmp_path)  # a retried task: the stored outcome, nothing called
    assert again.returncode == 0, again.stderr[-2000:]
    assert counts(tmp_path) == after and result_of(tmp_path) == first


def test_killed_inside_a_tool_repeats_only_that_tool(tmp_path):
    killed = run_case(tmp_path, "--kill-in-score")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert counts(tmp_path) == Counter({"model 0": 1, "tool get_features start": 1, "tool get_features end": 1,
                                        "tool score start": 1})
    resumed = run_case(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = counts(tmp_path)
    # get_features (finished in the same step as the killed score) is not run again; score is (it never finished)
    assert after["tool get_features start"] == 1 and after["tool score start"] == 2 and after["tool score end"] == 1
    assert after["model 0"] == 1 and all(after[f"tool {t} start"] == 1 for t in ALL_TOOLS if t != "score")
    assert_concluded(result_of(tmp_path))


def _escalation(decision_id: str, **changes) -> Escalation:
    from dataclasses import replace

    from decisionflow.decisions.agent import CaseFile

    case = CaseFile(decision_id=decision_id, event_id=f"ev-{decision_id}", account_id="acc-1",
                    event_time=datetime(2026, 11, 3, tzinfo=timezone.utc), band="review", policy_decision="review",
                    reason_codes=("SCORE_REVIEW",), score=0.5)
    return replace(PolicyBrain().escalate(case), **changes)


def test_write_escalations_inserts_each_once(tmp_path):
    lake = str(tmp_path / "lake")
    now = datetime(2026, 12, 1, 12, tzinfo=timezone.utc)
    agent = _escalation("d1", brain="agent", chat_model="scripted", recommendation="decline", decision="decline",
                        accepted=True, fallback_reason=None, refused=({"decision": "approve", "reason": "no"},),
                        model_calls=3, tool_calls=4, transcript=[{"role": "system", "content": "x"}],
                        started_at=now, finished_at=now + timedelta(seconds=2))
    policy = _escalation("d2")
    assert write_escalations(lake, [agent, policy], "run-1", {"d1": "ev-1", "d2": "ev-2"}) == 2
    assert write_escalations(lake, [agent, policy], "run-1", ["ev-1", "ev-2"]) == 0  # a retry inserts nothing
    changed = _escalation("d2", decision="decline")  # a written escalation is never rewritten
    assert write_escalations(lake, [changed, _escalation("d3")], "run-2", ["ev-2", "ev-3"]) == 1
    rows = read_escalations(lake).set_index("decision_id")
    assert sorted(rows.index) == ["d1", "d2", "d3"] and rows.loc["d2", "applied_decision"] == "review"
    one = rows.loc["d1"]
    assert (one["brain"], one["chat_model"], one["recommendation"], bool(one["accepted"])) == ("agent", "scripted",
                                                                                              "decline", True)
    assert json.loads(one["refused"]) == [{"decision": "approve", "reason": "no"}]
    assert json.loads(one["transcript"]) == [{"role": "system", "content": "x"}]
    assert (int(one["model_calls"]), int(one["tool_calls"]), one["event_id"], one["run_id"]) == (3, 4, "ev-1", "run-1")
    assert one["finished_at"] - one["started_at"] == timedelta(seconds=2)
    p = rows.loc["d2"]
    assert p["brain"] == "policy" and p["chat_model"] is None and p["fallback_reason"]
    assert json.loads(p["refused"]) == []
    assert len(read_escalations(lake, run_id="run-2")) == 1
    with pytest.raises(ValueError, match="no event id"):
        write_escalations(lake, [agent], "run-1", {"dX": "ev"})


def test_account_history_from_lake(tmp_path):
    import pyarrow as pa

    from decisionflow.decisions import _delta
    from decisionflow.decisions.agent import account_history_from_lake
    from decisionflow.lakehouse.tables import table

    lake = str(tmp_path / "lake")
    history = account_history_from_lake(lake)
    assert history("acc-1", datetime(2026, 11, 3, tzinfo=timezone.utc)) == []  # no tables yet

    def ts(day, hour=0):
        return datetime(2026, 11, day, hour, tzinfo=timezone.utc)

    decisions = table("gold/decisions")
    rows = [{"decision_id": f"d{i}", "event_id": f"e{i}", "account_id": acct, "merchant_id": "m", "event_time": t,
             "decided_at": t, "run_id": "r", "decision": d, "reason_codes": ["SCORE_REVIEW"], "score": 0.5,
             "model_name": "m", "model_version": "1", "model_run_id": "x", "features": "{}", "similar_cases": "[]",
             "policy_name": "p", "policy_version": "1", "escalated": False, "rationale": "r", "actions": []}
            for i, (acct, t, d) in enumerate([("acc-1", ts(1), "decline"), ("acc-1", ts(2), "approve"),
                                              ("acc-1", ts(5), "review"), ("acc-2", ts(1), "decline")])]
    dt = _delta.open_table(decisions, lake, create=True)
    source = _delta.conform(pa.Table.from_pylist(rows), _delta.arrow_schema(decisions))
    dt.merge(source, "t.decision_id = s.decision_id", source_alias="s",
             target_alias="t").when_not_matched_insert_all().execute()
    labels = table("silver/labels")
    from deltalake import write_deltalake

    kafka = {"schema_version": 1, "source_topic": "transaction-labels", "source_partition": 0,
             "payload_sha256": "x", "silver_loaded_at": ts(5)}
    write_deltalake(labels.path(lake), _delta.conform(pa.Table.from_pylist([
        {"event_id": "e0", "label": "fraud", "source": "chargeback", "labelled_at": ts(2), "source_offset": 1, **kafka},
        {"event_id": "e1", "label": "fraud", "source": "chargeback", "labelled_at": ts(4), "source_offset": 2, **kafka},
    ]), _delta.arrow_schema(labels)))
    found = account_history_from_lake(lake)("acc-1", ts(3))
    # before Nov 3: e1 (Nov 2) and e0 (Nov 1), newest first; e1's label came later (Nov 4): not known yet
    assert [(h["decision"], h["label"]) for h in found] == [("approve", None), ("decline", "fraud")]
