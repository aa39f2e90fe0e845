"""Audit rows for the audit-trail and outbox tests: every field filled, as the decision graph writes them."""

from __future__ import annotations

import json

from decisionflow.decisions import audit

POLICY_VERSION = "2026.12.1"


def make_decisions(n: int, *, start: int = 0, run_id: str = "run-1", policy_version: str = POLICY_VERSION):
    import numpy as np
    import pandas as pd

    events = [f"ev-{i:06d}" for i in range(start, start + n)]
    decision = np.array(["approve", "review", "decline"], dtype=object)[np.arange(n) % 3]
    return pd.DataFrame({
        "decision_id": audit.decision_ids(events, policy_version),
        "event_id": events,
        "account_id": [f"acc-{i % 7}" for i in range(n)],
        "merchant_id": "m-1",
        "event_time": pd.Timestamp("2026-11-30T12:00:00Z") + pd.to_timedelta(np.arange(n), unit="s"),
        "decided_at": pd.Timestamp("2026-12-01T09:00:00Z"),
        "run_id": run_id,
        "decision": decision,
        # lists as the graph's parquet round trip returns them (numpy arrays of strings)
        "reason_codes": [np.array([f"band_{d}"], dtype=object) for d in decision],
        "score": np.linspace(0.0, 1.0, n),
        "model_name": "decisionflow-risk",
        "model_version": "3",
        "model_run_id": "0123abcd",
        "features": json.dumps({"amount": 10.0, "txn_count_1h": 1}),
        "similar_cases": [json.dumps([{"case_id": "c1", "note_id": "n1", "event_id": "ev-x", "outcome": "fraud",
                                       "score": 0.03, "created_at": "2026-11-01T00:00:00+00:00"}])
                          if d != "approve" else audit.not_searched() for d in decision],
        "policy_name": "transaction_risk",
        "policy_version": policy_version,
        "escalated": decision == "review",
        "brain": "policy",
        "rationale": [f"score band {d}" for d in decision],
        "actions": [np.array([], dtype=object) if d == "approve" else
                    np.array(["notify_customer"] if d == "review" else ["block_card", "notify_customer"],
                             dtype=object) for d in decision],
        "band": decision,  # extra column: ignored by the audit
    })
