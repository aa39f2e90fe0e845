"""The escalation step's brains: the deterministic policy brain and a LangChain agent bound by the policy.

The decision graph's escalate node builds a :class:`CaseFile` for each escalated case (riskiest first, within the
policy's ``escalation.budget_per_run``) and asks ``brain.escalate(case, ports)`` for an :class:`Escalation`: the
decision to apply, who chose it, and everything the agent saw and said. No Airflow here
(:func:`decisionflow.hooks.llm.brain_from_connection` picks the brain from the ``llm_default`` connection).

* :class:`PolicyBrain` - no chat model: the policy's decision stands, and the audit says so (``brain = policy``).
* :class:`AgentBrain` - ``langchain.agents.create_agent`` with the case's tools
  (:mod:`decisionflow.decisions.agent_tools`), checkpointed per case on the checkpointer given
  (``thread_id = decision_id``, ``durability="sync"``).

Guardrails, in code (the prompt only explains them):

* ``recommend(decision, rationale)`` is the only way the agent states a recommendation; a decision outside
  ``policy.escalation.allowed_for(band, reason_codes)`` is refused by the tool, recorded in
  :attr:`Escalation.refused`, and unless an allowed recommendation follows, the policy's decision stands.
  Text content of the model's answers is never parsed: a "recommendation" in plain text counts for nothing.
* Event text (memo, notes) reaches the model only as quoted JSON (see :mod:`~decisionflow.decisions.agent_tools`);
  account ids, IPs and device ids are masked at the source, and ``PIIMiddleware`` (strategy ``block``) on the
  user message and every tool result is a tripwire: an unmasked id reaching the model boundary aborts the case.
  (The installed ``PIIMiddleware`` checks only the last user message and the tool results since the last AI
  message, and its ``hash`` tokens are not per-case numbered: hence masking at the source, the middleware as
  the check.) Card numbers and e-mail addresses in free text are masked by ``PIIMiddleware`` itself.
* ``ModelCallLimitMiddleware`` / ``ToolCallLimitMiddleware`` (thread limits: they hold across a resume) from
  ``policy.escalation.max_model_calls`` / ``max_tool_calls``, and a wall-clock ``case_timeout_seconds`` per
  attempt. A chat model that raises, times out, answers without a tool call or with malformed calls, a limit
  reached, a refusal not followed by an allowed recommendation, conflicting recommendations: the policy's
  decision stands, ``brain = "policy"`` (it chose the applied decision), ``accepted = False``, and
  ``fallback_reason`` says why; ``chat_model`` still names the model that was tried.

``brain`` is who chose the *applied* decision: ``agent`` only when an allowed recommendation was accepted (a
recommendation of ``review`` included: the agent chose to keep it for a person).

Durability: the agent's graph is checkpointed after every step, each tool call being its own task, so a process
killed mid-case resumes (input ``None``) after the last finished model call and tool call without repeating
them. The outcome of a case is stored on the same checkpointer in its own thread (``<decision_id>:outcome``):
``escalate()`` again for a concluded case returns the stored :class:`Escalation` without calling the model or a
tool (a retried task acts once, on the same answer).
"""

from __future__ import annotations

import contextvars
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, NotRequired  # NotRequired: the agent state's hints resolve here

from decisionflow.decisions.agent_tools import (
    SYSTEM_PROMPT,
    Masker,
    build_tools,
    case_prompt,
    json_safe,
)

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from decisionflow.decisions.graph import SimilarCaseSource
    from decisionflow.decisions.policy import Policy

__all__ = ["AGENT", "POLICY", "AgentBrain", "AgentPorts", "CaseFile", "Escalation", "PolicyBrain",
           "account_history_from_lake", "read_escalations", "write_escalations"]

log = logging.getLogger(__name__)

AGENT, POLICY = "agent", "policy"
ESCALATIONS_TABLE = "gold/escalations"
#: The agent's own reason codes, by the accepted decision (policy.reason_codes declares their texts).
AGENT_REASON_CODES = {"approve": "AGENT_APPROVED", "decline": "AGENT_DECLINED", "review": "AGENT_REVIEW"}
_MODEL_TAG = "decisionflow_model_call"  # response_metadata key marking a real model answer (vs a middleware one)
_TOOL_TAG = "decisionflow_tool_call"  # ... and a tool call the tool node answered (vs one a limit blocked)


# -- the case and its outcome --------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaseFile:
    """One escalated case, built by the decision graph's escalate node.

    :param band: the score band (approve | review | decline); :param policy_decision: what the policy decided.
    :param features: feature values, JSON-safe; :param transaction: the gold transaction's fields
        (``graph.TRANSACTION_COLUMNS``: memo, ip, device_id included - untrusted text and identifiers).
    :param similar_cases: similar cases already retrieved by the run (``None``: not searched).
    """

    decision_id: str
    event_id: str
    account_id: str
    event_time: datetime
    band: str
    policy_decision: str
    reason_codes: tuple[str, ...]
    score: float
    features: dict[str, Any] = field(default_factory=dict)
    transaction: dict[str, Any] = field(default_factory=dict)
    similar_cases: list[dict] | None = None

    @classmethod
    def from_rows(cls, decision: Mapping[str, Any], transaction: Mapping[str, Any]) -> CaseFile:
        """From a row of the graph's decisions frame (``features`` and ``similar_cases`` as JSON strings) and the
        transaction's batch row. ``similar_cases`` that is a ``{"searched": false}`` marker becomes None."""
        import pandas as pd

        features = decision.get("features") or {}
        if isinstance(features, str):
            features = json.loads(features)
        similar = decision.get("similar_cases")
        if isinstance(similar, str):
            similar = json.loads(similar)
        if not isinstance(similar, list):
            similar = None
        ts = pd.Timestamp(decision["event_time"])
        event_time = (ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")).to_pydatetime()
        return cls(decision_id=str(decision["decision_id"]), event_id=str(decision["event_id"]),
                   account_id=str(decision["account_id"]), event_time=event_time, band=str(decision["band"]),
                   policy_decision=str(decision["decision"]),
                   reason_codes=tuple(str(c) for c in decision["reason_codes"]), score=float(decision["score"]),
                   features=json_safe(dict(features)), transaction=json_safe(dict(transaction)),
                   similar_cases=similar)


@dataclass(frozen=True)
class Escalation:
    """The outcome of one escalated case (one ``gold/escalations`` row; :meth:`summary_json` for the audit).

    :param brain: who chose the applied ``decision``: ``agent`` (an allowed recommendation was accepted) or
        ``policy`` (the policy's decision stands; ``fallback_reason`` says why).
    :param chat_model: the chat model tried (None: policy brain).
    :param recommendation: the agent's accepted recommendation (None: none accepted).
    :param refused: the refused recommendations, ``{"decision", "reason"}`` each.
    :param transcript: every message, in the masked form the model saw (system prompt, user case file, AI
        messages with their tool calls, tool results).
    """

    decision_id: str
    brain: str
    chat_model: str | None
    recommendation: str | None
    decision: str
    accepted: bool
    refused: tuple[dict, ...]
    fallback_reason: str | None
    rationale: str
    model_calls: int
    tool_calls: int
    transcript: list[dict]
    started_at: datetime
    finished_at: datetime

    @property
    def reason_code(self) -> str | None:
        """``AGENT_APPROVED`` / ``AGENT_DECLINED`` / ``AGENT_REVIEW`` when the agent's answer was applied."""
        return AGENT_REASON_CODES.get(self.decision) if self.accepted else None

    def summary(self) -> dict[str, Any]:
        """The audit's ``escalation`` summary (no transcript: that is in ``gold/escalations``)."""
        return {"brain": self.brain, "chat_model": self.chat_model, "recommendation": self.recommendation,
                "accepted": self.accepted, "refused": [dict(r) for r in self.refused],
                "fallback_reason": self.fallback_reason, "model_calls": self.model_calls,
                "tool_calls": self.tool_calls}

    def summary_json(self) -> str:
        """:meth:`summary` as JSON: the value of ``gold/decisions.escalation``."""
        return json.dumps(self.summary(), sort_keys=True)

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe (timestamps ISO 8601)."""
        data = asdict(self)
        data["refused"] = [dict(r) for r in self.refused]
        data["started_at"], data["finished_at"] = self.started_at.isoformat(), self.finished_at.isoformat()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Escalation:
        values = dict(data)
        values["refused"] = tuple(dict(r) for r in values.get("refused") or ())
        values["started_at"] = datetime.fromisoformat(values["started_at"])
        values["finished_at"] = datetime.fromisoformat(values["finished_at"])
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class AgentPorts:
    """What the tools reach, built by the decision graph for its run.

    :param scorer: the run's pinned model (a frame -> scores).
    :param policy: the run's policy (``policy.escalation`` bounds the agent).
    :param similar: similar-case search (``graph.SimilarCaseSource``), used when the case has none retrieved.
    :param account_history: ``(account_id, before) -> list of dicts`` (see :func:`account_history_from_lake`).
    """

    scorer: Callable[[pd.DataFrame], np.ndarray]
    policy: Policy
    similar: SimilarCaseSource | None = None
    account_history: Callable[[str, datetime], list[dict]] | None = None


def _now() -> datetime:
    return datetime.now(timezone.utc)


# -- the policy brain ----------------------------------------------------------------------------------------
class PolicyBrain:
    """No chat model: the policy's decision stands.

    :param reason: why there is no agent (shown as ``fallback_reason``), e.g. "connection 'llm_default' is not
        defined".
    """

    name = POLICY

    def __init__(self, reason: str = "no chat model configured: the policy brain decides"):
        self.reason = reason

    def escalate(self, case: CaseFile, ports: AgentPorts | None = None) -> Escalation:  # noqa: ARG002
        now = _now()
        return Escalation(decision_id=case.decision_id, brain=POLICY, chat_model=None, recommendation=None,
                          decision=case.policy_decision, accepted=False, refused=(), fallback_reason=self.reason,
                          rationale=f"policy brain: the policy's decision stands ({case.policy_decision}, reason "
                                    f"codes {', '.join(case.reason_codes)})",
                          model_calls=0, tool_calls=0, transcript=[], started_at=now, finished_at=now)


# -- the agent brain -----------------------------------------------------------------------------------------
class CaseAborted(RuntimeError):
    """The case's wall-clock budget ran out: the agent stops at its next step."""


def _accepted(messages: Sequence[Any]) -> list[dict]:
    from langchain_core.messages import ToolMessage

    return [m.artifact for m in messages
            if isinstance(m, ToolMessage) and m.name == "recommend" and isinstance(m.artifact, dict)
            and m.artifact.get("accepted")]


def _middleware(case: CaseFile, rules: Any, cancel: threading.Event) -> list[Any]:
    from langchain.agents.middleware import (
        AgentMiddleware,
        AgentState,
        ModelCallLimitMiddleware,
        PIIMiddleware,
        ToolCallLimitMiddleware,
        hook_config,
    )
    from langchain.agents.middleware.pii import PIIMatch
    from decisionflow.decisions import agent_tools as T

    class CaseState(AgentState):
        case_started_at: NotRequired[str]

    class CaseGuard(AgentMiddleware):
        """Ends the agent once a recommendation is accepted; aborts a cancelled case; tags real model answers."""

        state_schema = CaseState

        @hook_config(can_jump_to=["end"])
        def before_model(self, state, runtime):  # noqa: ARG002
            if cancel.is_set():
                raise CaseAborted("case cancelled: wall-clock budget exceeded")
            if _accepted(state["messages"]):
                return {"jump_to": "end"}
            return None

        def wrap_model_call(self, request, handler):
            if cancel.is_set():
                raise CaseAborted("case cancelled: wall-clock budget exceeded")
            response = handler(request)
            for message in getattr(response, "result", [response]):
                if getattr(message, "type", None) == "ai":
                    message.response_metadata[_MODEL_TAG] = True
            return response

        def wrap_tool_call(self, request, handler):
            if cancel.is_set():
                raise CaseAborted("case cancelled: wall-clock budget exceeded")
            result = handler(request)
            if getattr(result, "type", None) == "tool":
                result.response_metadata[_TOOL_TAG] = True
            return result

    def detector(pattern, raw: str | None):
        def detect(content: str) -> list[PIIMatch]:
            found = [PIIMatch(type="id", value=m.group(0), start=m.start(), end=m.end())
                     for m in pattern.finditer(content)]
            if raw and raw in content:
                start = content.index(raw)
                found.append(PIIMatch(type="id", value=raw, start=start, end=start + len(raw)))
            return found
        return detect

    trip = {"strategy": "block", "apply_to_input": True, "apply_to_tool_results": True}
    scrub = {"apply_to_input": True, "apply_to_tool_results": True}
    return [
        CaseGuard(),
        # other personal data a memo may carry: LangChain's own detectors, masked in state before the model call
        PIIMiddleware("credit_card", strategy="mask", **scrub),
        PIIMiddleware("email", strategy="redact", **scrub),
        PIIMiddleware("ip", **trip),
        PIIMiddleware("account_id", detector=detector(T._ACCOUNT, case.account_id), **trip),
        PIIMiddleware("device_id", detector=detector(T._DEVICE, case.transaction.get("device_id")), **trip),
        ModelCallLimitMiddleware(thread_limit=rules.max_model_calls, exit_behavior="end"),
        ToolCallLimitMiddleware(thread_limit=rules.max_tool_calls, exit_behavior="end"),
    ]


def _outcome_graph(checkpointer: Any):
    """A one-node graph whose thread keeps a concluded case's Escalation (as a dict) on the checkpointer."""
    from typing import TypedDict

    from langgraph.graph import END, START, StateGraph

    class Outcome(TypedDict):
        escalation: dict

    graph = StateGraph(Outcome)
    graph.add_node("conclude", lambda state: {"escalation": state["escalation"]})
    graph.add_edge(START, "conclude")
    graph.add_edge("conclude", END)
    return graph.compile(checkpointer=checkpointer)


def transcript(system_prompt: str, messages: Sequence[Any]) -> list[dict]:
    """Every message as a JSON-safe dict, in the (masked) form the model saw; ``source`` tells real model answers
    and tool results from the ones a middleware injected (limit notices)."""
    out: list[dict] = [{"role": "system", "content": system_prompt}]
    for m in messages:
        entry: dict[str, Any] = {"role": {"human": "user", "ai": "assistant"}.get(m.type, m.type),
                                 "content": m.content if isinstance(m.content, str) else json_safe(m.content)}
        if m.type == "ai":
            entry["source"] = "model" if m.response_metadata.get(_MODEL_TAG) else "middleware"
            entry["tool_calls"] = [{"id": c.get("id"), "name": c.get("name"), "args": json_safe(c.get("args"))}
                                   for c in m.tool_calls]
            if m.invalid_tool_calls:
                entry["invalid_tool_calls"] = [json_safe(dict(c)) for c in m.invalid_tool_calls]
        elif m.type == "tool":
            entry.update(tool_call_id=m.tool_call_id, name=m.name, status=m.status,
                         source="tool" if m.response_metadata.get(_TOOL_TAG) else "middleware")
        out.append(entry)
    return out


class AgentBrain:
    """A LangChain agent (``create_agent``) deciding escalated cases within the policy's bounds.

    :param chat_model: any LangChain ``BaseChatModel`` supporting tool calls (``bind_tools``).
    :param checkpointer: a LangGraph checkpointer (the decision graph's ``SqliteSaver``); None until set
        (:attr:`checkpointer` is a plain attribute): an in-memory one owned by this brain is used meanwhile
        (resumable within the process only).
    :param model_name: the name recorded as ``chat_model`` (default: the model's ``model_name`` / ``model``
        attribute, else its class name).
    """

    name = AGENT

    def __init__(self, chat_model: Any, *, checkpointer: Any = None, model_name: str | None = None):
        self.chat_model = chat_model
        #: settable: the decision graph sets its own saver on a brain built without one
        self.checkpointer = checkpointer
        self._memory: Any = None
        self.model_name = model_name or str(getattr(chat_model, "model_name", None) or getattr(chat_model, "model",
                                            None) or type(chat_model).__name__)

    # -- public --------------------------------------------------------------------------------------------
    def escalate(self, case: CaseFile, ports: AgentPorts) -> Escalation:
        """The outcome of ``case``: stored if it was concluded before, else from the agent (run or resumed).

        Runs in an empty ``contextvars`` context: called from a node of the decision graph, the agent and its
        checkpoints are its own thread, never a subgraph of the caller's run.
        """
        return _in_fresh_context(self._escalate, case, ports)

    def _escalate(self, case: CaseFile, ports: AgentPorts) -> Escalation:
        outcome = _outcome_graph(self._saver())
        outcome_config = {"configurable": {"thread_id": f"{case.decision_id}:outcome"}}
        stored = outcome.get_state(outcome_config)
        if stored.values and not stored.next:
            log.info("escalation %s concluded before: returning the stored outcome", case.decision_id)
            return Escalation.from_dict(stored.values["escalation"])
        result = self._run(case, ports)
        outcome.invoke({"escalation": result.as_dict()}, outcome_config, durability="sync")
        log.info("escalation %s: brain=%s decision=%s accepted=%s model_calls=%d tool_calls=%d%s", case.decision_id,
                 result.brain, result.decision, result.accepted, result.model_calls, result.tool_calls,
                 f" fallback: {result.fallback_reason}" if result.fallback_reason else "")
        return result

    # -- internals -----------------------------------------------------------------------------------------
    def _saver(self) -> Any:
        if self.checkpointer is not None:
            return self.checkpointer
        if self._memory is None:
            from langgraph.checkpoint.memory import InMemorySaver

            self._memory = InMemorySaver()
        return self._memory

    def _run(self, case: CaseFile, ports: AgentPorts) -> Escalation:
        from langchain.agents import create_agent
        from langchain_core.messages import HumanMessage

        rules = ports.policy.escalation
        cancel = threading.Event()
        masker = Masker(case.account_id, case.transaction.get("ip"), case.transaction.get("device_id"))

        def check(name: str) -> None:
            if cancel.is_set():
                raise CaseAborted(f"case cancelled before tool {name}: wall-clock budget exceeded")

        agent = create_agent(self.chat_model, build_tools(case, ports, masker, on_tool=check),
                             system_prompt=SYSTEM_PROMPT, middleware=_middleware(case, rules, cancel),
                             checkpointer=self._saver(), name="escalation_agent")
        # every loop is a handful of steps (middleware nodes, model, tools): the call limits end it long before
        config = {"configurable": {"thread_id": case.decision_id},
                  "recursion_limit": 8 * (rules.max_model_calls + rules.max_tool_calls) + 20}
        snapshot = agent.get_state(config)
        started = _now()
        if snapshot.values and not snapshot.next:
            payload: Any = "done"
        elif snapshot.values:
            log.info("escalation %s resumes at %s", case.decision_id, list(snapshot.next))
            payload = None
        else:
            payload = {"messages": [HumanMessage(case_prompt(case, masker))], "case_started_at": started.isoformat()}
        error: BaseException | None = None
        timed_out = False
        if payload != "done":
            box: dict[str, BaseException] = {}

            def work() -> None:
                try:
                    agent.invoke(payload, config, durability="sync")
                except BaseException as exc:  # noqa: BLE001 - reported to the caller below
                    box["error"] = exc

            # a model call that hangs past the budget is left behind (daemon thread); the guard stops its agent
            # at the next step, and the outcome recorded below is the case's answer
            worker = threading.Thread(target=work, name=f"escalation-{case.decision_id}", daemon=True)
            worker.start()
            worker.join(rules.case_timeout_seconds)
            if worker.is_alive():
                cancel.set()
                timed_out = True
            error = box.get("error")
        state = agent.get_state(config)
        return self._conclude(case, ports, state, started, error, timed_out, masker)

    def _conclude(self, case: CaseFile, ports: AgentPorts, state: Any, started: datetime,
                  error: BaseException | None, timed_out: bool, masker: Masker) -> Escalation:
        rules = ports.policy.escalation
        values = state.values or {}
        messages = list(values.get("messages") or [])
        if values.get("case_started_at"):
            started = datetime.fromisoformat(values["case_started_at"])
        model_answers = [m for m in messages if m.type == "ai" and m.response_metadata.get(_MODEL_TAG)]
        injected = [m for m in messages if m.type == "ai" and not m.response_metadata.get(_MODEL_TAG)]
        tool_messages = [m for m in messages if m.type == "tool" and m.response_metadata.get(_TOOL_TAG)]
        refused = tuple({"decision": m.artifact.get("decision"), "reason": m.artifact.get("reason")}
                        for m in tool_messages if m.name == "recommend" and isinstance(m.artifact, dict)
                        and not m.artifact.get("accepted"))
        accepted = _accepted(messages)
        decisions = list(dict.fromkeys(a["decision"] for a in accepted))

        reason: str | None = None
        if timed_out:
            reason = f"case timeout: no conclusion within {rules.case_timeout_seconds:g}s (case_timeout_seconds)"
        elif error is not None:
            where = "chat model" if "model" in (state.next or ()) else ("tool" if "tools" in (state.next or ())
                                                                         else "agent")
            # masked: a PII guard's message quotes what it caught
            reason = f"{where} error: {type(error).__name__}: {masker.text(str(error))[:300]}"
        elif len(decisions) > 1:
            reason = f"conflicting recommendations {decisions}: none applied"
        elif not decisions:
            limit = next((m.content for m in injected if "limit" in str(m.content).lower()), None)
            last = model_answers[-1] if model_answers else None
            if limit:
                which = "model" if "model call" in str(limit).lower() else "tool"
                cap = rules.max_model_calls if which == "model" else rules.max_tool_calls
                reason = f"{which} call limit reached ({cap}, max_{which}_calls): {limit}"
            elif refused:
                reason = f"recommendation refused ({'; '.join(r['reason'] for r in refused)}); no allowed " \
                         "recommendation followed"
            elif last is not None and last.invalid_tool_calls:
                reason = f"the chat model returned malformed tool calls ({len(last.invalid_tool_calls)})"
            elif any(m.status == "error" for m in tool_messages):
                reason = "the chat model's tool calls failed (malformed arguments or unknown tools) and it " \
                         "stopped without recommend()"
            else:
                reason = "the chat model answered without calling recommend() (text is never taken as an answer)"

        if reason is None:
            choice = decisions[0]
            rationale = accepted[0].get("rationale") or ""
            brain, decision, recommendation, ok = AGENT, choice, choice, True
        else:
            brain, decision, recommendation, ok = POLICY, case.policy_decision, None, False
            rationale = f"agent ({self.model_name}) not applied: {reason}; the policy's decision stands " \
                        f"({case.policy_decision})"
        return Escalation(decision_id=case.decision_id, brain=brain, chat_model=self.model_name,
                          recommendation=recommendation, decision=decision, accepted=ok, refused=refused,
                          fallback_reason=reason, rationale=rationale, model_calls=len(model_answers),
                          tool_calls=len(tool_messages), transcript=transcript(SYSTEM_PROMPT, messages),
                          started_at=started, finished_at=_now())


def _in_fresh_context(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn`` in an empty contextvars context (not a child run of a graph node that called us)."""
    return contextvars.Context().run(fn, *args, **kwargs)


# -- the lake: account history, escalation rows --------------------------------------------------------------
def account_history_from_lake(lake_root: str, storage_options: dict[str, str] | None = None,
                              limit: int = 20) -> Callable[[str, datetime], list[dict]]:
    """``history(account_id, before)``: the account's earlier decisions (``gold/decisions``, event time before
    ``before``), newest first, at most ``limit``, each with the latest label known before ``before``
    (``silver/labels``, by ``labelled_at``) and a review answer given before it. Tables are opened once, on first
    use; a missing table reads as no history."""
    import pandas as pd

    from decisionflow.decisions import _delta
    from decisionflow.lakehouse.tables import table as declared

    decisions_spec, labels_spec = declared("gold/decisions"), declared("silver/labels")
    opened: dict[str, Any] = {}

    def table(spec):
        if spec.name not in opened:
            opened[spec.name] = _delta.open_table(spec, lake_root, storage_options)
        return opened[spec.name]

    def history(account_id: str, before: datetime) -> list[dict]:
        cutoff = pd.Timestamp(before)
        cutoff = cutoff.tz_localize("UTC") if cutoff.tzinfo is None else cutoff.tz_convert("UTC")
        dt = table(decisions_spec)
        if dt is None:
            return []
        wanted = ["event_id", "event_time", "decision", "score", "reason_codes"]
        have = set(decisions_spec.column_names)
        review = [c for c in ("review_decision", "reviewed_at") if c in have]
        rows = _delta.select(decisions_spec, dt, wanted + review, {"account_id": account_id}).to_pandas()
        rows = rows[pd.to_datetime(rows["event_time"], utc=True) < cutoff]
        rows = rows.sort_values("event_time", ascending=False).drop_duplicates("event_id").head(limit)
        labels: dict[str, str] = {}
        lt = table(labels_spec) if len(rows) else None
        if lt is not None:
            found = _delta.select(labels_spec, lt, ["event_id", "label", "labelled_at"],
                                  {"event_id": list(rows["event_id"])}).to_pandas()
            found = found[pd.to_datetime(found["labelled_at"], utc=True) < cutoff].sort_values("labelled_at")
            labels = dict(zip(found["event_id"], found["label"]))
        out = []
        for r in rows.to_dict("records"):
            entry = {"event_time": json_safe(r["event_time"]), "decision": r["decision"],
                     "score": round(float(r["score"]), 4), "reason_codes": list(r["reason_codes"]),
                     "label": labels.get(r["event_id"])}
            if review and r.get("review_decision") and pd.notna(r.get("reviewed_at")) \
                    and pd.Timestamp(r["reviewed_at"]) < cutoff:
                entry["review_decision"] = r["review_decision"]
            out.append(entry)
        return out

    return history


def escalation_rows(escalations: Sequence[Escalation], run_id: str, event_ids: Mapping[str, str] | Sequence[str]
                    ) -> list[dict]:
    """The ``gold/escalations`` rows of these outcomes (``event_ids``: by decision id, or in the same order)."""
    if not isinstance(event_ids, Mapping):
        ids = list(event_ids)
        if len(ids) != len(escalations):
            raise ValueError(f"{len(escalations)} escalations but {len(ids)} event ids")
        event_ids = {e.decision_id: i for e, i in zip(escalations, ids)}
    rows = []
    for e in escalations:
        if e.decision_id not in event_ids:
            raise ValueError(f"no event id for escalation of decision {e.decision_id}")
        rows.append({"decision_id": e.decision_id, "run_id": run_id, "event_id": event_ids[e.decision_id],
                     "brain": e.brain, "chat_model": e.chat_model, "recommendation": e.recommendation,
                     "applied_decision": e.decision, "accepted": bool(e.accepted),
                     "refused": json.dumps([dict(r) for r in e.refused], sort_keys=True),
                     "fallback_reason": e.fallback_reason, "model_calls": int(e.model_calls),
                     "tool_calls": int(e.tool_calls), "transcript": json.dumps(e.transcript, sort_keys=True),
                     "started_at": e.started_at, "finished_at": e.finished_at})
    return rows


def write_escalations(lake_root: str, escalations: Sequence[Escalation], run_id: str,
                      event_ids: Mapping[str, str] | Sequence[str],
                      storage_options: dict[str, str] | None = None) -> int:
    """MERGE the outcomes into ``gold/escalations`` by ``decision_id``, inserting only the absent ones (a retried
    write inserts nothing; a written escalation is never rewritten).

    :param lake_root: the lake root (``LakeHook().root``); ``storage_options``: delta-rs object-store options.
    :param escalations: the run's outcomes; ``run_id``: the decision run.
    :param event_ids: each escalation's event id, by decision id (a mapping) or in the same order (a sequence).
    :return: rows inserted.
    """
    import pyarrow as pa

    from decisionflow.decisions import _delta
    from decisionflow.lakehouse.tables import table as declared

    if not escalations:
        return 0
    spec = declared(ESCALATIONS_TABLE)
    schema = _delta.arrow_schema(spec)
    source = _delta.conform(pa.Table.from_pylist(escalation_rows(escalations, run_id, event_ids)), schema)
    if len(set(source["decision_id"].to_pylist())) != source.num_rows:
        raise ValueError("write_escalations: a decision id appears more than once in the batch")

    def merge(dt) -> dict[str, Any]:
        return (dt.merge(source, predicate="t.decision_id = s.decision_id", source_alias="s", target_alias="t")
                .when_not_matched_insert_all().execute())

    metrics = _delta.merge_with_retry(spec, lake_root, storage_options, merge, what="MERGE of escalations")
    inserted = int(metrics.get("num_target_rows_inserted", 0))
    log.info("%s: %d of %d escalations inserted", spec.name, inserted, source.num_rows)
    return inserted


def read_escalations(lake_root: str, run_id: str | None = None, storage_options: dict[str, str] | None = None
                     ) -> pd.DataFrame:
    """``gold/escalations`` rows (of ``run_id``) as a DataFrame; empty when the table does not exist yet."""
    from decisionflow.decisions import _delta
    from decisionflow.lakehouse.tables import table as declared

    spec = declared(ESCALATIONS_TABLE)
    dt = _delta.open_table(spec, lake_root, storage_options)
    if dt is None:
        return _delta.arrow_schema(spec).empty_table().to_pandas()
    return _delta.select(spec, dt, list(spec.column_names), {"run_id": run_id} if run_id else None).to_pandas()
