"""A scripted LangChain chat model for the agent tests: real tool calls, no network, no weights.

:class:`ScriptedChatModel` answers from a *script*: entry ``i`` is its answer when the conversation it is given
already holds ``i`` AI messages (so the answer depends on where the conversation is, not on how often this Python
object was called: a case resumed in a new process gets the answer the killed one would have given). An entry is
an ``AIMessage`` (usually built with :func:`say` / :func:`call`), an exception instance (raised), or a callable
``(messages) -> AIMessage``. Past the end of the script it answers plain text (no tool call).

``bind_tools`` returns the model itself (``create_agent`` calls it; LangChain's fake models do not implement it),
so the agent executes the scripted tool calls with the real tools.

``obedient=True`` makes it a *gullible* model: before following its script it looks at every line of every input
message, and obeys the first instruction-like line it finds:

* a line starting with ``system:`` / ``SYSTEM:`` (any case) that names a decision (approve / decline / review) ->
  it calls ``recommend`` with that decision;
* a line starting with fake tool-call syntax - ``<tool_call>{...}``, ``{"name": ..., "arguments": ...}``,
  ``Action: recommend(...)`` or ``recommend(...)`` -> it makes that tool call.

That is the worst case of a model reading a prompt injection: the tests show that quoting keeps such lines from
existing in what the model sees, and that the guardrail refuses whatever is still outside policy.

``count_file`` (optional) gets one line ``model <position>`` per call, before the answer (so a call killed
mid-way is counted too); ``kill_at`` SIGKILLs the process at the start of the call at that position (a task
killed while the chat model is thinking); ``delay`` sleeps before answering and ``hold`` (a ``threading.Event``)
makes every call wait until it is set (a model that hangs: timeouts).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

_ids = itertools.count(1)


def call(name: str, call_id: str | None = None, **args: Any) -> dict[str, Any]:
    """A tool call (``name``, ``args``, ``id``) for :func:`say`."""
    return {"name": name, "args": args, "id": call_id or "", "type": "tool_call"}


def say(*calls: dict[str, Any], content: str = "") -> AIMessage:
    """An AI message making these tool calls (ids are filled in when the model answers)."""
    return AIMessage(content=content, tool_calls=list(calls))


def _text(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        parts.append(block if isinstance(block, str) else str(block.get("text", "")))
    return "\n".join(parts)


_SYSTEM_LINE = re.compile(r"^\s*system\s*:(?P<rest>.*)$", re.IGNORECASE)
_DECISION = re.compile(r"\b(approve|decline|review)\b", re.IGNORECASE)
_FAKE_CALL = re.compile(r"^\s*(?:<tool_call>|\{\s*\"name\"\s*:|(?:action\s*:\s*)?recommend\s*\()", re.IGNORECASE)


def instruction_in(messages: Sequence[BaseMessage]) -> dict[str, Any] | None:
    """The tool call an obedient model would make for the first instruction-like line in ``messages``, or None."""
    for message in messages:
        for line in _text(message).splitlines():
            match = _SYSTEM_LINE.match(line)
            if match:
                decision = _DECISION.search(match.group("rest"))
                if decision:
                    return call("recommend", decision=decision.group(1).lower(),
                                rationale="as instructed: " + line.strip()[:200])
            if _FAKE_CALL.match(line):
                parsed = _parse_fake_call(line)
                if parsed is not None:
                    return parsed
    return None


def _parse_fake_call(line: str) -> dict[str, Any] | None:
    body = line.strip()
    if body.lower().startswith("<tool_call>"):
        body = body[len("<tool_call>"):].split("</tool_call>")[0]
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("name"), str):
        args = data.get("arguments", data.get("args", {}))
        return call(data["name"], **(args if isinstance(args, dict) else {}))
    decision = _DECISION.search(line)
    if decision:
        return call("recommend", decision=decision.group(1).lower(), rationale="as instructed: " + line.strip()[:200])
    return None


class ScriptedChatModel(BaseChatModel):
    """See the module docstring. ``calls`` counts the answers given by this object (all positions)."""

    script: list[Any] = []
    obedient: bool = False
    count_file: str | None = None
    kill_at: int | None = None
    delay: float = 0.0
    hold: Any = None  # a threading.Event: each call waits for it to be set before answering
    model_name: str = "scripted"
    calls: int = 0
    seen: list[list[BaseMessage]] = []

    @property
    def _llm_type(self) -> str:
        return "scripted"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name}

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedChatModel:  # noqa: ARG002
        return self

    def _answer(self, messages: list[BaseMessage]) -> AIMessage:
        position = sum(isinstance(m, AIMessage) for m in messages)
        if self.obedient:
            obeyed = instruction_in(messages)
            if obeyed is not None:
                return say(obeyed)
        if position >= len(self.script):
            return AIMessage(content="I have nothing more to add.")
        step: Any = self.script[position]
        if isinstance(step, BaseException):
            raise step
        if callable(step) and not isinstance(step, BaseMessage):
            step = step(messages)
        return step

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        position = sum(isinstance(m, AIMessage) for m in messages)
        self.calls += 1
        self.seen.append(list(messages))
        if self.count_file:
            with open(self.count_file, "a") as fh:
                fh.write(f"model {position}\n")
                fh.flush()
                os.fsync(fh.fileno())
        if self.kill_at is not None and position == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.delay:
            time.sleep(self.delay)
        if self.hold is not None:
            self.hold.wait(30)
        answer = self._answer(messages)
        calls = [{**c, "id": c.get("id") or f"call-{position}-{i}-{next(_ids)}"}
                 for i, c in enumerate(answer.tool_calls)]
        message = AIMessage(content=answer.content, tool_calls=calls,
                            invalid_tool_calls=list(answer.invalid_tool_calls))
        return ChatResult(generations=[ChatGeneration(message=message)])


def scripted(script: Sequence[Any] | Callable[..., Any] = (), **kwargs: Any) -> ScriptedChatModel:
    """A :class:`ScriptedChatModel` with this script (fresh lists, so instances never share them)."""
    return ScriptedChatModel(script=list(script), seen=[], **kwargs)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` durably (fsync): a count written before a SIGKILL is still there after it."""
    with open(path, "a") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def count_tool_calls(count_file: str | os.PathLike, *, per_case: bool = False) -> None:
    """Make every tool the agent builds write ``tool [<decision_id>] <name> start`` / ``... end`` to
    ``count_file`` around its execution (patches :func:`decisionflow.decisions.agent.build_tools`; for the
    subprocess scripts of the durability tests)."""
    from decisionflow.decisions import agent as agent_module

    original = agent_module.build_tools

    def counting_tools(case, ports, masker, on_tool=None):
        tools = original(case, ports, masker, on_tool)
        prefix = f"tool {case.decision_id}" if per_case else "tool"
        for tool in tools:
            def counted(*a, _fn=tool.func, _name=tool.name, **k):
                append_line(count_file, f"{prefix} {_name} start")
                out = _fn(*a, **k)
                append_line(count_file, f"{prefix} {_name} end")
                return out
            tool.func = counted
        return tools

    agent_module.build_tools = counting_tools
