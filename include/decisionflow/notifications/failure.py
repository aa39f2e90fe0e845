"""The shared failure notifier: a failed task's alert, in one line naming layer, cause and remedy, to on-call.

Every decisionflow DAG gets it by default through :func:`failure_alerts` (its ``default_args``)::

    default_args=failure_alerts({"retries": 2, "owner": "data-platform"})

The alert (:func:`build_alert`) is one JSON object:

.. code-block:: json

    {"kind": "task_failed", "alert_id": "build_lakehouse/gold/<run_id>/-1/1", "dag_id": "build_lakehouse",
     "task_id": "gold", "map_index": -1, "run_id": "...", "try_number": 1, "max_tries": 3,
     "layer": "lakehouse", "cause": "quality gate failed: table gold/...", "remedy": "...",
     "retryable": false, "error_type": "...", "log_url": "http://127.0.0.1:8080/dags/.../tasks/gold?try_number=1",
     "retry_command": "decisionflow retry build_lakehouse <run_id>", "failed_at": "2026-12-01T20:00:00+00:00",
     "line": "build_lakehouse.gold failed (try 1/3, run ...): [lakehouse] ... -- remedy: ... -- log: http://..."}

``max_tries`` is the tries allowed (the task's retries + 1); ``retryable`` false means the error fails the same way
every time (a ``NonRetryableError``: not retried). It goes to two channels, each optional and each bounded by
``timeout``:

* the webhook of an HTTP connection (``alerts_webhook``: host/port/schema or a URL in ``host``, extra
  ``endpoint`` (default ``alerts``) and ``headers``, ``password`` a bearer token), ``POST`` with the alert as body
  and ``Idempotency-Key: <alert_id>``; no connection: the channel is off (logged);
* the Kafka topic ``platform-alerts`` through :class:`~decisionflow.hooks.kafka.KafkaHook` (created when missing,
  keyed by ``dag_id``).

A notifier failure never masks the task failure: each channel's error is logged and swallowed. Nothing heavy is
imported at module level (the hooks and httpx are imported when an alert is sent), so DAG files parse fast.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from airflow.sdk import BaseNotifier

from decisionflow import constants
from decisionflow.exceptions import describe_failure, is_non_retryable

#: Partitions of a new ``platform-alerts`` topic (alerts are keyed by DAG id).
ALERTS_TOPIC_PARTITIONS = 1
#: Retention of a new ``platform-alerts`` topic: 14 days.
ALERTS_RETENTION_MS = 14 * 24 * 3600 * 1000


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    try:
        return getattr(obj, name, default)
    except Exception:  # noqa: BLE001 - a property that needs a live supervisor (log_url, ...) may raise
        return default


def _task_layer(task: Any) -> str:
    """The failed operator's ``layer`` (or, for any other operator, the one of its module)."""
    layer = _get(task, "layer", "") or ""
    if layer:
        return str(layer)
    module = type(task).__module__ if task is not None else ""
    parts = module.split(".")
    return parts[2] if len(parts) >= 3 and parts[:2] == ["decisionflow", "operators"] else ""


def build_alert(context: Mapping[str, Any], *, layer: str = "", remedy: str = "") -> dict[str, Any]:
    """The alert of a failed task from its Airflow context (``ti``, ``dag_run``/``run_id``, ``exception``).

    :param context: the failure callback's context.
    :param layer: layer to name when neither the error nor the operator names one.
    :param remedy: remedy to name when the error names none.
    """
    ti = context.get("ti") or context.get("task_instance")
    task = context.get("task") or _get(ti, "task")
    dag = context.get("dag")
    dag_id = str(_get(ti, "dag_id") or _get(dag, "dag_id") or "?")
    task_id = str(_get(ti, "task_id") or _get(task, "task_id") or "?")
    run_id = str(context.get("run_id") or _get(ti, "run_id") or _get(context.get("dag_run"), "run_id") or "?")
    map_index = _get(ti, "map_index", -1)
    map_index = -1 if map_index is None else int(map_index)
    try_number = int(_get(ti, "try_number", 0) or 0)
    # Airflow's ti.max_tries counts the retries: the tries allowed are one more
    retries = _get(ti, "max_tries", None)
    if retries in (None, 0):
        retries = _get(task, "retries", None)
    max_tries = (int(retries) + 1) if isinstance(retries, int) else None
    exception = context.get("exception")
    failure = describe_failure(exception, layer=layer or _task_layer(task), remedy=remedy)
    retryable = not (failure.non_retryable or is_non_retryable(exception if isinstance(exception, BaseException)
                                                                else None))
    log_url = str(_get(ti, "log_url", "") or "")
    where = f"{dag_id}.{task_id}" + (f"[{map_index}]" if map_index >= 0 else "")
    tries = f"try {try_number}/{max_tries}" if max_tries else f"try {try_number}"
    line = f"{where} failed ({tries}, run {run_id}): {failure.line()}" + (f" -- log: {log_url}" if log_url else "")
    return {
        "kind": "task_failed",
        "alert_id": f"{dag_id}/{task_id}/{run_id}/{map_index}/{try_number}",
        "dag_id": dag_id, "task_id": task_id, "map_index": map_index, "run_id": run_id,
        "try_number": try_number, "max_tries": max_tries,
        "layer": failure.layer, "cause": failure.cause, "remedy": failure.remedy, "retryable": retryable,
        "error_type": failure.error_type, "log_url": log_url,
        "retry_command": f"decisionflow retry {dag_id} {run_id}",
        "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "line": line,
    }


class FailureNotifier(BaseNotifier):
    """
    Send a failed task's alert -- dag_id, task_id, run_id, try, layer, cause, remedy, log URL, in one ``line`` and
    as fields -- to a webhook and to the Kafka topic ``platform-alerts`` (see the module doc for the format).

    Use it as ``on_failure_callback`` (every decisionflow DAG has it through :func:`failure_alerts`). It never
    raises: a channel that fails is logged (with the alert line, so the task log still has it) and skipped.

    :param webhook_conn_id: HTTP connection of the alerts webhook (``host`` a URL, or host/port/schema; extra
        ``endpoint``, default ``alerts``, and ``headers``; ``password`` a bearer token). When it does not exist,
        the webhook channel is off. ``None``: off. Defaults to ``alerts_webhook``.
    :param kafka_conn_id: ``kafka`` connection of the alerts topic; ``None``: the Kafka channel is off. Defaults to
        ``kafka_default``.
    :param topic: Kafka topic of the alerts (created with one partition and 14 days' retention when missing).
        Defaults to ``platform-alerts``.
    :param layer: layer named when neither the error nor the failed operator names one (e.g. for a
        ``@task`` function or a provider operator).
    :param remedy: remedy named when the error names none.
    :param timeout: seconds each channel may take (broker metadata and acknowledgement, HTTP request).
    """

    template_fields: Sequence[str] = ()

    def __init__(self, *, webhook_conn_id: str | None = constants.ALERTS_WEBHOOK_CONN_ID,
                 kafka_conn_id: str | None = "kafka_default", topic: str = constants.ALERTS_TOPIC,
                 layer: str = "", remedy: str = "", timeout: float = 10.0) -> None:
        super().__init__()
        if not topic:
            raise ValueError("FailureNotifier: topic must be a non-empty Kafka topic name")
        if timeout <= 0:
            raise ValueError(f"FailureNotifier: timeout must be > 0 seconds, got {timeout}")
        self.webhook_conn_id = webhook_conn_id
        self.kafka_conn_id = kafka_conn_id
        self.topic = topic
        self.layer = layer
        self.remedy = remedy
        self.timeout = float(timeout)

    # -- BaseNotifier ------------------------------------------------------------------------------------------
    def __call__(self, *args) -> None:
        """Send the alert; never raises (BaseNotifier's own ``__call__`` re-raises a notifier error)."""
        try:
            super().__call__(*args)
        except Exception as exc:  # noqa: BLE001 - a notifier failure must never mask the task failure
            self.log.error("failure notifier: could not send the alert: %s: %s", type(exc).__name__, exc)

    def notify(self, context) -> None:
        alert = build_alert(context, layer=self.layer, remedy=self.remedy)
        self.log.error("ALERT %s", alert["line"])
        delivered = self.send(alert)
        self.log.info("alert %s delivered to %s", alert["alert_id"], delivered or "no channel")

    # -- channels ----------------------------------------------------------------------------------------------
    def send(self, alert: Mapping[str, Any]) -> dict[str, Any]:
        """Send ``alert`` to every configured channel; what each answered (a failed channel is logged, absent)."""
        delivered: dict[str, Any] = {}
        for name, channel in (("webhook", self._send_webhook), ("kafka", self._send_kafka)):
            try:
                result = channel(alert)
            except Exception as exc:  # noqa: BLE001 - one channel down must not stop the other
                self.log.error("failure notifier: %s channel failed (%s: %s); the alert was: %s", name,
                               type(exc).__name__, exc, alert.get("line"))
                continue
            if result is not None:
                delivered[name] = result
        return delivered

    def _send_webhook(self, alert: Mapping[str, Any]) -> dict[str, Any] | None:
        if not self.webhook_conn_id:
            return None
        from decisionflow.hooks.webhook import webhook_url

        url, headers = webhook_url(self.webhook_conn_id, self.log, endpoint="alerts")
        if url is None:
            return None
        import httpx

        body = json.dumps(alert, default=str).encode()
        headers = {**headers, "Content-Type": "application/json", "Idempotency-Key": str(alert["alert_id"])}
        last: Exception | None = None
        for _ in range(2):  # one retry: the same key, so the receiver applies it once
            try:
                response = httpx.post(url, content=body, headers=headers, timeout=self.timeout)
            except httpx.HTTPError as exc:
                last = exc
                continue
            if response.status_code < 300:
                return {"url": url, "status": response.status_code}
            last = RuntimeError(f"POST {url} -> {response.status_code}: {response.text[:200]}")
            if response.status_code < 500:
                break
        raise last or RuntimeError(f"POST {url} failed")

    def _send_kafka(self, alert: Mapping[str, Any]) -> dict[str, Any] | None:
        if not self.kafka_conn_id:
            return None
        from decisionflow.hooks.kafka import KafkaHook

        hook = KafkaHook(kafka_config_id=self.kafka_conn_id, client_id="decisionflow-alerts")
        hook.ensure_topic(self.topic, ALERTS_TOPIC_PARTITIONS, retention_ms=ALERTS_RETENTION_MS, timeout=self.timeout)
        return hook.send(self.topic, json.dumps(alert, default=str).encode(), key=str(alert["dag_id"]).encode(),
                         headers={"kind": str(alert.get("kind", "task_failed"))}, timeout=self.timeout)


def failure_alerts(default_args: Mapping[str, Any] | None = None, **notifier_kwargs: Any) -> dict[str, Any]:
    """``default_args`` with a :class:`FailureNotifier` added to ``on_failure_callback`` (kept callbacks first).

    :param default_args: the DAG's default arguments.
    :param notifier_kwargs: arguments of the :class:`FailureNotifier` (``webhook_conn_id``, ``topic``...).
    """
    args = dict(default_args or {})
    existing = args.get("on_failure_callback")
    callbacks = list(existing) if isinstance(existing, list | tuple) else ([existing] if existing else [])
    if not any(isinstance(cb, FailureNotifier) for cb in callbacks):
        callbacks.append(FailureNotifier(**notifier_kwargs))
    args["on_failure_callback"] = callbacks
    return args
