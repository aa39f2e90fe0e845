"""Operators of the ``platform_check`` DAG: each layer proves itself through its own hook."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from decisionflow.operators.base import DecisionflowOperatorMixin

if TYPE_CHECKING:
    from airflow.sdk import Context


def _import_hook(path: str):
    import importlib

    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"hook_class {path!r} cannot be imported: {exc}") from exc


class LayerCheckOperator(DecisionflowOperatorMixin, BaseOperator):
    """
    Run one layer's end-to-end self-check (``platform_check()`` of a decisionflow hook).

    On failure the task log carries three lines on-call can act on -- the layer, the cause and the remedy --
    and the task fails (so Airflow's retries apply). On success the check's summary is returned as XCom.

    :param hook_class: dotted path of a :class:`~decisionflow.hooks.base.CheckableHook` subclass,
        e.g. ``"decisionflow.hooks.mlflow.MlflowHook"``.
    :param conn_id: connection the hook uses; ``None`` means the hook's ``default_conn_name``.
    :param hook_kwargs: extra keyword arguments for the hook's constructor.
    """

    template_fields: Sequence[str] = ("conn_id", "hook_kwargs")
    ui_color = "#e8f4ea"

    def __init__(
        self,
        *,
        hook_class: str,
        conn_id: str | None = None,
        hook_kwargs: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.hook_class = hook_class
        self.conn_id = conn_id
        self.hook_kwargs = hook_kwargs or {}

    def _hook(self):
        cls = _import_hook(self.hook_class)
        kwargs = dict(self.hook_kwargs)
        if self.conn_id:
            kwargs[cls.conn_name_attr] = self.conn_id
        return cls(**kwargs)

    def execute(self, context: Context) -> dict[str, Any]:
        from decisionflow.hooks.base import LayerCheckError

        hook = self._hook()
        try:
            summary = hook.platform_check()
        except LayerCheckError as exc:
            self._log_failure(exc.layer, exc.cause, exc.remedy)
            raise
        except Exception as exc:
            error = LayerCheckError(hook.layer, f"{type(exc).__name__}: {exc}", hook.remedy)
            self._log_failure(error.layer, error.cause, error.remedy)
            raise error from exc
        self.log.info("[%s] OK: %s", hook.layer, summary)
        return summary

    def _log_failure(self, layer: str, cause: str, remedy: str) -> None:
        self.log.error("PLATFORM CHECK FAILED\n  layer:  %s\n  cause:  %s\n  remedy: %s", layer, cause, remedy)


def layer_failure_callback(layer: str, remedy: str):
    """``on_failure_callback`` for tasks that are not LayerCheckOperators (e.g. a spark-submit job)."""

    def _callback(context) -> None:
        exception = context.get("exception")
        context["ti"].log.error(
            "PLATFORM CHECK FAILED\n  layer:  %s\n  cause:  %s\n  remedy: %s", layer, exception, remedy
        )

    return _callback


#: The Airflow Variable that makes the on-call drill fail (anything but "false", "0", "no" or "off": fail).
DRILL_VARIABLE = "oncall_drill_fail"


class OnCallDrillOperator(DecisionflowOperatorMixin, BaseOperator):
    """
    Fail on purpose, for on-call to practise: the failure alert (webhook + ``platform-alerts``) and
    ``decisionflow retry``. While the Airflow Variable ``oncall_drill_fail`` is true (the default when it is unset)
    the task fails with a :class:`~decisionflow.exceptions.NonRetryableError` (so at once, no retries): its alert
    says layer ``drill``, the cause and the remedy. Set the Variable to ``false`` and ``decisionflow retry`` the
    run: the task and its downstream run again and succeed.

    :param variable: the Variable read at run time. Defaults to ``oncall_drill_fail``.
    """

    layer = "drill"
    ui_color = "#fbe3e3"

    def __init__(self, *, variable: str = DRILL_VARIABLE, **kwargs) -> None:
        super().__init__(**kwargs)
        if not variable:
            raise ValueError("variable: give the name of the Airflow Variable that makes the drill fail")
        self.variable = variable

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow.sdk import Variable

        from decisionflow.exceptions import NonRetryableError

        value = str(Variable.get(self.variable, default="true")).strip().lower()
        if value not in ("false", "0", "no", "off"):
            error = NonRetryableError(f"[drill] failed on purpose: Variable {self.variable} is {value!r} -- remedy: "
                                      f"set Variable {self.variable} to false, then `decisionflow retry "
                                      f"{context['dag'].dag_id} {context['run_id']} --yes`")
            raise error
        self.log.info("Variable %s is %r: the drill passes", self.variable, value)
        return {"variable": self.variable, "value": value}

