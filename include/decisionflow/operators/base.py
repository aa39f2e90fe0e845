"""The one place where the platform's errors become Airflow task outcomes.

Every decisionflow operator derives from :class:`DecisionflowOperatorMixin` (before its Airflow base class). The
mixin wraps the ``execute`` (and ``execute_complete``) each subclass defines, so that, whatever the operator:

* a :class:`~decisionflow.exceptions.NotReadyError` (or an error with ``not_ready = True``: a fresh platform,
  nothing built yet) becomes ``AirflowSkipException`` with its message -- a skipped task, not a red one;
* a :class:`~decisionflow.exceptions.NonRetryableError` (it fails the same way on every try) becomes
  ``AirflowFailException``: the task fails at once, no retries burnt;
* any failure is logged as one line naming layer, cause and remedy (``FAILED [layer] cause -- remedy: ...``,
  from :func:`~decisionflow.exceptions.describe_failure`); a retryable error is re-raised as it is, so Airflow's
  retries apply.

Cheap to import (no Airflow import at module level beyond what a DAG file already has).
"""

from __future__ import annotations

import functools
from typing import Any

from decisionflow.exceptions import NotReadyError, describe_failure, is_non_retryable

#: Methods of a subclass that are wrapped (``execute_complete`` is where a deferred operator resumes).
WRAPPED_METHODS = ("execute", "execute_complete")

_PASS_THROUGH = ("AirflowSkipException", "TaskDeferred", "AirflowRescheduleException", "DagRunTriggerException",
                 "DownstreamTasksSkipped", "AirflowTaskTerminated", "AirflowSensorTimeout")


def _is_control(exc: BaseException) -> bool:
    """Airflow's control-flow exceptions: not failures of ours, passed through untouched."""
    return any(type(e).__name__ in _PASS_THROUGH for e in type(exc).__mro__ if e is not object) and \
        type(exc).__module__.startswith("airflow")


def _is_not_ready(exc: BaseException) -> bool:
    return isinstance(exc, NotReadyError) or getattr(exc, "not_ready", False) is True


def map_failure(operator: Any, exc: Exception) -> BaseException:
    """What ``operator`` raises for ``exc``: the skip, the no-retry failure or ``exc`` itself (see the module doc).

    Logs the failure line once per exception (a nested ``super().execute`` does not log it twice).
    """
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    if _is_control(exc):
        return exc
    if _is_not_ready(exc):
        operator.log.info("not ready, skipping: %s", exc)
        return AirflowSkipException(str(exc))
    failure = describe_failure(exc, layer=getattr(operator, "layer", ""), remedy=getattr(operator, "remedy", ""))
    if not getattr(exc, "_decisionflow_logged", False):
        operator.log.error("FAILED %s%s", failure.line(), " (not retryable: no retries)" if failure.non_retryable
                           else "")
        try:
            exc._decisionflow_logged = True  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - some exception types refuse attributes
            pass
    if failure.non_retryable and not isinstance(exc, AirflowFailException) and is_non_retryable(exc):
        mapped = AirflowFailException(failure.line())
        mapped._decisionflow_logged = True  # type: ignore[attr-defined]
        return mapped
    return exc


def _wrap(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            mapped = map_failure(self, exc)
            if mapped is exc:
                raise
            raise mapped from exc

    wrapper._decisionflow_mapped = True  # type: ignore[attr-defined]
    return wrapper


class DecisionflowOperatorMixin:
    """Mixin of every decisionflow operator: errors mapped to skip / fail-without-retry, one failure line.

    Put it first among the bases (``class MyOperator(DecisionflowOperatorMixin, BaseOperator)``). Subclasses may
    set ``layer`` (e.g. ``"feast"``) and ``remedy``: they are used when the error itself names neither.

    :cvar layer: the layer named in a failure line when the error does not name one.
    :cvar remedy: the remedy named when the error does not name one.
    """

    layer: str = ""
    remedy: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in WRAPPED_METHODS:
            method = cls.__dict__.get(name)
            if callable(method) and not getattr(method, "_decisionflow_mapped", False):
                setattr(cls, name, _wrap(method))
