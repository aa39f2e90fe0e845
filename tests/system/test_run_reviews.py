"""Human review on the real stack, after ``test_run_decisions.py`` (file order) on the same session stack.

The review queue holds the review cases of the decision runs. Unpausing ``review_decisions`` and one more
decision run (it decides nothing new but records the ``decisions`` asset) start a review run on that asset: it
claims the riskiest open cases and parks one mapped HITL task per case in ``awaiting_input``. One is answered
through the REST API (``PATCH .../hitlDetails``: decline + a note); its apply task records the answer in the
audit row, sends the resolution's action once (one record on ``decisions``, one webhook effect), the label reaches
``silver/labels`` and the note ``silver/case_notes`` after the next ingest and lakehouse build. Answering again
(REST: 409; CLI path: refused) and answering an unknown decision id through the CLI are refused with a clear
message. No extra model training: the data and models of the earlier tests are reused.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import datetime, timezone

import pytest

from decisionflow.airflow_client import AirflowApiError

from .test_run_decisions import read_topic_keys, webhook

pytestmark = [pytest.mark.system, pytest.mark.timeout(3600)]

REVIEW, DECIDE, INGEST, BUILD = "review_decisions", "run_decisions", "ingest_transactions", "build_lakehouse"
TASK = "review_case.review"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def mapped(client, run_id: str, task_id: str, index: int) -> dict:
    return client.request("GET", f"/dags/{REVIEW}/dagRuns/{run_id}/taskInstances/{task_id}/{index}")


def wait_settled_awaiting_input(client, run_id: str, index: int, settle: float = 6.0, timeout: float = 600) -> None:
    """Until the review task has sat in ``awaiting_input`` for ``settle`` seconds (an answer within ~2 s of it
    parking races the executor's event and costs a retry_delay)."""
    deadline, since = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        state = mapped(client, run_id, TASK, index)["state"]
        if state == "awaiting_input":
            since = since or time.monotonic()
            if time.monotonic() - since >= settle:
                return
        else:
            since = None
            assert state not in ("failed", "upstream_failed", "skipped"), f"review task {state}"
        time.sleep(1)
    raise AssertionError(f"review task {run_id}[{index}] never settled in awaiting_input: {state}")


def wait_task(client, run_id: str, task_id: str, index: int, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = mapped(client, run_id, task_id, index)["state"]
        if state in ("success", "failed", "upstream_failed"):
            return state
        time.sleep(2)
    raise AssertionError(f"{task_id}[{index}] of {run_id} not finished after {timeout:.0f}s: {state}")


def read_delta(path, columns=None):
    from deltalake import DeltaTable

    return DeltaTable(str(path)).to_pandas(columns=columns)


def test_review_answered_through_rest_updates_audit_acts_once_and_labels(stack, client, lake):
    from decisionflow.decisions import review_queue
    from decisionflow.decisions.review import ReviewError, resolution_id

    started = time.monotonic()
    assert not review_queue.open_reviews(str(lake)).empty, "no open review case after the decision runs"
    client.wait_for_dag(REVIEW)
    client.unpause(REVIEW)
    after = now_iso()
    decide_id = client.trigger(DECIDE)  # records the decisions asset (nothing new to decide)
    assert client.wait_for_run(DECIDE, decide_id, timeout=900) == "success"

    # The review run the decisions asset started (an hourly tick on unpause may have run too).
    run, deadline = None, time.monotonic() + 300
    while run is None and time.monotonic() < deadline:
        runs = [r for r in client.runs(REVIEW) if r.get("run_type") == "asset_triggered"
                and (r.get("run_after") or r.get("queued_at") or "") >= after[:19]]
        run = runs[0] if runs else None
        time.sleep(3)
    assert run, f"no asset-triggered {REVIEW} run: {[(r['dag_run_id'], r.get('run_type')) for r in client.runs(REVIEW)]}"
    run_id = run["dag_run_id"]
    deadline = time.monotonic() + 300
    while client.task_states(REVIEW, run_id).get("pick") not in ("success", "failed") and time.monotonic() < deadline:
        time.sleep(2)
    cases = client.xcom(REVIEW, run_id, "pick")
    assert cases, f"{REVIEW} {run_id} claimed no case"
    print(f"\n{REVIEW} {run_id} claimed {len(cases)} case(s) ({time.monotonic() - started:.0f}s)")
    case = cases[0]
    decision_id, index = case["decision_id"], case["review_map_index"]
    claimed = review_queue.read_queue(str(lake), decision_ids=[decision_id]).iloc[0]
    assert (claimed["status"], claimed["review_run_id"]) == ("in_review", run_id)

    wait_settled_awaiting_input(client, run_id, index)
    path = f"/dags/{REVIEW}/dagRuns/{run_id}/taskInstances/{TASK}/{index}/hitlDetails"
    detail = client.request("GET", path)
    assert decision_id[:12] in detail["subject"] and "### Similar past cases" in detail["body"]
    assert detail["options"] == ["approve", "decline", "escalate"] and detail["defaults"] == ["decline"]
    webhook_before = webhook(stack, "/effects?limit=0")["keys"]
    note = f"System test: card reported stolen ({uuid.uuid4().hex[:8]})."
    answered = client.request("PATCH", path, json={"chosen_options": ["decline"], "params_input": {"note": note}})
    assert answered["chosen_options"] == ["decline"]
    assert wait_task(client, run_id, "review_case.apply", index) == "success"
    print(f"answered and applied ({time.monotonic() - started:.0f}s)")

    audit = read_delta(lake / "gold/decisions").set_index("decision_id")
    row = audit.loc[decision_id]
    assert row["review_decision"] == "decline" and row["review_source"] == "hitl"
    assert row["reviewed_by"] == answered["responded_by"]["name"] and row["reviewed_at"] is not None
    assert row["review_note"] == note
    assert audit.drop(index=decision_id)["review_decision"].isna().all(), "only the answered case is reviewed"
    assert review_queue.read_queue(str(lake), decision_ids=[decision_id]).iloc[0]["status"] == "resolved"

    # Its action, once: one committed record keyed by the resolution id, one webhook effect.
    rid = resolution_id(decision_id)
    keys = Counter(read_topic_keys(stack))
    assert keys[rid] == 1 and keys[decision_id] == 1
    effects = webhook(stack, "/effects?limit=100000")
    assert effects["keys"] - webhook_before == 1
    assert [e["key"] for e in effects["effects"] if e["key"].startswith(rid)] == [f"{rid}:webhook"]

    # Answering again is refused: the REST API (409) and the CLI path.
    with pytest.raises(AirflowApiError, match="409"):
        client.request("PATCH", path, json={"chosen_options": ["approve"], "params_input": {"note": ""}})
    from decisionflow.cli import answer_case

    with pytest.raises(ReviewError, match=f"decision {decision_id} is already resolved: decline by"):
        answer_case(str(lake), decision_id, "approve", None, "tester", client=client)
    if len(cases) > 1:  # the CLI answers a case with an open HITL task through that task
        other = cases[1]
        wait_settled_awaiting_input(client, run_id, other["review_map_index"])
        via = answer_case(str(lake), other["decision_id"], "approve", None, "tester", client=client)
        assert via["via"] == "hitl"
        assert wait_task(client, run_id, "review_case.apply", other["review_map_index"]) == "success"
        approved = read_delta(lake / "gold/decisions").set_index("decision_id").loc[other["decision_id"]]
        assert approved["review_decision"] == "approve" and approved["review_source"] == "hitl"
    unknown = str(uuid.uuid4())
    cli = subprocess.run([sys.executable, "-m", "decisionflow.cli", "review", "answer", unknown, "--decision",
                          "approve", "--lake", str(lake)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DECISIONFLOW_DATA": str(stack.ctx.data)})
    assert cli.returncode == 1 and f"decision {unknown} is unknown" in cli.stderr, cli.stderr

    # The label and the note reach silver with the next ingest and lakehouse build: the Kafka watcher starts them
    # (the label and note are new events); driven through the REST API if that chain has not got there.
    def in_silver() -> tuple[int, int]:
        labels = read_delta(lake / "silver/labels")
        mine = labels[(labels["event_id"] == row["event_id"]) & (labels["source"] == "investigation")
                      & (labels["labelled_at"] == row["reviewed_at"])]
        assert (mine["label"] == "fraud").all(), mine
        notes = read_delta(lake / "silver/case_notes")
        ours = notes[notes["case_id"] == f"REVIEW-{decision_id[:12]}"]
        assert (ours["text"] == note).all() and (ours["author"] == row["reviewed_by"]).all(), ours
        return len(mine), len(ours)

    waited, driven, deadline = time.monotonic(), False, time.monotonic() + 1500
    while in_silver() != (1, 1):
        assert time.monotonic() < deadline, f"label/note not in silver: {in_silver()}"
        if not driven and time.monotonic() - waited > 300:
            for dag_id in (INGEST, BUILD):
                assert client.wait_for_run(dag_id, client.trigger(dag_id), timeout=1200, log=print) == "success"
            driven = True
        time.sleep(10)
    print(f"label and note in silver{' (driven)' if driven else ''} ({time.monotonic() - started:.0f}s in all)")
