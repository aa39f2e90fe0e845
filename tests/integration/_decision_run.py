"""A whole decision run with the scripted escalation agent, in a process of its own (killed with SIGKILL, rerun).

    python _decision_run.py <work dir> [--kill-model-at N]

The work dir holds ``model.pkl`` (the fitted model and its PinnedModel), the lake (``lake/``, gold written by the
test) and gets ``checkpoints.sqlite``, ``counts.txt`` and ``delivered.txt``. Every chat-model call writes
``model <position>`` to the count file as it starts, every tool execution ``tool <decision_id> <name> start|end``;
the one delivery channel appends each decision id it sends to ``delivered.txt`` (and marks it sent in the outbox).
``--kill-model-at N`` SIGKILLs the process as the first case's model call at position N starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: scripted_chat

from scripted_chat import append_line, call, count_tool_calls, say, scripted  # noqa: E402

from decisionflow.decisions.agent import AgentBrain  # noqa: E402
from decisionflow.decisions.graph import DecisionContext, InMemoryModelSource, run_decisions, sqlite_checkpointer  # noqa: E402
from decisionflow.decisions.policy import Policy  # noqa: E402

SCRIPT = [
    say(call("get_features")),
    say(call("account_history"), call("policy_check")),
    say(call("recommend", decision="review", rationale="mixed signals: a person should look")),
]
BUDGET = 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work")
    parser.add_argument("--kill-model-at", type=int)
    args = parser.parse_args()
    work = Path(args.work)
    counts, delivered = work / "counts.txt", work / "delivered.txt"

    count_tool_calls(counts, per_case=True)

    def deliver(outbox):
        pending = outbox.pending(channel="kafka")
        for decision_id in pending["decision_id"]:
            append_line(delivered, decision_id)
        if len(pending):
            outbox.mark_sent(pending["decision_id"].tolist(), "kafka")
        return {"sent": len(pending)}

    model, pinned = pickle.loads((work / "model.pkl").read_bytes())
    policy = Policy.load()
    policy = dataclasses.replace(policy, escalation=dataclasses.replace(policy.escalation, budget_per_run=BUDGET))
    brain = AgentBrain(scripted(SCRIPT, count_file=str(counts), kill_at=args.kill_model_at))
    ctx = DecisionContext(run_id="run-agent", lake_root=str(work / "lake"), work_dir=work / "run", policy=policy,
                          models=InMemoryModelSource(model, pinned), deliverers=[("kafka", deliver)], brain=brain,
                          account_history=lambda account, before: [])
    with sqlite_checkpointer(work / "checkpoints.sqlite") as saver:
        state = run_decisions(ctx, saver)
    print(state["escalation"])


if __name__ == "__main__":
    main()
