"""One escalated case in a process of its own, for the durability test (killed with SIGKILL, then rerun).

    python _agent_case.py <sqlite checkpoint> <count file> <result file> [--kill-model-at N] [--kill-in-score]

Every chat-model call writes ``model <position>`` to the count file as it starts; every tool execution writes
``tool <name> start`` and ``tool <name> end``. ``--kill-model-at N`` SIGKILLs the process as the model call at
position N starts; ``--kill-in-score`` SIGKILLs it inside the ``score`` tool, once its sibling ``get_features``
(same AI message, run in parallel) has finished. The result (``Escalation.as_dict()``) goes to the result file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: scripted_chat

from scripted_chat import call, count_tool_calls, say, scripted  # noqa: E402

from decisionflow.decisions.agent import AgentBrain, AgentPorts, CaseFile  # noqa: E402
from decisionflow.decisions.graph import sqlite_checkpointer  # noqa: E402
from decisionflow.decisions.policy import Policy  # noqa: E402

SCRIPT = [
    say(call("get_features"), call("score")),
    say(call("account_history"), call("policy_check")),
    say(call("similar_cases")),
    say(call("recommend", decision="decline", rationale="prior fraud on the account and a high score")),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("counts")
    parser.add_argument("result")
    parser.add_argument("--kill-model-at", type=int)
    parser.add_argument("--kill-in-score", action="store_true")
    args = parser.parse_args()

    count_tool_calls(args.counts)

    def scorer(frame):
        if args.kill_in_score:
            deadline = time.monotonic() + 10
            while "tool get_features end" not in Path(args.counts).read_text() and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.5)  # the finished sibling's write reaches the checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
        return np.array([0.83])

    case = CaseFile(decision_id="dec-durable", event_id="ev-7", account_id="acc-000777",
                    event_time=datetime(2026, 11, 3, 12, 30, tzinfo=timezone.utc), band="review",
                    policy_decision="review", reason_codes=("SCORE_REVIEW",), score=0.61,
                    features={"amount": 250.0, "txn_count_1h": 1},
                    transaction={"event_id": "ev-7", "account_id": "acc-000777", "ip": "203.0.113.5",
                                 "device_id": "dev-0000aaaa1111bbbb", "memo": "rent", "amount": 250.0})
    ports = AgentPorts(scorer=scorer, policy=Policy.load(),
                       account_history=lambda account, before: [{"decision": "decline", "label": "fraud"}])
    model = scripted(SCRIPT, count_file=args.counts, kill_at=args.kill_model_at)
    with sqlite_checkpointer(args.checkpoint) as saver:
        result = AgentBrain(model, checkpointer=saver).escalate(case, ports)
    Path(args.result).write_text(json.dumps(result.as_dict()))


if __name__ == "__main__":
    main()
