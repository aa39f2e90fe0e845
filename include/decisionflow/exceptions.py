"""Exceptions shared across the layers (plain Python, no Airflow).

:class:`NotReadyError` is what a fresh platform raises until the loop has run once: a table not built yet, no
champion yet. It is not a failure: the operators turn it into a skip with the message (which says what to run),
so `make up` followed by the first scheduled ticks shows skipped tasks, not red ones, and nothing is decided
or trained on nothing.

:class:`NonRetryableError` is the base of every error that fails the same way on every try -- a bad training
config, a failed quality gate, an incompatible table, a malformed policy, bad DAG params. The operators turn it
into Airflow's ``AirflowFailException`` (fail at once, no retries burnt on 30-60 s Spark jobs); a Spark job that
ends on one exits with :data:`EXIT_NON_RETRYABLE` and prints :data:`NON_RETRYABLE_MARKER` so its operator does the
same. Both mappings live in :mod:`decisionflow.operators.base`.

:func:`describe_failure` turns any exception into what on-call needs in one line: the layer, the cause and the
remedy (:class:`Failure`), used by the operators' failure line and the failure notifier.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

#: Exit code of a Spark application (``decisionflow.jobs``) that failed on a :class:`NonRetryableError`.
EXIT_NON_RETRYABLE = 3
#: Line prefix a Spark application prints (followed by a JSON object: layer, cause, remedy) when it failed on a
#: :class:`NonRetryableError`; the Spark operator reads it from spark-submit's output.
NON_RETRYABLE_MARKER = "DECISIONFLOW-NON-RETRYABLE:"


class NotReadyError(RuntimeError):
    """The input of this step does not exist yet (a fresh platform); the message names it and what builds it."""


class NonRetryableError(Exception):
    """An error that fails the same way on every try: retrying it only burns time.

    Subclasses keep their own names, constructors and messages; they may set ``layer`` and ``remedy`` (as class
    attributes or per instance) for the failure line and the alert. A subclass that also derives from a built-in
    (``ValueError``, ``RuntimeError``) keeps being caught as such.
    """

    layer: str = ""
    remedy: str = ""


#: ``[layer] cause -- remedy: remedy``: the message convention of the platform's errors.
_LINE = re.compile(r"^\s*\[(?P<layer>[\w .:/-]{1,40})\]\s*(?P<cause>.*?)(?:\s*(?:--|;)\s*remedy:\s*(?P<remedy>.*))?$",
                   re.DOTALL)
_REMEDY = re.compile(r"^(?P<cause>.*?)\s*(?:--|;)\s*remedy:\s*(?P<remedy>.*)$", re.DOTALL)

#: Layer of an error by the package it is defined in (``decisionflow.<package>``), when it names none itself.
_LAYER_BY_PACKAGE = {
    "lakehouse": "lakehouse", "jobs": "spark", "spark": "spark", "features": "feast", "models": "mlflow",
    "decisions": "decisions", "vectors": "milvus", "contracts": "contracts", "rollout": "serving",
    "serving": "serving", "risk": "kafka", "settings": "settings",
}
_LAYER_BY_HOOK = {"kafka": "kafka", "lake": "lake", "mlflow": "mlflow", "feast": "feast", "milvus": "milvus",
                  "ray": "ray", "ray_serve": "serving", "llm": "llm"}

#: What to do when the error names no remedy of its own.
REMEDY_NON_RETRYABLE = ("it fails the same way on every try (not retried): fix what the cause names (input data, "
                        "config, params or code), then `decisionflow retry <dag_id> <run_id>`")
REMEDY_RETRYABLE = ("if retries do not clear it, check the layer (`decisionflow status`, `decisionflow logs "
                    "<component>`), fix it, then `decisionflow retry <dag_id> <run_id>`")


@dataclass(frozen=True)
class Failure:
    """A failure as on-call reads it: ``[layer] cause -- remedy: remedy``."""

    layer: str
    cause: str
    remedy: str
    non_retryable: bool = False
    error_type: str = ""

    def line(self) -> str:
        """The one line: ``[layer] cause -- remedy: remedy``."""
        return f"[{self.layer}] {self.cause} -- remedy: {self.remedy}"

    def as_dict(self) -> dict:
        return asdict(self)


def _chain(exc: BaseException):
    """``exc``, then its causes (``raise ... from``) and contexts, without loops."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _layer_of_module(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == "decisionflow":
        if parts[1] in ("hooks", "operators") and len(parts) >= 3:
            return _LAYER_BY_HOOK.get(parts[2], parts[2])
        return _LAYER_BY_PACKAGE.get(parts[1], parts[1])
    return ""


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_non_retryable(exc: BaseException | None) -> bool:
    """``exc`` or one of its causes is a :class:`NonRetryableError` (or an ``AirflowFailException``)."""
    if exc is None:
        return False
    return any(isinstance(e, NonRetryableError) or type(e).__name__ == "AirflowFailException" for e in _chain(exc))


def describe_failure(exc: BaseException | str | None, *, layer: str = "", remedy: str = "") -> Failure:
    """Layer, cause and remedy of a failure, from the most telling exception of ``exc``'s chain.

    Looked for, in order: ``layer``/``cause``/``remedy`` attributes (``DecisionRunError``, ``LayerCheckError``,
    a :class:`NonRetryableError` subclass), the ``[layer] cause -- remedy: ...`` message convention, the package
    the error comes from; then the ``layer``/``remedy`` given (e.g. the failed operator's), then a default remedy
    by whether it is retryable. Never raises.

    :param exc: the exception (``context["exception"]`` of a failure callback), a message, or ``None``.
    :param layer: the layer to use when the exception names none (e.g. from the operator).
    :param remedy: the remedy to use when the exception names none.
    """
    if exc is None or isinstance(exc, str):
        text = _one_line(exc or "the task failed without an exception (killed, timed out or lost its worker)")
        match = _LINE.match(text)
        if match:
            return Failure(match["layer"].strip(), match["cause"].strip(),
                           (match["remedy"] or remedy or REMEDY_RETRYABLE).strip())
        return Failure(layer or "airflow", text, remedy or REMEDY_RETRYABLE)
    try:
        chain = list(_chain(exc))
        non_retryable = is_non_retryable(exc)
        # the innermost error of ours says most; an Airflow wrapper (AirflowFailException) says least
        ours = [e for e in chain if type(e).__module__.startswith("decisionflow")]
        best = next((e for e in ours if getattr(e, "remedy", "") and getattr(e, "layer", "")), None)
        best = best or next((e for e in [*ours, *chain] if _LINE.match(str(e)) and _LINE.match(str(e))["remedy"]), None)
        best = best or (ours[-1] if ours else chain[0])
        found_layer = str(getattr(best, "layer", "") or "")
        found_remedy = str(getattr(best, "remedy", "") or "")
        cause = str(getattr(best, "cause", "") or "") if found_layer else ""
        text = _one_line(str(best)) or type(best).__name__
        match = _LINE.match(text)
        if match and not cause:
            found_layer = found_layer or match["layer"].strip()
            cause = match["cause"].strip()
            found_remedy = found_remedy or (match["remedy"] or "").strip()
        elif not cause:
            tail = _REMEDY.match(text)
            cause, found_remedy = ((tail["cause"], found_remedy or tail["remedy"]) if tail else (text, found_remedy))
            if not type(best).__module__.startswith("decisionflow") and type(best).__name__ not in cause:
                cause = f"{type(best).__name__}: {cause}"
        cause = _one_line(cause)
        found_layer = found_layer or _layer_of_module(type(best).__module__) or layer or "airflow"
        default = REMEDY_NON_RETRYABLE if non_retryable else REMEDY_RETRYABLE
        return Failure(found_layer, cause, _one_line(found_remedy or remedy or default), non_retryable,
                       f"{type(best).__module__}.{type(best).__qualname__}")
    except Exception as oops:  # noqa: BLE001 - describing a failure must never fail
        return Failure(layer or "airflow", _one_line(f"{type(exc).__name__}: {exc} (describe: {oops})"),
                       remedy or REMEDY_RETRYABLE)


def non_retryable_marker(failure: Failure) -> str:
    """The line a Spark application prints when it ends on a :class:`NonRetryableError`."""
    return NON_RETRYABLE_MARKER + " " + json.dumps({"layer": failure.layer, "cause": failure.cause,
                                                    "remedy": failure.remedy}, sort_keys=True)


def parse_non_retryable_marker(line: str) -> Failure | None:
    """The :class:`Failure` of a marker line (anywhere in ``line``), or ``None`` when it is not one."""
    at = line.find(NON_RETRYABLE_MARKER)
    if at < 0:
        return None
    try:
        data = json.loads(line[at + len(NON_RETRYABLE_MARKER):].strip())
        return Failure(str(data["layer"]), str(data["cause"]), str(data["remedy"]), True)
    except (ValueError, KeyError, TypeError):
        return Failure("spark", _one_line(line[at:]), REMEDY_NON_RETRYABLE, True)


class ParamsError(NonRetryableError, ValueError):
    """A DAG param or templated operator argument that cannot be used; the message names the field and the value."""

    layer = "params"
    remedy = "trigger the DAG again with a valid value (Trigger DAG w/ config), or fix the DAG file"
